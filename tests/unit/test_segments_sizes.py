"""Which custom segment filters time alone can change (so the sweep must evaluate them and a size
is exact only as of the last evaluation), and when the sweep evaluates the others."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from services.segments.filter_sql import SqlBuilder, compile_filter
from services.segments.filters import (
    SETTLE_AFTER_CREATION,
    TIME_DEPENDENT_EVALUATION_INTERVAL,
    TIME_INDEPENDENT_EVALUATION_INTERVAL,
    AttributeTest,
    CountryTest,
    EngagementTest,
    EventCountTest,
    FilterNode,
    Group,
    Operand,
    Operator,
    PlatformTest,
    SeenTest,
    SmartSegmentTest,
    SubscriptionTest,
    depends_on_time,
    size_exact_as_of,
    sweep_due,
)
from services.segments.model import Thresholds

NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)
PLAN = AttributeTest(False, "plan", Operator.EQUALS, Operand("string", "pro"))
SIGNED_UP = AttributeTest(False, "signup", Operator.LESS_THAN, Operand("timestamp", NOW))
CONDITIONS: dict[str, tuple[FilterNode, bool]] = {
    "attribute": (PLAN, False),
    "timestamp attribute": (SIGNED_UP, False),
    "platform": (PlatformTest((1, 4)), False),
    "country": (CountryTest(("FR",)), False),
    "subscription": (SubscriptionTest("email", "marketing", False), False),
    "first seen between dates": (SeenTest(False, NOW - timedelta(days=9), NOW), False),
    "smart segment": (SmartSegmentTest(segments=(3,)), True),
    "flag": (SmartSegmentTest(flags=(3,)), True),
    "engagement": (EngagementTest(Operator.GREATER_THAN, 10.0), True),
    "last seen within days": (SeenTest(True, within_last_days=7), True),
    "event count": (EventCountTest("purchase", Operator.GREATER_THAN_OR_EQUAL, 3, 30), True),
}
# $2 is the moment of evaluation in compiled filters; $20 and up are other parameters.
READS_NOW = re.compile(r"\$2(?!\d)")


@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_a_condition_depends_on_time_exactly_when_its_sql_reads_now(name: str) -> None:
    node, expected = CONDITIONS[name]
    assert depends_on_time(node) is expected
    sql = compile_filter(node, SqlBuilder(first=3))
    assert bool(READS_NOW.search(sql)) is expected


def test_a_group_depends_on_time_when_any_child_does() -> None:
    seen = SeenTest(True, within_last_days=7)
    assert not depends_on_time(Group("and", (PLAN, Group("not", (PlatformTest((1,)),)))))
    assert depends_on_time(Group("or", (PLAN, Group("not", (seen,)))))


def test_the_size_of_a_time_independent_filter_is_exact_as_of_the_response() -> None:
    evaluated = NOW - timedelta(minutes=10)
    assert size_exact_as_of(PLAN, evaluated, NOW) == NOW
    assert size_exact_as_of(SmartSegmentTest(segments=(3,)), evaluated, NOW) == evaluated


def test_the_sweep_evaluates_time_independent_segments_only_to_settle_and_as_a_safety_net() -> None:
    created = NOW - timedelta(hours=1)
    engaged = SmartSegmentTest(segments=(3,))
    settled = created + SETTLE_AFTER_CREATION
    # A time-dependent filter: when its last evaluation is 30 s old.
    assert not sweep_due(engaged, created, NOW - timedelta(seconds=29), NOW)
    assert sweep_due(engaged, created, NOW - TIME_DEPENDENT_EVALUATION_INTERVAL, NOW)
    assert sweep_due(engaged, created, None, NOW)
    # A time-independent one: until an evaluation ended at least a minute after creation...
    assert sweep_due(PLAN, created, None, NOW)
    assert sweep_due(PLAN, created, settled - timedelta(seconds=1), settled + timedelta(seconds=5))
    assert not sweep_due(PLAN, created, settled, settled + timedelta(seconds=5))
    # ... then every few minutes.
    interval = TIME_INDEPENDENT_EVALUATION_INTERVAL
    assert not sweep_due(PLAN, created, NOW - interval + timedelta(seconds=1), NOW)
    assert sweep_due(PLAN, created, NOW - interval, NOW)


def test_thresholds_round_trip_through_settings_and_missing_ones_are_defaults() -> None:
    changed = Thresholds(new_days=2, risky_after_days=3)
    assert Thresholds.from_stored(changed.to_settings()) == changed
    assert Thresholds.from_stored({"segments.new_days": 2}) == Thresholds(new_days=2)
    assert Thresholds.from_stored(None) == Thresholds()
