"""The profile lookup both identity's transactions and its export snapshot read."""

from __future__ import annotations

import asyncpg

from services.identity.model import Profile

# Unlocked read of profiles and, for tombstones, their survivor (one hop, as merges keep it).
SELECT_PROFILES_AND_SURVIVORS = """
    SELECT p.profile_id AS requested_id, s.profile_id, s.custom_id, s.merged_into, s.version
    FROM profiles p
    JOIN profiles s ON s.project_id = p.project_id
        AND s.profile_id = coalesce(p.merged_into, p.profile_id)
    WHERE p.project_id = $1 AND p.profile_id = ANY($2::uuid[])"""


def profile_from_row(row: asyncpg.Record) -> Profile:
    return Profile(
        profile_id=row["profile_id"],
        custom_id=row["custom_id"],
        merged_into=row["merged_into"],
        version=row["version"],
    )
