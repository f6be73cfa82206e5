"""The transactions of segments' repositories: one short transaction on a pooled connection,
where a lost race between writers of the same profiles surfaces as ConcurrentChange."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import cast
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from profiles.common.v1 import bus_pb2
from services.segments.errors import ConcurrentChange
from services.segments.messages import change_to_bus, entries_to_bus
from services.segments.model import MembershipChange
from shared.outbox import OutboxItem, enqueue_many, enqueue_serialized
from shared.topics import SEGMENT_CHANGES

# Lost races between writers of the same profiles (an event transaction that followed a merged
# ID into its survivor while a merge locked them the other way round): the transaction rolled
# back entirely and may be retried.
RACE_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


def pooled_connection(conn: PoolConnectionProxy[asyncpg.Record]) -> asyncpg.Connection:
    """A pooled connection typed as the Connection it stands for (it forwards every call)."""
    return cast(asyncpg.Connection, conn)


@asynccontextmanager
async def race_safe_transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """One short transaction; a lost race surfaces as ConcurrentChange after the rollback."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            yield pooled_connection(conn)
    except RACE_ERRORS as exc:
        raise ConcurrentChange("a concurrent change to the same profiles won; retry") from exc


async def enqueue_changes(
    conn: asyncpg.Connection, project_id: UUID, changes: Sequence[tuple[UUID, MembershipChange]]
) -> None:
    """Adds the changes (profile, change) to the outbox, in the connection's transaction and in
    order: the one way both repositories' transactions announce membership changes."""
    await enqueue_many(
        conn,
        [
            OutboxItem(project_id, SEGMENT_CHANGES, change_to_bus(project_id, p, c), p)
            for p, c in changes
        ],
    )


async def enqueue_shared_change(
    conn: asyncpg.Connection,
    project_id: UUID,
    profile_ids: Sequence[UUID],
    change: MembershipChange,
) -> None:
    """Adds one change of many profiles to the outbox (a new segment's entries), in the
    connection's transaction and in the profiles' order, as enqueue_changes would."""
    await enqueue_serialized(
        conn,
        project_id,
        SEGMENT_CHANGES,
        bus_pb2.SegmentMembershipChanged.DESCRIPTOR.full_name,
        entries_to_bus(project_id, profile_ids, change),
        profile_ids,
    )
