"""Funnel matching (model.best_attempt) and definition validation (convert), without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from profiles.common.v1 import types_pb2
from profiles.segments.v1 import filters_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from services.segments.convert import (
    filter_to_proto,
    segment_definition_from_proto,
)
from services.segments.errors import DefinitionInvalid
from services.segments.filters import filter_from_json, filter_to_json
from services.segments.funnels import best_attempt

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def test_a_completed_funnel_reports_every_step_time() -> None:
    attempt = best_attempt([[at(0)], [at(1)], [at(2)]], timedelta(days=1))
    assert attempt.step_times == (at(0), at(1), at(2))
    assert attempt.converted
    assert attempt.deadline_time == at(24)


def test_an_incomplete_funnel_stops_at_the_first_missing_step() -> None:
    attempt = best_attempt([[at(0)], [at(1)], []], timedelta(days=1))
    assert attempt.step_times == (at(0), at(1))
    assert not attempt.converted


def test_steps_out_of_order_do_not_count() -> None:
    # Step 2 happened before step 1, and step 3 before step 2.
    attempt = best_attempt([[at(5)], [at(1)], [at(6)]], timedelta(days=1))
    assert attempt.step_times == (at(5),)
    # Same time is not "after".
    assert best_attempt([[at(5)], [at(5)]], timedelta(days=1)).step_times == (at(5),)


def test_steps_outside_the_window_do_not_count() -> None:
    window = timedelta(hours=2)
    assert best_attempt([[at(0)], [at(2)]], window).step_times == (at(0),)  # at the deadline
    assert best_attempt([[at(0)], [at(1.99)]], window).step_times == (at(0), at(1.99))
    # The window runs from the start, not from the previous step.
    assert best_attempt([[at(0)], [at(1)], [at(2.5)]], window).step_times == (at(0), at(1))


def test_the_best_attempt_has_the_most_steps_then_the_earliest_start() -> None:
    window = timedelta(hours=3)
    # The first attempt (at 0) reaches step 2 only; the second (at 10) converts.
    attempt = best_attempt([[at(0), at(10)], [at(1), at(11)], [at(12)]], window)
    assert attempt.step_times == (at(10), at(11), at(12))
    # Two attempts with two steps each: the earliest wins.
    tie = best_attempt([[at(10), at(0)], [at(1), at(11)], []], window)
    assert tie.step_times == (at(0), at(1))
    assert best_attempt([[], [at(1)]], window).step_times == ()


def test_a_repeated_event_name_needs_distinct_later_events() -> None:
    window = timedelta(hours=5)
    views = [at(0), at(1)]
    assert best_attempt([views, views, views], window).step_times == (at(0), at(1))


def node(**condition: object) -> filters_pb2.FilterNode:
    return filters_pb2.FilterNode(condition=filters_pb2.Condition(**condition))  # type: ignore[arg-type]


def group(operator: int, *children: filters_pb2.FilterNode) -> filters_pb2.FilterNode:
    return filters_pb2.FilterNode(
        group=filters_pb2.FilterGroup(operator=operator, children=children)  # type: ignore[arg-type]
    )


def custom(name: str, operator: int, **value: object) -> filters_pb2.FilterNode:
    return node(
        attribute=filters_pb2.AttributeCondition(
            custom_attribute=name,
            operator=operator,  # type: ignore[arg-type]
            value=types_pb2.AttributeValue(**value) if value else None,  # type: ignore[arg-type]
        )
    )


def violations(filter_node: filters_pb2.FilterNode, name: str = "s") -> list[tuple[str, str]]:
    with pytest.raises(DefinitionInvalid) as caught:
        segment_definition_from_proto(
            pb.CreateSegmentRequest(display_name=name, filter=filter_node)
        )
    return [(v.field, v.description) for v in caught.value.violations]


def test_every_bad_node_is_reported_with_its_path() -> None:
    tree = group(
        filters_pb2.GROUP_OPERATOR_AND,
        custom("plan", filters_pb2.OPERATOR_EQUALS, string_value="pro"),
        custom("bad name!", filters_pb2.OPERATOR_EQUALS, string_value="x"),
        custom("age", filters_pb2.OPERATOR_LESS_THAN, string_value="x"),
        group(filters_pb2.GROUP_OPERATOR_NOT),
        filters_pb2.FilterNode(),
    )
    paths = [p for p, _ in violations(tree)]
    assert paths == [
        "filter.group.children[1].condition.attribute.custom_attribute",
        "filter.group.children[2].condition.attribute.value",
        "filter.group.children[3].group.children",
        "filter.group.children[4]",
    ]


def test_limits_on_conditions_depth_and_in_values() -> None:
    many = group(
        filters_pb2.GROUP_OPERATOR_OR,
        *[custom("a", filters_pb2.OPERATOR_EXISTS) for _ in range(16)],
        group(
            filters_pb2.GROUP_OPERATOR_AND,
            *[custom("b", filters_pb2.OPERATOR_EXISTS) for _ in range(16)],
        ),
    )
    assert ("filter", "has 32 conditions; at most 31 allowed") in violations(many)
    deep = custom("a", filters_pb2.OPERATOR_EXISTS)
    for _ in range(9):
        deep = group(filters_pb2.GROUP_OPERATOR_NOT, deep)
    assert any("nests groups more than 8 deep" in d for _, d in violations(deep))
    in_list = node(
        attribute=filters_pb2.AttributeCondition(
            custom_attribute="plan",
            operator=filters_pb2.OPERATOR_IN,
            values=[types_pb2.AttributeValue(string_value=str(i)) for i in range(65)],
        )
    )
    assert violations(in_list) == [("filter.condition.attribute.values", "IN takes 1 to 64 values")]


def test_hostile_names_and_values_are_data_and_the_filter_round_trips() -> None:
    hostile = "x'); DROP TABLE profiles; --"
    tree = group(
        filters_pb2.GROUP_OPERATOR_OR,
        custom("plan", filters_pb2.OPERATOR_EQUALS, string_value=hostile),
        node(
            event_count=filters_pb2.EventCountCondition(
                event_name="purchase",
                operator=filters_pb2.OPERATOR_GREATER_THAN_OR_EQUAL,
                count=3,
                within_last_days=30,
            )
        ),
    )
    definition = segment_definition_from_proto(
        pb.CreateSegmentRequest(display_name=hostile, filter=tree)
    )
    assert definition.display_name == hostile
    assert filter_from_json(filter_to_json(definition.filter)) == definition.filter
    assert filter_to_proto(definition.filter) == tree
    # A table name in an event name is not a name.
    bad = node(
        event_count=filters_pb2.EventCountCondition(
            event_name="events; --", operator=filters_pb2.OPERATOR_EQUALS, within_last_days=1
        )
    )
    assert [p for p, _ in violations(bad)] == ["filter.condition.event_count.event_name"]
