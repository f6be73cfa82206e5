"""ListProfiles' custom_id_prefix and email_prefix: the profiles whose custom ID starts with a
text (case-sensitive, as custom IDs are) or whose email does (any case), read as one range of
an index each (0058); checked against the values' own text in every sort order, over small
pages, with the other filters, bad input and page tokens bound to the prefix. Also the
language each row now carries, and a rare prefix on a large project reading its own rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from profiles.common.v1.types_pb2 import PLATFORM_ANDROID
from profiles.query.v1 import query_service_pb2 as pb
from services.query.list_reads import text_range
from services.query.repository import QueryReads
from services.query.views import UsersTableFilters
from tests.support.identity import new_id, violations
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    op,
    pages,
    session_start,
    start_suite,
)

SORTS = [
    (order_by, sort_order)
    for order_by in (
        pb.PROFILE_ORDER_BY_LAST_SEEN,
        pb.PROFILE_ORDER_BY_SESSION_COUNT,
        pb.PROFILE_ORDER_BY_TIME_SPENT,
        pb.PROFILE_ORDER_BY_NAME,
    )
    for sort_order in (pb.SORT_ORDER_ASCENDING, pb.SORT_ORDER_DESCENDING)
]

# The people: a custom ID (None: anonymous), an email, a language, a country. The custom IDs
# sit on both sides of "user-"'s range in code point order ("user,1" below it, "user.1" and
# "user/1" above it: a locale's order, which sorts punctuation last, would mix them), in
# another case, and longer or shorter than the prefix.
PEOPLE: list[tuple[str | None, str, str, str]] = [
    ("user-1", "ben.muller@example.com", "fr", "FR"),
    ("user-2", "Ben.Mullerson@Example.org", "de", "DE"),
    ("user-10", "", "fr", "DE"),
    ("user-é", "benmuller@example.net", "", "FR"),
    ("User-3", "ana@example.com", "fr", "FR"),
    ("user", "", "de", ""),
    ("username", "ben.muller+news@example.com", "", ""),
    ("user,1", "", "", ""),
    ("user.1", "", "fr", ""),
    ("user/1", "", "", ""),
    ("xuser-1", "", "", ""),
    (None, "ben.muller.anon@example.com", "fr", "FR"),
    (None, "", "", ""),
]


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


async def people(suite: Suite) -> dict[str, tuple[str | None, str, str, str]]:
    """Tracks and identifies PEOPLE (newest first, a session each where they have a country, a
    first name on every other one): their rows by profile ID."""
    by_id = {}
    for n, person in enumerate(PEOPLE):
        custom_id, email, language, country = person
        installation = new_id()
        time = NOW - timedelta(minutes=10 * (n + 1))
        operations = [op("set", "FIRST_NAME", "Ana" if n % 2 else "Bo")]
        if email:
            operations.append(op("set", "EMAIL", email))
        if language:
            operations.append(op("set", "LANGUAGE", language))
        events = [attribute_event(installation, operations, time=time)]
        if country:
            events.append(
                session_start(
                    installation, f"s{n}", time, country=country, platform=PLATFORM_ANDROID
                )
            )
        await suite.track(*events)
        if custom_id is not None:
            await suite.identity.identify(installation, custom_id)
        by_id[await suite.identity.profile_of(installation)] = person
    await suite.settle()
    return by_id


async def listed(suite: Suite, page_size: int = 2, **fields: Any) -> list[pb.ProfileRow]:
    """Every row of every page of the users table with these fields."""
    request = pb.ListProfilesRequest(page_size=page_size, **fields)
    return await pages(suite, "ListProfiles", request, "profiles")


async def ids(suite: Suite, page_size: int = 2, **fields: Any) -> list[str]:
    return [r.profile_id for r in await listed(suite, page_size, **fields)]


async def counted(suite: Suite, **fields: Any) -> int:
    reply = await suite.call(
        "ListProfiles", pb.ListProfilesRequest(page_size=1, include_total_size=True, **fields)
    )
    assert not reply.total_size_is_lower_bound
    return int(reply.total_size)


def custom_ids_starting(rows: list[pb.ProfileRow], who: dict[str, Any], prefix: str) -> list[str]:
    """The model: `rows` (in their order) whose custom ID starts with `prefix`."""
    return [
        r.profile_id
        for r in rows
        if who[r.profile_id][0] is not None and who[r.profile_id][0].startswith(prefix)
    ]


def emails_starting(rows: list[pb.ProfileRow], who: dict[str, Any], prefix: str) -> list[str]:
    """The model: `rows` whose email, lower-cased as stored, starts with `prefix` lower-cased."""
    return [
        r.profile_id
        for r in rows
        if who[r.profile_id][1] and who[r.profile_id][1].lower().startswith(prefix.lower())
    ]


async def test_a_custom_id_prefix_lists_the_profiles_whose_custom_id_starts_with_it(
    suite: Suite,
) -> None:
    who = await people(suite)
    table = await listed(suite, page_size=50)
    assert len(table) == len(PEOPLE)
    expected_by_prefix = {
        "user-": ["user-1", "user-2", "user-10", "user-é"],  # partial, over several pages
        "user-1": ["user-1", "user-10"],
        "user-10": ["user-10"],  # a whole custom ID: that profile
        "user-é": ["user-é"],
        "User-": ["User-3"],  # case-sensitive
        "user": [
            *("user-1", "user-2", "user-10", "user-é", "user", "username"),
            *("user,1", "user.1", "user/1"),
        ],
        "user.": ["user.1"],
        "xuser-1": ["xuser-1"],
        "user-11": [],  # nobody
        "USER-1": [],
        " user": [],  # matched as given: spaces are not trimmed
        "user-1 ": [],
    }
    for prefix, custom_ids in expected_by_prefix.items():
        found = await listed(suite, custom_id_prefix=prefix)
        assert [r.custom_id for r in found] == [
            r.custom_id for r in table if r.custom_id in custom_ids
        ], prefix
        assert [r.profile_id for r in found] == custom_ids_starting(table, who, prefix), prefix
        assert await counted(suite, custom_id_prefix=prefix) == len(custom_ids), prefix

    # Every sort order: the whole table's rows in that order, restricted to the prefix.
    for order_by, sort_order in SORTS:
        order = {"order_by": order_by, "sort_order": sort_order}
        everyone = await listed(suite, page_size=50, **order)
        for prefix in ("user-", "user", "User-"):
            assert await ids(suite, custom_id_prefix=prefix, **order) == custom_ids_starting(
                everyone, who, prefix
            ), (prefix, order)

    # With the other filters: the rows both select.
    french = await listed(suite, page_size=50, country="FR")
    assert await ids(suite, custom_id_prefix="user", country="fr") == custom_ids_starting(
        french, who, "user"
    )
    assert await ids(suite, custom_id_prefix="user-", country="FR") == [
        p for p, person in who.items() if person[0] in ("user-1", "user-é")
    ]
    speakers = await listed(suite, page_size=50, language="fr")
    assert await ids(suite, custom_id_prefix="user", language="FR") == custom_ids_starting(
        speakers, who, "user"
    )
    anas = await listed(suite, page_size=50, name_prefix="ana")
    assert await ids(suite, custom_id_prefix="user-", name_prefix="ana") == (
        custom_ids_starting(anas, who, "user-")
    )
    assert (
        await ids(
            suite,
            custom_id_prefix="user-",
            identity_filter=pb.PROFILE_IDENTITY_FILTER_ANONYMOUS,
        )
        == []
    )
    assert await ids(suite, custom_id_prefix="user-1", email_prefix="ben") == [
        p for p, person in who.items() if person[0] == "user-1"
    ]
    everything = {"custom_id_prefix": "user", "country": "FR", "language": "fr"}
    assert await counted(suite, **everything) == len(
        [p for p, (c, _, lang, land) in who.items()
         if c and c.startswith("user") and lang == "fr" and land == "FR"]
    ) == 1  # fmt: skip


async def test_an_email_prefix_lists_the_profiles_whose_email_starts_with_it_in_any_case(
    suite: Suite,
) -> None:
    who = await people(suite)
    table = await listed(suite, page_size=50)
    expected_by_prefix = {
        "ben.muller": [
            "ben.muller@example.com",
            "ben.mullerson@example.org",
            "ben.muller+news@example.com",
            "ben.muller.anon@example.com",
        ],
        "BEN.MULLER@": ["ben.muller@example.com"],
        "ben.muller@exa": ["ben.muller@example.com"],
        "Ben.Mullerson@Example.org": ["ben.mullerson@example.org"],  # a whole address
        "benm": ["benmuller@example.net"],
        "b": [
            "ben.muller@example.com",
            "ben.mullerson@example.org",
            "benmuller@example.net",
            "ben.muller+news@example.com",
            "ben.muller.anon@example.com",
        ],
        "ben.muller-": [],
        "example.com": [],  # the start of the address, not any part of it
        "zed": [],
    }
    for prefix, emails in expected_by_prefix.items():
        found = await listed(suite, email_prefix=prefix)
        assert sorted(r.email for r in found) == sorted(emails), prefix
        assert [r.profile_id for r in found] == emails_starting(table, who, prefix), prefix
        assert await counted(suite, email_prefix=prefix) == len(emails), prefix
    for order_by, sort_order in SORTS:
        order = {"order_by": order_by, "sort_order": sort_order}
        everyone = await listed(suite, page_size=50, **order)
        assert await ids(suite, email_prefix="ben.", **order) == emails_starting(
            everyone, who, "ben."
        ), order
    # Anonymous people have emails too: the identity tabs narrow it.
    anonymous = await listed(
        suite, page_size=50, identity_filter=pb.PROFILE_IDENTITY_FILTER_ANONYMOUS
    )
    assert (
        await ids(suite, email_prefix="ben", identity_filter=pb.PROFILE_IDENTITY_FILTER_ANONYMOUS)
        == emails_starting(anonymous, who, "ben")
        != []
    )


async def test_each_row_carries_the_profiles_language_and_country(suite: Suite) -> None:
    who = await people(suite)
    rows = await listed(suite, page_size=50)
    assert {r.profile_id: (r.language, r.country) for r in rows} == {
        p: (language, country) for p, (_, _, language, country) in who.items()
    }
    by_id = await suite.call("GetProfileRows", pb.GetProfileRowsRequest(profile_ids=list(who)))
    assert {r.profile_id: r.language for r in by_id.profiles} == {
        p: person[2] for p, person in who.items()
    }


async def test_a_page_token_holds_only_for_its_prefix(suite: Suite) -> None:
    who = await people(suite)
    for field, prefix, same in (
        ("custom_id_prefix", "user-", "user-"),
        ("email_prefix", "ben.muller", "BEN.Muller"),  # the same prefix in another case
    ):
        first = await suite.call(
            "ListProfiles", pb.ListProfilesRequest(page_size=1, **{field: prefix})
        )
        assert first.next_page_token
        for other in ({}, {field: prefix + "x"}, {field: prefix[:-1]}):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await suite.call(
                    "ListProfiles",
                    pb.ListProfilesRequest(page_size=1, page_token=first.next_page_token, **other),
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, other)
            assert violations(caught.value) == ["page_token"], (field, other)
        # Another filter beside it is another list too.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.call(
                "ListProfiles",
                pb.ListProfilesRequest(
                    page_size=1, page_token=first.next_page_token, country="FR", **{field: prefix}
                ),
            )
        assert violations(caught.value) == ["page_token"], field
        second = await suite.call(
            "ListProfiles",
            pb.ListProfilesRequest(page_size=1, page_token=first.next_page_token, **{field: same}),
        )
        assert len(second.profiles) == 1
        assert second.profiles[0].profile_id != first.profiles[0].profile_id
        value = who[second.profiles[0].profile_id][0 if field == "custom_id_prefix" else 1]
        assert (value or "").lower().startswith(prefix.lower()), field


async def test_a_prefix_longer_than_any_value_is_refused_by_name(suite: Suite) -> None:
    for field, longest in (("custom_id_prefix", 512), ("email_prefix", 254)):
        # The longest a value can be: accepted (nobody has it).
        reply = await suite.call("ListProfiles", pb.ListProfilesRequest(**{field: "é" * longest}))
        assert list(reply.profiles) == []
        for typed in ("a" * (longest + 1), "é" * (longest + 1)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await suite.call("ListProfiles", pb.ListProfilesRequest(**{field: typed}))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert violations(caught.value) == [field]
        # U+0000, which no stored text holds: refused, never an internal error.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.call("ListProfiles", pb.ListProfilesRequest(**{field: "user\x00"}))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert violations(caught.value) == [field]
    # Both refused at once, with the other fields' refusals.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call(
            "ListProfiles",
            pb.ListProfilesRequest(
                custom_id_prefix="a" * 513, email_prefix="a" * 255, country="France"
            ),
        )
    assert sorted(violations(caught.value)) == ["country", "custom_id_prefix", "email_prefix"]


def test_a_prefix_range_ends_at_the_least_text_above_every_text_starting_with_it() -> None:
    assert text_range("user-") == ("user-", "user.")
    assert text_range("é") == ("é", "ê")
    assert text_range("a\U0010ffff") == ("a\U0010ffff", "b")
    assert text_range("a" + chr(0xD7FF)) == ("a" + chr(0xD7FF), "a" + chr(0xE000))  # no surrogate
    low, high = text_range(chr(0x10FFFF))
    assert low == chr(0x10FFFF)
    assert high.startswith(low)
    assert len(high) > 512
    # Every text starting with the prefix is in [low, high), in code point order; the texts
    # around it are not.
    for prefix in ("user-", "a\U0010ffff", "z" + chr(0xD7FF), chr(0x10FFFF)):
        low, high = text_range(prefix)
        for inside in (prefix, prefix + "\x01", prefix + chr(0x10FFFF) * 3, prefix + "zz"):
            assert low <= inside < high, (prefix, inside)
        if len(prefix) > 1:
            before = prefix[:-1] + chr(ord(prefix[-1]) - 1) + "\U0010ffff"
            assert not low <= before < high, prefix


# --- a large project, read through the repository ----------------------------------------------

PROFILES = 20_000
# Profile n: custom ID "user-<n>" on every fourth, email "person<n>@example.com" on every
# third; never seen on one in 50.
LOAD = """
    INSERT INTO query_profiles (project_id, profile_id, identified, custom_id, has_email,
        has_phone, has_token, push_reachable, subscribed, platforms, first_name, last_name,
        has_details, device_platform, last_seen, session_count, time_spent_ms, update_time,
        email)
    SELECT $1, ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, n % 4 = 0,
           CASE WHEN n % 4 = 0 THEN 'user-' || n END, n % 3 = 0, false, false, false, '{}',
           '{1}', NULL, NULL, n % 3 = 0, 1,
           CASE WHEN n % 50 <> 1 THEN $2::timestamptz - make_interval(secs => n * 7919 % 86400)
           END,
           n % 13, n % 1000, $2,
           CASE WHEN n % 3 = 0 THEN 'person' || n || '@example.com' END
    FROM generate_series(1, $3::int) AS n"""
# Rows the current transaction read from query_profiles and its indexes: scanned rows, heap
# rows fetched through an index, index entries returned.
ROWS_READ = """
    SELECT sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid))
    FROM pg_class c
    WHERE c.oid = 'query_profiles'::regclass
       OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'query_profiles'::regclass)"""


async def read_pages(
    conn: asyncpg.Connection,
    project_id: uuid.UUID,
    filters: UsersTableFilters,
    order_by: int,
    ascending: bool,
) -> tuple[list[uuid.UUID], int]:
    """Every match, in pages of 50 as the service reads them, and the rows that took."""
    reads = QueryReads(conn)
    found: list[uuid.UUID] = []
    after: Any = None
    async with conn.transaction():
        before = await conn.fetchval(ROWS_READ)
        while True:
            rows = await reads.profile_rows_page(
                project_id,
                filters,
                now=NOW,
                order_by=order_by,
                ascending=ascending,
                after=after,
                limit=51,
            )
            found.extend(view.profile_id for _, view in rows[:50])
            if len(rows) <= 50:
                break
            value, view = rows[49]
            after = (value, view.profile_id)
        read = await conn.fetchval(ROWS_READ) - before
    return found, read


async def test_a_rare_prefix_on_a_large_project_reads_its_own_rows_from_an_index(
    db: asyncpg.Pool,
) -> None:
    project_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO projects (project_id, name) VALUES ($1, $2)", project_id, project_id.hex
    )
    await db.execute(LOAD, project_id, datetime(2026, 1, 5, tzinfo=UTC), PROFILES)
    await db.execute("ANALYZE query_profiles")
    values = {
        r["profile_id"]: (r["custom_id"], r["email"])
        for r in await db.fetch(
            "SELECT profile_id, custom_id, email FROM query_profiles WHERE project_id = $1",
            project_id,
        )
    }
    async with db.acquire() as conn:
        for filters, matches in (
            # "user-12340", "user-12344", "user-12348" (every fourth number has a custom ID).
            (UsersTableFilters(custom_id_prefix="user-1234"), 3),
            (UsersTableFilters(custom_id_prefix="user-99"), None),  # about 30
            (UsersTableFilters(email_prefix="person777"), None),
            (UsersTableFilters(email_prefix="person1999"), None),
            (UsersTableFilters(custom_id_prefix="nobody"), 0),
            (UsersTableFilters(email_prefix="nobody"), 0),
        ):
            for order_by, ascending in ((1, False), (2, True), (3, False), (4, True)):
                found, read = await read_pages(conn, project_id, filters, order_by, ascending)
                expected = {
                    p
                    for p, (custom_id, email) in values.items()
                    if (filters.custom_id_prefix and (custom_id or "").startswith(
                        filters.custom_id_prefix))
                    or (filters.email_prefix and (email or "").startswith(filters.email_prefix))
                }  # fmt: skip
                assert sorted(found) == sorted(expected), (filters, order_by)
                assert matches is None or len(found) == matches
                # About its own rows (a few hundred at most), where walking the sort order
                # reads every profile of the project. (A common prefix walks it, as a
                # common name does, until a page is full: "user-" reads a page's 4 rows in 1.)
                assert read <= 4 * len(expected) + 300, (filters, order_by, ascending, read)
