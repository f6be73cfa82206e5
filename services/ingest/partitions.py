"""Time partitions of events and rejected_events: which exist, which to create, which to drop.

Pure rules, no I/O (0024_events_partitioned.sql holds the tables; retention.py applies these).
A period is one calendar month in UTC: partition `events_2027_01` holds event times in
[2027-01-01, 2027-02-01). Everything no monthly partition covers lands in `<parent>_default`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# Partitions created ahead of the current month: two, so that a month's partition exists long
# before its first event, even if maintenance stops for weeks.
MONTHS_AHEAD = 2

# Partitioned tables and the column each is partitioned by: events by event time; rejected
# events by receive time (a rejected event may carry no usable event time).
PARTITIONED_TABLES: dict[str, str] = {"events": "event_time", "rejected_events": "receive_time"}

# How long an event's dedupe key is kept after it was received (event_keys): TrackEvents refuses
# events over 30 days old, so every retry it would accept arrives while the key is kept; the
# rest is margin for clock-skew correction and late maintenance.
EVENT_KEY_DAYS = 35

_NAME = re.compile(r"^(?P<parent>.+)_(?P<year>\d{4})_(?P<month>\d{2})$")


@dataclass(frozen=True, slots=True)
class Period:
    """One monthly partition's range, [start, end)."""

    parent: str
    start: datetime
    end: datetime

    @property
    def name(self) -> str:
        return f"{self.parent}_{self.start:%Y_%m}"


def month_start(moment: datetime) -> datetime:
    """The first instant of `moment`'s month, in UTC."""
    utc = moment.astimezone(UTC)
    return datetime(utc.year, utc.month, 1, tzinfo=UTC)


def add_months(start: datetime, months: int) -> datetime:
    """The first of the month `months` after the month of `start` (a first of month)."""
    index = start.year * 12 + (start.month - 1) + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def period_of(parent: str, moment: datetime) -> Period:
    start = month_start(moment)
    return Period(parent, start, add_months(start, 1))


def periods_due(parent: str, now: datetime, ahead: int = MONTHS_AHEAD) -> list[Period]:
    """The partitions that must exist at `now`: the current month's and `ahead` more."""
    first = month_start(now)
    return [
        Period(parent, add_months(first, n), add_months(first, n + 1)) for n in range(ahead + 1)
    ]


def parse_period(parent: str, name: str) -> Period | None:
    """The period of a monthly partition of `parent` by its name; None for any other table
    (the DEFAULT partition, say)."""
    match = _NAME.match(name)
    if match is None or match["parent"] != parent:
        return None
    month = int(match["month"])
    if not 1 <= month <= 12:
        return None
    start = datetime(int(match["year"]), month, 1, tzinfo=UTC)
    return Period(parent, start, add_months(start, 1))


def retention_cutoff(now: datetime, retention_days: int) -> datetime | None:
    """Rows older than this are past retention; None when retention is off (0: keep forever)."""
    if retention_days <= 0:
        return None
    return now - timedelta(days=retention_days)


def expired(periods: list[Period], cutoff: datetime | None) -> list[Period]:
    """The partitions wholly older than `cutoff`, oldest first: dropped whole."""
    if cutoff is None:
        return []
    return sorted((p for p in periods if p.end <= cutoff), key=lambda p: p.start)
