"""The overview's read (GetOverview): query's rollup counters and segments' smart segment
distribution, in one statement."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

# GetOverview reads one project's and platform's counters: an index range of the primary key,
# as many rows as distinct values (languages, countries, app versions...), whatever the number
# of profiles.
SELECT_COUNTERS = """
    SELECT metric, value, count FROM query_counters
    WHERE project_id = $1 AND platform = $2 AND count <> 0"""

# The whole overview in one statement, hence one snapshot without a transaction (BEGIN and
# COMMIT were two of its four round trips): the counters above (segment and flag NULL), then
# segments' read contract segments_read_distribution, the smart segment distribution exact as
# of $3 on platform $2 (0: all), with metric NULL.
SELECT_OVERVIEW = f"""
    SELECT c.metric, c.value, c.count, NULL::smallint AS segment, NULL::smallint AS flag
    FROM ({SELECT_COUNTERS}) c
    UNION ALL
    SELECT NULL, NULL, d.profile_count, d.segment, d.flag
    FROM segments_read_distribution($1, $2::smallint, $3) d"""


class OverviewReads:
    """The overview's statement, on the connection of QueryReads."""

    _conn: asyncpg.Connection

    async def overview(
        self, project_id: UUID, platform: int, as_of: datetime
    ) -> tuple[list[tuple[str, str, int]], list[tuple[int, int, int]]]:
        """The project's (platform's) rollup counters as (metric, value, count) and its smart
        segment distribution as of `as_of` as (segment, flag, count), read in one snapshot."""
        counters: list[tuple[str, str, int]] = []
        distribution: list[tuple[int, int, int]] = []
        for metric, value, count, segment, flag in await self._conn.fetch(
            SELECT_OVERVIEW, project_id, platform, as_of
        ):
            if metric is None:
                distribution.append((segment, flag, count))
            else:
                counters.append((metric, value, count))
        return counters, distribution
