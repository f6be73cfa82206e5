"""The monthly partition rules (services/ingest/partitions.py) and the retention settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.ingest.partitions import (
    Period,
    add_months,
    expired,
    parse_period,
    periods_due,
    retention_cutoff,
)
from shared.project_settings import InvalidSettingValue, validate_setting
from shared.settings import Settings


def test_the_current_month_and_two_ahead_are_due_across_a_year_end() -> None:
    due = periods_due("events", datetime(2030, 11, 30, 23, 59, tzinfo=UTC))
    assert [p.name for p in due] == ["events_2030_11", "events_2030_12", "events_2031_01"]
    assert due[-1].end == datetime(2031, 2, 1, tzinfo=UTC)


def test_a_local_time_falls_in_its_utc_month() -> None:
    moment = datetime(2031, 3, 1, 0, 30, tzinfo=UTC).astimezone(datetime.now().astimezone().tzinfo)
    assert periods_due("events", moment, ahead=0)[0].name == "events_2031_03"


def test_partition_names_read_back_and_other_tables_do_not() -> None:
    assert parse_period("events", "events_2031_02") == Period(
        "events", datetime(2031, 2, 1, tzinfo=UTC), datetime(2031, 3, 1, tzinfo=UTC)
    )
    assert parse_period("events", "events_default") is None
    assert parse_period("events", "rejected_events_2031_02") is None
    assert parse_period("rejected_events", "rejected_events_2031_02") is not None
    assert parse_period("events", "events_2031_13") is None
    assert add_months(datetime(2031, 12, 1, tzinfo=UTC), 14) == datetime(2033, 2, 1, tzinfo=UTC)


def test_only_months_wholly_past_retention_expire() -> None:
    now = datetime(2031, 5, 10, tzinfo=UTC)
    periods = [parse_period("events", f"events_2031_0{m}") for m in range(1, 6)]
    cutoff = retention_cutoff(now, 60)  # 2031-03-11
    assert cutoff == now - timedelta(days=60)
    names = [p.name for p in expired([p for p in periods if p], cutoff)]
    assert names == ["events_2031_01", "events_2031_02"]
    assert retention_cutoff(now, 0) is None
    assert expired([p for p in periods if p], None) == []


@pytest.mark.parametrize("days", [0, 90, 36_500])
def test_project_retention_is_off_or_at_least_90_days(days: int) -> None:
    validate_setting("events.retention_days", days)


@pytest.mark.parametrize("days", [1, 89, 36_501, -1, True, "90"])
def test_project_retention_below_90_days_is_refused(days: object) -> None:
    with pytest.raises(InvalidSettingValue):
        validate_setting("events.retention_days", days)


def test_global_retention_defaults_to_keeping_events_forever() -> None:
    assert Settings.from_env({}).events_retention_days == 0
    assert Settings.from_env({"PROFILES_EVENTS_RETENTION_DAYS": "400"}).events_retention_days == 400
