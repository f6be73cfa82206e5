"""Custom segments' filter tree without I/O: the validated conditions (attributes, platforms,
country, subscriptions, smart segment, engagement, first/last seen, event counts) and groups,
their stored JSON, the definition of a custom segment, and when the sweep re-evaluates one.

filter_sql.py compiles a tree to SQL; the smart segment and engagement conditions read segments'
own rules (model.py in Python, segments_read_engagement and segment_state_at in SQL).
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

# --- custom segments: the filter tree ------------------------------------------------------
#
# A validated filter, as the SQL compiler (filter_sql.py) and storage (JSON) see it. Enum-like
# fields keep the proto numbers (operators, platforms, smart segments); names are lower-case.

MAX_CONDITIONS = 31
MAX_DEPTH = 8
MAX_IN_VALUES = 64
MAX_SEGMENTS_PER_PROJECT = 100


class Operator(enum.IntEnum):
    """Values equal profiles.segments.v1.Operator."""

    EQUALS = 1
    NOT_EQUALS = 2
    LESS_THAN = 3
    LESS_THAN_OR_EQUAL = 4
    GREATER_THAN = 5
    GREATER_THAN_OR_EQUAL = 6
    IN = 7
    CONTAINS = 8
    STARTS_WITH = 9
    EXISTS = 10


COMPARISONS = frozenset(
    {
        Operator.EQUALS,
        Operator.NOT_EQUALS,
        Operator.LESS_THAN,
        Operator.LESS_THAN_OR_EQUAL,
        Operator.GREATER_THAN,
        Operator.GREATER_THAN_OR_EQUAL,
    }
)
ORDERED_TYPES = frozenset({"number", "timestamp"})
# Which operand types each operator accepts (EXISTS takes none).
OPERATOR_TYPES: Mapping[Operator, frozenset[str]] = {
    Operator.EQUALS: frozenset({"string", "url", "number", "bool", "timestamp", "string_list"}),
    Operator.NOT_EQUALS: frozenset({"string", "url", "number", "bool", "timestamp", "string_list"}),
    Operator.LESS_THAN: ORDERED_TYPES,
    Operator.LESS_THAN_OR_EQUAL: ORDERED_TYPES,
    Operator.GREATER_THAN: ORDERED_TYPES,
    Operator.GREATER_THAN_OR_EQUAL: ORDERED_TYPES,
    Operator.IN: frozenset({"string", "url", "number"}),
    Operator.CONTAINS: frozenset({"string", "url"}),
    Operator.STARTS_WITH: frozenset({"string", "url"}),
}


@dataclass(frozen=True, slots=True)
class Operand:
    """A typed operand: string, url (str), number (float), bool, timestamp (aware datetime) or
    string_list (tuple of str)."""

    type: str
    value: Any


@dataclass(frozen=True, slots=True)
class AttributeTest:
    """A native (name from NATIVE_ATTRIBUTES) or custom attribute of a profile, or an attribute
    of an event for a funnel step (native False)."""

    native: bool
    name: str
    operator: Operator
    value: Operand | None = None
    values: tuple[Operand, ...] = ()
    ignore_case: bool = False


@dataclass(frozen=True, slots=True)
class PlatformTest:
    platforms: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CountryTest:
    countries: tuple[str, ...]  # upper-case


@dataclass(frozen=True, slots=True)
class SubscriptionTest:
    channel: str  # email, sms, push (profile_subscriptions.channel)
    kind: str  # marketing, transactional
    subscribed: bool


@dataclass(frozen=True, slots=True)
class SmartSegmentTest:
    segments: tuple[int, ...] = ()
    flags: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class EngagementTest:
    operator: Operator
    score: float


@dataclass(frozen=True, slots=True)
class SeenTest:
    """First seen (last False) or last seen in [start, end) or within the last N x 24 h."""

    last: bool
    start_time: datetime | None = None
    end_time: datetime | None = None
    within_last_days: int | None = None


@dataclass(frozen=True, slots=True)
class EventCountTest:
    event_name: str
    operator: Operator
    count: int
    within_last_days: int


Condition = (
    AttributeTest
    | PlatformTest
    | CountryTest
    | SubscriptionTest
    | SmartSegmentTest
    | EngagementTest
    | SeenTest
    | EventCountTest
)


@dataclass(frozen=True, slots=True)
class Group:
    operator: str  # "and", "or", "not"
    children: tuple[FilterNode, ...]


FilterNode = Group | Condition


def count_conditions(node: FilterNode) -> int:
    if isinstance(node, Group):
        return sum(count_conditions(c) for c in node.children)
    return 1


def _operand_to_json(operand: Operand) -> dict[str, Any]:
    value = operand.value
    if operand.type == "timestamp":
        value = value.isoformat()
    elif operand.type == "string_list":
        value = list(value)
    return {"type": operand.type, "value": value}


def _operand_from_json(data: Mapping[str, Any]) -> Operand:
    value = data["value"]
    if data["type"] == "timestamp":
        value = datetime.fromisoformat(value)
    elif data["type"] == "string_list":
        value = tuple(value)
    elif data["type"] == "number":
        value = float(value)
    return Operand(data["type"], value)


def _time_or_none(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def filter_to_json(node: FilterNode) -> dict[str, Any]:
    """The stored form of a filter; filter_from_json(filter_to_json(f)) == f."""
    if isinstance(node, Group):
        return {"group": node.operator, "children": [filter_to_json(c) for c in node.children]}
    if isinstance(node, AttributeTest):
        return {
            "attribute": {
                "native": node.native,
                "name": node.name,
                "operator": int(node.operator),
                "value": None if node.value is None else _operand_to_json(node.value),
                "values": [_operand_to_json(v) for v in node.values],
                "ignore_case": node.ignore_case,
            }
        }
    if isinstance(node, PlatformTest):
        return {"platform": list(node.platforms)}
    if isinstance(node, CountryTest):
        return {"country": list(node.countries)}
    if isinstance(node, SubscriptionTest):
        return {
            "subscription": {
                "channel": node.channel,
                "kind": node.kind,
                "subscribed": node.subscribed,
            }
        }
    if isinstance(node, SmartSegmentTest):
        return {"smart_segment": {"segments": list(node.segments), "flags": list(node.flags)}}
    if isinstance(node, EngagementTest):
        return {"engagement": {"operator": int(node.operator), "score": node.score}}
    if isinstance(node, SeenTest):
        return {
            "seen": {
                "last": node.last,
                "start_time": None if node.start_time is None else node.start_time.isoformat(),
                "end_time": None if node.end_time is None else node.end_time.isoformat(),
                "within_last_days": node.within_last_days,
            }
        }
    return {
        "event_count": {
            "event_name": node.event_name,
            "operator": int(node.operator),
            "count": node.count,
            "within_last_days": node.within_last_days,
        }
    }


def filter_from_json(data: Mapping[str, Any]) -> FilterNode:
    if "group" in data:
        return Group(data["group"], tuple(filter_from_json(c) for c in data["children"]))
    if "attribute" in data:
        a = data["attribute"]
        return AttributeTest(
            a["native"],
            a["name"],
            Operator(a["operator"]),
            None if a["value"] is None else _operand_from_json(a["value"]),
            tuple(_operand_from_json(v) for v in a["values"]),
            a["ignore_case"],
        )
    if "platform" in data:
        return PlatformTest(tuple(data["platform"]))
    if "country" in data:
        return CountryTest(tuple(data["country"]))
    if "subscription" in data:
        s = data["subscription"]
        return SubscriptionTest(s["channel"], s["kind"], s["subscribed"])
    if "smart_segment" in data:
        m = data["smart_segment"]
        return SmartSegmentTest(tuple(m["segments"]), tuple(m["flags"]))
    if "engagement" in data:
        e = data["engagement"]
        return EngagementTest(Operator(e["operator"]), float(e["score"]))
    if "seen" in data:
        t = data["seen"]
        return SeenTest(
            t["last"],
            _time_or_none(t["start_time"]),
            _time_or_none(t["end_time"]),
            t["within_last_days"],
        )
    c = data["event_count"]
    return EventCountTest(
        c["event_name"], Operator(c["operator"]), int(c["count"]), int(c["within_last_days"])
    )


@dataclass(frozen=True, slots=True)
class SegmentDefinition:
    """What CreateSegment asks for; `fingerprint` tells two definitions apart (request_id)."""

    display_name: str
    description: str
    filter: FilterNode
    request_id: UUID | None = None

    @property
    def fingerprint(self) -> str:
        body = [self.display_name, self.description, filter_to_json(self.filter)]
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# Hex digits of an etag: 80 bits of the definition's SHA-256, far beyond what edits collide on.
ETAG_LENGTH = 20


@dataclass(frozen=True, slots=True)
class CustomSegment:
    """`size` is the number of stored members; it is exact as of `size_time` (see
    size_exact_as_of)."""

    segment_id: UUID
    display_name: str
    description: str
    filter: FilterNode
    create_time: datetime
    size: int
    size_time: datetime

    @property
    def etag(self) -> str:
        """A fingerprint of the definition (AIP-154): equal etags, equal definitions. Taken
        from the content, so two edits that leave the same definition leave the same etag,
        and an update checked against it applies to exactly the definition its caller read."""
        definition = SegmentDefinition(self.display_name, self.description, self.filter)
        return definition.fingerprint[:ETAG_LENGTH]


# The fields UpdateSegment may change, by their names in the contract's Segment.
SEGMENT_UPDATABLE = ("display_name", "description", "filter")


@dataclass(frozen=True, slots=True)
class SegmentUpdate:
    """What UpdateSegment asks for: the new value of each field it changes (None: kept), and
    the etag the segment must still have (None: any, the last writer wins)."""

    segment_id: UUID
    display_name: str | None = None
    description: str | None = None
    filter: FilterNode | None = None
    etag: str | None = None

    def applied_to(self, segment: CustomSegment) -> CustomSegment:
        """The segment with this update's fields (its size is still the stored one)."""
        return replace(
            segment,
            display_name=segment.display_name if self.display_name is None else self.display_name,
            description=segment.description if self.description is None else self.description,
            filter=segment.filter if self.filter is None else self.filter,
        )


def same_filter(a: FilterNode, b: FilterNode) -> bool:
    """Whether two filters are the same tree, as stored: an update that leaves the filter so
    recomputes nothing."""
    return filter_to_json(a) == filter_to_json(b)


def depends_on_time(node: FilterNode) -> bool:
    """Whether time passing alone can change the filter's result for a profile whose data does
    not change: conditions read "now" (smart segments and flags, the engagement score, relative
    last/first seen windows, event counts in the last N days). Absolute dates do not."""
    if isinstance(node, Group):
        return any(depends_on_time(child) for child in node.children)
    if isinstance(node, SeenTest):
        return node.within_last_days is not None
    return isinstance(node, SmartSegmentTest | EngagementTest | EventCountTest)


def size_exact_as_of(node: FilterNode, evaluate_time: datetime, now: datetime) -> datetime:
    """When stored members were last exactly the profiles matching the filter. Every event,
    merge and erasure updates them in its own transaction (within the bus lag), so only what
    time alone changes waits for the sweep: for a filter that depends on time that is the end of
    its last complete evaluation, otherwise now."""
    return evaluate_time if depends_on_time(node) else now


# One evaluation scans the project's live profiles (about 2.4 s at a million), so segments are
# not all evaluated at every run of the sweep. A time-dependent one is evaluated when its last
# evaluation is this old: its time-driven changes go out at most this late plus the evaluations'
# own time, within the minute the issue allows, at a sixth of the cost of every 5 s.
TIME_DEPENDENT_EVALUATION_INTERVAL = timedelta(seconds=30)
# Time-independent segments change only with data, which reaches their members with each event
# in the same transaction. The sweep still evaluates them for this long after their creation (an
# event handled while the segment was being created did not see it) and then this often, as a
# safety net for writes that reached the source tables without a bus message.
SETTLE_AFTER_CREATION = timedelta(minutes=1)
TIME_INDEPENDENT_EVALUATION_INTERVAL = timedelta(minutes=5)


def sweep_due(
    node: FilterNode, create_time: datetime, evaluate_time: datetime | None, now: datetime
) -> bool:
    """Whether the periodic evaluation should evaluate the segment now."""
    if evaluate_time is None:
        return True
    if depends_on_time(node):
        return now - evaluate_time >= TIME_DEPENDENT_EVALUATION_INTERVAL
    if evaluate_time < create_time + SETTLE_AFTER_CREATION:
        return True
    return now - evaluate_time >= TIME_INDEPENDENT_EVALUATION_INTERVAL
