"""Proto conversions of custom segments and funnels, both ways, beside the servicer.

The proto → domain direction validates everything the contract promises and reports every bad
field at once, each with its path in proto field names (`filter.group.children[2].condition.
attribute.operator`) and why; nothing invalid reaches the service or the SQL compiler.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, timedelta
from uuid import UUID

from google.protobuf.descriptor import Descriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import types_pb2
from profiles.segments.v1 import filters_pb2, funnels_pb2, segments_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from services.segments.definitions import FunnelPreview, SegmentPreview
from services.segments.errors import DefinitionInvalid, UpdateMaskInvalid
from services.segments.filters import (
    MAX_CONDITIONS,
    MAX_DEPTH,
    MAX_IN_VALUES,
    OPERATOR_TYPES,
    SEGMENT_UPDATABLE,
    AttributeTest,
    CountryTest,
    CustomSegment,
    EngagementTest,
    EventCountTest,
    FilterNode,
    Group,
    Operand,
    Operator,
    PlatformTest,
    SeenTest,
    SegmentDefinition,
    SegmentUpdate,
    SmartSegmentTest,
    SubscriptionTest,
)
from services.segments.funnels import (
    CONVERSION_WINDOW_PRECISION,
    FUNNEL_UPDATABLE,
    MAX_CONVERSION_WINDOW,
    MAX_FUNNEL_STEPS,
    MIN_CONVERSION_WINDOW,
    MIN_FUNNEL_STEPS,
    Funnel,
    FunnelDefinition,
    FunnelStep,
    FunnelUpdate,
)
from services.segments.model import SegmentFlag, SmartSegment
from shared.convert import timestamp_of as _timestamp
from shared.errors import FieldViolation

NAME = re.compile(r"[a-zA-Z0-9_]{1,30}")
COUNTRY = re.compile(r"[A-Za-z]{2}")
MAX_DISPLAY_NAME = 100
MAX_DESCRIPTION = 1000
MAX_STRING = 300
MAX_URL = 2048
MAX_LIST_ITEMS = 25
MAX_SCORE = 280.0
MAX_EVENT_COUNT = 1_000_000
MAX_SEEN_DAYS = 3650
MAX_COUNT_DAYS = 365

NATIVE_NAMES: dict[int, str] = {
    filters_pb2.NATIVE_ATTRIBUTE_EMAIL: "email",
    filters_pb2.NATIVE_ATTRIBUTE_PHONE: "phone",
    filters_pb2.NATIVE_ATTRIBUTE_LANGUAGE: "language",
    filters_pb2.NATIVE_ATTRIBUTE_REGION: "region",
    filters_pb2.NATIVE_ATTRIBUTE_TIMEZONE: "timezone",
    filters_pb2.NATIVE_ATTRIBUTE_FIRST_NAME: "first_name",
    filters_pb2.NATIVE_ATTRIBUTE_LAST_NAME: "last_name",
    filters_pb2.NATIVE_ATTRIBUTE_AVATAR_URL: "avatar_url",
    filters_pb2.NATIVE_ATTRIBUTE_COUNTRY: "country",
}
NATIVE_NUMBERS = {name: number for number, name in NATIVE_NAMES.items()}
CHANNELS = {
    types_pb2.CHANNEL_EMAIL: "email",
    types_pb2.CHANNEL_SMS: "sms",
    types_pb2.CHANNEL_PUSH: "push",
}
KINDS = {
    types_pb2.SUBSCRIPTION_KIND_MARKETING: "marketing",
    types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL: "transactional",
}
PLATFORMS = frozenset(
    {
        types_pb2.PLATFORM_IOS,
        types_pb2.PLATFORM_ANDROID,
        types_pb2.PLATFORM_WEB,
        types_pb2.PLATFORM_API,
    }
)
NUMERIC_OPERATORS = frozenset(
    {
        Operator.EQUALS,
        Operator.NOT_EQUALS,
        Operator.LESS_THAN,
        Operator.LESS_THAN_OR_EQUAL,
        Operator.GREATER_THAN,
        Operator.GREATER_THAN_OR_EQUAL,
    }
)
OPERAND_TYPES = {
    "string_value": "string",
    "url_value": "url",
    "number_value": "number",
    "bool_value": "bool",
    "timestamp_value": "timestamp",
    "string_list_value": "string_list",
}
MIN_TIME = Timestamp(seconds=-62135596800)  # 0001-01-01
MAX_TIME = Timestamp(seconds=253402300799)  # 9999-12-31T23:59:59


class Violations:
    """Collects the field violations of one request; raise_if_any() ends the validation."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, why: str) -> None:
        self.items.append(FieldViolation(field, why, DefinitionInvalid.reason))

    def raise_if_any(self) -> None:
        if self.items:
            first = self.items[0]
            raise DefinitionInvalid(
                f"{first.field} {first.description}"
                + (f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""),
                self.items,
            )


def _text(value: str, path: str, bad: Violations, *, minimum: int, maximum: int) -> None:
    if "\x00" in value:
        bad.add(path, "must not contain NUL characters")
    elif not minimum <= len(value) <= maximum:
        bad.add(path, f"must be {minimum} to {maximum} characters")


def _request_id(value: str, bad: Violations) -> UUID | None:
    if not value:
        return None
    try:
        parsed = UUID(value)
    except ValueError:
        bad.add("request_id", "must be a UUID")
        return None
    return parsed


def _display_name(value: str, path: str, bad: Violations) -> None:
    _text(value, path, bad, minimum=1, maximum=MAX_DISPLAY_NAME)
    if value and not value.strip():
        bad.add(path, "must not be blank")


def _description(value: str, path: str, bad: Violations) -> None:
    _text(value, path, bad, minimum=0, maximum=MAX_DESCRIPTION)


def _names(display_name: str, description: str, bad: Violations) -> None:
    _display_name(display_name, "display_name", bad)
    _description(description, "description", bad)


# update_mask paths named in one refusal at most, each cut to this many characters: a mask is
# the client's text, echoed back in the error's field violations.
MAX_MASK_VIOLATIONS = 10
MAX_ECHOED_PATH = 64


def _mask_paths(
    paths: Sequence[str], updatable: tuple[str, ...], resource: Descriptor
) -> frozenset[str]:
    """The fields an update changes (AIP-134): those `paths` names, or every updatable one when
    it names none or only `*`. Raises UpdateMaskInvalid with a violation on `update_mask` for
    each path that is unknown, a sub-path, or a field no update changes (the first
    MAX_MASK_VIOLATIONS of them)."""
    if not paths or list(paths) == ["*"]:
        return frozenset(updatable)
    problems = []
    for path in paths:
        if path in updatable:
            continue
        head = path.split(".")[0]
        shown = path if len(path) <= MAX_ECHOED_PATH else path[: MAX_ECHOED_PATH - 1] + "…"
        if path == "*":
            why = "“*” must be the only path"
        elif head in updatable:
            why = f"{shown} is a sub-path: name {head}, which is replaced whole"
        elif head in resource.fields_by_name:
            why = f"{shown} cannot be updated (updatable: {', '.join(updatable)})"
        else:
            why = f"{shown} is not a field of {resource.name} (updatable: {', '.join(updatable)})"
        problems.append(FieldViolation("update_mask", why, UpdateMaskInvalid.reason))
        if len(problems) == MAX_MASK_VIOLATIONS:
            break
    if problems:
        raise UpdateMaskInvalid(f"update_mask: {problems[0].description}", problems)
    return frozenset(paths)


def _etag(value: str) -> str | None:
    """An update's etag, None when not sent. Any other text is compared as sent: one that is
    not an etag of this service never equals the definition's (ABORTED, not INVALID_ARGUMENT,
    as for a stale one)."""
    return value or None


# --- proto → domain ---------------------------------------------------------------------


def segment_definition_from_proto(request: pb.CreateSegmentRequest) -> SegmentDefinition:
    """The validated definition; raises DefinitionInvalid with every bad field."""
    bad = Violations()
    _names(request.display_name, request.description, bad)
    request_id = _request_id(request.request_id, bad)
    node = _filter(request.filter if request.HasField("filter") else None, "filter", bad)
    bad.raise_if_any()
    assert node is not None
    return SegmentDefinition(request.display_name, request.description, node, request_id)


def segment_update_from_proto(request: pb.UpdateSegmentRequest, segment_id: UUID) -> SegmentUpdate:
    """The validated update of the segment `segment_id`: each field the mask names checked as
    CreateSegment checks it, with its path in the request (`segment.filter...`). Raises
    UpdateMaskInvalid (the mask, checked first: it says which fields to check) or
    DefinitionInvalid with every bad field."""
    fields = _mask_paths(
        request.update_mask.paths, SEGMENT_UPDATABLE, segments_pb2.Segment.DESCRIPTOR
    )
    segment = request.segment
    bad = Violations()
    if "display_name" in fields:
        _display_name(segment.display_name, "segment.display_name", bad)
    if "description" in fields:
        _description(segment.description, "segment.description", bad)
    node: FilterNode | None = None
    if "filter" in fields:
        node = _filter(
            segment.filter if segment.HasField("filter") else None, "segment.filter", bad
        )
    bad.raise_if_any()
    return SegmentUpdate(
        segment_id,
        display_name=segment.display_name if "display_name" in fields else None,
        description=segment.description if "description" in fields else None,
        filter=node,
        etag=_etag(segment.etag),
    )


def _filter(
    message: filters_pb2.FilterNode | None, path: str, bad: Violations
) -> FilterNode | None:
    """A required filter tree, every bad node reported under `path`."""
    if message is None:
        bad.add(path, "is required")
        return None
    counter = [0]
    node = _node(message, path, 1, counter, bad)
    if counter[0] > MAX_CONDITIONS:
        bad.add(path, f"has {counter[0]} conditions; at most {MAX_CONDITIONS} allowed")
    return node


def _node(
    node: filters_pb2.FilterNode, path: str, depth: int, counter: list[int], bad: Violations
) -> FilterNode | None:
    which = node.WhichOneof("node")
    if which == "group":
        return _group(node.group, f"{path}.group", depth, counter, bad)
    if which == "condition":
        counter[0] += 1
        return _condition(node.condition, f"{path}.condition", bad)
    bad.add(path, "must set exactly one of group and condition")
    return None


def _group(
    group: filters_pb2.FilterGroup, path: str, depth: int, counter: list[int], bad: Violations
) -> FilterNode | None:
    if depth > MAX_DEPTH:
        bad.add(path, f"nests groups more than {MAX_DEPTH} deep")
        return None
    operators = {
        filters_pb2.GROUP_OPERATOR_AND: "and",
        filters_pb2.GROUP_OPERATOR_OR: "or",
        filters_pb2.GROUP_OPERATOR_NOT: "not",
    }
    operator = operators.get(group.operator)
    count = len(group.children)
    if operator is None:
        bad.add(f"{path}.operator", "must be AND, OR or NOT")
    elif operator == "not" and count != 1:
        bad.add(f"{path}.children", f"NOT takes exactly 1 child, not {count}")
    elif not 1 <= count <= MAX_CONDITIONS:
        bad.add(f"{path}.children", f"{operator.upper()} takes 1 to {MAX_CONDITIONS} children")
    children = [
        _node(child, f"{path}.children[{i}]", depth + 1, counter, bad)
        for i, child in enumerate(group.children[: MAX_CONDITIONS + 1])
    ]
    if operator is None or any(c is None for c in children) or not children:
        return None
    return Group(operator, tuple(c for c in children if c is not None))


def _condition(condition: filters_pb2.Condition, path: str, bad: Violations) -> FilterNode | None:
    which = condition.WhichOneof("condition")
    if which is None:
        bad.add(path, "must set exactly one kind of condition")
        return None
    path = f"{path}.{which}"
    if which == "attribute":
        return _attribute(condition.attribute, path, bad)
    if which == "platform":
        platforms = list(condition.platform.platforms)
        if not 1 <= len(platforms) <= len(PLATFORMS):
            bad.add(f"{path}.platforms", "must list 1 to 4 platforms")
        elif any(p not in PLATFORMS for p in platforms):
            bad.add(f"{path}.platforms", "must be known platforms, not PLATFORM_UNSPECIFIED")
        elif len(set(platforms)) != len(platforms):
            bad.add(f"{path}.platforms", "must not repeat a platform")
        else:
            return PlatformTest(tuple(sorted(platforms)))
        return None
    if which == "country":
        countries = list(condition.country.countries)
        if not 1 <= len(countries) <= MAX_IN_VALUES:
            bad.add(f"{path}.countries", f"must list 1 to {MAX_IN_VALUES} countries")
            return None
        for i, country in enumerate(countries):
            if COUNTRY.fullmatch(country) is None:
                bad.add(f"{path}.countries[{i}]", "must be an ISO 3166-1 alpha-2 code")
        return CountryTest(tuple(c.upper() for c in countries))
    if which == "subscription":
        sub = condition.subscription
        channel, kind = CHANNELS.get(sub.channel), KINDS.get(sub.kind)
        if channel is None:
            bad.add(f"{path}.channel", "is required (email, sms or push)")
        if kind is None:
            bad.add(f"{path}.kind", "is required (marketing or transactional)")
        if channel is None or kind is None:
            return None
        return SubscriptionTest(channel, kind, sub.subscribed)
    if which == "smart_segment":
        return _smart_segment(condition.smart_segment, path, bad)
    if which == "engagement":
        return _engagement(condition.engagement, path, bad)
    if which in ("first_seen", "last_seen"):
        window = condition.first_seen if which == "first_seen" else condition.last_seen
        return _seen(window, which == "last_seen", path, bad)
    return _event_count(condition.event_count, path, bad)


def _smart_segment(
    test: filters_pb2.SmartSegmentCondition, path: str, bad: Violations
) -> FilterNode | None:
    segments, flags = list(test.segments), list(test.flags)
    if not segments and not flags:
        bad.add(path, "must list at least one segment or flag")
        return None
    ok = True
    for i, segment in enumerate(segments):
        if segment not in SmartSegment._value2member_map_:
            bad.add(f"{path}.segments[{i}]", "is not a smart segment")
            ok = False
    for i, flag in enumerate(flags):
        if flag not in SegmentFlag._value2member_map_:
            bad.add(f"{path}.flags[{i}]", "is not a smart segment flag")
            ok = False
    if not ok:
        return None
    return SmartSegmentTest(tuple(sorted(set(segments))), tuple(sorted(set(flags))))


def _engagement(
    test: filters_pb2.EngagementCondition, path: str, bad: Violations
) -> FilterNode | None:
    operator = _operator(test.operator)
    ok = True
    if operator not in NUMERIC_OPERATORS:
        bad.add(
            f"{path}.operator",
            "must be EQUALS, NOT_EQUALS, LESS_THAN(_OR_EQUAL) or GREATER_THAN(_OR_EQUAL)",
        )
        ok = False
    if not math.isfinite(test.score) or not 0 <= test.score <= MAX_SCORE:
        bad.add(f"{path}.score", "must be 0 to 280")
        ok = False
    if not ok or operator is None:
        return None
    return EngagementTest(operator, test.score)


def _seen(
    window: filters_pb2.TimeWindow, last: bool, path: str, bad: Violations
) -> FilterNode | None:
    which = window.WhichOneof("window")
    if which == "within_last_days":
        if not 1 <= window.within_last_days <= MAX_SEEN_DAYS:
            bad.add(f"{path}.within_last_days", f"must be 1 to {MAX_SEEN_DAYS}")
            return None
        return SeenTest(last, within_last_days=window.within_last_days)
    if which != "range":
        bad.add(path, "must set range or within_last_days")
        return None
    time_range = window.range
    has_start, has_end = time_range.HasField("start_time"), time_range.HasField("end_time")
    if not has_start and not has_end:
        bad.add(f"{path}.range", "must set start_time, end_time or both")
        return None
    ok = True
    for name, present in (("start_time", has_start), ("end_time", has_end)):
        stamp = getattr(time_range, name)
        if present and not _valid_time(stamp):
            bad.add(f"{path}.range.{name}", "is not a valid timestamp")
            ok = False
    if not ok:
        return None
    start = time_range.start_time.ToDatetime(tzinfo=UTC) if has_start else None
    end = time_range.end_time.ToDatetime(tzinfo=UTC) if has_end else None
    if start is not None and end is not None and end <= start:
        bad.add(f"{path}.range.end_time", "must be after start_time")
        return None
    return SeenTest(last, start, end)


def _event_count(
    test: filters_pb2.EventCountCondition, path: str, bad: Violations
) -> FilterNode | None:
    ok = True
    if NAME.fullmatch(test.event_name) is None:
        bad.add(f"{path}.event_name", "must match ^[a-zA-Z0-9_]{1,30}$")
        ok = False
    operator = _operator(test.operator)
    if operator not in NUMERIC_OPERATORS:
        bad.add(
            f"{path}.operator",
            "must be EQUALS, NOT_EQUALS, LESS_THAN(_OR_EQUAL) or GREATER_THAN(_OR_EQUAL)",
        )
        ok = False
    if not 0 <= test.count <= MAX_EVENT_COUNT:
        bad.add(f"{path}.count", f"must be 0 to {MAX_EVENT_COUNT}")
        ok = False
    if not 1 <= test.within_last_days <= MAX_COUNT_DAYS:
        bad.add(f"{path}.within_last_days", f"must be 1 to {MAX_COUNT_DAYS}")
        ok = False
    if not ok or operator is None:
        return None
    return EventCountTest(test.event_name.lower(), operator, test.count, test.within_last_days)


def _operator(value: int) -> Operator | None:
    try:
        return Operator(value)
    except ValueError:
        return None


def _valid_time(stamp: Timestamp) -> bool:
    return (
        MIN_TIME.seconds <= stamp.seconds <= MAX_TIME.seconds and 0 <= stamp.nanos < 1_000_000_000
    )


def _attribute(
    test: filters_pb2.AttributeCondition, path: str, bad: Violations
) -> AttributeTest | None:
    which = test.WhichOneof("attribute")
    native = which == "native_attribute"
    name: str | None = None
    if native:
        name = NATIVE_NAMES.get(test.native_attribute)
        if name is None:
            bad.add(f"{path}.native_attribute", "must be a native attribute, not UNSPECIFIED")
    elif which == "custom_attribute":
        if NAME.fullmatch(test.custom_attribute) is None:
            bad.add(f"{path}.custom_attribute", "must match ^[a-zA-Z0-9_]{1,30}$")
        else:
            name = test.custom_attribute.lower()
    else:
        bad.add(path, "must set native_attribute or custom_attribute")
    checked = _comparison(
        test.operator,
        test.value if test.HasField("value") else None,
        list(test.values),
        path,
        bad,
        native_name=name if native else None,
    )
    if name is None or checked is None:
        return None
    operator, value, values = checked
    return AttributeTest(native, name, operator, value, values, test.ignore_case)


def _comparison(
    operator_number: int,
    value: types_pb2.AttributeValue | None,
    values: list[types_pb2.AttributeValue],
    path: str,
    bad: Violations,
    *,
    native_name: str | None = None,
) -> tuple[Operator, Operand | None, tuple[Operand, ...]] | None:
    """Checks an operator with its operand(s); native attributes only take strings (the avatar
    URL a string or a URL)."""
    operator = _operator(operator_number)
    if operator is None:
        bad.add(f"{path}.operator", "is required")
        return None
    if operator == Operator.EXISTS:
        if value is not None:
            bad.add(f"{path}.value", "must be unset for EXISTS")
        if values:
            bad.add(f"{path}.values", "must be empty for EXISTS")
        return (operator, None, ()) if value is None and not values else None
    if operator == Operator.IN:
        if value is not None:
            bad.add(f"{path}.value", "must be unset for IN; use values")
            return None
        if not 1 <= len(values) <= MAX_IN_VALUES:
            bad.add(f"{path}.values", f"IN takes 1 to {MAX_IN_VALUES} values")
            return None
        operands = [_operand(v, f"{path}.values[{i}]", bad) for i, v in enumerate(values)]
        if any(o is None for o in operands):
            return None
        kinds = {o.type for o in operands if o is not None}
        if len(kinds) != 1:
            bad.add(f"{path}.values", "must all have one type")
            return None
        kind = kinds.pop()
        if not _type_allowed(operator, kind, native_name, f"{path}.values", bad):
            return None
        return operator, None, tuple(o for o in operands if o is not None)
    if values:
        bad.add(f"{path}.values", f"must be empty for {operator.name}; use value")
        return None
    if value is None:
        bad.add(f"{path}.value", f"is required for {operator.name}")
        return None
    operand = _operand(value, f"{path}.value", bad)
    if operand is None:
        return None
    if not _type_allowed(operator, operand.type, native_name, f"{path}.value", bad):
        return None
    if operator == Operator.STARTS_WITH and not operand.value:
        bad.add(f"{path}.value", "STARTS_WITH takes 1 to 300 characters")
        return None
    return operator, operand, ()


def _type_allowed(
    operator: Operator, kind: str, native_name: str | None, path: str, bad: Violations
) -> bool:
    allowed = OPERATOR_TYPES[operator]
    if operator == Operator.CONTAINS and kind == "string_list":
        allowed = frozenset()  # CONTAINS takes a string; it finds it in lists too
    if native_name is not None:
        native_types = {"string", "url"} if native_name == "avatar_url" else {"string"}
        if kind not in native_types:
            expected = "a string or a URL" if native_name == "avatar_url" else "a string"
            bad.add(path, f"{native_name} takes {expected} operand")
            return False
    if kind not in allowed:
        bad.add(path, f"{operator.name} does not apply to a {kind} operand")
        return False
    return True


def _operand(value: types_pb2.AttributeValue, path: str, bad: Violations) -> Operand | None:
    which = value.WhichOneof("value")
    if which is None:
        bad.add(path, "must hold a value")
        return None
    kind = OPERAND_TYPES[which]
    if which == "string_value":
        _text(value.string_value, path, bad, minimum=0, maximum=MAX_STRING)
        return Operand(kind, value.string_value)
    if which == "url_value":
        _text(value.url_value, path, bad, minimum=1, maximum=MAX_URL)
        return Operand(kind, value.url_value)
    if which == "number_value":
        if not math.isfinite(value.number_value):
            bad.add(path, "must be a finite number")
            return None
        return Operand(kind, value.number_value)
    if which == "bool_value":
        return Operand(kind, value.bool_value)
    if which == "timestamp_value":
        if not _valid_time(value.timestamp_value):
            bad.add(path, "is not a valid timestamp")
            return None
        return Operand(kind, value.timestamp_value.ToDatetime(tzinfo=UTC))
    items = list(value.string_list_value.values)
    if len(items) > MAX_LIST_ITEMS:
        bad.add(path, f"holds more than {MAX_LIST_ITEMS} items")
        return None
    for i, item in enumerate(items):
        _text(item, f"{path}.string_list_value.values[{i}]", bad, minimum=0, maximum=MAX_STRING)
    return Operand(kind, tuple(items))


def funnel_definition_from_proto(request: pb.CreateFunnelRequest) -> FunnelDefinition:
    bad = Violations()
    _names(request.display_name, request.description, bad)
    request_id = _request_id(request.request_id, bad)
    steps = _steps(request.steps, "steps", bad)
    window = _window(
        request.conversion_window if request.HasField("conversion_window") else None,
        "conversion_window",
        bad,
    )
    bad.raise_if_any()
    assert window is not None
    return FunnelDefinition(
        request.display_name, request.description, tuple(steps), window, request_id
    )


def funnel_update_from_proto(request: pb.UpdateFunnelRequest, funnel_id: UUID) -> FunnelUpdate:
    """The validated update of the funnel `funnel_id`, as segment_update_from_proto: each field
    the mask names checked as CreateFunnel checks it, with its path in the request
    (`funnel.steps[1].event_name`). Raises UpdateMaskInvalid or DefinitionInvalid."""
    fields = _mask_paths(request.update_mask.paths, FUNNEL_UPDATABLE, funnels_pb2.Funnel.DESCRIPTOR)
    funnel = request.funnel
    bad = Violations()
    if "display_name" in fields:
        _display_name(funnel.display_name, "funnel.display_name", bad)
    if "description" in fields:
        _description(funnel.description, "funnel.description", bad)
    steps = _steps(funnel.steps, "funnel.steps", bad) if "steps" in fields else None
    window = None
    if "conversion_window" in fields:
        window = _window(
            funnel.conversion_window if funnel.HasField("conversion_window") else None,
            "funnel.conversion_window",
            bad,
        )
    bad.raise_if_any()
    return FunnelUpdate(
        funnel_id,
        display_name=funnel.display_name if "display_name" in fields else None,
        description=funnel.description if "description" in fields else None,
        steps=None if steps is None else tuple(steps),
        conversion_window=window,
        etag=_etag(funnel.etag),
    )


def _steps(steps: Sequence[funnels_pb2.FunnelStep], path: str, bad: Violations) -> list[FunnelStep]:
    """A funnel's steps, each bad one reported under `path[i]`."""
    count = len(steps)
    if not MIN_FUNNEL_STEPS <= count <= MAX_FUNNEL_STEPS:
        bad.add(path, f"must hold {MIN_FUNNEL_STEPS} to {MAX_FUNNEL_STEPS} steps, not {count}")
    checked: list[FunnelStep] = []
    for i, step in enumerate(steps[:MAX_FUNNEL_STEPS]):
        step_path = f"{path}[{i}]"
        if NAME.fullmatch(step.event_name) is None:
            bad.add(f"{step_path}.event_name", "must match ^[a-zA-Z0-9_]{1,30}$")
            continue
        condition: AttributeTest | None = None
        if step.HasField("attribute_condition"):
            test = step.attribute_condition
            cpath = f"{step_path}.attribute_condition"
            name_ok = NAME.fullmatch(test.attribute_name) is not None
            if not name_ok:
                bad.add(f"{cpath}.attribute_name", "must match ^[a-zA-Z0-9_]{1,30}$")
            compared = _comparison(
                test.operator,
                test.value if test.HasField("value") else None,
                list(test.values),
                cpath,
                bad,
            )
            if compared is None or not name_ok:
                continue
            operator, value, values = compared
            condition = AttributeTest(
                False, test.attribute_name.lower(), operator, value, values, test.ignore_case
            )
        checked.append(FunnelStep(step.event_name.lower(), condition))
    return checked


def _window(duration: Duration | None, path: str, bad: Violations) -> timedelta | None:
    """A required conversion window, 1 minute to 90 days, kept to the millisecond."""
    if duration is None:
        bad.add(path, "is required (1 minute to 90 days)")
        return None
    window = duration.ToTimedelta()
    if not MIN_CONVERSION_WINDOW <= window <= MAX_CONVERSION_WINDOW:
        bad.add(path, "must be 1 minute to 90 days")
        return None
    # The funnel keeps its window to the millisecond (funnels.conversion_window_ms), and every
    # count and attempt uses that: the definition holds it already, so that CreateFunnel and
    # its preview answer the window GetFunnel shows and the counts apply, not the one sent.
    return window - window % CONVERSION_WINDOW_PRECISION


# --- domain → proto ---------------------------------------------------------------------


def _operand_to_proto(operand: Operand) -> types_pb2.AttributeValue:
    value = types_pb2.AttributeValue()
    if operand.type == "string":
        value.string_value = operand.value
    elif operand.type == "url":
        value.url_value = operand.value
    elif operand.type == "number":
        value.number_value = operand.value
    elif operand.type == "bool":
        value.bool_value = operand.value
    elif operand.type == "timestamp":
        value.timestamp_value.CopyFrom(_timestamp(operand.value))
    else:
        value.string_list_value.values.extend(operand.value)
    return value


def filter_to_proto(node: FilterNode) -> filters_pb2.FilterNode:
    message = filters_pb2.FilterNode()
    if isinstance(node, Group):
        operators = {
            "and": filters_pb2.GROUP_OPERATOR_AND,
            "or": filters_pb2.GROUP_OPERATOR_OR,
            "not": filters_pb2.GROUP_OPERATOR_NOT,
        }
        message.group.operator = operators[node.operator]
        message.group.children.extend(filter_to_proto(c) for c in node.children)
        return message
    condition = message.condition
    if isinstance(node, AttributeTest):
        attribute = condition.attribute
        if node.native:
            attribute.native_attribute = NATIVE_NUMBERS[node.name]  # type: ignore[assignment]
        else:
            attribute.custom_attribute = node.name
        attribute.operator = int(node.operator)  # type: ignore[assignment]
        if node.value is not None:
            attribute.value.CopyFrom(_operand_to_proto(node.value))
        attribute.values.extend(_operand_to_proto(v) for v in node.values)
        attribute.ignore_case = node.ignore_case
    elif isinstance(node, PlatformTest):
        condition.platform.platforms.extend(node.platforms)  # type: ignore[arg-type]
    elif isinstance(node, CountryTest):
        condition.country.countries.extend(node.countries)
    elif isinstance(node, SubscriptionTest):
        channels = {v: k for k, v in CHANNELS.items()}
        kinds = {v: k for k, v in KINDS.items()}
        condition.subscription.channel = channels[node.channel]
        condition.subscription.kind = kinds[node.kind]
        condition.subscription.subscribed = node.subscribed
    elif isinstance(node, SmartSegmentTest):
        condition.smart_segment.segments.extend(node.segments)  # type: ignore[arg-type]
        condition.smart_segment.flags.extend(node.flags)  # type: ignore[arg-type]
    elif isinstance(node, EngagementTest):
        condition.engagement.operator = int(node.operator)  # type: ignore[assignment]
        condition.engagement.score = node.score
    elif isinstance(node, SeenTest):
        window = condition.last_seen if node.last else condition.first_seen
        if node.within_last_days is not None:
            window.within_last_days = node.within_last_days
        else:
            window.range.SetInParent()
            if node.start_time is not None:
                window.range.start_time.CopyFrom(_timestamp(node.start_time))
            if node.end_time is not None:
                window.range.end_time.CopyFrom(_timestamp(node.end_time))
    else:
        condition.event_count.event_name = node.event_name
        condition.event_count.operator = int(node.operator)  # type: ignore[assignment]
        condition.event_count.count = node.count
        condition.event_count.within_last_days = node.within_last_days
    return message


def segment_to_proto(segment: CustomSegment) -> segments_pb2.Segment:
    return segments_pb2.Segment(
        segment_id=str(segment.segment_id),
        display_name=segment.display_name,
        description=segment.description,
        filter=filter_to_proto(segment.filter),
        create_time=_timestamp(segment.create_time),
        size=segment.size,
        size_time=_timestamp(segment.size_time),
        etag=segment.etag,
    )


def segment_preview_to_proto(preview: SegmentPreview) -> segments_pb2.Segment:
    """The segment a validate_only CreateSegment would create: no ID, no create_time."""
    definition = preview.definition
    return segments_pb2.Segment(
        display_name=definition.display_name,
        description=definition.description,
        filter=filter_to_proto(definition.filter),
        size=preview.size,
        size_time=_timestamp(preview.size_time),
    )


def funnel_to_proto(funnel: Funnel) -> funnels_pb2.Funnel:
    message = _funnel_definition_to_proto(funnel)
    message.funnel_id = str(funnel.funnel_id)
    message.create_time.CopyFrom(_timestamp(funnel.create_time))
    message.reached_profile_counts.extend(funnel.reached_profile_counts)
    message.etag = funnel.etag
    return message


def funnel_preview_to_proto(preview: FunnelPreview) -> funnels_pb2.Funnel:
    """The funnel a validate_only CreateFunnel would create: no ID, no create_time."""
    message = _funnel_definition_to_proto(preview.definition)
    message.reached_profile_counts.extend(preview.reached_profile_counts)
    return message


def _funnel_definition_to_proto(funnel: Funnel | FunnelDefinition) -> funnels_pb2.Funnel:
    window = Duration()
    window.FromTimedelta(funnel.conversion_window)
    message = funnels_pb2.Funnel(
        display_name=funnel.display_name,
        description=funnel.description,
        conversion_window=window,
    )
    for step in funnel.steps:
        proto_step = message.steps.add(event_name=step.event_name)
        if step.condition is not None:
            test = step.condition
            condition = proto_step.attribute_condition
            condition.attribute_name = test.name
            condition.operator = int(test.operator)  # type: ignore[assignment]
            if test.value is not None:
                condition.value.CopyFrom(_operand_to_proto(test.value))
            condition.values.extend(_operand_to_proto(v) for v in test.values)
            condition.ignore_case = test.ignore_case
    return message
