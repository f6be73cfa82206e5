"""Rules every request of the contract follows, whatever its RPC: checked once per call as the
server interceptor decodes the request, so no servicer repeats them and a field added later is
covered too. A broken request is refused after authentication (UNAUTHENTICATED comes first).

- A request body that does not decode (truncated bytes, invalid UTF-8 in a string, nesting past
  protobuf's depth limit) is refused as REQUEST_UNDECODABLE.
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

import itertools
import json
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
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
MAX_VIOLATIONS = 20

# Request message -> its repeated field whose items the service answers one by one (each with
# its own status): a NUL in one item rejects that item, not the request.
ANSWERED_PER_ITEM: dict[str, str] = {
    "profiles.ingest.v1.TrackEventsRequest": "events",
    "profiles.ingest.v1.StreamEventsRequest": "events",
    "profiles.ingest.v1.ImportEventsRequest": "events",
    "profiles.ingest.v1.ImportTokensRequest": "tokens",
}

# Client streams whose every message gets its own answer with a status (StreamEvents answers a
# malformed batch and goes on): their broken messages are handed to the servicer as Refused
# rather than ending the call.
STREAMS_ANSWERED_PER_MESSAGE = frozenset({"/profiles.ingest.v1.IngestService/StreamEvents"})

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


class RequestUndecodable(InvalidArgument):
    reason = "REQUEST_UNDECODABLE"


class RequestInvalid(InvalidArgument):
    """Its reason is that of its first violation (STRING_UNSTORABLE, TIMESTAMP_INVALID...)."""

    reason = "REQUEST_INVALID"


class Refused:
    """What the tolerant deserializer hands on instead of a request that breaks a rule: the
    wrapped handler raises `error` once the caller is authenticated (gRPC itself would answer
    UNKNOWN, before authentication, had the deserializer raised). `message` is the request as
    decoded, if it decoded."""

    __slots__ = ("error", "message")

    def __init__(self, error: InvalidArgument, message: Message | None = None) -> None:
        self.error = error
        self.message = message


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, handing on a Refused instead of raising or of a request that breaks a
    rule above."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except (DecodeError, ValueError, RecursionError) as exc:
            # upb's messages name the problem (bad UTF-8, MaxDepth), never the bytes sent.
            return Refused(
                RequestUndecodable(
                    f"the request body is not a valid message of this RPC: {str(exc)[:200]}"
                )
            )
        # U+0000 is encoded as a zero byte: a body without one holds no NUL, and most calls
        # skip the walk over strings (a ResolveProfiles of 1,000 keys: 6 ms of Python).
        error = broken_rule(message, strings=b"\x00" in data)
        return message if error is None else Refused(error, message)

    return deserialize


def check_request(request: object) -> None:
    """Raises the error of a request the tolerant deserializer refused."""
    if type(request) is Refused:
        raise request.error


def broken_rule(message: Message, *, strings: bool = True) -> InvalidArgument | None:
    """The error of a request that breaks a rule above, or None (`strings`: look for NUL)."""
    descriptor = message.DESCRIPTOR
    if not strings and not _holds_time(descriptor):
        return None
    skip = ANSWERED_PER_ITEM.get(descriptor.full_name, "")
    # The interceptor sends the first 20 violations at most (trailing metadata is capped): no
    # use finding a thousand.
    found = list(itertools.islice(violations(message, skip=skip, strings=strings), MAX_VIOLATIONS))
    if not found:
        return None
    error = RequestInvalid(
        "the request breaks a rule of the contract: "
        + ", ".join(f"{v.field} {v.description}" for v in found[:5]),
        found,
    )
    error.reason = found[0].reason
    return error


def key_path(key: object) -> str:
    """A map key as it appears in a field path: `["price"]`, quoted and escaped as JSON, so a
    path is always text the database can store (`["a\\u0000b"]`)."""
    if isinstance(key, str):
        return f"[{json.dumps(key, ensure_ascii=False)}]"
    return f"[{key}]"


@cache
def _holds_time(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can hold a Timestamp or Duration, at any depth."""
    if descriptor.full_name in (TIMESTAMP, DURATION):
        return True
    seen = seen | {descriptor.full_name}
    return any(
        _holds_time(field.message_type, seen)
        for field in descriptor.fields
        if field.message_type is not None and field.message_type.full_name not in seen
    )


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


def violations(
    message: Message, prefix: str = "", skip: str = "", *, strings: bool = True
) -> Iterator[FieldViolation]:
    """A violation for every string in `message` (nested messages, lists and maps included, map
    keys too) that holds U+0000 (unless not `strings`) and every malformed Timestamp or
    Duration; the top-level field named `skip` is not looked at."""
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        if field.type == _STRING:
            if not strings:
                continue
            path = f"{prefix}{field.name}"
            if not field.is_repeated:
                if NUL in value:
                    yield _nul(path)
            else:
                for i, item in enumerate(value):
                    if NUL in item:
                        yield _nul(f"{path}[{i}]")
            continue
        entry = field.message_type
        if entry is None or not (strings or _holds_time(entry)):
            continue
        path = f"{prefix}{field.name}"
        if not field.is_repeated:
            yield from _message_violations(value, path, strings)
        elif entry.GetOptions().map_entry:
            key_field = entry.fields_by_name["key"]
            value_field = entry.fields_by_name["value"]
            for key in value:
                item_path = f"{path}{key_path(key)}"
                if strings and key_field.type == _STRING and NUL in key:
                    yield _nul(item_path)
                item = value[key]
                if value_field.type == _STRING:
                    if strings and NUL in item:
                        yield _nul(item_path)
                elif value_field.type == _MESSAGE:
                    yield from _message_violations(item, item_path, strings)
        else:
            for i, item in enumerate(value):
                yield from _message_violations(item, f"{path}[{i}]", strings)


def _message_violations(message: Message, path: str, strings: bool) -> Iterator[FieldViolation]:
    problem = _time_problem(message)
    if problem is not None:
        yield FieldViolation(path, problem[1], problem[0])
        return
    yield from violations(message, f"{path}.", strings=strings)


def _nul(path: str) -> FieldViolation:
    return FieldViolation(path, "holds U+0000 (NUL), which no string may hold", STRING_UNSTORABLE)


def unstorable_paths(message: Message) -> list[str]:
    """The paths of the strings in `message` that hold U+0000."""
    return [v.field for v in violations(message) if v.reason == STRING_UNSTORABLE]
