"""ListProfiles' name_prefix through its indexes (0051): the first word's matches from the name
index, later words' from query_name_tails, kept by triggers on the projection. The results are
the rule's (tests/api/test_query_name_search.py's model) in every sort order after renames, an
erasure and a merge, and a rare name on a large project reads its own rows, not the project's
(rows counted by the server, no time measured)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from profiles.query.v1 import query_service_pb2 as pb
from services.query.repository import QueryReads
from services.query.views import UsersTableFilters
from tests.api.test_query_name_search import model_matches
from tests.support.identity import new_id
from tests.support.query import NOW, Suite, attribute_event, op, pages, start_suite

ORDERS = [
    (order_by, sort_order)
    for order_by in (
        pb.PROFILE_ORDER_BY_LAST_SEEN,
        pb.PROFILE_ORDER_BY_SESSION_COUNT,
        pb.PROFILE_ORDER_BY_TIME_SPENT,
        pb.PROFILE_ORDER_BY_NAME,
    )
    for sort_order in (pb.SORT_ORDER_ASCENDING, pb.SORT_ORDER_DESCENDING)
]
TEXTS = ["ana", "lo", "lopez", "maria lo", "ma", "zé", "b", "marie", "ana maria"]


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


async def every_row(suite: Suite, **fields: Any) -> list[pb.ProfileRow]:
    """Every row of the users table, three a page."""
    return await pages(
        suite, "ListProfiles", pb.ListProfilesRequest(page_size=3, **fields), "profiles"
    )


async def check_every_order(suite: Suite) -> None:
    """In every order, a name's pages are the unfiltered table's rows the rule keeps, in the
    same order."""
    for order_by, sort_order in ORDERS:
        table = await every_row(suite, order_by=order_by, sort_order=sort_order)
        for text in TEXTS:
            expected = [
                r.profile_id for r in table if model_matches(r.first_name, r.last_name, text)
            ]
            found = await every_row(
                suite, order_by=order_by, sort_order=sort_order, name_prefix=text
            )
            assert [r.profile_id for r in found] == expected, (order_by, sort_order, text)


async def name(suite: Suite, installation_id: str, first: str, last: str, minutes: int) -> None:
    operations = [op("set", "FIRST_NAME", first)] if first else [op("unset", "FIRST_NAME")]
    operations.append(op("set", "LAST_NAME", last) if last else op("unset", "LAST_NAME"))
    await suite.track(
        attribute_event(installation_id, operations, time=NOW - timedelta(minutes=minutes))
    )


async def test_renames_an_erasure_and_a_merge_keep_every_order_of_a_name_search_right(
    suite: Suite,
) -> None:
    people = [
        ("Ana", "María López"),
        ("María", "Lopez"),
        ("ana maria", "Zé"),
        ("Bruno", "Ana"),
        ("Marie", ""),
        ("", "Lorenzo"),
        ("Loïc", "Bamba"),
        ("Ana", "Bamba"),
    ]
    installations = [new_id() for _ in people]
    for n, (inst, (first, last)) in enumerate(zip(installations, people, strict=True)):
        await name(suite, inst, first, last, minutes=len(people) - n)
    await suite.settle()
    await check_every_order(suite)

    # A first name becomes a later word and back, a name goes, another comes.
    await name(suite, installations[0], "Lopez", "Ana", minutes=0)
    await name(suite, installations[4], "", "", minutes=0)
    await name(suite, installations[5], "Zébulon", "Marie", minutes=0)
    await suite.settle()
    await check_every_order(suite)

    # The erasure strips the name at once, in identity's transaction (the projection's own
    # recount follows on the bus).
    erased = await suite.identity.profile_of(installations[1])
    await suite.identity.delete(erased)
    assert erased not in {r.profile_id for r in await every_row(suite, name_prefix="lopez")}
    assert (
        await suite.fetchval(
            "SELECT count(*) FROM query_name_tails WHERE project_id = $1 AND profile_id = $2",
            suite.project.project_id,
            uuid.UUID(erased),
        )
        == 0
    )
    # A merge leaves one row, with the survivor's name.
    source = await suite.identity.profile_of(installations[6])
    target = await suite.identity.profile_of(installations[7])
    await suite.identity.merge(source, target)
    await suite.settle()
    assert source not in {r.profile_id for r in await every_row(suite)}
    await check_every_order(suite)
    # No tails of a profile the projection no longer holds.
    assert (
        await suite.fetchval(
            """SELECT count(*) FROM query_name_tails t WHERE t.project_id = $1 AND NOT EXISTS (
               SELECT 1 FROM query_profiles q
               WHERE q.project_id = t.project_id AND q.profile_id = t.profile_id
                 AND q.search_name IS NOT NULL)""",
            suite.project.project_id,
        )
        == 0
    )


# --- a large project, read through the repository ----------------------------------------------

PROFILES = 20_000
FIRST_NAMES = [
    "Ana",
    "Bruno",
    "Chloé",
    "David",
    "Élodie",
    "Farid",
    "Greta",
    "Hugo",
    "Inès",
    "Jonas",
]
FIRST_NAMES_ARRAY = "ARRAY[" + ", ".join(f"'{n}'" for n in FIRST_NAMES) + "]"
# Profile n: a name on every second one (one of FIRST_NAMES, so one profile in 20 has each, and
# the family name "Family<n // 20>", which 10 profiles share), never seen on one in 50 (named).
LOAD = f"""
    INSERT INTO query_profiles (project_id, profile_id, identified, custom_id, has_email,
        has_phone, has_token, push_reachable, subscribed, platforms, first_name, last_name,
        has_details, device_platform, last_seen, session_count, time_spent_ms, update_time)
    SELECT $1, ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, n % 4 = 0,
           CASE WHEN n % 4 = 0 THEN 'user-' || n END, false, false, false, false, '{{}}',
           '{{1}}', CASE WHEN n % 2 = 1 THEN ({FIRST_NAMES_ARRAY})[1 + n / 2 % 10] END,
           CASE WHEN n % 2 = 1 THEN 'Family' || lpad((n / 20)::text, 5, '0') END, n % 2 = 1, 1,
           CASE WHEN n % 50 <> 1 THEN $2::timestamptz - make_interval(secs => n * 7919 % 86400)
           END,
           n % 13, n % 1000, $2
    FROM generate_series(1, $3::int) AS n"""
# Rows the current transaction read from query_profiles, query_name_tails and their indexes:
# scanned rows, heap rows fetched through an index, index entries returned.
ROWS_READ = """
    SELECT sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid))
    FROM pg_class c
    WHERE c.oid IN ('query_profiles'::regclass, 'query_name_tails'::regclass)
       OR c.oid IN (SELECT indexrelid FROM pg_index
                    WHERE indrelid IN ('query_profiles'::regclass, 'query_name_tails'::regclass))"""


def modelled(n: int) -> tuple[str, str]:
    if n % 2 == 0:
        return "", ""
    return FIRST_NAMES[n // 2 % 10], f"Family{n // 20:05d}"


async def read_pages(
    conn: asyncpg.Connection,
    project_id: uuid.UUID,
    text: str,
    order_by: int,
    ascending: bool,
    *,
    first_only: bool,
) -> tuple[list[uuid.UUID], int]:
    """Every match (or the first page's), in pages of 50 as the service reads them, and the
    rows that took."""
    reads = QueryReads(conn)
    found: list[uuid.UUID] = []
    after: Any = None
    async with conn.transaction():
        before = await conn.fetchval(ROWS_READ)
        while True:
            rows = await reads.profile_rows_page(
                project_id,
                UsersTableFilters(name_prefix=text),
                now=NOW,
                order_by=order_by,
                ascending=ascending,
                after=after,
                limit=51,
            )
            found.extend(view.profile_id for _, view in rows[:50])
            if len(rows) <= 50 or first_only:
                break
            value, view = rows[49]
            after = (value, view.profile_id)
        read = await conn.fetchval(ROWS_READ) - before
    return found, read


async def test_a_rare_name_on_a_large_project_reads_its_own_rows_from_the_indexes(
    db: asyncpg.Pool,
) -> None:
    project_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO projects (project_id, name) VALUES ($1, $2)", project_id, project_id.hex
    )
    await db.execute(LOAD, project_id, datetime(2026, 1, 5, tzinfo=UTC), PROFILES)
    await db.execute("ANALYZE query_profiles, query_name_tails")
    rows = {
        r["profile_id"]: r
        for r in await db.fetch(
            "SELECT profile_id, last_seen, sort_name FROM query_profiles WHERE project_id = $1",
            project_id,
        )
    }
    number = {r: int(str(r)[-12:], 16) for r in rows}

    async with db.acquire() as conn:
        for text, order_by, ascending, at_most, first_only in [
            # A family name 10 profiles share: about their rows, where walking the sort order
            # reads every profile (40,000 rows before 0051).
            ("family00321", 1, False, 200, False),
            ("FAMILY00321", 4, True, 200, False),
            ("family00321", 4, False, 200, False),
            ("family00321", 2, True, 200, False),
            # A first name (one profile in 20), sorted by name: one run of the name index,
            # read once over its 20 pages, where the walk read every name before it.
            ("élodie", 4, True, 4_000, False),
            ("Farid", 4, False, 4_000, False),
            # Common, by last seen: the first page's walk stops once the page is full (about
            # 1,000 profiles).
            ("greta", 1, False, 4_000, True),
            # Nobody: nothing to read.
            ("zzz", 1, False, 50, False),
            ("zzz", 4, True, 50, False),
        ]:
            found, read = await read_pages(
                conn, project_id, text, order_by, ascending, first_only=first_only
            )
            column = {1: "last_seen", 2: None, 4: "sort_name"}[order_by]
            matches = [p for p in rows if model_matches(*modelled(number[p]), text)]
            if column is not None:
                seen = sorted(
                    (p for p in matches if rows[p][column] is not None),
                    key=lambda p: (rows[p][column], p),
                    reverse=not ascending,
                )
                matches = seen + sorted(p for p in matches if rows[p][column] is None)
                assert found == (matches[:50] if first_only else matches), text
                assert len(found) == 50 or not first_only
            else:
                assert sorted(found) == sorted(matches), (text, order_by, ascending)
            assert read <= at_most, (text, order_by, ascending, read)
