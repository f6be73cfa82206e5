"""The admin forms of the console: a custom segment's or a funnel's definition as typed, the
contract message built from it, and the service's refusals told beside the box they name.

Pure functions of plain values and protobuf messages: no I/O, no HTTP. A form is read into a
dataclass of the strings typed (kept as typed, so a refused form comes back filled in), then
built into a request; what cannot be built (a number that is not one) is refused here, by box.
Box IDs are the form's own (`c2-value`: the value of condition 3), never the contract's paths.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from google.protobuf import duration_pb2, field_mask_pb2

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2
from profiles.segments.v1 import filters_pb2, funnels_pb2, segments_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from shared.convert import set_timestamp
from shared.names import normalize_name

# The form's limits, the contract's: a tree holds at most 31 conditions, a funnel 2 to 10 steps.
MAX_CONDITIONS = 31
MIN_STEPS, MAX_STEPS = 2, 10
MAX_IN_VALUES = 64

CONDITION_KINDS = {
    "attribute": "Attribute",
    "platform": "Platform",
    "country": "Country of the last session",
    "subscription": "Subscription",
    "last_seen": "Last seen in the last N days",
    "first_seen": "First seen in the last N days",
    "event_count": "Count of a custom event",
    "smart_segment": "Smart segment",
}
# Operator choices: form value -> (contract value, words).
OPERATORS = {
    "equals": (filters_pb2.OPERATOR_EQUALS, "is"),
    "not_equals": (filters_pb2.OPERATOR_NOT_EQUALS, "is not"),
    "less_than": (filters_pb2.OPERATOR_LESS_THAN, "is less than"),
    "at_most": (filters_pb2.OPERATOR_LESS_THAN_OR_EQUAL, "is at most"),
    "greater_than": (filters_pb2.OPERATOR_GREATER_THAN, "is more than"),
    "at_least": (filters_pb2.OPERATOR_GREATER_THAN_OR_EQUAL, "is at least"),
    "in": (filters_pb2.OPERATOR_IN, "is one of (comma-separated)"),
    "contains": (filters_pb2.OPERATOR_CONTAINS, "contains"),
    "starts_with": (filters_pb2.OPERATOR_STARTS_WITH, "starts with"),
    "exists": (filters_pb2.OPERATOR_EXISTS, "is set"),
}
# An event count compares a number: no IN, CONTAINS, STARTS_WITH or EXISTS.
COUNT_OPERATORS = ("equals", "not_equals", "less_than", "at_most", "greater_than", "at_least")
VALUE_TYPES = {
    "string": "text",
    "number": "number",
    "bool": "true or false",
    "timestamp": "time (UTC)",
}
NATIVE_ATTRIBUTES = {
    "email": ("Email", filters_pb2.NATIVE_ATTRIBUTE_EMAIL),
    "phone": ("Phone", filters_pb2.NATIVE_ATTRIBUTE_PHONE),
    "first_name": ("First name", filters_pb2.NATIVE_ATTRIBUTE_FIRST_NAME),
    "last_name": ("Last name", filters_pb2.NATIVE_ATTRIBUTE_LAST_NAME),
    "language": ("Language", filters_pb2.NATIVE_ATTRIBUTE_LANGUAGE),
    "region": ("Region", filters_pb2.NATIVE_ATTRIBUTE_REGION),
    "country": ("Country (attribute)", filters_pb2.NATIVE_ATTRIBUTE_COUNTRY),
    "timezone": ("Time zone", filters_pb2.NATIVE_ATTRIBUTE_TIMEZONE),
    "avatar_url": ("Avatar URL", filters_pb2.NATIVE_ATTRIBUTE_AVATAR_URL),
}
# The attribute box's value for "a custom attribute, named in the box beside".
CUSTOM = "custom"
PLATFORM_CHOICES = {
    "ios": ("iOS", types_pb2.PLATFORM_IOS),
    "android": ("Android", types_pb2.PLATFORM_ANDROID),
    "web": ("Web", types_pb2.PLATFORM_WEB),
    "api": ("API (server-side)", types_pb2.PLATFORM_API),
}
CHANNEL_CHOICES = {
    "email": ("Email", types_pb2.CHANNEL_EMAIL),
    "sms": ("SMS", types_pb2.CHANNEL_SMS),
    "push": ("Push", types_pb2.CHANNEL_PUSH),
}
SUBSCRIPTION_KINDS = {
    "marketing": ("Marketing", types_pb2.SUBSCRIPTION_KIND_MARKETING),
    "transactional": ("Transactional", types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL),
}
SMART_CHOICES = {
    "smart:1": "New",
    "smart:2": "One-time",
    "smart:3": "Engaged",
    "smart:4": "Dormant",
    "flag:1": "Promising New",
    "flag:2": "Promising Dormant",
    "flag:3": "Risky Engaged",
}
WINDOW_UNITS = {"minutes": 60, "hours": 3600, "days": 86_400}
JOINS = {"and": filters_pb2.GROUP_OPERATOR_AND, "or": filters_pb2.GROUP_OPERATOR_OR}

# The forms' choices as (value, words), in the order the boxes list them.
OPERATOR_CHOICES = [(value, words) for value, (_, words) in OPERATORS.items()]
COUNT_OPERATOR_CHOICES = [(value, OPERATORS[value][1]) for value in COUNT_OPERATORS]
VALUE_TYPE_CHOICES = list(VALUE_TYPES.items())
ATTRIBUTE_CHOICES = [(CUSTOM, "a custom attribute, named below")] + [
    (value, words) for value, (words, _) in NATIVE_ATTRIBUTES.items()
]
KIND_CHOICES = list(CONDITION_KINDS.items())
CHANNEL_WORDS = [(value, words) for value, (words, _) in CHANNEL_CHOICES.items()]
SUBSCRIPTION_KIND_WORDS = [(value, words) for value, (words, _) in SUBSCRIPTION_KINDS.items()]
PLATFORM_WORDS = [(value, words) for value, (words, _) in PLATFORM_CHOICES.items()]
WINDOW_UNIT_CHOICES = [(unit, unit) for unit in WINDOW_UNITS]

NAME_WORDS = "A name is 1 to 100 characters, not used by another one of the project."
EVENT_NAME_WORDS = "An event name is 1 to 30 letters, digits or underscores, such as purchase."
ATTRIBUTE_NAME_WORDS = "An attribute name is 1 to 30 letters, digits or underscores, such as plan."
# What a box says when the service refused it without words the console has for that box.
BOX_WORDS = {
    "name": NAME_WORDS,
    "description": "A description holds at most 1,000 characters.",
    "custom_name": ATTRIBUTE_NAME_WORDS,
    "attribute": "Choose an attribute.",
    "operator": "This comparison does not apply here.",
    "value": "This value does not fit the comparison.",
    "platforms": "Tick 1 to 4 platforms.",
    "countries": "Countries are two-letter codes separated by commas, such as FR, DE.",
    "channel": "Choose a channel.",
    "sub_kind": "Choose a kind of subscription.",
    "days": "A number of days from 1 to 3,650.",
    "event_name": EVENT_NAME_WORDS,
    "count_operator": "This comparison does not apply to a count.",
    "count": "A count from 0 to 1,000,000.",
    "count_days": "A number of days from 1 to 365.",
    "smart": "Tick at least one smart segment or flag.",
    "window": "A conversion window from 1 minute to 90 days.",
    "attribute_name": ATTRIBUTE_NAME_WORDS,
}


@dataclass(frozen=True, slots=True)
class ConditionForm:
    """One condition as typed: every box's text, whatever the kind (switching kind keeps the
    rest)."""

    kind: str = "attribute"
    negate: bool = False
    attribute: str = CUSTOM
    custom_name: str = ""
    operator: str = "equals"
    value_type: str = "string"
    value: str = ""
    ignore_case: bool = False
    platforms: tuple[str, ...] = ()
    countries: str = ""
    channel: str = "email"
    sub_kind: str = "marketing"
    subscribed: str = "yes"
    days: str = "30"
    event_name: str = ""
    count_operator: str = "at_least"
    count: str = "1"
    count_days: str = "30"
    smart: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SegmentForm:
    name: str = ""
    description: str = ""
    join: str = "and"
    conditions: tuple[ConditionForm, ...] = (ConditionForm(),)


@dataclass(frozen=True, slots=True)
class StepForm:
    event_name: str = ""
    attribute_name: str = ""  # empty: no condition on the step
    operator: str = "equals"
    value_type: str = "string"
    value: str = ""
    ignore_case: bool = False


@dataclass(frozen=True, slots=True)
class FunnelForm:
    name: str = ""
    description: str = ""
    steps: tuple[StepForm, ...] = (StepForm(), StepForm())
    window: str = "7"
    window_unit: str = "days"


@dataclass(slots=True)
class Refusals:
    """What the page says, by box ID ("" for the form as a whole)."""

    boxes: dict[str, str] = field(default_factory=dict)

    def add(self, box: str, text: str) -> None:
        self.boxes.setdefault(box, text)

    def __bool__(self) -> bool:
        return bool(self.boxes)


Getter = Callable[[str], list[str]]
FormT = TypeVar("FormT", SegmentForm, FunnelForm)


# The longest text a box keeps: above every valid value (an IN list of 64 values of 300
# characters with their separators is under 20,000), so what it cuts was refused anyway, and a
# refused form of megabytes is not sent to the service nor echoed back whole.
MAX_TYPED_CHARS = 24_000


def _one(get: Getter, name: str, default: str = "") -> str:
    values = get(name)
    return values[0][:MAX_TYPED_CHARS] if values else default


def _choice(text: str, choices: Iterable[str], default: str) -> str:
    return text if text in choices else default


# -- reading the forms ------------------------------------------------------------------------


def read_segment_form(get: Getter) -> SegmentForm:
    """The segment form from the posted fields (`get(name)`: every value of a field)."""
    count = min(_count(_one(get, "conditions"), 1), MAX_CONDITIONS)
    conditions = []
    for i in range(count):
        p = f"c{i}-"
        conditions.append(
            ConditionForm(
                kind=_choice(_one(get, p + "kind"), CONDITION_KINDS, "attribute"),
                negate=bool(_one(get, p + "negate")),
                attribute=_choice(_one(get, p + "attribute"), (CUSTOM, *NATIVE_ATTRIBUTES), CUSTOM),
                custom_name=_one(get, p + "custom_name").strip(),
                operator=_choice(_one(get, p + "operator"), OPERATORS, "equals"),
                value_type=_choice(_one(get, p + "value_type"), VALUE_TYPES, "string"),
                value=_one(get, p + "value"),
                ignore_case=bool(_one(get, p + "ignore_case")),
                platforms=tuple(v for v in get(p + "platforms") if v in PLATFORM_CHOICES),
                countries=_one(get, p + "countries"),
                channel=_choice(_one(get, p + "channel"), CHANNEL_CHOICES, "email"),
                sub_kind=_choice(_one(get, p + "sub_kind"), SUBSCRIPTION_KINDS, "marketing"),
                subscribed=_choice(_one(get, p + "subscribed"), ("yes", "no"), "yes"),
                days=_one(get, p + "days", "30").strip(),
                event_name=_one(get, p + "event_name").strip(),
                count_operator=_choice(
                    _one(get, p + "count_operator"), COUNT_OPERATORS, "at_least"
                ),
                count=_one(get, p + "count", "1").strip(),
                count_days=_one(get, p + "count_days", "30").strip(),
                smart=tuple(v for v in get(p + "smart") if v in SMART_CHOICES),
            )
        )
    return SegmentForm(
        name=_one(get, "name"),
        description=_one(get, "description"),
        join=_choice(_one(get, "join"), JOINS, "and"),
        conditions=tuple(conditions),
    )


def read_funnel_form(get: Getter) -> FunnelForm:
    count = max(min(_count(_one(get, "steps"), MIN_STEPS), MAX_STEPS), MIN_STEPS)
    steps = []
    for i in range(count):
        p = f"s{i}-"
        steps.append(
            StepForm(
                event_name=_one(get, p + "event_name").strip(),
                attribute_name=_one(get, p + "attribute_name").strip(),
                operator=_choice(_one(get, p + "operator"), OPERATORS, "equals"),
                value_type=_choice(_one(get, p + "value_type"), VALUE_TYPES, "string"),
                value=_one(get, p + "value"),
                ignore_case=bool(_one(get, p + "ignore_case")),
            )
        )
    return FunnelForm(
        name=_one(get, "name"),
        description=_one(get, "description"),
        steps=tuple(steps),
        window=_one(get, "window", "7").strip(),
        window_unit=_choice(_one(get, "window_unit"), WINDOW_UNITS, "days"),
    )


def _count(text: str, default: int) -> int:
    return int(text) if text.isdigit() and len(text) < 4 and int(text) > 0 else default


def add_condition(form: SegmentForm) -> SegmentForm:
    if len(form.conditions) >= MAX_CONDITIONS:
        return form
    return replace(form, conditions=(*form.conditions, ConditionForm()))


def remove_condition(form: SegmentForm, index: int) -> SegmentForm:
    kept = tuple(c for i, c in enumerate(form.conditions) if i != index)
    return replace(form, conditions=kept or (ConditionForm(),))


def add_step(form: FunnelForm) -> FunnelForm:
    if len(form.steps) >= MAX_STEPS:
        return form
    return replace(form, steps=(*form.steps, StepForm()))


def remove_step(form: FunnelForm, index: int) -> FunnelForm:
    if len(form.steps) <= MIN_STEPS:
        return form
    return replace(form, steps=tuple(s for i, s in enumerate(form.steps) if i != index))


# -- building the requests --------------------------------------------------------------------


def _parse_time(text: str) -> datetime | None:
    """A time typed as ISO 8601 ("2026-12-01", "2026-12-01T10:30", with or without an offset),
    read as UTC when it has no offset."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _operand(text: str, value_type: str) -> types_pb2.AttributeValue | str:
    """The operand typed in `text` as `value_type`, or why it is not one."""
    operand = types_pb2.AttributeValue()
    if value_type == "number":
        try:
            number = float(text.strip())
        except ValueError:
            return f"“{_short(text)}” is not a number (use a dot for decimals: 4.5)."
        if not math.isfinite(number):
            return "A number must be finite."
        operand.number_value = number
    elif value_type == "bool":
        word = text.strip().lower()
        if word not in ("true", "false"):
            return "Type true or false."
        operand.bool_value = word == "true"
    elif value_type == "timestamp":
        moment = _parse_time(text)
        if moment is None:
            return f"“{_short(text)}” is not a time: type 2026-12-01 or 2026-12-01T10:30 (UTC)."
        set_timestamp(operand.timestamp_value, moment)
    else:
        operand.string_value = text
    return operand


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _comparison(
    operator: str, value_type: str, text: str, box: str, bad: Refusals
) -> tuple[int, types_pb2.AttributeValue | None, list[types_pb2.AttributeValue]]:
    """The operator, the operand (`value`) and the operands (`values`, for IN) as typed."""
    contract, _ = OPERATORS[operator]
    if operator == "exists":
        return contract, None, []
    if operator == "in":
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            bad.add(box, "Type one or more values separated by commas.")
            return contract, None, []
        if len(items) > MAX_IN_VALUES:
            bad.add(box, f"At most {MAX_IN_VALUES} values; this list has {len(items)}.")
            return contract, None, []
        operands = []
        for item in items:
            parsed = _operand(item, value_type)
            if isinstance(parsed, str):
                bad.add(box, parsed)
                return contract, None, []
            operands.append(parsed)
        return contract, None, operands
    parsed = _operand(text, value_type)
    if isinstance(parsed, str):
        bad.add(box, parsed)
        return contract, None, []
    return contract, parsed, []


def _whole(text: str, box: str, bad: Refusals) -> int:
    """A whole number typed in `box`; 0 and a refusal when it is not one (the service checks
    the range and says so)."""
    text = text.strip()
    if re.fullmatch(r"-?\d{1,9}", text):
        return int(text)
    bad.add(box, f"“{_short(text)}” is not a whole number." if text else "Type a number.")
    return 0


def _condition(form: ConditionForm, i: int, bad: Refusals) -> filters_pb2.Condition:
    box = f"c{i}-"
    condition = filters_pb2.Condition()
    if form.kind == "attribute":
        test = condition.attribute
        if form.attribute == CUSTOM:
            if not form.custom_name:
                bad.add(box + "custom_name", "Type the custom attribute's name.")
            test.custom_attribute = form.custom_name
        else:
            test.native_attribute = NATIVE_ATTRIBUTES[form.attribute][1]
        operator, value, values = _comparison(
            form.operator, form.value_type, form.value, box + "value", bad
        )
        test.operator = operator  # type: ignore[assignment]
        if value is not None:
            test.value.CopyFrom(value)
        test.values.extend(values)
        test.ignore_case = form.ignore_case
    elif form.kind == "platform":
        condition.platform.platforms.extend(PLATFORM_CHOICES[p][1] for p in form.platforms)
        if not form.platforms:
            bad.add(box + "platforms", "Tick at least one platform.")
    elif form.kind == "country":
        countries = [c.strip().upper() for c in form.countries.split(",") if c.strip()]
        if not countries:
            bad.add(box + "countries", "Type one or more country codes, such as FR, DE.")
        condition.country.countries.extend(countries)
    elif form.kind == "subscription":
        condition.subscription.channel = CHANNEL_CHOICES[form.channel][1]
        condition.subscription.kind = SUBSCRIPTION_KINDS[form.sub_kind][1]
        condition.subscription.subscribed = form.subscribed == "yes"
    elif form.kind in ("last_seen", "first_seen"):
        window: filters_pb2.TimeWindow = getattr(condition, form.kind)
        window.within_last_days = _whole(form.days, box + "days", bad)
    elif form.kind == "event_count":
        test_count = condition.event_count
        if not form.event_name:
            bad.add(box + "event_name", "Type the custom event's name, such as purchase.")
        test_count.event_name = stored_event_name(form.event_name)
        test_count.operator = OPERATORS[form.count_operator][0]
        test_count.count = _whole(form.count, box + "count", bad)
        test_count.within_last_days = _whole(form.count_days, box + "count_days", bad)
    else:  # smart_segment
        for choice in form.smart:
            kind, _, number = choice.partition(":")
            target = condition.smart_segment.segments if kind == "smart" else None
            if target is not None:
                target.append(int(number))  # type: ignore[arg-type]
            else:
                condition.smart_segment.flags.append(int(number))  # type: ignore[arg-type]
        if not form.smart:
            bad.add(box + "smart", "Tick at least one smart segment or flag.")
    return condition


# A name the contract takes as it is (its `^[a-zA-Z0-9_]{1,30}$`): sent unchanged.
_CONTRACT_NAME = re.compile(r"[A-Za-z0-9_]{1,30}")


def stored_event_name(typed: str) -> str:
    """An event name as the edge stores the name an SDK sends ("Product Viewed" is stored as
    product_viewed: shared.names), so that a name typed as the SDK sent it finds its events. A
    contract name is kept as it is ("_internal", which ingest stores as sent); text of which
    the rule keeps nothing is sent as typed, for the service to refuse in its words."""
    if _CONTRACT_NAME.fullmatch(typed):
        return typed
    return normalize_name(typed) or typed


def segment_request(
    form: SegmentForm, request_id: str = ""
) -> tuple[segments_pb.CreateSegmentRequest, Refusals]:
    """CreateSegment's request for the form (one group of its conditions joined by AND or OR,
    a negated condition wrapped in NOT), and what the console refuses before asking."""
    bad = Refusals()
    if not form.name.strip():
        bad.add("name", "Give the segment a name.")
    request = segments_pb.CreateSegmentRequest(
        display_name=form.name.strip(), description=form.description.strip(), request_id=request_id
    )
    group = request.filter.group
    group.operator = JOINS[form.join]
    for i, typed in enumerate(form.conditions):
        condition = _condition(typed, i, bad)
        child = group.children.add()
        if typed.negate:
            child.group.operator = filters_pb2.GROUP_OPERATOR_NOT
            child.group.children.add().condition.CopyFrom(condition)
        else:
            child.condition.CopyFrom(condition)
    return request, bad


def funnel_request(
    form: FunnelForm, request_id: str = ""
) -> tuple[segments_pb.CreateFunnelRequest, Refusals]:
    bad = Refusals()
    if not form.name.strip():
        bad.add("name", "Give the funnel a name.")
    request = segments_pb.CreateFunnelRequest(
        display_name=form.name.strip(), description=form.description.strip(), request_id=request_id
    )
    for i, typed in enumerate(form.steps):
        box = f"s{i}-"
        if not typed.event_name:
            bad.add(box + "event_name", "Type the custom event's name, such as purchase.")
        step = funnels_pb2.FunnelStep(event_name=stored_event_name(typed.event_name))
        if typed.attribute_name:
            test = step.attribute_condition
            test.attribute_name = typed.attribute_name
            operator, value, values = _comparison(
                typed.operator, typed.value_type, typed.value, box + "value", bad
            )
            test.operator = operator  # type: ignore[assignment]
            if value is not None:
                test.value.CopyFrom(value)
            test.values.extend(values)
            test.ignore_case = typed.ignore_case
        request.steps.append(step)
    try:
        amount = float(form.window)
    except ValueError:
        bad.add("window", f"“{_short(form.window)}” is not a number.")
        amount = 0
    if math.isfinite(amount) and amount > 0:
        seconds = round(amount * WINDOW_UNITS[form.window_unit])
        request.conversion_window.CopyFrom(duration_pb2.Duration(seconds=min(seconds, 2**40)))
    elif "window" not in bad.boxes:
        bad.add("window", BOX_WORDS["window"])
    return request, bad


# -- editing: a stored definition in the form, and the update it makes -------------------------

_OPERATOR_KEYS: dict[int, str] = {int(contract): key for key, (contract, _) in OPERATORS.items()}
# A box of a condition (`c3-value`) or a step (`s1-event_name`), not of the whole form.
_ROW_BOX = re.compile(r"[cs]\d+-")
_NATIVE_KEYS = {number: key for key, (_, number) in NATIVE_ATTRIBUTES.items()}
_PLATFORM_KEYS = {number: key for key, (_, number) in PLATFORM_CHOICES.items()}
_CHANNEL_KEYS = {number: key for key, (_, number) in CHANNEL_CHOICES.items()}
_SUBSCRIPTION_KEYS = {number: key for key, (_, number) in SUBSCRIPTION_KINDS.items()}


def segment_form_of(segment: segments_pb2.Segment) -> tuple[SegmentForm, bool]:
    """The segment form holding a stored segment, and whether it holds its filter: the form is
    one group of conditions joined by AND or OR, each maybe negated, of the kinds and value
    types it offers. A filter of another shape (defined through the API: nested groups, an
    engagement condition, a date range, a URL or list value) is not editable here: the form
    then holds its name and description only."""
    form = SegmentForm(name=segment.display_name, description=segment.description)
    found = _conditions_of(segment.filter)
    if found is None:
        return form, False
    join, conditions = found
    return replace(form, join=join, conditions=conditions), True


def _conditions_of(node: filters_pb2.FilterNode) -> tuple[str, tuple[ConditionForm, ...]] | None:
    if node.WhichOneof("node") == "condition":
        single = _condition_form(node.condition, negate=False)
        return None if single is None else ("and", (single,))
    if node.WhichOneof("node") != "group":
        return None
    joins = {contract: key for key, contract in JOINS.items()}
    join = joins.get(node.group.operator)
    children = list(node.group.children)
    if join is None or not 1 <= len(children) <= MAX_CONDITIONS:
        return None
    conditions = []
    for child in children:
        negate = child.WhichOneof("node") == "group"
        if negate:
            inner = child.group
            if (
                inner.operator != filters_pb2.GROUP_OPERATOR_NOT
                or len(inner.children) != 1
                or inner.children[0].WhichOneof("node") != "condition"
            ):
                return None
            typed = _condition_form(inner.children[0].condition, negate=True)
        else:
            typed = _condition_form(child.condition, negate=False)
        if typed is None:
            return None
        conditions.append(typed)
    return join, tuple(conditions)


def _condition_form(condition: filters_pb2.Condition, *, negate: bool) -> ConditionForm | None:
    """One stored condition as typed in the form; None when the form has no boxes for it."""
    kind = condition.WhichOneof("condition")
    if kind == "attribute":
        test = condition.attribute
        typed = _comparison_text(
            test.operator, test.value if test.HasField("value") else None, test.values
        )
        if typed is None:
            return None
        operator, value_type, value = typed
        if test.WhichOneof("attribute") == "native_attribute":
            native = _NATIVE_KEYS.get(test.native_attribute)
            if native is None:
                return None
            attribute, custom_name = native, ""
        else:
            attribute, custom_name = CUSTOM, test.custom_attribute
        return ConditionForm(
            kind="attribute",
            negate=negate,
            attribute=attribute,
            custom_name=custom_name,
            operator=operator,
            value_type=value_type,
            value=value,
            ignore_case=test.ignore_case,
        )
    if kind == "platform":
        platforms = {_PLATFORM_KEYS.get(p) for p in condition.platform.platforms}
        if None in platforms:
            return None
        # In the boxes' order, which is the order a posted form lists them in.
        ordered = tuple(key for key in PLATFORM_CHOICES if key in platforms)
        return ConditionForm(kind="platform", negate=negate, platforms=ordered)
    if kind == "country":
        return ConditionForm(
            kind="country", negate=negate, countries=", ".join(condition.country.countries)
        )
    if kind == "subscription":
        sub = condition.subscription
        channel, sub_kind = _CHANNEL_KEYS.get(sub.channel), _SUBSCRIPTION_KEYS.get(sub.kind)
        if channel is None or sub_kind is None:
            return None
        return ConditionForm(
            kind="subscription",
            negate=negate,
            channel=channel,
            sub_kind=sub_kind,
            subscribed="yes" if sub.subscribed else "no",
        )
    if kind in ("last_seen", "first_seen"):
        window: filters_pb2.TimeWindow = getattr(condition, kind)
        if window.WhichOneof("window") != "within_last_days":
            return None  # a date range: no box for it
        return ConditionForm(kind=kind, negate=negate, days=str(window.within_last_days))
    if kind == "event_count":
        count = condition.event_count
        count_operator = _OPERATOR_KEYS.get(count.operator)
        if count_operator not in COUNT_OPERATORS:
            return None
        return ConditionForm(
            kind="event_count",
            negate=negate,
            event_name=count.event_name,
            count_operator=count_operator,
            count=str(count.count),
            count_days=str(count.within_last_days),
        )
    if kind == "smart_segment":
        chosen = {f"smart:{int(v)}" for v in condition.smart_segment.segments}
        chosen |= {f"flag:{int(v)}" for v in condition.smart_segment.flags}
        if not chosen <= SMART_CHOICES.keys():
            return None
        ordered = tuple(key for key in SMART_CHOICES if key in chosen)
        return ConditionForm(kind="smart_segment", negate=negate, smart=ordered)
    return None  # engagement, or a kind this console does not know


def _comparison_text(
    contract: int,
    value: types_pb2.AttributeValue | None,
    values: Sequence[types_pb2.AttributeValue],
) -> tuple[str, str, str] | None:
    """(operator box, value type box, value box) of a stored comparison; None when the boxes
    cannot hold it (a URL or list operand, or an IN list whose items the comma list would
    change)."""
    operator = _OPERATOR_KEYS.get(contract)
    if operator is None:
        return None
    if operator == "exists":
        return operator, "string", ""
    if operator == "in":
        typed = [_operand_text(v) for v in values]
        if not typed or any(t is None for t in typed):
            return None
        kinds = {t[0] for t in typed if t is not None}
        texts = [t[1] for t in typed if t is not None]
        if len(kinds) != 1 or any("," in t or t != t.strip() or not t for t in texts):
            return None
        return operator, kinds.pop(), ", ".join(texts)
    if value is None:
        return None
    typed_value = _operand_text(value)
    if typed_value is None:
        return None
    return operator, typed_value[0], typed_value[1]


def _operand_text(value: types_pb2.AttributeValue) -> tuple[str, str] | None:
    """(value type box, value box) of an operand, as _operand reads it back."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return "string", value.string_value
    if which == "number_value":
        number = value.number_value
        text = str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)
        return "number", text
    if which == "bool_value":
        return "bool", "true" if value.bool_value else "false"
    if which == "timestamp_value":
        moment = value.timestamp_value.ToDatetime(tzinfo=UTC)
        return "timestamp", moment.isoformat().replace("+00:00", "Z")
    return None  # a URL or a list of strings: no box types them


def funnel_form_of(funnel: funnels_pb2.Funnel) -> tuple[FunnelForm, bool]:
    """The funnel form holding a stored funnel, and whether it holds its steps (each step's
    condition typed in its boxes; not a URL or list operand). The window is shown in the
    largest unit that holds it exactly."""
    steps = []
    editable = True
    for step in funnel.steps:
        typed = StepForm(event_name=step.event_name)
        if step.HasField("attribute_condition"):
            test = step.attribute_condition
            compared = _comparison_text(
                test.operator, test.value if test.HasField("value") else None, test.values
            )
            if compared is None:
                editable = False
            else:
                operator, value_type, value = compared
                typed = replace(
                    typed,
                    attribute_name=test.attribute_name,
                    operator=operator,
                    value_type=value_type,
                    value=value,
                    ignore_case=test.ignore_case,
                )
        steps.append(typed)
    window, unit = window_text(funnel.conversion_window.ToTimedelta() // timedelta(milliseconds=1))
    form = FunnelForm(
        name=funnel.display_name,
        description=funnel.description,
        steps=tuple(steps)
        if editable and MIN_STEPS <= len(steps) <= MAX_STEPS
        else FunnelForm().steps,
        window=window,
        window_unit=unit,
    )
    return form, editable and MIN_STEPS <= len(steps) <= MAX_STEPS


def window_text(milliseconds: int) -> tuple[str, str]:
    """A window as the form's length and unit: the largest unit that holds it whole, else
    minutes with their fraction."""
    for unit in ("days", "hours", "minutes"):
        unit_ms = WINDOW_UNITS[unit] * 1000
        if milliseconds % unit_ms == 0:
            return str(milliseconds // unit_ms), unit
    return repr(milliseconds / 60_000), "minutes"


def keep_rows(form: FormT, initial: FormT) -> FormT:
    """The posted form with the rows (join and conditions, or steps) of `initial`: those of a
    definition the form cannot hold, never shown, so whatever was posted for them is not
    read."""
    if isinstance(form, SegmentForm) and isinstance(initial, SegmentForm):
        return replace(form, join=initial.join, conditions=initial.conditions)
    if isinstance(form, FunnelForm) and isinstance(initial, FunnelForm):
        return replace(form, steps=initial.steps)
    return form


def segment_update_request(
    form: SegmentForm,
    initial: SegmentForm,
    *,
    filter_editable: bool,
    segment_id: str,
    etag: str,
) -> tuple[segments_pb.UpdateSegmentRequest, Refusals]:
    """UpdateSegment's request for the form: the name always, the description and the filter
    when they differ from `initial` (the stored segment in the form), so that a segment whose
    conditions were left as they are is not recomputed, and a filter the form cannot hold is
    never sent. `etag` makes the service refuse the update if the segment changed since the
    page was shown."""
    built, bad = segment_request(form)
    segment = segments_pb2.Segment(
        segment_id=segment_id,
        display_name=built.display_name,
        description=built.description,
        etag=etag,
    )
    paths = ["display_name"]
    if form.description.strip() != initial.description.strip():
        paths.append("description")
    if filter_editable and (form.join, form.conditions) != (initial.join, initial.conditions):
        segment.filter.CopyFrom(built.filter)
        paths.append("filter")
    elif not filter_editable:
        # The conditions posted are the form's defaults, never shown: not checked, not sent.
        bad.boxes = {box: text for box, text in bad.boxes.items() if not _ROW_BOX.match(box)}
    request = segments_pb.UpdateSegmentRequest(
        segment=segment, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    return request, bad


def funnel_update_request(
    form: FunnelForm,
    initial: FunnelForm,
    *,
    steps_editable: bool,
    funnel_id: str,
    etag: str,
) -> tuple[segments_pb.UpdateFunnelRequest, Refusals]:
    """UpdateFunnel's request for the form, as segment_update_request: the name always, the
    description, steps and window when they differ from `initial` (a window left as shown is
    not rounded to the second the form types)."""
    built, bad = funnel_request(form)
    funnel = funnels_pb2.Funnel(
        funnel_id=funnel_id,
        display_name=built.display_name,
        description=built.description,
        etag=etag,
    )
    paths = ["display_name"]
    if form.description.strip() != initial.description.strip():
        paths.append("description")
    if steps_editable and form.steps != initial.steps:
        funnel.steps.extend(built.steps)
        paths.append("steps")
    elif not steps_editable:
        bad.boxes = {box: text for box, text in bad.boxes.items() if not _ROW_BOX.match(box)}
    if (form.window, form.window_unit) != (initial.window, initial.window_unit):
        funnel.conversion_window.CopyFrom(built.conversion_window)
        paths.append("conversion_window")
    elif "window" in bad.boxes:
        del bad.boxes["window"]
    request = segments_pb.UpdateFunnelRequest(
        funnel=funnel, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    return request, bad


def update_violations(
    violations: Sequence[tuple[str, str]], resource: str
) -> list[tuple[str, str]]:
    """An update's field violations with the paths a creation's would have (`segment.filter...`
    is the form's `filter...`), so that the same mapping tells them beside their boxes."""
    prefix = resource + "."
    return [(path.removeprefix(prefix), why) for path, why in violations]


# -- the users table's filters as a new segment's conditions -----------------------------------


@dataclass(frozen=True, slots=True)
class UsersFilters:
    """The users table's filters as its URL holds them, read (pages._users_filters): the tab,
    the segment box (`smart:3`, `flag:1`, `custom:<ID>`), the platform's name, the codes and
    the starts typed."""

    tab: str = "all"
    segment: str = ""
    platform: str = "all"
    country: str = ""
    language: str = ""
    reach: str = ""
    id_prefix: str = ""
    custom_id: str = ""
    email: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class FilterWords:
    """One filter of the users table as the segment form names it: what it is (`label`, with
    what was typed apart, `typed`, for the page to isolate and shorten), and how it was carried
    over or why it was not (`how`)."""

    label: str
    typed: str = ""
    how: str = ""


@dataclass(frozen=True, slots=True)
class FromUsers:
    """The new-segment form filled from the users table's filters: the form, the filters
    carried over as its conditions, and those no condition of the form expresses (named on
    the page, never dropped without a word)."""

    form: SegmentForm
    carried: tuple[FilterWords, ...]
    left: tuple[FilterWords, ...]


# What the identity tabs and the boxes no segment condition expresses are, and why not.
NO_CUSTOM_ID_CONDITION = "a segment has no condition on the custom ID"
USERS_TABS_LEFT = {
    "identified": "Identified profiles (with a custom ID)",
    "anonymous": "Anonymous profiles (without a custom ID)",
}
USER_DETAILS = "With user details (a first or last name, an email or a phone number)"
OWN_GROUP = (
    "joined by OR, it needs a group of its own beside the other conditions, and this form"
    " holds one group"
)
# The users table's reach filter (ListProfiles' reachable_channel) is the overview's rule: an
# address for the channel and a marketing subscription on it, for email and SMS.
REACH_ADDRESSES = {"email": "email", "sms": "phone"}
REACH_HOW = {
    "email": "an email marketing subscription, and the email set",
    "sms": "an SMS marketing subscription, and the phone set",
}


def _exists(attribute: str) -> ConditionForm:
    return ConditionForm(kind="attribute", attribute=attribute, operator="exists")


def segment_form_from_users(
    filters: UsersFilters, custom: segments_pb2.Segment | None = None
) -> FromUsers:
    """The new-segment form with conditions that match the profiles the users table lists
    with `filters` (their evaluation reads the same facts the table's projection is made
    of), and the filters it cannot hold. `custom` is the custom segment the table is
    filtered by (GetSegment's; None when it no longer exists): its conditions are copied, as
    the form can hold no "member of" condition.

    Carried over: the smart segment or flag, the platform, the country of the last session,
    the reach by email or SMS (the address set and a marketing subscription on the channel),
    the start of the email (any case, as both compare emails), the user details tab (a
    group of four "is set", alone, or implied by an email or phone condition), a custom
    segment's conditions (a form it can hold, joined by AND or alone). Not: the identified
    and anonymous tabs and the custom ID's start (a segment has no custom ID condition), the
    profile ID's start, the name (a word of it, ignoring accents), the language (the table
    takes the devices' language when the attribute is unset), the reach by push (tokens and
    opt-in)."""
    own: list[ConditionForm] = []
    carried: list[FilterWords] = []
    left: list[FilterWords] = []
    # Groups joined by OR (the user details, a custom segment's OR): the form holds one group,
    # so such a group is carried only when it is the whole filter.
    alone: list[tuple[FilterWords, str, tuple[ConditionForm, ...]]] = []

    kind, _, value = filters.segment.partition(":")
    if kind in ("smart", "flag"):
        label = "Smart segment" if kind == "smart" else "Predictive flag"
        own.append(ConditionForm(kind="smart_segment", smart=(filters.segment,)))
        carried.append(FilterWords(label, SMART_CHOICES.get(filters.segment, value)))
    if filters.platform in PLATFORM_CHOICES:
        own.append(ConditionForm(kind="platform", platforms=(filters.platform,)))
        carried.append(FilterWords("Platform", PLATFORM_CHOICES[filters.platform][0]))
    if filters.country:
        own.append(ConditionForm(kind="country", countries=filters.country))
        carried.append(FilterWords("Country of the last session", filters.country))
    if filters.reach in REACH_ADDRESSES:
        own.append(ConditionForm(kind="subscription", channel=filters.reach))
        own.append(_exists(REACH_ADDRESSES[filters.reach]))
        carried.append(
            FilterWords("Reachable by", CHANNEL_CHOICES[filters.reach][0], REACH_HOW[filters.reach])
        )
    elif filters.reach:
        why = "a segment has no condition on push tokens or on the devices' notification opt-in"
        left.append(FilterWords("Reachable by", CHANNEL_CHOICES[filters.reach][0], why))
    if filters.email:
        own.append(
            ConditionForm(
                kind="attribute",
                attribute="email",
                operator="starts_with",
                value=filters.email,
                ignore_case=True,
            )
        )
        carried.append(FilterWords("Email starting with", filters.email, "in any case"))

    if filters.tab in USERS_TABS_LEFT:
        left.append(FilterWords(USERS_TABS_LEFT[filters.tab], "", NO_CUSTOM_ID_CONDITION))
    elif filters.tab == "details":
        if filters.email or filters.reach in REACH_ADDRESSES:
            # An email or a phone is set already: the profile has user details.
            carried.append(FilterWords(USER_DETAILS, "", "implied by the email or phone set"))
        else:
            four = tuple(_exists(a) for a in ("first_name", "last_name", "email", "phone"))
            how = "the first name, last name, email or phone is set"
            alone.append((FilterWords(USER_DETAILS, "", how), "or", four))

    if kind == "custom":
        name = custom.display_name if custom is not None else value
        label = "Member of the custom segment"
        if custom is None:
            left.append(FilterWords(label, name, "it no longer exists"))
        else:
            form, editable = segment_form_of(custom)
            if not editable:
                why = "its conditions have a shape this form cannot hold (defined through the API)"
                left.append(FilterWords(label, name, why))
            elif len(form.conditions) == 1 or form.join == "and":
                if len(own) + len(form.conditions) > MAX_CONDITIONS:
                    why = f"with the others, its conditions would be over {MAX_CONDITIONS}"
                    left.append(FilterWords(label, name, why))
                else:
                    own.extend(form.conditions)
                    how = f"its conditions, copied: a later change to “{name}” does not follow"
                    carried.append(FilterWords(label, name, how))
            else:
                how = f"its conditions, copied: a later change to “{name}” does not follow"
                alone.append((FilterWords(label, name, how), "or", form.conditions))

    join = "and"
    if alone and not own and len(alone) == 1:
        words, join, conditions = alone[0]
        own.extend(conditions)
        carried.append(words)
    else:
        left += [replace(words, how=OWN_GROUP) for words, _, _ in alone]

    if filters.language:
        why = (
            "a segment tests the language attribute only, where the table also takes the"
            " language of the person's devices"
        )
        left.append(FilterWords("Language", filters.language, why))
    if filters.name:
        why = (
            "a segment compares a first or last name from its start, not any word of the name"
            " ignoring accents"
        )
        left.append(FilterWords("Name with a word starting with", filters.name, why))
    if filters.custom_id:
        label = "Custom ID starting with"
        left.append(FilterWords(label, filters.custom_id, NO_CUSTOM_ID_CONDITION))
    if filters.id_prefix:
        why = "a segment has no condition on the profile ID"
        left.append(FilterWords("Profile ID starting with", filters.id_prefix, why))
    form = SegmentForm(join=join, conditions=tuple(own) or SegmentForm().conditions)
    return FromUsers(form, tuple(carried), tuple(left))


# -- the service's refusals, by box -----------------------------------------------------------

_CONDITION_PATH = re.compile(
    r"^filter\.group\.children\[(\d+)\](?:\.group\.children\[0\])?"
    r"(?:\.condition(?:\.(\w+)(?:\.(\w+))?)?)?"
)
# (condition kind, its field) -> the box it was typed in; None: the kind's first box.
_CONDITION_BOXES: dict[tuple[str, str | None], str] = {
    ("attribute", "native_attribute"): "attribute",
    ("attribute", "custom_attribute"): "custom_name",
    ("attribute", "operator"): "operator",
    ("attribute", "value"): "value",
    ("attribute", "values"): "value",
    ("attribute", None): "attribute",
    ("platform", "platforms"): "platforms",
    ("platform", None): "platforms",
    ("country", "countries"): "countries",
    ("country", None): "countries",
    ("subscription", "channel"): "channel",
    ("subscription", "kind"): "sub_kind",
    ("subscription", None): "channel",
    ("smart_segment", None): "smart",
    ("smart_segment", "segments"): "smart",
    ("smart_segment", "flags"): "smart",
    ("first_seen", None): "days",
    ("first_seen", "within_last_days"): "days",
    ("last_seen", None): "days",
    ("last_seen", "within_last_days"): "days",
    ("event_count", "event_name"): "event_name",
    ("event_count", "operator"): "count_operator",
    ("event_count", "count"): "count",
    ("event_count", "within_last_days"): "count_days",
    ("event_count", None): "event_name",
}
_STEP_PATH = re.compile(r"^steps\[(\d+)\](?:\.(\w+)(?:\.(\w+))?)?")
_STEP_BOXES = {
    ("event_name", None): "event_name",
    ("attribute_condition", "attribute_name"): "attribute_name",
    ("attribute_condition", "operator"): "operator",
    ("attribute_condition", "value"): "value",
    ("attribute_condition", "values"): "value",
    ("attribute_condition", None): "attribute_name",
}
_TOP_BOXES = {
    "display_name": "name",
    "description": "description",
    "conversion_window": "window",
    "request_id": "",
}
_OPERATOR_NAMES = {
    filters_pb2.Operator.Name(contract).removeprefix("OPERATOR_"): words
    for contract, words in OPERATORS.values()
}


def service_words(box_kind: str, why: str) -> str:
    """The service's reason for refusing a box, in the box's words: the console's sentence for
    boxes whose reasons name contract fields or patterns; for a comparison, the reason with
    the contract's operator and type names turned into the form's ("is less than", text)."""
    if box_kind in ("value", "operator", "count_operator") and why:
        text = why
        for name in sorted(_OPERATOR_NAMES, key=len, reverse=True):
            text = re.sub(rf"\b{name}\b", f"“{_OPERATOR_NAMES[name]}”", text)
        text = re.sub(r"\bstring\b", "text", text)
        text = re.sub(r"\b(use values|use value)\b", "", text).strip(" ;")
        if "_" not in text and "^" not in text:
            return text[0].upper() + text[1:] + "."
    return BOX_WORDS.get(box_kind, "")


def _refusals(
    violations: Sequence[tuple[str, str]],
    row_box: Callable[[str], tuple[str, str] | None],
    whole: Callable[[str], str],
) -> Refusals:
    """A form's refusals by box: the name and description boxes by their own words, a row's
    box (`row_box(path)`: the box and its kind, or None) in the service's, anything else
    (`whole(path)`) above the form."""
    bad = Refusals()
    for path, why in violations:
        top = _TOP_BOXES.get(path.split(".")[0].split("[")[0])
        if top is not None:
            bad.add(top, BOX_WORDS.get(top, "") or "The service refused this form.")
            continue
        found = row_box(path)
        if found is not None:
            box, kind = found
            bad.add(box, service_words(kind, why))
            continue
        bad.add("", whole(path))
    return bad


def segment_refusals(violations: Sequence[tuple[str, str]], conditions: int) -> Refusals:
    """CreateSegment's field violations by box of the segment form."""

    def row_box(path: str) -> tuple[str, str] | None:
        found = _CONDITION_PATH.match(path)
        if not found or int(found.group(1)) >= conditions:
            return None
        kind, part = found.group(2), found.group(3)
        box = _CONDITION_BOXES.get((kind, part)) or _CONDITION_BOXES.get((kind, None))
        return (f"c{found.group(1)}-{box}", box) if box else None

    def whole(path: str) -> str:
        if path in ("filter", "filter.group.children"):
            return f"A segment holds 1 to {MAX_CONDITIONS} conditions."
        return "The service refused this definition; check every condition."

    return _refusals(violations, row_box, whole)


def funnel_refusals(violations: Sequence[tuple[str, str]], steps: int) -> Refusals:
    """CreateFunnel's field violations by box of the funnel form."""

    def row_box(path: str) -> tuple[str, str] | None:
        found = _STEP_PATH.match(path)
        if not found or int(found.group(1)) >= steps:
            return None
        part = found.group(2) or ""
        box = _STEP_BOXES.get((part, found.group(3))) or _STEP_BOXES.get((part, None))
        return (f"s{found.group(1)}-{box}", box) if box else None

    def whole(path: str) -> str:
        if path == "steps":
            return f"A funnel has {MIN_STEPS} to {MAX_STEPS} steps."
        return "The service refused this definition; check every step."

    return _refusals(violations, row_box, whole)


# -- the users table as CSV -------------------------------------------------------------------

# A cell starting with one of these is a formula to a spreadsheet (OWASP's CSV injection): it
# is prefixed with a quote, so it reads as the text it is.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CSV_COLUMNS = (
    "profile_id",
    "custom_id",
    "first_name",
    "last_name",
    "email",
    "anonymous",
    "device",
    "platform",
    "sessions",
    "last_seen_utc",
    "total_time_spent_seconds",
    "smart_segment",
    # Last, so that the columns before them keep their places in existing spreadsheets.
    "country",
    "language",
)


# The last line of a download a failing service cut short (the status was sent already).
CSV_CUT_SHORT = "# incomplete: the query service stopped answering; download again"


def csv_cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def csv_rows(
    rows: Iterable[query_service_pb2.ProfileRow],
    *,
    platforms: Mapping[int, str],
    segment_of: Callable[[query_service_pb2.ProfileRow], str],
) -> list[list[str]]:
    """The users table's rows as CSV cells, each one safe to open in a spreadsheet."""
    found = []
    for row in rows:
        seen = ""
        if row.HasField("last_seen_time"):
            seen = row.last_seen_time.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cells: list[object] = [
            row.profile_id,
            row.custom_id,
            row.first_name,
            row.last_name,
            row.email,
            "yes" if row.anonymous else "no",
            row.device_model,
            platforms.get(row.platform, "") if row.platform else "",
            row.session_count,
            seen,
            row.total_time_spent.seconds,
            segment_of(row),
            row.country,
            row.language,
        ]
        found.append([csv_cell(cell) for cell in cells])
    return found


def csv_text(
    rows: Iterable[Sequence[str]], *, header: bool = False, columns: Sequence[str] = CSV_COLUMNS
) -> str:
    # Every cell quoted: a spreadsheet that splits on ";" (Excel in most European locales)
    # would otherwise start a new cell, maybe a formula, inside "Zz;=cmd|..." (csv_cell only
    # sees the whole cell's first character).
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_ALL)
    if header:
        writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()
