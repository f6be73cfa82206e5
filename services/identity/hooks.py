"""Identity's side of the profile hooks: the functions other owners declare (shared/schema,
profile_hooks) to move or erase the rows they keep per profile. Identity calls exactly those,
in its merge's or erasure's transaction, and never names another owner's table."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

# The profile hooks other owners declared in their migrations (shared/schema, profile_hooks):
# identity moves and erases other owners' rows only through these functions, in the merge's or
# erasure's transaction, in this order. Read once at start-up (migrations are applied before any
# service starts). Identity's own tables (profiles, installations, aliases, changes, answers)
# are handled by its own statements (repository.py, erasure.py), and the outbox keeps its rows'
# profile_id (a merge must not wait for the relay's row locks; an erasure purges by tombstone
# IDs too).
SELECT_PROFILE_HOOKS = """
    SELECT kind, function_name FROM profile_hooks ORDER BY kind, run_order, function_name"""
MERGE_HOOK = "merge"
ERASE_HOOK = "erase"
# Format templates; function names come from the registry and are quoted.
CALL_MERGE_HOOK = "SELECT {function}($1, $2, $3)"
CALL_ERASE_HOOK = "SELECT {function}($1, $2::uuid[], $3::text[], $4::text[])"


@dataclass(frozen=True, slots=True)
class ProfileHooks:
    """The statements calling other owners' declared profile hooks, read at start-up."""

    # SELECT fn($1 project, $2 source, $3 target), per declared merge hook, in order.
    merge: tuple[str, ...] = ()
    # SELECT fn($1 project, $2 profile IDs, $3 installation IDs, $4 custom IDs), per erase hook.
    erase: tuple[str, ...] = ()


async def load_profile_hooks(conn: asyncpg.Connection) -> ProfileHooks:
    """The profile hooks every owner declared (profile_hooks), and nothing else."""
    merge, erase = [], []
    for row in await conn.fetch(SELECT_PROFILE_HOOKS):
        function = _quoted(row["function_name"])
        if row["kind"] == MERGE_HOOK:
            merge.append(CALL_MERGE_HOOK.format(function=function))
        elif row["kind"] == ERASE_HOOK:
            erase.append(CALL_ERASE_HOOK.format(function=function))
    return ProfileHooks(merge=tuple(merge), erase=tuple(erase))


def _quoted(identifier: str) -> str:
    """An SQL identifier quoted like PostgreSQL's quote_ident (always quoted)."""
    return '"' + identifier.replace('"', '""') + '"'


async def run_merge_hooks(
    conn: asyncpg.Connection, hooks: ProfileHooks, project_id: UUID, source: UUID, target: UUID
) -> None:
    """Lets every owner that declared a merge hook move or merge the source's rows into the
    target's (events, sessions, attributes, subscriptions...), in the caller's transaction."""
    for statement in hooks.merge:
        await conn.execute(statement, project_id, source, target)
