"""Identity's per-batch contracts and ingest's attribute fold read the rows of the keys they are
given, not the project's, whatever plan PostgreSQL kept for them (0034, 0035).

PostgreSQL keeps a SQL function's plan for the life of the connection. Each contract is first
called here while the project's tables are young (the statistics of a new database say "a few
rows"), then the project grows to thousands of rows and the same connection calls it again
with two keys: the rows the call reads, counted by the server for this transaction
(`pg_stat_get_xact_tuples_fetched` and `_returned`), must be about the keys', not the project's.
Before 0034, the join of the keys to the table was kept as a merge join over the whole project.
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from services.identity.repository import SELECT_INSTALLATION_LINKS

GROWN = 3_000
# Two keys cost a handful of probes; a scan of the project reads GROWN rows.
AT_MOST_READ = 50
CALLS_WHILE_YOUNG = 8  # past the five custom plans a cached plan may start with
YOUNG_OPERATIONS = 300
YOUNG_ROWS = 100
NEW_INSTALLATIONS = 400

FOLDED_TOGETHER = 10

SET_OPERATIONS = """
    INSERT INTO attribute_operations (project_id, profile_id, native, name, event_time,
                                      event_id, origin, position, kind, value)
    SELECT $1, $2, false, n.name, now(), $4, 'inst', 0, 'set',
           jsonb_build_object('type', 'string', 'value', $5::text)
    FROM unnest($3::text[]) AS n(name)"""

FOLD = """
    SELECT profiles_ingest_fold_attributes(
        $1, array_fill($2::uuid, ARRAY[cardinality($3::text[])]),
        array_fill(false, ARRAY[cardinality($3::text[])]), $3::text[],
        array_fill(now(), ARRAY[cardinality($3::text[])]),
        array_fill($4::text, ARRAY[cardinality($3::text[])]),
        array_fill('inst'::text, ARRAY[cardinality($3::text[])]),
        array_fill(0::smallint, ARRAY[cardinality($3::text[])]))"""

OTHER_OPERATIONS = """
    INSERT INTO attribute_operations (project_id, profile_id, native, name, event_time,
                                      event_id, origin, position, kind, value)
    SELECT $1, gen_random_uuid(), false, 'plan', now(), 'other-' || n, 'inst', 0, 'set',
           jsonb_build_object('type', 'string', 'value', 'pro')
    FROM generate_series(1, $2) AS n"""

READ_COUNTS = """
    SELECT c.relname::text,
           pg_stat_get_xact_tuples_fetched(c.oid) + pg_stat_get_xact_tuples_returned(c.oid)
    FROM pg_class c WHERE c.relname = ANY($1::text[])"""

GROW = """
    WITH p AS (
        INSERT INTO profiles (project_id, profile_id)
        SELECT $1, gen_random_uuid() FROM generate_series(1, $2)
        RETURNING profile_id
    )
    INSERT INTO installations (project_id, installation_id, profile_id)
    SELECT $1, 'grown-' || p.profile_id, p.profile_id FROM p"""

# Each contract's statement, and whether it takes installation IDs or profile IDs.
CONTRACTS = {
    "identity_read_installation_profiles": (
        "SELECT count(*) FROM identity_read_installation_profiles($1, $2::text[])",
        "installations",
    ),
    "identity_read_installation_links": (
        "SELECT count(*) FROM identity_read_installation_links($1, $2::text[])",
        "installations",
    ),
    "identity_apply_profile_locks": (
        "SELECT count(*) FROM identity_apply_profile_locks($1, $2::uuid[])",
        "profiles",
    ),
    "identity_apply_profile_versions": (
        "SELECT count(*) FROM identity_apply_profile_versions($1, $2::uuid[])",
        "profiles",
    ),
}


async def rows_read(conn: asyncpg.Connection, tables: list[str]) -> int:
    return sum(count for _, count in await conn.fetch(READ_COUNTS, tables))


@pytest.mark.parametrize("analyzed_young", [False, True], ids=["never_analyzed", "analyzed_young"])
@pytest.mark.parametrize("contract", sorted(CONTRACTS))
async def test_identity_contracts_probe_the_keys_of_a_grown_project(
    database_url: str, contract: str, analyzed_young: bool
) -> None:
    """Either statistics a young table can have: none, or a page's worth (autovacuum analyzes a
    table after its first 50 rows), with which a lookup by key is planned as a sequential scan,
    one scan of the whole table per key once it has grown."""
    conn = await asyncpg.connect(database_url)
    try:
        project = uuid.uuid4()
        await conn.execute("INSERT INTO projects (project_id, name) VALUES ($1, $2)", project,
                           str(project))  # fmt: skip
        # Two rows, or a batch's worth analyzed: both ask for every row the project holds.
        await conn.execute(GROW, project, YOUNG_ROWS if analyzed_young else 2)
        if analyzed_young:
            await conn.execute("ANALYZE profiles, installations")
        statement, takes = CONTRACTS[contract]
        column = "installation_id" if takes == "installations" else "profile_id"
        keys = [r[0] for r in await conn.fetch(
            f"SELECT {column} FROM installations WHERE project_id = $1", project)]  # fmt: skip
        for _ in range(CALLS_WHILE_YOUNG):
            async with conn.transaction():
                assert await conn.fetchval(statement, project, keys) == len(keys)
        await conn.execute(GROW, project, GROWN)

        async with conn.transaction():
            tables = ["profiles", "installations"]
            before = await rows_read(conn, tables)
            assert await conn.fetchval(statement, project, keys) == len(keys)
            read = await rows_read(conn, tables) - before
        # A few probes per key (a lock, an upsert's conflict check), never the grown table.
        assert read <= 4 * len(keys) + AT_MOST_READ, f"{contract}: {read} rows, {len(keys)} keys"
    finally:
        await conn.close()


async def test_attribute_fold_rewrites_by_probe_in_a_grown_table(database_url: str) -> None:
    """The fold's rewrite of the replayed operations reaches them by address, never by a scan of
    every project's operations (its cached plan was a hash join over a sequential scan)."""
    conn = await asyncpg.connect(database_url)
    try:
        project = uuid.uuid4()
        await conn.execute("INSERT INTO projects (project_id, name) VALUES ($1, $2)", project,
                           str(project))  # fmt: skip
        profile = uuid.uuid4()
        await conn.execute(
            "INSERT INTO profiles (project_id, profile_id) VALUES ($1, $2)", project, profile
        )

        names = [f"attribute_{n}" for n in range(FOLDED_TOGETHER)]

        async def set_all(event_id: str, value: str) -> int:
            """A SET of each of `names` by one new event, folded in one call as ingest folds a
            batch's attributes; the rows of attribute_operations that call read."""
            async with conn.transaction():
                await conn.execute(SET_OPERATIONS, project, profile, names, event_id, value)
                before = await rows_read(conn, ["attribute_operations"])
                await conn.execute(FOLD, project, profile, names, event_id)
                return await rows_read(conn, ["attribute_operations"]) - before

        # Other profiles' operations: the table grows, this attribute's history does not. The
        # plan is made while it holds a few hundred (as in ingest's bench, where it was kept).
        await conn.execute(OTHER_OPERATIONS, project, YOUNG_OPERATIONS)
        for n in range(CALLS_WHILE_YOUNG):
            await set_all(f"young-{n}", "free")
        await conn.execute(OTHER_OPERATIONS, project, GROWN)
        read = await set_all("after-growth", "team")
        assert read <= AT_MOST_READ, f"the fold read {read} operations to rewrite {len(names)}"
        values = await conn.fetch(
            "SELECT value->>'value' FROM profile_attributes WHERE project_id = $1"
            " AND profile_id = $2 AND name = ANY($3::text[])",
            project,
            profile,
            names,
        )
        assert [v for (v,) in values] == ["team"] * len(names)
    finally:
        await conn.close()


async def test_version_bump_raises_each_named_profile_once_and_creates_none(
    database_url: str,
) -> None:
    """The bump is an upsert of the rows it locked (0034): a key named twice is bumped once, and
    a key with no profile gets no row, neither in the answer nor in the table."""
    conn = await asyncpg.connect(database_url)
    try:
        project = uuid.uuid4()
        await conn.execute("INSERT INTO projects (project_id, name) VALUES ($1, $2)", project,
                           str(project))  # fmt: skip
        first, second, missing = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        for profile in (first, second):
            await conn.execute(
                "INSERT INTO profiles (project_id, profile_id) VALUES ($1, $2)", project, profile
            )
        bumped = await conn.fetch(
            "SELECT profile_id, version FROM identity_apply_profile_versions($1, $2::uuid[])",
            project,
            [second, missing, first, second],
        )
        assert sorted((r["profile_id"], r["version"]) for r in bumped) == sorted(
            [(first, 2), (second, 2)]
        )
        stored = await conn.fetch(
            "SELECT profile_id, version FROM profiles WHERE project_id = $1", project
        )
        assert sorted(tuple(r) for r in stored) == sorted([(first, 2), (second, 2)])
    finally:
        await conn.close()


async def test_identity_resolves_new_installations_by_probe_in_a_grown_project(
    database_url: str,
) -> None:
    """Identity's own read of the links (SELECT_INSTALLATION_LINKS, prepared on its connections,
    run for every batch with installations its cache does not know) probes each key too: the
    tables analyzed while young, a batch mostly of new installations once the project grew."""
    conn = await asyncpg.connect(database_url)
    try:
        project = uuid.uuid4()
        await conn.execute("INSERT INTO projects (project_id, name) VALUES ($1, $2)", project,
                           str(project))  # fmt: skip
        await conn.execute(GROW, project, YOUNG_ROWS)
        await conn.execute("ANALYZE installations, profiles")
        rows = await conn.fetch(
            "SELECT installation_id FROM installations WHERE project_id = $1", project
        )
        known = [r["installation_id"] for r in rows]
        for _ in range(CALLS_WHILE_YOUNG):
            assert len(await conn.fetch(SELECT_INSTALLATION_LINKS, project, known)) == len(known)
        await conn.execute(GROW, project, GROWN)

        asked = known + [f"new-{n}" for n in range(NEW_INSTALLATIONS)]
        async with conn.transaction():
            tables = ["profiles", "installations"]
            before = await rows_read(conn, tables)
            assert len(await conn.fetch(SELECT_INSTALLATION_LINKS, project, asked)) == len(known)
            read = await rows_read(conn, tables) - before
        # A probe of each installation asked and of each one's profile.
        assert read <= 2 * len(known) + AT_MOST_READ, f"read {read} rows for {len(asked)} keys"
    finally:
        await conn.close()
