"""Rules every request of the contract follows, whatever its RPC: checked once per call by the
server interceptor, so no servicer repeats them and a field added later is covered too.

- A request body that does not decode (truncated bytes, invalid UTF-8 in a string, nesting past
  protobuf's depth limit) is refused as REQUEST_UNDECODABLE, after authentication.
- No string of a request may hold U+0000: PostgreSQL text and jsonb cannot store it, so a string
  the database cannot store is invalid everywhere (STRING_UNSTORABLE, one field violation per
  path).
- A google.protobuf.Timestamp or Duration outside the range its definition documents (years 1
  to 9999; nanos 0 to 999,999,999; a Duration within 10,000 years, nanos of its seconds' sign)
  names no time at all (TIMESTAMP_INVALID, DURATION_INVALID).

The items of a batch that is answered item by item (TrackEvents' events, ImportTokens' tokens)
are left to the service, which refuses such an item alone rather than its batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from shared.errors import FieldViolation, InvalidArgument

NUL = "\x00"
STRING_UNSTORABLE = "STRING_UNSTORABLE"
TIMESTAMP_INVALID = "TIMESTAMP_INVALID"
DURATION_INVALID = "DURATION_INVALID"
TIMESTAMP = "google.protobuf.Timestamp"
DURATION = "google.protobuf.Duration"
# The range google.protobuf.Timestamp documents (0001-01-01 to 9999-12-31), in seconds.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
MAX_DURATION_SECONDS = 315_576_000_000
NANOS = 1_000_000_000

# Request message -> its repeated field whose items the service answers one by one (each with
# its own status): a NUL in one item rejects that item, not the request.
ANSWERED_PER_ITEM: dict[str, str] = {
    "profiles.ingest.v1.TrackEventsRequest": "events",
    "profiles.ingest.v1.StreamEventsRequest": "events",
    "profiles.ingest.v1.ImportEventsRequest": "events",
    "profiles.ingest.v1.ImportTokensRequest": "tokens",
}

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


class RequestUndecodable(InvalidArgument):
    reason = "REQUEST_UNDECODABLE"


class RequestInvalid(InvalidArgument):
    """Its reason is that of its first violation (STRING_UNSTORABLE, TIMESTAMP_INVALID...)."""

    reason = "REQUEST_INVALID"


class Undecodable:
    """What the tolerant deserializer hands on for bytes that are no valid request: the handler
    then refuses the call after authenticating it, instead of gRPC answering UNKNOWN first."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` returning an Undecodable instead of raising."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, RecursionError) as exc:
            # upb's messages name the problem (bad UTF-8, MaxDepth), never the bytes sent.
            return Undecodable(str(exc)[:200])

    return deserialize


def key_path(key: object) -> str:
    """A map key as it appears in a field path: `["price"]`, quoted and escaped as JSON, so a
    path is always text the database can store (`["a\\u0000b"]`)."""
    if isinstance(key, str):
        return f"[{json.dumps(key, ensure_ascii=False)}]"
    return f"[{key}]"


def _time_problem(message: Message) -> tuple[str, str] | None:
    """(reason, description) for a Timestamp or Duration outside its documented range."""
    name = message.DESCRIPTOR.full_name
    if name == TIMESTAMP:
        seconds, nanos = message.seconds, message.nanos  # type: ignore[attr-defined]
        if MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS and 0 <= nanos < NANOS:
            return None
        return TIMESTAMP_INVALID, "is not a time between years 1 and 9999 (nanos 0 to 999999999)"
    if name == DURATION:
        seconds, nanos = message.seconds, message.nanos  # type: ignore[attr-defined]
        if (
            abs(seconds) <= MAX_DURATION_SECONDS
            and abs(nanos) < NANOS
            and (seconds == 0 or nanos == 0 or (seconds > 0) == (nanos > 0))
        ):
            return None
        return DURATION_INVALID, "is not a duration within 10,000 years (nanos of its sign)"
    return None


def violations(message: Message, prefix: str = "", skip: str = "") -> Iterator[FieldViolation]:
    """A violation for every string in `message` (nested messages, lists and maps included, map
    keys too) that holds U+0000 and every malformed Timestamp or Duration; the top-level field
    named `skip` is not looked at."""
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        path = f"{prefix}{field.name}"
        if not field.is_repeated:
            if field.type == _STRING:
                if NUL in value:
                    yield _nul(path)
            elif field.type == _MESSAGE:
                yield from _message_violations(value, path)
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            for key in value:
                item_path = f"{path}{key_path(key)}"
                if key_field.type == _STRING and NUL in key:
                    yield _nul(item_path)
                item = value[key]
                if value_field.type == _STRING:
                    if NUL in item:
                        yield _nul(item_path)
                elif value_field.type == _MESSAGE:
                    yield from _message_violations(item, item_path)
        elif field.type == _STRING:
            for i, item in enumerate(value):
                if NUL in item:
                    yield _nul(f"{path}[{i}]")
        elif field.type == _MESSAGE:
            for i, item in enumerate(value):
                yield from _message_violations(item, f"{path}[{i}]")


def _message_violations(message: Message, path: str) -> Iterator[FieldViolation]:
    problem = _time_problem(message)
    if problem is not None:
        yield FieldViolation(path, problem[1], problem[0])
        return
    yield from violations(message, f"{path}.")


def _nul(path: str) -> FieldViolation:
    return FieldViolation(path, "holds U+0000 (NUL), which no string may hold", STRING_UNSTORABLE)


def unstorable_paths(message: Message) -> list[str]:
    """The paths of the strings in `message` that hold U+0000."""
    return [v.field for v in violations(message) if v.reason == STRING_UNSTORABLE]


def check_request(request: object) -> None:
    """Raises RequestUndecodable or RequestInvalid for a request that breaks a rule above."""
    if isinstance(request, Undecodable):
        raise RequestUndecodable(
            f"the request body is not a valid message of this RPC: {request.problem}"
        )
    if not isinstance(request, Message):
        return
    found = list(violations(request, skip=ANSWERED_PER_ITEM.get(request.DESCRIPTOR.full_name, "")))
    if found:
        error = RequestInvalid(
            "the request breaks a rule of the contract: "
            + ", ".join(f"{v.field} {v.description}" for v in found[:10]),
            found,
        )
        error.reason = found[0].reason
        raise error
