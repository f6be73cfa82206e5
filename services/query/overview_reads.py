"""The overview's reads (GetOverview): query's rollup counters and segments' smart segment
distribution, in one statement, and the daily trend of active and new profiles."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from uuid import UUID

import asyncpg

from services.query.rollup import ACTIVE_DAY

# GetOverview reads one project's and platform's counters: an index range of the primary key,
# as many rows as distinct values (languages, countries, app versions...), whatever the number
# of profiles.
SELECT_COUNTERS = """
    SELECT metric, value, count FROM query_counters
    WHERE project_id = $1 AND platform = $2 AND count <> 0"""

# The whole overview in one statement, hence one snapshot without a transaction (BEGIN and
# COMMIT were two of its four round trips), each row tagged with what it is: the counters above,
# segments' read contract segments_read_distribution (the smart segment distribution exact as of
# $3 on platform $2, 0: all), and segments_read_custom_segment_sizes (every custom segment's
# size, all platforms).
SELECT_OVERVIEW = f"""
    SELECT 'counter' AS kind, c.metric, c.value, c.count, NULL::smallint AS segment,
           NULL::smallint AS flag, NULL::uuid AS segment_id, NULL::bigint AS seq
    FROM ({SELECT_COUNTERS}) c
    UNION ALL
    SELECT 'smart', NULL, NULL, d.profile_count, d.segment, d.flag, NULL, NULL
    FROM segments_read_distribution($1, $2::smallint, $3) d
    UNION ALL
    SELECT 'custom', NULL, z.display_name, z.profile_count, NULL, NULL, z.segment_id,
           z.create_seq
    FROM segments_read_custom_segment_sizes($1) z"""


# The daily trend: query's daily counters (0066) of one project and platform over days [$3, $4),
# one range of the primary key, two rows a day at most (days with no profile may have no row or
# a row of 0), whatever the number of profiles and sessions. The counters are moved by the
# rollups' recounts, so they lag writes by the bus lag as the other counters do.
SELECT_DAY_COUNTS = """
    SELECT day, metric, count FROM query_day_counts
    WHERE project_id = $1 AND platform = $2 AND day >= $3 AND day < $4"""


@dataclass(frozen=True, slots=True)
class OverviewRows:
    """What the overview's statement read, in one snapshot."""

    # (metric, value, count): the project's (platform's) rollup counters.
    counters: list[tuple[str, str, int]]
    # (segment, flag, count): the smart segment distribution as of the read.
    distribution: list[tuple[int, int, int]]
    # (segment ID, display name, size): every custom segment, oldest first.
    segment_sizes: list[tuple[UUID, str, int]]


class OverviewReads:
    """The overview's statement, on the connection of QueryReads."""

    _conn: asyncpg.Connection

    async def overview(self, project_id: UUID, platform: int, as_of: datetime) -> OverviewRows:
        """Everything GetOverview reads, in one snapshot."""
        rows = OverviewRows([], [], [])
        sized: list[tuple[int, UUID, str, int]] = []
        for kind, metric, value, count, segment, flag, segment_id, seq in await self._conn.fetch(
            SELECT_OVERVIEW, project_id, platform, as_of
        ):
            if kind == "counter":
                rows.counters.append((metric, value, count))
            elif kind == "smart":
                rows.distribution.append((segment, flag, count))
            else:
                sized.append((seq, segment_id, value, count))
        rows.segment_sizes.extend((s, name, count) for _, s, name, count in sorted(sized))
        return rows

    async def daily_trend(
        self, project_id: UUID, platform: int, first: date, days: int
    ) -> list[tuple[int, int]]:
        """(active, new) profiles of each of `days` UTC days from `first`, oldest first, zeros
        included."""
        counts = [[0, 0] for _ in range(days)]
        end = first + timedelta(days=days)
        for day, metric, count in await self._conn.fetch(
            SELECT_DAY_COUNTS, project_id, platform, first, end
        ):
            counts[(day - first).days][0 if metric == ACTIVE_DAY else 1] = count
        return [(active, new) for active, new in counts]
