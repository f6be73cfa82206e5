"""The console's admin forms and the users table's CSV: pure functions, no server."""

from __future__ import annotations

from typing import Any

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import filters_pb2
from services.console import definitions as d
from services.console import present


def posted(fields: dict[str, str | list[str]]) -> d.Getter:
    def get(name: str) -> list[str]:
        value = fields.get(name, [])
        return [value] if isinstance(value, str) else value

    return get


def test_the_erasure_is_confirmed_by_the_custom_id_or_the_word_delete() -> None:
    assert present.erasure_word("user-1") == "user-1"
    assert present.erasure_word("") == "delete"
    assert present.erasure_confirmed("user-1", " user-1 ")
    assert not present.erasure_confirmed("user-1", "User-1")
    assert not present.erasure_confirmed("", "")
    assert "nothing was erased" in present.erasure_refusal("user-1", "")
    assert present.erasure_refusal("user-1", "user-2").startswith("“user-2” is not “user-1”")


def test_a_segment_form_builds_one_group_with_a_negated_condition_wrapped_in_not() -> None:
    form = d.read_segment_form(
        posted(
            {
                "name": " Gold ",
                "join": "or",
                "conditions": "3",
                "c0-kind": "attribute",
                "c0-attribute": "custom",
                "c0-custom_name": "plan",
                "c0-operator": "in",
                "c0-value_type": "string",
                "c0-value": "gold, silver,",
                "c0-ignore_case": "1",
                "c1-kind": "platform",
                "c1-negate": "1",
                "c1-platforms": ["ios", "web", "windows"],
                "c2-kind": "event_count",
                "c2-event_name": "purchase",
                "c2-count_operator": "at_least",
                "c2-count": "3",
                "c2-count_days": "30",
            }
        )
    )
    request, refused = d.segment_request(form, "r-1")
    assert not refused
    assert request.display_name == "Gold"
    assert request.request_id == "r-1"
    group = request.filter.group
    assert group.operator == filters_pb2.GROUP_OPERATOR_OR
    first = group.children[0].condition.attribute
    assert first.custom_attribute == "plan"
    assert first.operator == filters_pb2.OPERATOR_IN
    assert [v.string_value for v in first.values] == ["gold", "silver"]
    assert not first.HasField("value")
    assert first.ignore_case
    negated = group.children[1].group
    assert negated.operator == filters_pb2.GROUP_OPERATOR_NOT
    assert list(negated.children[0].condition.platform.platforms) == [
        types_pb2.PLATFORM_IOS,
        types_pb2.PLATFORM_WEB,
    ]
    count = group.children[2].condition.event_count
    assert (count.event_name, count.operator, count.count, count.within_last_days) == (
        "purchase",
        filters_pb2.OPERATOR_GREATER_THAN_OR_EQUAL,
        3,
        30,
    )
    assert present.filter_words(request.filter) == (
        "(plan is one of gold, silver or not (platform is iOS or Web)"
        " or purchase events is at least 3 in the last 30 days)"
    )


def test_typed_values_are_read_as_their_type_or_refused_beside_the_value_box() -> None:
    def build(value_type: str, value: str, operator: str = "equals") -> tuple[Any, dict[str, str]]:
        form = d.SegmentForm(
            name="x",
            conditions=(
                d.ConditionForm(
                    attribute="email", operator=operator, value_type=value_type, value=value
                ),
            ),
        )
        request, refused = d.segment_request(form)
        return request.filter.group.children[0].condition.attribute, refused.boxes

    test, refused = build("number", "4.5", "greater_than")
    assert test.value.number_value == 4.5
    assert not refused
    test, refused = build("bool", "TRUE")
    assert test.value.bool_value is True
    test, refused = build("timestamp", "2026-12-01T10:30")
    assert test.value.timestamp_value.seconds == 1_796_121_000
    test, refused = build("string", "", "exists")
    assert not test.HasField("value")
    assert not refused
    assert test.native_attribute == filters_pb2.NATIVE_ATTRIBUTE_EMAIL
    _, refused = build("number", "abc")
    assert refused == {"c0-value": "“abc” is not a number (use a dot for decimals: 4.5)."}
    _, refused = build("timestamp", "yesterday")
    assert "is not a time" in refused["c0-value"]
    _, refused = build("number", "1, x", "in")
    assert "“x” is not a number" in refused["c0-value"]


def test_empty_boxes_are_refused_before_asking_the_service() -> None:
    form = d.SegmentForm(
        conditions=(
            d.ConditionForm(kind="attribute", attribute="custom"),
            d.ConditionForm(kind="platform"),
            d.ConditionForm(kind="smart_segment"),
            d.ConditionForm(kind="last_seen", days="soon"),
        )
    )
    _, refused = d.segment_request(form)
    assert set(refused.boxes) == {"name", "c0-custom_name", "c1-platforms", "c2-smart", "c3-days"}


def test_the_service_s_refusals_land_beside_the_boxes_they_name() -> None:
    refused = d.segment_refusals(
        [
            ("display_name", "must be 1 to 100 characters"),
            ("filter.group.children[0].condition.attribute.custom_attribute", "must match ^x$"),
            (
                "filter.group.children[1].group.children[0].condition.attribute.value",
                "LESS_THAN does not apply to a string operand",
            ),
            ("filter.group.children[2].condition.event_count.within_last_days", "must be 1 to 365"),
            ("filter.group.children[7].condition", "must set exactly one kind"),
        ],
        conditions=3,
    )
    assert refused.boxes == {
        "name": d.NAME_WORDS,
        "c0-custom_name": d.ATTRIBUTE_NAME_WORDS,
        "c1-value": "“is less than” does not apply to a text operand.",
        "c2-count_days": "A number of days from 1 to 365.",
        "": "The service refused this definition; check every condition.",
    }


def test_rows_are_added_and_removed_keeping_what_was_typed() -> None:
    form = d.SegmentForm(conditions=(d.ConditionForm(value="a"), d.ConditionForm(value="b")))
    assert [c.value for c in d.add_condition(form).conditions] == ["a", "b", ""]
    assert [c.value for c in d.remove_condition(form, 0).conditions] == ["b"]
    assert len(d.remove_condition(d.SegmentForm(), 0).conditions) == 1
    funnel = d.FunnelForm()
    assert len(d.remove_step(funnel, 0).steps) == d.MIN_STEPS
    assert len(d.add_step(funnel).steps) == 3


def test_a_funnel_form_builds_its_steps_window_and_one_attribute_condition() -> None:
    form = d.read_funnel_form(
        posted(
            {
                "name": "Browse to buy",
                "steps": "3",
                "s0-event_name": "view_item",
                "s1-event_name": "add_to_cart",
                "s2-event_name": "purchase",
                "s2-attribute_name": "amount",
                "s2-operator": "greater_than",
                "s2-value_type": "number",
                "s2-value": "20",
                "window": "2",
                "window_unit": "hours",
            }
        )
    )
    request, refused = d.funnel_request(form)
    assert not refused
    assert [s.event_name for s in request.steps] == ["view_item", "add_to_cart", "purchase"]
    assert not request.steps[0].HasField("attribute_condition")
    condition = request.steps[2].attribute_condition
    assert condition.attribute_name == "amount"
    assert condition.operator == filters_pb2.OPERATOR_GREATER_THAN
    assert condition.value.number_value == 20
    assert request.conversion_window.seconds == 7200
    _, refused = d.funnel_request(d.FunnelForm(name="x", window="0"))
    assert set(refused.boxes) == {"s0-event_name", "s1-event_name", "window"}
    refusals = d.funnel_refusals(
        [
            ("steps[1].event_name", "must match ^[a-zA-Z0-9_]{1,30}$"),
            ("conversion_window", "must be 1 minute to 90 days"),
        ],
        steps=2,
    )
    assert refusals.boxes == {"s1-event_name": d.EVENT_NAME_WORDS, "window": d.BOX_WORDS["window"]}


def test_csv_cells_that_a_spreadsheet_would_run_are_prefixed_with_a_quote() -> None:
    for formula in ("=1+1", "+33612345678", "-2", "@SUM(A1)", "\tx", "\rx"):
        assert d.csv_cell(formula) == "'" + formula
    assert d.csv_cell("Ana") == "Ana"
    assert d.csv_cell(3) == "3"
    row = query_pb.ProfileRow(
        profile_id="p-1",
        custom_id="=HYPERLINK(1)",
        first_name="Ana",
        email="-ana@example.com",
        session_count=2,
        country="FR",
        language="fr",
    )
    row.last_seen_time.seconds = 1_796_121_000
    row.total_time_spent.seconds = 65
    rows = d.csv_rows([row], platforms={}, segment_of=lambda r: "New")
    assert rows == [
        [
            "p-1",
            "'=HYPERLINK(1)",
            "Ana",
            "",
            "'-ana@example.com",
            "no",
            "",
            "",
            "2",
            "2026-12-01T10:30:00Z",
            "65",
            "New",
            "FR",
            "fr",
        ]
    ]
    text = d.csv_text(rows, header=True)
    assert text.startswith('"profile_id","custom_id",')
    # A separator a spreadsheet may split on stays inside its quoted cell.
    (separated,) = d.csv_rows(
        [query_pb.ProfileRow(profile_id="p-2", last_name="Zz;=cmd|' /C calc'!A0")],
        platforms={},
        segment_of=lambda r: "",
    )
    assert "\"Zz;=cmd|' /C calc'!A0\"" in d.csv_text([separated])
    assert text.endswith("\r\n")


def test_a_box_keeps_at_most_what_a_valid_value_could_hold() -> None:
    # A 900 KB value was sent to the service and echoed back whole on its refusal.
    huge = "x" * 900_000
    fields = {"name": [huge], "description": [huge], "conditions": ["1"], "c0-value": [huge]}
    form = d.read_segment_form(lambda name: fields.get(name, []))
    assert len(form.name) == len(form.description) == d.MAX_TYPED_CHARS
    assert len(form.conditions[0].value) == d.MAX_TYPED_CHARS
    longest_valid_in = ", ".join("v" * 300 for _ in range(64))
    assert len(longest_valid_in) < d.MAX_TYPED_CHARS
