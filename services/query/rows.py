"""Row decoding that several of query's reads share (the profile view and
the timeline both list a profile's identity changes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from services.query.views import IdentityChangeView


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
