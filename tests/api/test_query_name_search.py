"""ListProfiles' name_prefix: a profile matches when a word of its name ("first last") starts
with the text, ignoring accents and case by Unicode's rules; sorting by name folds alike.
Checked against a model of the rule on random names and random queries, with the other filters
and every sort order, over small pages."""

from __future__ import annotations

import random
import unicodedata
from datetime import timedelta
from typing import Any

import grpc
import pytest

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2 as pb
from tests.support.identity import new_id, violations
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    custom_event,
    op,
    pages,
    session_start,
    start_suite,
)

# Words whose lower case Python and PostgreSQL agree on: ASCII, accented Latin letters (composed
# and decomposed), and a word sharing its start with another.
WORDS = ["Ana", "anaïs", "ÉLODIE", "E\u0301lise", "Martin", "martínez", "O'Brien", "Zoé", "Bo"]
QUERIES = [
    "a",
    "AN",
    "ana",
    "anaï",
    "é",
    "élo",
    "Élise",
    "mart",
    "MARTÍ",
    "o'b",
    "zo",
    "bo b",
    "ana martin",
    "  ana   martin ",
    "x",
    "in",
    "z",
    "é\u0301",
    "E\u0301LO",
    "elo",
    "anai",
    "martinez",
    "ZOE",
]


def fold(text: str) -> str:
    """The rule's fold: spaces normalized, accents (combining marks) dropped, lower case."""
    decomposed = unicodedata.normalize("NFD", " ".join(text.split()))
    stripped = "".join(c for c in decomposed if not "\u0300" <= c <= "\u036f")
    return unicodedata.normalize("NFC", stripped).lower()


def model_matches(first: str, last: str, text: str) -> bool:
    """The rule: some word of the folded name starts with the folded text."""
    name, wanted = fold(f"{first} {last}"), fold(text)
    if not name or not wanted:
        return bool(name) or not wanted
    return any(name.startswith(wanted, i) for i in range(len(name)) if i == 0 or name[i - 1] == " ")


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


async def every_row(suite: Suite, **fields: Any) -> list[pb.ProfileRow]:
    """Every row of the users table, two a page."""
    return await pages(
        suite, "ListProfiles", pb.ListProfilesRequest(page_size=2, **fields), "profiles"
    )


async def test_name_search_finds_exactly_the_profiles_a_word_of_whose_name_starts_the_text(
    suite: Suite,
) -> None:
    rng = random.Random(19)
    names: dict[str, tuple[str, str]] = {}
    identified: set[str] = set()
    for n in range(14):
        inst = new_id()
        first = rng.choice(["", *WORDS])
        last = rng.choice(["", *WORDS, f"{rng.choice(WORDS)}  {rng.choice(WORDS)}"])
        operations = [op("set", "FIRST_NAME", first)] if first else []
        if last:
            operations.append(op("set", "LAST_NAME", last))
        time = NOW - timedelta(minutes=n)
        await suite.track(
            attribute_event(inst, operations, time=time)
            if operations
            else custom_event(inst, time=time)
        )
        if n % 3 == 0:
            await suite.identity.identify(inst, f"user-{n}")
        profile_id = await suite.identity.profile_of(inst)
        names[profile_id] = (first, last)
        if n % 3 == 0:
            identified.add(profile_id)
    await suite.settle()  # the users table reads query's projection, fed by the bus

    queries = QUERIES + [rng.choice(WORDS)[: rng.randint(1, 4)].upper() for _ in range(6)]
    for text in queries:
        expected = {p for p, (first, last) in names.items() if model_matches(first, last, text)}
        found = [r.profile_id for r in await every_row(suite, name_prefix=text)]
        assert len(found) == len(set(found)), text  # no page repeats a profile
        assert set(found) == expected, text
        # With another filter and another order, the same rule on the rest.
        by_name = await every_row(
            suite,
            name_prefix=text,
            identity_filter=pb.PROFILE_IDENTITY_FILTER_IDENTIFIED,
            order_by=pb.PROFILE_ORDER_BY_NAME,
            sort_order=pb.SORT_ORDER_ASCENDING,
        )
        assert {r.profile_id for r in by_name} == expected & identified, text
    # A nameless profile never matches, and no text means no filter.
    assert len(await every_row(suite)) == len(names)


async def test_a_name_prefix_is_bounded_and_binds_its_page_tokens(suite: Suite) -> None:
    for n in range(3):
        await suite.track(attribute_event(new_id(), [op("set", "FIRST_NAME", f"Ana{n}")], time=NOW))
    await suite.settle()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call("ListProfiles", pb.ListProfilesRequest(name_prefix="a" * 101))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == ["name_prefix"]
    # 100 characters after its spaces are normalized: accepted.
    await suite.call("ListProfiles", pb.ListProfilesRequest(name_prefix=" a " + "b" * 98 + "  "))

    first = await suite.call("ListProfiles", pb.ListProfilesRequest(page_size=1, name_prefix="ana"))
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call(
            "ListProfiles",
            pb.ListProfilesRequest(page_size=1, name_prefix="an", page_token=first.next_page_token),
        )
    assert violations(caught.value) == ["page_token"]
    # The same text spelled with other spaces is the same filter.
    again = await suite.call(
        "ListProfiles",
        pb.ListProfilesRequest(page_size=1, name_prefix=" ana ", page_token=first.next_page_token),
    )
    assert len(again.profiles) == 1


async def test_the_total_size_counts_every_page_of_the_filters_and_stops_at_its_limit(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(7)
    for n in range(9):
        inst = new_id()
        operations = [op("set", "FIRST_NAME", rng.choice(WORDS))] if n % 3 else []
        time = NOW - timedelta(minutes=n)
        await suite.track(
            session_start(inst, "s", time, country=rng.choice(["FR", "US"])),
            *([attribute_event(inst, operations, time=time)] if operations else []),
        )
        if rng.random() < 0.4:
            await suite.identity.identify(inst, f"counted-{n}")
    await suite.settle()

    filters: list[dict[str, Any]] = [{}]
    for _ in range(12):
        fields: dict[str, Any] = {}
        if rng.random() < 0.5:
            fields["identity_filter"] = rng.choice(
                [pb.PROFILE_IDENTITY_FILTER_IDENTIFIED, pb.PROFILE_IDENTITY_FILTER_ANONYMOUS]
            )
        if rng.random() < 0.5:
            fields["country"] = rng.choice(["FR", "US"])
        if rng.random() < 0.5:
            fields["name_prefix"] = rng.choice(QUERIES)
        filters.append(fields)
    for fields in filters:
        rows = await every_row(suite, **fields)
        first = await suite.call(
            "ListProfiles", pb.ListProfilesRequest(page_size=2, include_total_size=True, **fields)
        )
        assert (first.total_size, first.total_size_is_lower_bound) == (len(rows), False), fields
        # Only when asked: a count reads up to its limit of rows more.
        plain = await suite.call("ListProfiles", pb.ListProfilesRequest(page_size=2, **fields))
        assert (plain.total_size, plain.total_size_is_lower_bound) == (0, False)

    # Past the limit, a count stops there and says so; the page itself is whole.
    monkeypatch.setattr("services.query.service.TOTAL_SIZE_LIMIT", 4)
    details = pb.PROFILE_IDENTITY_FILTER_HAS_USER_DETAILS
    counted = await suite.call(
        "ListProfiles", pb.ListProfilesRequest(identity_filter=details, include_total_size=True)
    )
    assert (counted.total_size, counted.total_size_is_lower_bound) == (4, True)
    assert len(counted.profiles) == 6
    # The identity tabs on all or one platform are the rollups' counters: exact past the limit.
    for identity_filter in (0, pb.PROFILE_IDENTITY_FILTER_ANONYMOUS):
        for platform in (0, types_pb2.PLATFORM_IOS, types_pb2.PLATFORM_WEB):
            fields = {"identity_filter": identity_filter, "platform": platform}
            counted = await suite.call(
                "ListProfiles", pb.ListProfilesRequest(include_total_size=True, **fields)
            )
            rows = await every_row(suite, **fields)
            assert (counted.total_size, counted.total_size_is_lower_bound) == (len(rows), False)
    assert len(await every_row(suite)) == 9


async def test_sorting_by_name_folds_accents_and_case_as_the_search_does(suite: Suite) -> None:
    names = ["Zoé", "élodie", "Ana", "Émile", "bruno", "Eve", "Åsa"]
    for n, first in enumerate(names):
        await suite.track(
            attribute_event(
                new_id(), [op("set", "FIRST_NAME", first)], time=NOW - timedelta(minutes=n)
            )
        )
    await suite.settle()
    rows = await every_row(
        suite, order_by=pb.PROFILE_ORDER_BY_NAME, sort_order=pb.SORT_ORDER_ASCENDING
    )
    shown = [r.first_name for r in rows]
    # "Åsa" among the a's and "Émile" among the e's, not after "Zoé" as code points put them.
    assert (
        shown == sorted(names, key=fold) == ["Ana", "Åsa", "bruno", "élodie", "Émile", "Eve", "Zoé"]
    )
