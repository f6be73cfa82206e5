"""Rules every request of the contract follows, whatever its RPC: checked once per call by the
server interceptor, so no servicer repeats them and a field added later is covered too.

- A request body that does not decode (truncated bytes, invalid UTF-8 in a string, nesting past
  protobuf's depth limit) is refused as REQUEST_UNDECODABLE, after authentication.
- No string of a request may hold U+0000: PostgreSQL text and jsonb cannot store it, so a string
  the database cannot store is invalid everywhere (STRING_UNSTORABLE, one field violation per
  path). The items of a batch that is answered item by item (TrackEvents' events, ImportTokens'
  tokens) are left to the service, which refuses such an item alone rather than its batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from shared.errors import FieldViolation, InvalidArgument

NUL = "\x00"

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


class StringUnstorable(InvalidArgument):
    reason = "STRING_UNSTORABLE"


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


def unstorable_paths(message: Message, prefix: str = "", skip: str = "") -> Iterator[str]:
    """The path of every string in `message` (nested messages, lists and maps included, map
    keys too) that holds U+0000; the top-level field named `skip` is not looked at."""
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        path = f"{prefix}{field.name}"
        if not field.is_repeated:
            if field.type == _STRING:
                if NUL in value:
                    yield path
            elif field.type == _MESSAGE:
                yield from unstorable_paths(value, f"{path}.")
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            for key in value:
                item_path = f"{path}{key_path(key)}"
                if key_field.type == _STRING and NUL in key:
                    yield item_path
                item = value[key]
                if value_field.type == _STRING:
                    if NUL in item:
                        yield item_path
                elif value_field.type == _MESSAGE:
                    yield from unstorable_paths(item, f"{item_path}.")
        elif field.type == _STRING:
            for i, item in enumerate(value):
                if NUL in item:
                    yield f"{path}[{i}]"
        elif field.type == _MESSAGE:
            for i, item in enumerate(value):
                yield from unstorable_paths(item, f"{path}[{i}].")


def check_request(request: object) -> None:
    """Raises RequestUndecodable or StringUnstorable for a request that breaks a rule above."""
    if isinstance(request, Undecodable):
        raise RequestUndecodable(
            f"the request body is not a valid message of this RPC: {request.problem}"
        )
    if not isinstance(request, Message):
        return
    paths = list(
        unstorable_paths(request, skip=ANSWERED_PER_ITEM.get(request.DESCRIPTOR.full_name, ""))
    )
    if paths:
        raise StringUnstorable(
            "strings may not hold U+0000 (NUL): " + ", ".join(paths[:10]),
            [FieldViolation(p, "holds U+0000 (NUL)", StringUnstorable.reason) for p in paths],
        )
