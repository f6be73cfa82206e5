"""Turns contract messages into validated events, or into a precise rejection per event.
(The JSON stored beside an event is payloads.py's; the bus form of a stored one, messages.py's.)

Pure functions: no I/O, no grpc (protobuf messages are data). Each event is checked on its own
and gets at most one rejection, the first problem found, with a stable reason code and the path
of the offending field within the event (`custom.attributes["price"]`). Only a malformed request
as a whole raises (BatchInvalid).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, make_dataclass, replace
from dataclasses import fields as dataclass_fields
from datetime import datetime, timedelta
from math import isfinite
from operator import attrgetter
from types import MappingProxyType
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest import model
from services.ingest.errors import BatchInvalid, RequestTooLarge, TooManyEvents
from services.ingest.model import AttributeOperation, Invalid, Rejection, Value
from services.ingest.payloads import raw_event, value_json, without_nul
from shared import contract_limits as limits
from shared.contract_rules import key_path
from shared.convert import EPOCH
from shared.errors import FieldViolation

FUTURE_LIMIT = timedelta(minutes=10)
PAST_LIMIT = timedelta(days=30)
MAX_SESSION_DURATION = timedelta(hours=24)

# The range google.protobuf.Timestamp allows (0001-01-01 to 9999-12-31), in seconds.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
NANOS = 1_000_000_000

PLATFORMS = frozenset(
    {
        types_pb2.PLATFORM_IOS,
        types_pb2.PLATFORM_ANDROID,
        types_pb2.PLATFORM_WEB,
        types_pb2.PLATFORM_API,
    }
)
# The SessionRule values this build knows; another (a newer client's) is refused, never guessed.
SESSION_RULES = frozenset(pb.SessionRule.values())

CHANNELS = {
    types_pb2.CHANNEL_EMAIL: "email",
    types_pb2.CHANNEL_SMS: "sms",
    types_pb2.CHANNEL_PUSH: "push",
}
SUBSCRIPTION_KINDS = {
    types_pb2.SUBSCRIPTION_KIND_MARKETING: "marketing",
    types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL: "transactional",
}
OPERATION_KINDS: dict[int, model.OperationKind] = {
    types_pb2.ATTRIBUTE_OPERATION_KIND_SET: "set",
    types_pb2.ATTRIBUTE_OPERATION_KIND_SET_ONCE: "set_once",
    types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET: "unset",
    types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT: "increment",
    types_pb2.ATTRIBUTE_OPERATION_KIND_APPEND: "append",
    types_pb2.ATTRIBUTE_OPERATION_KIND_REMOVE: "remove",
}
NATIVE_NAMES = {
    types_pb2.NATIVE_ATTRIBUTE_EMAIL: "email",
    types_pb2.NATIVE_ATTRIBUTE_PHONE: "phone",
    types_pb2.NATIVE_ATTRIBUTE_LANGUAGE: "language",
    types_pb2.NATIVE_ATTRIBUTE_REGION: "region",
    types_pb2.NATIVE_ATTRIBUTE_TIMEZONE: "timezone",
    types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME: "first_name",
    types_pb2.NATIVE_ATTRIBUTE_LAST_NAME: "last_name",
    types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL: "avatar_url",
    types_pb2.NATIVE_ATTRIBUTE_COUNTRY: "country",
}
TOKEN_PLATFORMS: dict[int, str] = {
    types_pb2.PLATFORM_IOS: "ios",
    types_pb2.PLATFORM_ANDROID: "android",
    types_pb2.PLATFORM_WEB: "web",
}
# Proto JSON spells enum values by name; looked up once here rather than per event.
OPERATION_KIND_NAMES = {
    number: types_pb2.AttributeOperationKind.Name(number)  # type: ignore[arg-type]
    for number in OPERATION_KINDS
}
NATIVE_ENUM_NAMES = {number: types_pb2.NativeAttribute.Name(number) for number in NATIVE_NAMES}
CHANNEL_ENUM_NAMES = {number: types_pb2.Channel.Name(number) for number in CHANNELS}
SUBSCRIPTION_KIND_ENUM_NAMES = {
    number: types_pb2.SubscriptionKind.Name(number) for number in SUBSCRIPTION_KINDS
}
NAME_MATCH = model.NAME_PATTERN.fullmatch
# What a session start sets on its installation (shared, never mutated).
SESSION_START_VALUES: Mapping[str, Any] = MappingProxyType({"uninstalled": False})
FUTURE_LIMIT_NS = FUTURE_LIMIT // timedelta(microseconds=1) * 1000
PAST_LIMIT_NS = PAST_LIMIT // timedelta(microseconds=1) * 1000
MAX_SESSION_DURATION_NS = MAX_SESSION_DURATION // timedelta(microseconds=1) * 1000
MICROSECOND = timedelta(microseconds=1)
KINDS = {
    "custom": types_pb2.EVENT_KIND_CUSTOM,
    "session_start": types_pb2.EVENT_KIND_SESSION_START,
    "session_heartbeat": types_pb2.EVENT_KIND_SESSION_HEARTBEAT,
    "session_end": types_pb2.EVENT_KIND_SESSION_END,
    "attribute_operations": types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE,
    "subscription_change": types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE,
    "installation_update": types_pb2.EVENT_KIND_INSTALLATION_UPDATE,
    "crash": types_pb2.EVENT_KIND_CRASH,
}
CUSTOM = types_pb2.EVENT_KIND_CUSTOM
SESSION_START = types_pb2.EVENT_KIND_SESSION_START
ATTRIBUTE_CHANGE = types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE
SUBSCRIPTION_CHANGE = types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE
INSTALLATION_UPDATE = types_pb2.EVENT_KIND_INSTALLATION_UPDATE
CRASH = types_pb2.EVENT_KIND_CRASH
MAX_EVENT_BYTES = limits.MAX_EVENT_BYTES
MAX_EVENT_ID_LENGTH = limits.MAX_EVENT_ID_LENGTH
MAX_SESSION_ID_LENGTH = limits.MAX_SESSION_ID_LENGTH
MAX_STRING_LENGTH = limits.MAX_STRING_LENGTH
SESSION_RULE_INACTIVITY = pb.SESSION_RULE_INACTIVITY


@dataclass(frozen=True, slots=True)
class ValidEvent:
    """An event that passed validation, ready to store; `event_time` is skew-corrected.
    (BatchValidator.check and renumbered build it through _ValidEventTwin, every field
    positional: a new field goes last, and is passed there too.)

    `detail` is the bus message of its kind (bus_pb2.*Detail) and `payload` the JSON stored in
    events.payload: the same detail in proto JSON with field names kept (plus `stack_trace` for
    crashes), never a push token or an IP.
    """

    index: int
    event_id: str
    installation_id: str | None
    custom_id: str | None
    platform: int
    kind: int
    name: str | None
    event_time: datetime
    session_id: str | None
    detail_field: str
    detail: Message
    payload: dict[str, Any]
    operations: tuple[AttributeOperation, ...] = ()
    subscription: model.SubscriptionChange | None = None
    installation_values: Mapping[str, Any] | None = None
    # Session heartbeat and end: the duration sent.
    session_duration: timedelta | None = None
    # Session start without a country: the client IP to resolve the country from, then drop.
    # Never stored, logged or published (neither `detail` nor `payload` holds it).
    client_ip: str | None = field(default=None, repr=False)
    # pb.SessionRule for an installation's event without session_id, which ingest then derives
    # in the storing transaction (services/ingest/derived_sessions.py); 0 otherwise.
    session_rule: int = 0
    # The country of the session this event starts, when ingest derives it (SESSION_RULE_
    # INACTIVITY), resolved from the event's session_client_ip (then kept in `client_ip`).
    session_country: str = ""


# Building a frozen dataclass sets each field through object.__setattr__ (its own __setattr__
# refuses): 1.8 us for ValidEvent's 19 fields, the dearest step of a simple event's validation.
# This twin has the same slots in the same order and a plain __init__ (0.2 us); an instance it
# builds then takes ValidEvent's class, which CPython allows between two classes of one layout.
# What comes out is a ValidEvent like any other (equal, frozen, same repr: a unit test checks
# it). Only the per-event paths build through it (BatchValidator.check, inlined, and renumbered
# through `_valid_event`), with every field positional.
_ValidEventTwin = make_dataclass(
    "_ValidEventTwin",
    [(f.name, f.type) for f in dataclass_fields(ValidEvent)],
    slots=True,
    repr=False,
    eq=False,
)


def _valid_event(*values: Any) -> ValidEvent:
    """ValidEvent(*values), every field given: 0.5 us against the frozen __init__'s 1.8."""
    built = _ValidEventTwin(*values)
    built.__class__ = ValidEvent
    return built


# What an event's payload decides of its ValidEvent, in the order of ValidEvent's fields: kind,
# name, detail_field, detail, payload, operations, subscription, installation_values,
# session_duration, client_ip. (A tuple: filling a dict and reading it back cost more.)
_Part = tuple[
    int,
    str | None,
    str,
    Message,
    dict[str, Any],
    tuple[AttributeOperation, ...],
    model.SubscriptionChange | None,
    Mapping[str, Any] | None,
    timedelta | None,
    str | None,
]


@dataclass(frozen=True, slots=True)
class RejectedEvent:
    """An event refused with its reason; `raw` is the event as JSON (no client IP, no NUL)."""

    index: int
    event_id: str
    installation_id: str
    custom_id: str
    rejection: Rejection
    raw: dict[str, Any] | None


def validate_request(event_count: int, request_bytes: int, *, path: str = "events") -> None:
    """Raises BatchInvalid for a request that is malformed as a whole."""
    if event_count == 0:
        raise BatchInvalid(
            "the request has no events",
            [FieldViolation(path, "at least one event is required", "EVENTS_MISSING")],
        )
    if event_count > limits.MAX_EVENTS_PER_REQUEST:
        raise TooManyEvents(
            f"the request has {event_count} events; at most {limits.MAX_EVENTS_PER_REQUEST}",
            [FieldViolation(path, "at most 1000 events per request", TooManyEvents.reason)],
        )
    if request_bytes > limits.MAX_REQUEST_BYTES:
        raise RequestTooLarge(
            f"the request is {request_bytes} bytes; at most {limits.MAX_REQUEST_BYTES}",
            [FieldViolation(path, "at most 4 MiB per request", RequestTooLarge.reason)],
        )


NOT_A_TIME = "is not a time between years 1 and 9999 (nanos 0 to 999999999)"


def _ns_of(stamp: Timestamp) -> int | None:
    """Nanoseconds since the epoch, or None for a malformed Timestamp."""
    nanos = stamp.nanos  # each read of a message field costs a lookup: once each
    seconds = stamp.seconds
    if not 0 <= nanos < NANOS:
        return None
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
        return None
    return seconds * NANOS + nanos


def _ns_of_datetime(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1) * 1000


def _ns_of_delta(delta: timedelta) -> int:
    return delta // timedelta(microseconds=1) * 1000


def _datetime_of_ns(ns: int) -> datetime:
    # PostgreSQL keeps microseconds; nanoseconds are truncated. (Positional arguments: keyword
    # ones cost a third more, on every event.)
    return EPOCH + timedelta(0, 0, ns // 1000)


def duration_json(duration: timedelta) -> str:
    """A non-negative duration in proto JSON ("30s", "1.500s"): what
    Duration.FromTimedelta(duration).ToJsonString() gives (a unit test checks it), without its
    float arithmetic and Python-level checks, which cost more than the rest of a heartbeat's
    validation."""
    seconds = duration.days * 86_400 + duration.seconds
    micros = duration.microseconds
    if not micros:
        return f"{seconds}s"
    if not micros % 1000:
        return f"{seconds}.{micros // 1000:03d}s"
    return f"{seconds}.{micros:06d}s"


def _text(value: str, path: str, reason: str, *, limit: int, minimum: int = 0) -> str:
    if not minimum <= len(value) <= limit:
        raise Invalid(reason, path, f"{path} must be {minimum} to {limit} characters")
    if model.has_nul(value):
        raise Invalid(reason, path, f"{path} contains a NUL character")
    return value


def _attribute_value(value: types_pb2.AttributeValue, path: str) -> Value:
    which = value.WhichOneof("value")
    if which == "string_value":
        return Value("string", _text(value.string_value, path, model.VALUE_INVALID, limit=300))
    if which == "number_value":
        if not model.is_finite(value.number_value):
            raise Invalid(model.VALUE_INVALID, path, f"{path} is not a finite number")
        return Value("number", value.number_value)
    if which == "bool_value":
        return Value("bool", value.bool_value)
    if which == "timestamp_value":
        ns = _ns_of(value.timestamp_value)
        if ns is None:
            raise Invalid(model.VALUE_INVALID, path, f"{path} is not a valid timestamp")
        return Value("timestamp", _datetime_of_ns(ns).isoformat())
    if which == "url_value":
        if not model.is_url(value.url_value):
            raise Invalid(
                model.VALUE_INVALID, path, f"{path} is not a URL with scheme and host (<= 2048)"
            )
        return Value("url", value.url_value)
    if which == "string_list_value":
        items = list(value.string_list_value.values)
        if len(items) > limits.MAX_LIST_ITEMS:
            raise Invalid(model.VALUE_INVALID, path, f"{path} has over 25 items")
        for i, item in enumerate(items):
            _text(item, f"{path}[{i}]", model.VALUE_INVALID, limit=limits.MAX_STRING_LENGTH)
        return Value("string_list", items)
    raise Invalid(model.VALUE_INVALID, path, f"{path} has no value")


def _checked_value_json(value: types_pb2.AttributeValue, key: str) -> dict[str, Any]:
    """Checks a custom event's attribute value (of attribute `key`, a valid name); returns its
    proto JSON (as payloads.value_json). The field path is only built for a rejection."""
    which = value.WhichOneof("value")
    if which == "string_value":
        text = value.string_value
        if len(text) > limits.MAX_STRING_LENGTH or "\x00" in text:
            _text(text, _attribute_path(key), model.VALUE_INVALID, limit=limits.MAX_STRING_LENGTH)
        return {which: text}
    if which == "number_value":
        number = value.number_value
        if not model.is_finite(number):
            path = _attribute_path(key)
            raise Invalid(model.VALUE_INVALID, path, f"{path} is not a finite number")
        return {which: float(number)}
    if which == "bool_value":
        return {which: value.bool_value}
    _attribute_value(value, _attribute_path(key))
    return value_json(value)


def _attribute_path(key: str) -> str:
    # A valid name needs no escaping: the cheap spelling of key_path(key).
    return f'custom.attributes["{key}"]'


def _checked_name(name: str, names: dict[str, str]) -> str | None:
    """`name` lower-cased when it is a valid name, else None; `names` remembers the valid ones
    of a batch (its events repeat a few names: a dict read costs a fifth of the regex and the
    lower-casing)."""
    lowered = names.get(name)
    if lowered is None and NAME_MATCH(name) is not None:
        lowered = names[name] = name.lower()
    return lowered


def _custom(event: pb.Event, names: dict[str, str]) -> _Part:
    """A custom event's part: its lower-cased name, its bus detail and its stored payload."""
    custom = event.custom
    name = custom.name
    lowered = _checked_name(name, names)
    if lowered is None:
        raise Invalid(
            model.NAME_INVALID, "custom.name", "custom.name must match [a-zA-Z0-9_]{1,30}"
        )
    label = custom.label
    if len(label) > limits.MAX_LABEL_LENGTH or "\x00" in label:
        _text(label, "custom.label", model.LABEL_INVALID, limit=limits.MAX_LABEL_LENGTH)
    attributes = custom.attributes
    if len(attributes) > limits.MAX_ATTRIBUTES_PER_EVENT:
        raise Invalid(
            model.TOO_MANY_ATTRIBUTES, "custom.attributes", "at most 20 attributes per event"
        )
    payload: dict[str, Any] = {"name": lowered}
    if label:
        payload["label"] = label
    as_sent = lowered == name
    values: dict[str, dict[str, Any]] = {}
    for key in attributes:  # the map's own iteration: .items() is a slow pure-Python view
        value = attributes[key]
        lowered_key = names.get(key)  # _checked_name's first step: most names are known
        if lowered_key is None:
            lowered_key = _checked_name(key, names)
            if lowered_key is None:
                path = f"custom.attributes{key_path(key)}"
                raise Invalid(model.ATTRIBUTE_NAME_INVALID, path, "names match [a-zA-Z0-9_]{1,30}")
        if lowered_key in values:
            path = f"custom.attributes{key_path(key)}"
            raise Invalid(model.ATTRIBUTE_NAME_INVALID, path, "two names equal once lower-cased")
        if as_sent and lowered_key != key:
            as_sent = False
        # The common kinds here, the rest in _checked_value_json (a call per attribute costs).
        which = value.WhichOneof("value")
        if which == "string_value":
            text = value.string_value
            if len(text) > MAX_STRING_LENGTH or "\x00" in text:
                _text(text, _attribute_path(key), model.VALUE_INVALID, limit=MAX_STRING_LENGTH)
            values[lowered_key] = {which: text}
        elif which == "number_value":
            number = value.number_value
            if not isfinite(number):
                path = _attribute_path(key)
                raise Invalid(model.VALUE_INVALID, path, f"{path} is not a finite number")
            values[lowered_key] = {which: float(number)}
        elif which == "bool_value":
            values[lowered_key] = {which: value.bool_value}
        else:
            values[lowered_key] = _checked_value_json(value, key)
    if values:
        payload["attributes"] = values
    if as_sent:
        # CustomEvent and CustomEventDetail share their fields (numbers and types; a unit test
        # checks it): with nothing to lower-case, the detail is the event's bytes re-read, much
        # cheaper than copying attribute by attribute.
        detail = bus_pb2.CustomEventDetail.FromString(custom.SerializeToString())
    else:
        detail = bus_pb2.CustomEventDetail(name=lowered, label=label)
        for key in attributes:
            detail.attributes[key.lower()].CopyFrom(attributes[key])
    return (CUSTOM, lowered, "custom", detail, payload, (), None, None, None, None)


def _native_value(name: str, operation: types_pb2.AttributeOperation, path: str) -> Value:
    which = operation.value.WhichOneof("value")
    expected = "url_value" if name == "avatar_url" else "string_value"
    if which != expected:
        raise Invalid(model.VALUE_INVALID, f"{path}.value", f"{name} takes a {expected}")
    text = getattr(operation.value, expected)
    value_path = f"{path}.value"
    checks: dict[str, tuple[Callable[[str], bool], str, Callable[[str], str]]] = {
        "email": (model.is_email, model.EMAIL_INVALID, str.lower),
        "phone": (model.is_phone, model.PHONE_INVALID, str),
        "language": (model.is_language, model.LANGUAGE_INVALID, str.lower),
        "region": (model.is_country, model.REGION_INVALID, str.upper),
        "country": (model.is_country, model.COUNTRY_INVALID, str.upper),
        "timezone": (model.is_timezone, model.TIMEZONE_INVALID, str),
        "avatar_url": (model.is_http_url, model.VALUE_INVALID, str),
    }
    if name in checks:
        check, reason, normalize = checks[name]
        if model.has_nul(text) or not check(text):
            raise Invalid(reason, value_path, f"{value_path} is not a valid {name}")
        return Value("url" if name == "avatar_url" else "string", normalize(text))
    return Value("string", _text(text, value_path, model.VALUE_INVALID, limit=300, minimum=1))


def _operation_path(i: int) -> str:
    return f"attribute_operations.operations[{i}]"


def _operation(
    operation: types_pb2.AttributeOperation, i: int, names: dict[str, str]
) -> AttributeOperation:
    """The `i`th operation of an event, checked (field paths built only for a rejection)."""
    kind = OPERATION_KINDS.get(operation.kind)
    if kind is None:
        raise Invalid(model.OPERATION_INVALID, f"{_operation_path(i)}.kind", "kind is required")
    which = operation.WhichOneof("attribute")
    has_value = operation.HasField("value")
    if kind == "unset" and has_value:
        raise Invalid(model.VALUE_INVALID, f"{_operation_path(i)}.value", "unset takes no value")
    if kind != "unset" and not has_value:
        raise Invalid(model.VALUE_INVALID, f"{_operation_path(i)}.value", f"{kind} needs a value")
    if which == "native_attribute":
        path = _operation_path(i)
        name = NATIVE_NAMES.get(operation.native_attribute)
        if name is None:
            raise Invalid(model.ATTRIBUTE_NAME_INVALID, f"{path}.native_attribute", "unknown")
        if kind not in ("set", "set_once", "unset"):
            raise Invalid(
                model.OPERATION_INVALID, f"{path}.kind", f"{kind} is not allowed on {name}"
            )
        native = None if kind == "unset" else _native_value(name, operation, path)
        return AttributeOperation(kind, True, name, native)
    lowered = None
    if which == "custom_attribute":
        lowered = _checked_name(operation.custom_attribute, names)
    if lowered is None:
        raise Invalid(
            model.ATTRIBUTE_NAME_INVALID,
            f"{_operation_path(i)}.custom_attribute",
            "a custom attribute name matching [a-zA-Z0-9_]{1,30} is required",
        )
    if kind == "unset":
        return AttributeOperation(kind, False, lowered, None)
    # The common values here, the rest (and every rejection) in _attribute_value.
    sent = operation.value
    value_kind = sent.WhichOneof("value")
    value: Value | None = None
    if value_kind == "number_value":
        number = sent.number_value
        if isfinite(number):
            value = Value("number", number)
    elif value_kind == "string_value":
        text = sent.string_value
        if len(text) <= MAX_STRING_LENGTH and "\x00" not in text:
            value = Value("string", text)
    if value is None:
        value = _attribute_value(sent, f"{_operation_path(i)}.value")
    if kind == "increment" and value.type != "number":
        path = f"{_operation_path(i)}.value"
        raise Invalid(model.VALUE_INVALID, path, "increment takes a number_value")
    if kind in ("append", "remove") and value.type not in ("string", "string_list"):
        raise Invalid(
            model.VALUE_INVALID,
            f"{_operation_path(i)}.value",
            f"{kind} takes a string or a string list",
        )
    return AttributeOperation(kind, False, lowered, value)


# The proto JSON field of a checked value's type, where it is the value itself (payloads.
# value_json of the sent or normalized message gives the same).
VALUE_JSON_FIELDS = {
    "string": "string_value",
    "number": "number_value",
    "bool": "bool_value",
    "url": "url_value",
}


def _attribute_operations(
    event: pb.Event, names: dict[str, str]
) -> tuple[tuple[AttributeOperation, ...], bus_pb2.AttributeChangeDetail, dict[str, Any]]:
    operations = event.attribute_operations.operations
    if not operations:
        raise Invalid(
            model.PAYLOAD_MISSING, "attribute_operations.operations", "at least one operation"
        )
    if len(operations) > limits.MAX_OPERATIONS_PER_EVENT:
        raise Invalid(
            model.TOO_MANY_ATTRIBUTES,
            "attribute_operations.operations",
            "at most 20 operations per event",
        )
    parsed = []
    detail = bus_pb2.AttributeChangeDetail()
    add = detail.operations.add
    stored: list[dict[str, Any]] = []
    for i, op in enumerate(operations):
        checked = _operation(op, i, names)
        parsed.append(checked)
        copy = add()
        copy.CopyFrom(op)
        entry: dict[str, Any] = {"kind": OPERATION_KIND_NAMES[op.kind]}
        value = checked.value
        if checked.native:  # store the normalized form (lower-case email...)
            if value is not None:
                field = "url_value" if value.type == "url" else "string_value"
                setattr(copy.value, field, value.value)
            entry["native_attribute"] = NATIVE_ENUM_NAMES[op.native_attribute]
        else:
            copy.custom_attribute = checked.name
            entry["custom_attribute"] = checked.name
        if value is not None:  # the operations that have a value (all but unset)
            json_field = VALUE_JSON_FIELDS.get(value.type)
            entry["value"] = (
                value_json(copy.value) if json_field is None else {json_field: value.value}
            )
        stored.append(entry)
    return tuple(parsed), detail, {"operations": stored}


def _duration(which: str, message: pb.SessionHeartbeat | pb.SessionEnd) -> timedelta:
    """The duration of a heartbeat or end (`which`, its payload field), or Invalid."""
    duration = message.duration
    seconds = duration.seconds
    nanos = duration.nanos
    if not -NANOS < nanos < NANOS or seconds < 0 or nanos < 0:
        path = f"{which}.duration"
        raise Invalid(model.DURATION_INVALID, path, f"{path} must not be negative")
    # Judged to the nanosecond, before the microseconds stored: 24 h and 1 ns is over.
    if seconds * NANOS + nanos > MAX_SESSION_DURATION_NS:
        path = f"{which}.duration"
        raise Invalid(model.DURATION_INVALID, path, f"{path} must be at most 24 hours")
    return timedelta(0, seconds, nanos // 1000)


def _installation_update(
    event: pb.Event,
) -> tuple[dict[str, Any], bus_pb2.InstallationUpdateDetail, dict[str, Any]]:
    update = event.installation_update
    present = {descriptor.name for descriptor, _ in update.ListFields()}
    values: dict[str, Any] = {}
    detail = bus_pb2.InstallationUpdateDetail()
    lengths = {
        "app_version": limits.MAX_VERSION_LENGTH,
        "os_version": limits.MAX_VERSION_LENGTH,
        "device_model": limits.MAX_DEVICE_MODEL_LENGTH,
        "push_token": limits.MAX_PUSH_TOKEN_LENGTH,
    }
    for name, limit in lengths.items():
        if name in present:
            path = f"installation_update.{name}"
            values[name] = _text(getattr(update, name), path, model.VALUE_INVALID, limit=limit)
            if name == "push_token":
                detail.push_token_present = bool(values[name])
                values[name] = values[name] or None  # an empty token clears it
            else:
                setattr(detail, name, values[name])
    if update.HasField("language"):
        if not model.is_language(update.language):
            raise Invalid(model.LANGUAGE_INVALID, "installation_update.language", "not ISO 639-1")
        values["language"] = detail.language = update.language.lower()
    if update.HasField("timezone"):
        if not model.is_timezone(update.timezone):
            raise Invalid(
                model.TIMEZONE_INVALID, "installation_update.timezone", "not an IANA time zone"
            )
        values["timezone"] = detail.timezone = update.timezone
    for name in ("push_opt_in", "uninstalled"):
        if name in present:
            values[name] = getattr(update, name)
            setattr(detail, name, values[name])
    # The proto JSON of the detail: every field present, none of the token.
    payload = {k: v for k, v in values.items() if k != "push_token"}
    if "push_token" in values:
        payload["push_token_present"] = detail.push_token_present
    return values, detail, payload


def _payload(event: pb.Event, which: str | None, names: dict[str, str]) -> _Part:
    """Checks the payload (`which`, the payload oneof's field; a custom event's is _custom's);
    returns the ValidEvent fields that depend on it (_Part), `payload` being the proto JSON
    (field names kept) of the detail, built directly: json_format is slow (a unit test checks
    both agree)."""
    if which == "custom":
        return _custom(event, names)
    if which is None:
        raise Invalid(model.PAYLOAD_MISSING, "payload", "exactly one payload is required")
    detail: Message
    payload: dict[str, Any]
    if which.startswith("session_"):
        # Heartbeats and ends of an installation may ask for its open session instead.
        open_session = (
            which != "session_start"
            and event.session_rule == pb.SESSION_RULE_OPEN_SESSION
            and event.WhichOneof("origin") == "installation_id"
        )
        if not event.session_id and not open_session:
            raise Invalid(model.SESSION_ID_INVALID, "session_id", f"{which} needs a session_id")
        if which == "session_start":
            start = event.session_start
            country = start.country
            client_ip = None
            if country:
                if not model.is_country(country):
                    raise Invalid(model.COUNTRY_INVALID, "session_start.country", "not ISO 3166-1")
                country = country.upper()
            else:
                client_ip = start.client_ip
                if client_ip:
                    try:
                        ipaddress.ip_address(client_ip)
                    except ValueError:
                        raise Invalid(
                            model.VALUE_INVALID, "session_start.client_ip", "not an IP address"
                        ) from None
                else:
                    client_ip = None
            detail = bus_pb2.SessionDetail(country=country)
            payload = {"country": country} if country else {}
            # A session is a sign of life: it clears an earlier uninstall.
            return (
                SESSION_START,
                None,
                "session",
                detail,
                payload,
                (),
                None,
                SESSION_START_VALUES,
                None,
                client_ip,
            )
        duration = _duration(which, getattr(event, which))
        session = bus_pb2.SessionDetail()
        # What Duration.FromTimedelta sets, for a duration known to be non-negative.
        stored = session.duration
        stored.seconds = duration.days * 86_400 + duration.seconds
        stored.nanos = duration.microseconds * 1000
        payload = {"duration": duration_json(duration)}
        kind = KINDS[which]
        return (kind, None, "session", session, payload, (), None, None, duration, None)
    if which == "attribute_operations":
        operations, detail, payload = _attribute_operations(event, names)
        return (
            ATTRIBUTE_CHANGE,
            None,
            "attribute_change",
            detail,
            payload,
            operations,
            None,
            None,
            None,
            None,
        )
    if which == "subscription_change":
        change = event.subscription_change
        channel = CHANNELS.get(change.channel)
        kind_name = SUBSCRIPTION_KINDS.get(change.kind)
        if channel is None or kind_name is None:
            path = "subscription_change.channel" if channel is None else "subscription_change.kind"
            raise Invalid(model.SUBSCRIPTION_INVALID, path, "channel and kind are required")
        subscription = model.SubscriptionChange(channel, kind_name, change.subscribed)
        detail = types_pb2.SubscriptionChange()
        detail.CopyFrom(change)
        payload = {
            "channel": CHANNEL_ENUM_NAMES[change.channel],
            "kind": SUBSCRIPTION_KIND_ENUM_NAMES[change.kind],
        }
        if change.subscribed:
            payload["subscribed"] = True
        return (
            SUBSCRIPTION_CHANGE,
            None,
            "subscription_change",
            detail,
            payload,
            (),
            subscription,
            None,
            None,
            None,
        )
    if which == "installation_update":
        values, detail, payload = _installation_update(event)
        return (
            INSTALLATION_UPDATE,
            None,
            "installation_update",
            detail,
            payload,
            (),
            None,
            values,
            None,
            None,
        )
    crash = event.crash
    _text(crash.name, "crash.name", model.NAME_INVALID, limit=300, minimum=1)
    _text(crash.reason, "crash.reason", model.VALUE_INVALID, limit=300)
    _text(crash.stack_trace, "crash.stack_trace", model.VALUE_INVALID, limit=limits.MAX_EVENT_BYTES)
    detail = bus_pb2.CrashDetail(name=crash.name, reason=crash.reason, fatal=crash.fatal)
    payload = {"name": crash.name}
    if crash.reason:
        payload["reason"] = crash.reason
    if crash.fatal:
        payload["fatal"] = True
    if crash.stack_trace:
        payload["stack_trace"] = crash.stack_trace
    return (CRASH, None, "crash", detail, payload, (), None, None, None, None)


def _origin(event: pb.Event) -> tuple[str | None, str | None]:
    which = event.WhichOneof("origin")
    if which is None:
        raise Invalid(model.ORIGIN_MISSING, "origin", "installation_id or custom_id is required")
    if which == "installation_id":
        installation_id = event.installation_id
        if (
            not 1 <= len(installation_id) <= limits.MAX_INSTALLATION_ID_LENGTH
            or "\x00" in installation_id
        ):
            _text(
                installation_id,
                "installation_id",
                model.INSTALLATION_ID_INVALID,
                limit=limits.MAX_INSTALLATION_ID_LENGTH,
                minimum=1,
            )
        return installation_id, None
    # Only the cheap checks here; junk values ("null", a project's own list...) are identity's
    # rule, answered per key by ResolveProfiles (CUSTOM_ID_INVALID).
    problem = model.custom_id_problem(event.custom_id)
    if problem is not None:
        raise Invalid(model.CUSTOM_ID_INVALID, "custom_id", problem)
    return None, event.custom_id


def reject(index: int, event: pb.Event, rejection: Rejection) -> RejectedEvent:
    """A RejectedEvent keeping the raw event, except for ERASED (no payload, no custom ID, no
    installation ID: the installation ID may be the erased custom ID itself); every text of it
    storable (U+0000 replaced)."""
    erased = rejection.reason == model.ERASED
    if model.has_nul(rejection.field_path) or model.has_nul(rejection.message):
        # Paths and messages are built from what the client sent (and from identity's answer):
        # whatever is stored about a rejected event must be storable, or the batch would fail.
        rejection = Rejection(
            rejection.reason, without_nul(rejection.field_path), without_nul(rejection.message)
        )
    return RejectedEvent(
        index=index,
        event_id=without_nul(event.event_id[:256]),
        installation_id=without_nul(
            event.installation_id[:256]
            if event.WhichOneof("origin") == "installation_id" and not erased
            else ""
        ),
        custom_id="" if erased else without_nul(event.custom_id[:512]),
        rejection=rejection,
        raw=None if erased else raw_event(event),
    )


_REASON_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def _untranslated(message: pb.UntranslatedMessage) -> Invalid:
    """An edge gateway's untranslatable message: always refused, with the gateway's reason when
    it is a well-formed code, so ListRejectedEvents can filter on it."""
    reason = message.reason if _REASON_CODE.fullmatch(message.reason) else model.UNTRANSLATED
    explanation = message.explanation[:300] or "the gateway could not translate the message"
    return Invalid(reason, "untranslated", explanation)


class BatchValidator:
    """Checks the events of one request against every rule of the contract, with what the
    request shares (its send time, the receive time and the time limits) computed once."""

    __slots__ = ("_imported", "_latest_ns", "_names", "_now_ns", "_oldest_ns", "_request_send_ns")

    def __init__(
        self, request_send_time: Timestamp | None, now: datetime, *, imported: bool = False
    ) -> None:
        now_ns = _ns_of_datetime(now)
        self._imported = imported
        # The valid attribute and event names seen in the batch, each to its lower-cased form.
        self._names: dict[str, str] = {}
        self._now_ns = now_ns
        self._latest_ns = now_ns + FUTURE_LIMIT_NS
        oldest = _ns_of_datetime(model.OLDEST_EVENT_TIME)
        self._oldest_ns = oldest if imported else max(oldest, now_ns - PAST_LIMIT_NS)
        # None: no request send time; -1: a malformed one (events relying on it are refused).
        self._request_send_ns: int | None = None
        if request_send_time is not None:
            send_ns = _ns_of(request_send_time)
            self._request_send_ns = -1 if send_ns is None else send_ns

    def check(self, index: int, event: pb.Event) -> ValidEvent | RejectedEvent:
        """One event's ValidEvent, or its rejection (the first problem found); never raises
        for a bad event. (Each read of a message field costs a lookup and a new object: each
        is read once, into a local.)"""
        try:
            if event.ByteSize() > MAX_EVENT_BYTES:
                raise Invalid(model.EVENT_TOO_LARGE, "", "the event is over 32 KiB serialized")
            which = event.WhichOneof("payload")
            if which == "untranslated":
                raise _untranslated(event.untranslated)
            event_id = event.event_id
            if not 1 <= len(event_id) <= MAX_EVENT_ID_LENGTH or "\x00" in event_id:
                _text(
                    event_id,
                    "event_id",
                    model.EVENT_ID_INVALID,
                    limit=MAX_EVENT_ID_LENGTH,
                    minimum=1,
                )
            installation_id, custom_id = _origin(event)
            platform = event.platform
            if platform not in PLATFORMS:
                raise Invalid(model.PLATFORM_MISSING, "platform", "a known platform is required")
            event_time = self._event_time(event)
            session_id = event.session_id
            if len(session_id) > MAX_SESSION_ID_LENGTH or "\x00" in session_id:
                _text(
                    session_id,
                    "session_id",
                    model.SESSION_ID_INVALID,
                    limit=MAX_SESSION_ID_LENGTH,
                )
            names = self._names
            part = _custom(event, names) if which == "custom" else _payload(event, which, names)
            session_rule: int = event.session_rule
            if session_rule not in SESSION_RULES:
                raise Invalid(model.VALUE_INVALID, "session_rule", "not a known session rule")
            if not installation_id or session_id:
                session_rule = 0
            client_ip = part[9]
            # Checked whenever sent, used only for a derived session: a field the event does
            # not need is still refused when it is not what its name says (an IP address).
            session_client_ip = event.session_client_ip
            if session_client_ip:
                try:
                    ipaddress.ip_address(session_client_ip)
                except ValueError:
                    raise Invalid(
                        model.VALUE_INVALID, "session_client_ip", "not an IP address"
                    ) from None
                if session_rule == SESSION_RULE_INACTIVITY:
                    client_ip = session_client_ip
        except Invalid as invalid:
            return reject(index, event, invalid.rejection)
        # _valid_event's work, inlined: positional, in the order of ValidEvent's fields.
        built = _ValidEventTwin(
            index,
            event_id,
            installation_id,
            custom_id,
            platform,
            part[0],
            part[1],
            event_time,
            session_id or None,
            part[2],
            part[3],
            part[4],
            part[5],
            part[6],
            part[7] if installation_id is not None else None,
            part[8],
            client_ip,
            session_rule,
            "",
        )
        built.__class__ = ValidEvent
        return built

    def _event_time(self, event: pb.Event) -> datetime:
        """`event_time + (receive_time - send_time)` within the limits, or Invalid; to the
        microsecond (PostgreSQL keeps microseconds: nanoseconds are truncated)."""
        stamp = event.event_time  # an empty Timestamp when not sent
        nanos = stamp.nanos
        seconds = stamp.seconds
        # Only an empty one can be missing: the presence check (a lookup) is made for it alone.
        if not (seconds or nanos or event.HasField("event_time")):
            raise Invalid(model.EVENT_TIME_MISSING, "event_time", "event_time is required")
        if not (0 <= nanos < NANOS and MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS):
            raise Invalid(model.TIMESTAMP_INVALID, "event_time", f"event_time {NOT_A_TIME}")
        corrected = seconds * NANOS + nanos
        if event.HasField("send_time"):
            send_ns = _ns_of(event.send_time)
            if send_ns is None:
                raise Invalid(model.TIMESTAMP_INVALID, "send_time", f"send_time {NOT_A_TIME}")
        else:
            send_ns = self._request_send_ns
            if send_ns == -1:
                path = "request.send_time"
                raise Invalid(model.TIMESTAMP_INVALID, path, f"{path} {NOT_A_TIME}")
        if send_ns is not None:
            corrected += self._now_ns - send_ns
        if corrected > self._latest_ns:
            raise Invalid(
                model.EVENT_TIME_IN_FUTURE,
                "event_time",
                "event_time is over 10 minutes in the future after clock-skew correction",
            )
        if corrected < self._oldest_ns:
            raise Invalid(
                model.EVENT_TIME_TOO_OLD,
                "event_time",
                "event_time is over 30 days in the past (use ImportEvents) or before 1900",
            )
        # A multiple of one microsecond: timedelta's own constructor (its argument parsing)
        # costs half as much again, on every event.
        return EPOCH + MICROSECOND * (corrected // 1000)


def validate_events(
    events: Sequence[pb.Event],
    request_send_time: Timestamp | None,
    now: datetime,
    *,
    imported: bool = False,
    indexes: range | None = None,
) -> tuple[list[ValidEvent], list[RejectedEvent]]:
    """Checks every event of a batch (or those at `indexes`, a slice of it) with one
    BatchValidator: the valid events and the rejections, each in request order (`index` is the
    event's position in the batch). Never raises."""
    check = BatchValidator(request_send_time, now, imported=imported).check
    valid: list[ValidEvent] = []
    rejected: list[RejectedEvent] = []
    for index in range(len(events)) if indexes is None else indexes:
        checked = check(index, events[index])
        if isinstance(checked, ValidEvent):
            valid.append(checked)
        else:
            rejected.append(checked)
    return valid, rejected


def validate_event(
    index: int,
    event: pb.Event,
    *,
    request_send_time: Timestamp | None,
    now: datetime,
    imported: bool = False,
) -> ValidEvent | RejectedEvent:
    """Checks one event against every rule of the contract; never raises for a bad event.
    (A batch uses one BatchValidator for all its events.)"""
    return BatchValidator(request_send_time, now, imported=imported).check(index, event)


# Every field of ValidEvent after `index`, read at once (one C call).
_FIELDS_AFTER_INDEX = attrgetter(*(f.name for f in dataclass_fields(ValidEvent)[1:]))


def renumbered(event: ValidEvent, index: int) -> ValidEvent:
    """The event at another index: what `replace(event, index=index)` gives, without its
    per-call walk of the fields and keyword arguments, nor a frozen dataclass's __init__
    (group commit renumbers every event of a group's later batches)."""
    return _valid_event(index, *_FIELDS_AFTER_INDEX(event))


def with_country(event: ValidEvent, country: str) -> ValidEvent:
    """A session start with the country resolved from its client IP, and the IP dropped; for
    an event asking for a derived session, the country of the session it may start."""
    if event.detail_field != "session":
        return replace(event, session_country=country, client_ip=None)
    detail = bus_pb2.SessionDetail(country=country)
    payload = {"country": country} if country else {}
    return replace(event, detail=detail, payload=payload, client_ip=None)


@dataclass(frozen=True, slots=True)
class ValidToken:
    """A push token to import; `push_token` is a secret (kept out of reprs and logs)."""

    index: int
    platform: int
    push_token: str = field(repr=False)
    custom_id: str | None
    push_opt_in: bool

    @property
    def installation_id(self) -> str:
        return model.imported_installation_id(TOKEN_PLATFORMS[self.platform], self.push_token)


def validate_token_request(token_count: int) -> None:
    """Raises BatchInvalid for no tokens or over 1,000."""
    if token_count == 0:
        raise BatchInvalid(
            "the request has no tokens",
            [FieldViolation("tokens", "at least one token is required", "TOKENS_MISSING")],
        )
    if token_count > limits.MAX_TOKENS_PER_REQUEST:
        raise TooManyEvents(
            f"the request has {token_count} tokens; at most {limits.MAX_TOKENS_PER_REQUEST}",
            [FieldViolation("tokens", "at most 1000 tokens per request", "TOO_MANY_TOKENS")],
        )


def validate_token(index: int, token: pb.ImportedToken) -> ValidToken | Rejection:
    """Checks one imported token; the rejection's field path is relative to the token."""
    if token.platform not in TOKEN_PLATFORMS:
        return Rejection(model.PLATFORM_INVALID, "platform", "iOS, Android or Web is required")
    if not 1 <= len(token.push_token) <= limits.MAX_PUSH_TOKEN_LENGTH or model.has_nul(
        token.push_token
    ):
        return Rejection(
            model.PUSH_TOKEN_INVALID, "push_token", "push_token must be 1 to 4096 characters"
        )
    if token.push_token != token.push_token.strip():
        # A padded token (a CSV export's) would never match the one its SDK sends, so the
        # installation would stay an imported one: refused, as a padded custom ID is.
        return Rejection(
            model.PUSH_TOKEN_INVALID, "push_token", "push_token must not start or end with spaces"
        )
    custom_id = token.custom_id or None
    if custom_id is not None:
        problem = model.custom_id_problem(custom_id)
        if problem is not None:
            return Rejection(model.CUSTOM_ID_INVALID, "custom_id", problem)
    return ValidToken(index, token.platform, token.push_token, custom_id, token.push_opt_in)
