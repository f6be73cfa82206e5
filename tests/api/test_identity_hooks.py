"""Identity reaches other owners' rows only through the profile hooks they declare
(profile_hooks): a declared merge or erase hook runs in identity's transaction, a function
named like the old catalog convention (profiles_merge_<table>) that nobody declared does not,
and a table nobody declared a hook for is left alone."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import asyncpg

from tests.support.identity import Identity, new_id

if TYPE_CHECKING:
    from tests.conftest import TestProject

SETUP = [
    "CREATE TABLE test_declared (project_id uuid, profile_id uuid, installation_id text,"
    " note text, PRIMARY KEY (project_id, note))",
    "CREATE TABLE test_undeclared (project_id uuid, profile_id uuid, note text,"
    " PRIMARY KEY (project_id, note))",
    """CREATE FUNCTION test_merge_declared(p uuid, s uuid, t uuid) RETURNS void
       LANGUAGE sql AS $$
         UPDATE test_declared SET profile_id = t WHERE project_id = p AND profile_id = s;
       $$""",
    """CREATE FUNCTION test_erase_declared(p uuid, ids uuid[], installations text[],
                                           custom_ids text[]) RETURNS void
       LANGUAGE sql AS $$
         DELETE FROM test_declared WHERE project_id = p
           AND (profile_id = ANY(ids) OR installation_id = ANY(installations));
       $$""",
    # Found and called by identity's former catalog search; never declared here.
    """CREATE FUNCTION profiles_merge_test_undeclared(p uuid, s uuid, t uuid) RETURNS void
       LANGUAGE sql AS $$
         UPDATE test_undeclared SET profile_id = t WHERE project_id = p AND profile_id = s;
       $$""",
    """CREATE FUNCTION profiles_erase_test_undeclared(p uuid, ids uuid[]) RETURNS void
       LANGUAGE sql AS $$ DELETE FROM test_undeclared WHERE project_id = p; $$""",
    "INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES"
    " ('merge', 'ingest', 'test_merge_declared', 1000),"
    " ('erase', 'ingest', 'test_erase_declared', 1000)",
]


async def started(start_services: Any, project: TestProject, db: asyncpg.Pool) -> Identity:
    for statement in SETUP:
        await db.execute(statement)
    channel = (await start_services("identity"))["identity"].channel
    return Identity(channel, project)


async def test_a_declared_merge_hook_runs_and_an_undeclared_function_does_not(
    start_services: Any, project: TestProject, db: asyncpg.Pool
) -> None:
    identity = await started(start_services, project, db)
    target = uuid.UUID(await identity.profile_of_custom_id("hook"))
    installation = new_id()
    source = uuid.UUID(await identity.profile_of(installation))
    pid = project.project_id
    await db.execute("INSERT INTO test_declared VALUES ($1, $2, NULL, 'd')", pid, source)
    await db.execute("INSERT INTO test_undeclared VALUES ($1, $2, 'u')", pid, source)
    await identity.identify(installation, "hook")
    assert await db.fetchval("SELECT profile_id FROM test_declared") == target
    assert await db.fetchval("SELECT profile_id FROM test_undeclared") == source


async def test_a_declared_erase_hook_runs_and_an_undeclared_function_does_not(
    start_services: Any, project: TestProject, db: asyncpg.Pool
) -> None:
    identity = await started(start_services, project, db)
    installation = new_id()
    profile = uuid.UUID(await identity.profile_of(installation))
    other = uuid.UUID(await identity.profile_of(new_id()))
    pid = project.project_id
    await db.executemany(
        "INSERT INTO test_declared VALUES ($1, $2, $3, $4)",
        [
            (pid, profile, None, "by profile"),
            (pid, None, installation, "by installation"),
            (pid, other, None, "another profile"),
        ],
    )
    await db.execute("INSERT INTO test_undeclared VALUES ($1, $2, 'u')", pid, profile)
    await identity.delete(str(profile))
    notes = await db.fetch("SELECT note FROM test_declared ORDER BY note")
    assert [r["note"] for r in notes] == ["another profile"]
    assert await db.fetchval("SELECT count(*) FROM test_undeclared") == 1
