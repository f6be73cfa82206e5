"""The JSON ingest stores beside an event: proto JSON of its bus detail (field names kept), built
directly because json_format is slow (tests/unit/test_ingest_payload.py checks both agree), the
raw JSON of a rejected event, and the strings of an untranslated message that may be IDs. Pure:
no I/O."""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb


def value_json(value: types_pb2.AttributeValue) -> dict[str, Any]:
    which = value.WhichOneof("value")
    if which == "number_value":
        return {which: float(value.number_value)}
    if which == "timestamp_value":
        stamp = value.timestamp_value
        if stamp.nanos % 1000:
            # Stored to the microsecond, truncated, as event times and profile attributes are:
            # PostgreSQL would round the nanoseconds when reading the text as a time, and a
            # condition's operand (truncated) would then miss the value it names.
            stamp = Timestamp(seconds=stamp.seconds, nanos=stamp.nanos - stamp.nanos % 1000)
        return {which: stamp.ToJsonString()}
    if which == "string_list_value":
        items = list(value.string_list_value.values)
        return {which: {"values": items} if items else {}}
    if which is None:
        return {}
    return {which: getattr(value, which)}


def custom_payload(detail: bus_pb2.CustomEventDetail) -> dict[str, Any]:
    """The same dict as json_format.MessageToDict(detail, preserving_proto_field_name=True),
    built directly (a unit test checks they are equal)."""
    payload: dict[str, Any] = {"name": detail.name}
    if detail.label:
        payload["label"] = detail.label
    if detail.attributes:
        payload["attributes"] = {k: value_json(v) for k, v in detail.attributes.items()}
    return payload


def raw_event(event: pb.Event) -> dict[str, Any]:
    """The event as JSON for rejected_events: never the client IP, never a NUL character."""
    copy = event
    if event.session_client_ip or (
        event.WhichOneof("payload") == "session_start" and event.session_start.client_ip
    ):
        copy = pb.Event()
        copy.CopyFrom(event)
        copy.ClearField("session_client_ip")
        if copy.WhichOneof("payload") == "session_start":
            copy.session_start.ClearField("client_ip")
    try:
        as_json = json_format.MessageToDict(copy, preserving_proto_field_name=True)
    except (json_format.Error, ValueError):
        # Not expressible in proto JSON (a malformed Timestamp...): keep the exact bytes.
        return {"serialized_base64": base64.b64encode(copy.SerializeToString()).decode()}
    return without_nul(as_json)


# An untranslated message is the SDK's own JSON, and the IDs it names sit at its top level or
# one level below: Segment's userId, anonymousId and previousId, PostHog's distinct_id and
# properties.$anon_distinct_id or properties.alias, Countly's device_id and old_device_id. Its
# strings there of an ID's length are checked against the erasure quarantine, at most this many
# per message (the top level first), so that a refused message naming an erased ID is not kept.
MAX_MESSAGE_IDS = 64
MAX_ID_LENGTH = 512


def message_ids(event: pb.Event) -> list[str]:
    """The distinct strings of 1 to 512 characters at the top level of an untranslated message
    or one level below (in objects and lists), top level first, at most MAX_MESSAGE_IDS; none
    for any other event."""
    if event.WhichOneof("payload") != "untranslated":
        return []
    found: dict[str, None] = {}
    below: list[struct_pb2.Value] = []
    for value in event.untranslated.message.fields.values():
        _take_string(value, found)
        kind = value.WhichOneof("kind")
        if kind == "struct_value":
            below.extend(value.struct_value.fields.values())
        elif kind == "list_value":
            below.extend(value.list_value.values)
    for value in below:
        _take_string(value, found)
    return list(found)[:MAX_MESSAGE_IDS]


def _take_string(value: struct_pb2.Value, found: dict[str, None]) -> None:
    if value.WhichOneof("kind") == "string_value" and 1 <= len(value.string_value) <= MAX_ID_LENGTH:
        found[value.string_value] = None


def without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value
