"""Row decoding and SQL fragments that several of query's reads share (the profile view and
the timeline both list a profile's identity changes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from services.query.views import IdentityChangeView

# A profile's history names it, or one of the tombstones merged into it, on either side. The
# tombstones come from profiles_by_survivor; each side has its own index.
PROFILE_AND_TOMBSTONES = """
    SELECT $2::uuid AS id
    UNION ALL
    SELECT profile_id FROM identity_read_profiles() WHERE project_id = $1 AND merged_into = $2"""


def text_or_empty(value: str | None) -> str:
    return value or ""


def identity_change(c: Sequence[Any] | asyncpg.Record) -> IdentityChangeView:
    """An identity change from a row of identity_read_identity_changes' columns (change_id,
    kind, cause, change_time, source and target profile IDs, installation IDs, alias), in order."""
    return IdentityChangeView(
        change_id=c[0],
        kind=c[1],
        cause=c[2],
        change_time=c[3],
        source_profile_id=c[4],
        target_profile_id=c[5],
        installation_ids=tuple(c[6]),
        alias_custom_id=c[7] or "",
    )
