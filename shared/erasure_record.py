"""Reading identity's record of erasures (identity_read_erased_profiles, 0061), for the erasure
sweeps of the services that keep rows of profiles (segments, query). Each of them writes its own
page statement (what it keeps of a profile differs); the record's order, its watermark and the
shape of a row are the contract's, so they are here once."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

# Where the next sweep may start in the record (ordered by the erasing transaction's ID): every
# transaction below the oldest one still running has ended, so a sweep that read the record
# from its watermark on after taking this has seen every erasure below it.
SELECT_ERASURE_HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"


@dataclass(frozen=True, slots=True)
class ErasedProfile:
    """A profile ID identity erased and whether the reading service still keeps rows of it.
    `position` orders the record: the erasing transaction's ID."""

    position: int
    project_id: UUID
    profile_id: UUID
    kept: bool


async def erasure_horizon(pool: asyncpg.Pool) -> int:
    """Where the erasure sweep may start next time, if it reads the record now."""
    return int(await pool.fetchval(SELECT_ERASURE_HORIZON))


async def erased_profiles_page(
    pool: asyncpg.Pool,
    select_page: str,
    position: int,
    after: ErasedProfile | None,
    limit: int,
) -> list[ErasedProfile]:
    """At most `limit` rows of the record from `position` on, after `after` (the previous
    page's last row), in the record's order, by the service's own `select_page` ($1 the
    position as text, $2 and $3 the last row's project and profile or NULL, $4 the limit;
    columns position, project_id, profile_id, kept)."""
    rows = await pool.fetch(
        select_page,
        str(after.position if after else position),
        after.project_id if after else None,
        after.profile_id if after else None,
        limit,
    )
    return [
        ErasedProfile(int(r["position"]), r["project_id"], r["profile_id"], r["kept"]) for r in rows
    ]
