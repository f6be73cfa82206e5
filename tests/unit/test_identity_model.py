"""Identity's pure rules: which custom IDs are junk, which Identify rule applies, what an
operator merge does with custom IDs, and the kept answers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from services.identity.errors import (
    CustomIdConflict,
    CustomIdInvalid,
    InstallationIdInvalid,
    KeyMissing,
    MergeIntoItself,
    RequestIdInvalid,
)
from services.identity.model import (
    IdentifyOutcome,
    IdentifyResult,
    LogoutOutcome,
    LogoutResult,
    MergeResult,
    Profile,
    ProfileKey,
    answer_to_json,
    check_custom_id,
    check_installation_id,
    check_request_id,
    choose_identify_rule,
    custom_id_problem,
    identify_result_from_json,
    key_problem,
    logout_result_from_json,
    merge_result_from_json,
    plan_merge,
    split_keys,
)

JUNK = [
    "null",
    "NULL",
    "Null",
    "undefined",
    "nil",
    "none",
    "None",
    "nan",
    "NaN",
    "infinity",
    "Infinity",
    "true",
    "True",
    "false",
    "0",
    "-1",
    "anonymous",
    "Anonymous",
    "guest",
    "GUEST",
    "[object Object]",
    "[OBJECT OBJECT]",
    '"null"',
    "'null'",
    '"Undefined"',
    "'0'",
    '"[object Object]"',
]


@pytest.mark.parametrize("value", JUNK)
def test_junk_values_are_refused_in_any_case_and_quoted(value: str) -> None:
    assert custom_id_problem(value) is not None


@pytest.mark.parametrize("value", ["", " a", "a ", "\ta", "a\n", " "])
def test_empty_and_whitespace_padded_values_are_refused(value: str) -> None:
    assert custom_id_problem(value) is not None


@pytest.mark.parametrize(
    "value",
    [
        "alice",
        "user-42",
        "00",
        "1",
        "-2",
        "nullable",
        "guest1",
        "a b",
        '"alice"',
        "'null",
        "é" * 512,
    ],
)
def test_real_values_are_accepted(value: str) -> None:
    assert custom_id_problem(value) is None


def test_a_custom_id_longer_than_512_characters_is_refused_not_truncated() -> None:
    assert custom_id_problem("a" * 512) is None
    assert custom_id_problem("a" * 513) == "must be at most 512 characters"


def test_a_projects_extra_junk_is_matched_case_insensitively_and_quoted() -> None:
    assert custom_id_problem("Test-User", ["test-user"]) is not None
    assert custom_id_problem("'TEST-USER'", ["test-user"]) is not None
    assert custom_id_problem("test-user") is None


def test_check_custom_id_raises_with_the_field_path() -> None:
    with pytest.raises(CustomIdInvalid) as raised:
        check_custom_id("null", [], field="keys[3]")
    assert [v.field for v in raised.value.violations] == ["keys[3]"]


@pytest.mark.parametrize(
    ("value", "ok"), [("", False), ("i", True), ("i" * 128, True), ("i" * 129, False)]
)
def test_installation_ids_are_1_to_128_characters(value: str, ok: bool) -> None:
    if ok:
        check_installation_id(value)
    else:
        with pytest.raises(InstallationIdInvalid):
            check_installation_id(value)


def test_request_ids_are_at_most_64_characters() -> None:
    check_request_id("")
    check_request_id("r" * 64)
    with pytest.raises(RequestIdInvalid):
        check_request_id("r" * 65)


def test_key_problems_name_the_key_and_their_reason() -> None:
    assert key_problem(0, ProfileKey(installation_id="i"), []) is None
    assert key_problem(1, ProfileKey(custom_id="bob"), []) is None
    missing = key_problem(2, ProfileKey(), [])
    assert isinstance(missing, KeyMissing)
    assert [v.field for v in missing.violations] == ["keys[2]"]
    junk = key_problem(3, ProfileKey(custom_id="undefined"), [])
    assert isinstance(junk, CustomIdInvalid)
    bad_installation = key_problem(4, ProfileKey(installation_id=""), [])
    assert isinstance(bad_installation, InstallationIdInvalid)


def anonymous() -> Profile:
    return Profile(uuid.uuid4(), None)


def identified(custom_id: str) -> Profile:
    return Profile(uuid.uuid4(), custom_id)


def test_rule_1_anonymous_and_nobody_holds_the_custom_id() -> None:
    assert choose_identify_rule(anonymous(), None) is IdentifyOutcome.IDENTIFIED


def test_rule_2_anonymous_and_another_profile_holds_it() -> None:
    assert choose_identify_rule(anonymous(), identified("b")) is IdentifyOutcome.MERGED


def test_rule_3_already_on_the_holder() -> None:
    profile = identified("b")
    assert choose_identify_rule(profile, profile) is IdentifyOutcome.ALREADY_IDENTIFIED


def test_rule_3_also_holds_for_an_alias_of_the_current_profile() -> None:
    # The holder of an alias is the profile it resolves to, which may carry another custom ID.
    profile = identified("main-id")
    assert choose_identify_rule(profile, profile) is IdentifyOutcome.ALREADY_IDENTIFIED


def test_rule_4_identified_with_another_custom_id_moves() -> None:
    assert choose_identify_rule(identified("a"), identified("b")) is IdentifyOutcome.MOVED
    assert choose_identify_rule(identified("a"), None) is IdentifyOutcome.MOVED


def test_merging_two_identified_profiles_needs_permission_and_keeps_an_alias() -> None:
    source, target = identified("a"), identified("b")
    with pytest.raises(CustomIdConflict):
        plan_merge(source, target, allow_custom_id_conflict=False)
    plan = plan_merge(source, target, allow_custom_id_conflict=True)
    assert plan.alias_custom_id == "a"
    assert plan.inherited_custom_id is None


def test_an_identified_source_hands_its_custom_id_to_an_anonymous_target() -> None:
    plan = plan_merge(identified("a"), anonymous(), allow_custom_id_conflict=False)
    assert plan.inherited_custom_id == "a"
    assert plan.alias_custom_id is None


def test_an_anonymous_source_merges_without_custom_id_changes() -> None:
    plan = plan_merge(anonymous(), identified("b"), allow_custom_id_conflict=False)
    assert plan.alias_custom_id is None
    assert plan.inherited_custom_id is None


def test_a_profile_cannot_merge_into_itself() -> None:
    profile = anonymous()
    with pytest.raises(MergeIntoItself):
        plan_merge(profile, profile, allow_custom_id_conflict=True)


def test_kept_answers_come_back_identical() -> None:
    answers = [
        IdentifyResult(
            IdentifyOutcome.MERGED, uuid.uuid4(), uuid.uuid4(), None, False, uuid.uuid4()
        ),
        LogoutResult(LogoutOutcome.NEW_ANONYMOUS_PROFILE, uuid.uuid4(), uuid.uuid4(), uuid.uuid4()),
        MergeResult(uuid.uuid4(), uuid.uuid4(), False, "alias", uuid.uuid4(), datetime.now(UTC)),
        MergeResult(uuid.uuid4(), uuid.uuid4(), True),
    ]
    readers = [identify_result_from_json, logout_result_from_json, merge_result_from_json]
    for answer in answers:
        reader = readers[[IdentifyResult, LogoutResult, MergeResult].index(type(answer))]
        assert reader(answer_to_json(answer)) == answer


def test_a_batch_splits_into_installations_custom_ids_and_problems_by_index() -> None:
    batch = split_keys(
        [
            ProfileKey(installation_id="i"),
            ProfileKey(custom_id="bob"),
            ProfileKey(),
            ProfileKey(custom_id="null"),
            ProfileKey(installation_id=""),
            ProfileKey(installation_id="i"),
            ProfileKey(custom_id="blocked"),
        ],
        ["BLOCKED"],
    )
    assert batch.installation_ids == ["i", "i"]
    assert batch.custom_ids == ["bob"]
    assert sorted(batch.problems) == [2, 3, 4, 6]
    assert [p.reason for p in batch.problems.values()] == [
        "KEY_MISSING",
        "CUSTOM_ID_INVALID",
        "INSTALLATION_ID_INVALID",
        "CUSTOM_ID_INVALID",
    ]
