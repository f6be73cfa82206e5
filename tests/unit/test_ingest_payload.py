"""The stored payload, built directly for speed, equals protobuf's json_format output of the
event's bus detail, for every payload kind."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import json_format

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest.payloads import custom_payload
from services.ingest.validation import ValidEvent, validate_event

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def test_custom_payload_matches_json_format_for_every_value_kind() -> None:
    details = [bus_pb2.CustomEventDetail(name="plain")]
    full = bus_pb2.CustomEventDetail(name="purchase", label="shop")
    full.attributes["s"].string_value = "text"
    full.attributes["empty"].string_value = ""
    full.attributes["n"].number_value = 3.0
    full.attributes["big"].number_value = 1e300
    full.attributes["neg"].number_value = -0.25
    full.attributes["b"].bool_value = False
    full.attributes["t"].timestamp_value.FromNanoseconds(1_700_000_000_123_456_000)
    full.attributes["u"].url_value = "https://example.com/a?b=c"
    full.attributes["l"].string_list_value.values.extend(["a", "b"])
    full.attributes["none"].string_list_value.SetInParent()
    details.append(full)
    for detail in details:
        expected = json_format.MessageToDict(detail, preserving_proto_field_name=True)
        assert custom_payload(detail) == expected


def test_custom_events_and_their_bus_detail_share_field_numbers_and_types() -> None:
    # validation re-reads a CustomEvent's bytes as a CustomEventDetail when nothing needs
    # lower-casing; that is only right while both messages have the same fields.
    def shape(descriptor: object) -> list[tuple[str, int, int]]:
        return sorted(
            (f.name, f.number, f.type)
            for f in descriptor.fields  # type: ignore[attr-defined]
        )

    assert shape(pb.CustomEvent.DESCRIPTOR) == shape(bus_pb2.CustomEventDetail.DESCRIPTOR)


def _event(edit: str) -> pb.Event:
    event = pb.Event(
        event_id="e1", installation_id="inst", platform=types_pb2.PLATFORM_IOS, session_id="s1"
    )
    event.event_time.FromDatetime(NOW)
    if edit == "custom":
        event.custom.name = "Add_To_Cart"
        event.custom.label = "shop"
        event.custom.attributes["Price"].number_value = 2
        event.custom.attributes["at"].timestamp_value.FromNanoseconds(1_700_000_000_000_001_000)
    elif edit == "custom_lower":
        event.custom.name = "view"
        event.custom.attributes["tags"].string_list_value.values.extend(["a", "b"])
        event.custom.attributes["ok"].bool_value = False
    elif edit == "session_start":
        event.session_start.country = "fr"
    elif edit == "session_start_empty":
        event.session_start.SetInParent()
    elif edit == "heartbeat":
        event.session_heartbeat.duration.FromNanoseconds(61_500_000_000)
    elif edit == "end":
        event.session_end.duration.FromNanoseconds(12_000_001_000)
    elif edit == "attributes":
        ops = event.attribute_operations.operations
        ops.add(
            kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET,
            native_attribute=types_pb2.NATIVE_ATTRIBUTE_EMAIL,
        ).value.string_value = "Ann@Example.com"
        ops.add(kind=types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET, custom_attribute="Plan")
        inc = ops.add(kind=types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT, custom_attribute="n")
        inc.value.number_value = 1
        ops.add(
            kind=types_pb2.ATTRIBUTE_OPERATION_KIND_APPEND, custom_attribute="tags"
        ).value.string_list_value.values.append("x")
    elif edit in ("subscribe", "unsubscribe"):
        event.subscription_change.channel = types_pb2.CHANNEL_SMS
        event.subscription_change.kind = types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL
        event.subscription_change.subscribed = edit == "subscribe"
    elif edit == "update":
        event.installation_update.app_version = ""
        event.installation_update.push_token = "secret"
        event.installation_update.push_opt_in = False
        event.installation_update.language = "FR"
        event.installation_update.uninstalled = True
    elif edit == "update_clears_token":
        event.installation_update.push_token = ""
    elif edit == "crash":
        event.crash.name = "Oops"
        event.crash.stack_trace = "at x"
    elif edit == "fatal_crash":
        event.crash.name = "Oops"
        event.crash.reason = "null"
        event.crash.fatal = True
    return event


KINDS = [
    "custom", "custom_lower", "session_start", "session_start_empty", "heartbeat", "end",
    "attributes", "subscribe", "unsubscribe", "update", "update_clears_token", "crash",
    "fatal_crash",
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_the_stored_payload_is_the_proto_json_of_the_bus_detail(kind: str) -> None:
    event = _event(kind)
    result = validate_event(0, event, request_send_time=None, now=NOW)
    assert isinstance(result, ValidEvent)
    expected = json_format.MessageToDict(result.detail, preserving_proto_field_name=True)
    if kind.endswith("crash") and event.crash.stack_trace:
        expected["stack_trace"] = event.crash.stack_trace
    assert result.payload == expected
    assert "secret" not in str(result.payload)


def test_the_stored_operations_are_the_proto_json_of_the_bus_detail_for_every_value_kind() -> None:
    # Validation spells the common values of operations (strings, numbers, booleans, URLs)
    # from what it checked, the rest from the detail: both must be the detail's proto JSON.
    event = _event("custom")
    event.ClearField("custom")
    ops = event.attribute_operations.operations
    kinds = types_pb2
    for kind, name, setter in [
        (kinds.ATTRIBUTE_OPERATION_KIND_SET, "S", lambda v: setattr(v, "string_value", "Text")),
        (kinds.ATTRIBUTE_OPERATION_KIND_SET, "e", lambda v: setattr(v, "string_value", "")),
        (kinds.ATTRIBUTE_OPERATION_KIND_SET_ONCE, "n", lambda v: setattr(v, "number_value", 2)),
        (kinds.ATTRIBUTE_OPERATION_KIND_INCREMENT, "z", lambda v: setattr(v, "number_value", -0.0)),
        (kinds.ATTRIBUTE_OPERATION_KIND_SET, "b", lambda v: setattr(v, "bool_value", False)),
        (
            kinds.ATTRIBUTE_OPERATION_KIND_SET,
            "u",
            lambda v: setattr(v, "url_value", "https://a.io"),
        ),
        (
            kinds.ATTRIBUTE_OPERATION_KIND_SET,
            "t",
            lambda v: v.timestamp_value.FromNanoseconds(1_700_000_000_000_001_000),
        ),
        (kinds.ATTRIBUTE_OPERATION_KIND_REMOVE, "l", lambda v: v.string_list_value.SetInParent()),
        (kinds.ATTRIBUTE_OPERATION_KIND_UNSET, "gone", None),
    ]:
        op = ops.add(kind=kind, custom_attribute=name)
        if setter is not None:
            setter(op.value)
    for native, text, field in [
        (types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL, "https://a.io/Me.png", "url_value"),
        (types_pb2.NATIVE_ATTRIBUTE_LANGUAGE, "FR", "string_value"),
        (types_pb2.NATIVE_ATTRIBUTE_COUNTRY, "fr", "string_value"),
    ]:
        op = ops.add(kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET, native_attribute=native)
        setattr(op.value, field, text)
    result = validate_event(0, event, request_send_time=None, now=NOW)
    assert isinstance(result, ValidEvent)
    assert result.payload == json_format.MessageToDict(
        result.detail, preserving_proto_field_name=True
    )
    stored = result.payload["operations"]
    assert len(stored) == len(ops)
    assert stored[0]["custom_attribute"] == "s"
    assert stored[-1]["value"] == {"string_value": "FR"}
    assert stored[-2]["value"] == {"string_value": "fr"}  # language: lower-cased
