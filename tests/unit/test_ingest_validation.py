"""Every ingest validation rule, with a rejected and an accepted case at its boundary. Pure: no
database, no gRPC. (The replay of attribute operations is the database's: see
tests/api/test_attribute_replay.py.)"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest import model
from services.ingest.errors import BatchInvalid
from services.ingest.model import AttributeOperation, Rejection, Value
from services.ingest.validation import (
    RejectedEvent,
    ValidEvent,
    ValidToken,
    duration_json,
    renumbered,
    validate_event,
    validate_events,
    validate_request,
    validate_token,
)
from shared import contract_limits as limits

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def base_event() -> pb.Event:
    event = pb.Event(event_id="e1", installation_id="inst", platform=types_pb2.PLATFORM_WEB)
    event.event_time.FromDatetime(NOW)
    event.custom.name = "view"
    return event


def check(event: pb.Event, *, imported: bool = False) -> ValidEvent | RejectedEvent:
    return validate_event(0, event, request_send_time=None, now=NOW, imported=imported)


def reason(event: pb.Event, *, imported: bool = False) -> str:
    result = check(event, imported=imported)
    return "" if isinstance(result, ValidEvent) else result.rejection.reason


def path(event: pb.Event) -> str:
    result = check(event)
    assert isinstance(result, RejectedEvent)
    return result.rejection.field_path


Edit = Callable[[pb.Event], object]


def edited(edit: Edit) -> pb.Event:
    event = base_event()
    edit(event)
    return event


def _attr(name: str, setter: Callable[[types_pb2.AttributeValue], object]) -> Edit:
    return lambda e: setter(e.custom.attributes[name])


def _operation(kind: int, native: int = 0, custom: str = "", value: Edit | None = None) -> Edit:
    def edit(event: pb.Event) -> None:
        event.ClearField("custom")
        operation = event.attribute_operations.operations.add(kind=kind)
        if native:
            operation.native_attribute = native  # type: ignore[assignment]
        else:
            operation.custom_attribute = custom
        if value is not None:
            value(operation.value)

    return edit


def _native_set(native: int, text: str, field: str = "string_value") -> Edit:
    return _operation(
        types_pb2.ATTRIBUTE_OPERATION_KIND_SET,
        native=native,
        value=lambda v: setattr(v, field, text),
    )


def _session(which: str, seconds: int = 0, nanos: int = 0, session_id: str = "s1") -> Edit:
    def edit(event: pb.Event) -> None:
        event.ClearField("custom")
        event.session_id = session_id
        payload = getattr(event, which)
        payload.SetInParent()
        if which != "session_start":
            payload.duration.seconds = seconds
            payload.duration.nanos = nanos

    return edit


def _update(**fields: object) -> Edit:
    def edit(event: pb.Event) -> None:
        event.ClearField("custom")
        event.installation_update.SetInParent()
        for name, value in fields.items():
            setattr(event.installation_update, name, value)

    return edit


def _subscription(channel: int, kind: int) -> Edit:
    def edit(event: pb.Event) -> None:
        event.ClearField("custom")
        event.subscription_change.channel = channel  # type: ignore[assignment]
        event.subscription_change.kind = kind  # type: ignore[assignment]

    return edit


def _crash(name: str, why: str = "") -> Edit:
    def edit(event: pb.Event) -> None:
        event.ClearField("custom")
        event.crash.name = name
        event.crash.reason = why

    return edit


def _attributes(count: int) -> Edit:
    def edit(event: pb.Event) -> None:
        for i in range(count):
            event.custom.attributes[f"a{i}"].bool_value = True

    return edit


def _operations(count: int) -> Edit:
    def edit(event: pb.Event) -> None:
        event.ClearField("custom")
        for i in range(count):
            event.attribute_operations.operations.add(
                kind=types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET, custom_attribute=f"a{i}"
            )

    return edit


SET = types_pb2.ATTRIBUTE_OPERATION_KIND_SET
EMAIL = types_pb2.NATIVE_ATTRIBUTE_EMAIL
AVATAR = types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL

# (rule, edit accepted at the boundary, edit rejected just past it, expected reason)
BOUNDARIES: list[tuple[str, Edit, Edit, str]] = [
    ("event id 64", lambda e: setattr(e, "event_id", "x" * 64),
     lambda e: setattr(e, "event_id", "x" * 65), model.EVENT_ID_INVALID),
    ("event id empty", lambda e: setattr(e, "event_id", "x"),
     lambda e: setattr(e, "event_id", ""), model.EVENT_ID_INVALID),
    ("installation 128", lambda e: setattr(e, "installation_id", "i" * 128),
     lambda e: setattr(e, "installation_id", "i" * 129), model.INSTALLATION_ID_INVALID),
    ("installation empty", lambda e: setattr(e, "installation_id", "i"),
     lambda e: setattr(e, "installation_id", ""), model.INSTALLATION_ID_INVALID),
    ("origin", lambda e: None, lambda e: e.ClearField("installation_id"), model.ORIGIN_MISSING),
    ("custom id 512", lambda e: setattr(e, "custom_id", "c" * 512),
     lambda e: setattr(e, "custom_id", "c" * 513), model.CUSTOM_ID_INVALID),
    # Junk and padded custom IDs are identity's rule (tests/api/test_ingest.py); ingest itself
    # only refuses the empty, the over-long and NUL characters.
    ("custom id empty", lambda e: setattr(e, "custom_id", "c"),
     lambda e: setattr(e, "custom_id", ""), model.CUSTOM_ID_INVALID),
    ("custom id nul", lambda e: setattr(e, "custom_id", "a b"),
     lambda e: setattr(e, "custom_id", "a\x00b"), model.CUSTOM_ID_INVALID),
    ("platform", lambda e: setattr(e, "platform", types_pb2.PLATFORM_API),
     lambda e: setattr(e, "platform", types_pb2.PLATFORM_UNSPECIFIED), model.PLATFORM_MISSING),
    ("event time", lambda e: None, lambda e: e.ClearField("event_time"), model.EVENT_TIME_MISSING),
    ("future", lambda e: e.event_time.FromDatetime(NOW + timedelta(minutes=10)),
     lambda e: e.event_time.FromDatetime(NOW + timedelta(minutes=10, microseconds=1)),
     model.EVENT_TIME_IN_FUTURE),
    ("past", lambda e: e.event_time.FromDatetime(NOW - timedelta(days=30)),
     lambda e: e.event_time.FromDatetime(NOW - timedelta(days=30, microseconds=1)),
     model.EVENT_TIME_TOO_OLD),
    ("payload", lambda e: None, lambda e: e.ClearField("custom"), model.PAYLOAD_MISSING),
    ("session id 64", lambda e: setattr(e, "session_id", "s" * 64),
     lambda e: setattr(e, "session_id", "s" * 65), model.SESSION_ID_INVALID),
    ("session id on a session event", _session("session_start"),
     _session("session_start", session_id=""), model.SESSION_ID_INVALID),
    ("name 30", lambda e: setattr(e.custom, "name", "N" * 30),
     lambda e: setattr(e.custom, "name", "N" * 31), model.NAME_INVALID),
    ("name charset", lambda e: setattr(e.custom, "name", "a_B_9"),
     lambda e: setattr(e.custom, "name", "a-b"), model.NAME_INVALID),
    ("label 200", lambda e: setattr(e.custom, "label", "l" * 200),
     lambda e: setattr(e.custom, "label", "l" * 201), model.LABEL_INVALID),
    ("attributes 20", _attributes(20), _attributes(21), model.TOO_MANY_ATTRIBUTES),
    ("attribute name", _attr("ok_1", lambda v: setattr(v, "bool_value", True)),
     _attr("not ok", lambda v: setattr(v, "bool_value", True)), model.ATTRIBUTE_NAME_INVALID),
    ("string 300", _attr("s", lambda v: setattr(v, "string_value", "s" * 300)),
     _attr("s", lambda v: setattr(v, "string_value", "s" * 301)), model.VALUE_INVALID),
    ("url 2048", _attr("u", lambda v: setattr(v, "url_value", "https://a.io/" + "p" * 2035)),
     _attr("u", lambda v: setattr(v, "url_value", "https://a.io/" + "p" * 2036)),
     model.VALUE_INVALID),
    ("url host", _attr("u", lambda v: setattr(v, "url_value", "myapp://host")),
     _attr("u", lambda v: setattr(v, "url_value", "/relative/path")), model.VALUE_INVALID),
    ("list 25", _attr("l", lambda v: v.string_list_value.values.extend(["x"] * 25)),
     _attr("l", lambda v: v.string_list_value.values.extend(["x"] * 26)), model.VALUE_INVALID),
    ("finite number", _attr("n", lambda v: setattr(v, "number_value", 1e308)),
     _attr("n", lambda v: setattr(v, "number_value", float("nan"))), model.VALUE_INVALID),
    ("no value", _attr("b", lambda v: setattr(v, "bool_value", False)),
     _attr("b", lambda v: None), model.VALUE_INVALID),
    ("email", _native_set(EMAIL, "Ann.Lee+x@Example.co"),
     _native_set(EMAIL, "ann@localhost"), model.EMAIL_INVALID),
    ("phone", _native_set(types_pb2.NATIVE_ATTRIBUTE_PHONE, "+123456789012345"),
     _native_set(types_pb2.NATIVE_ATTRIBUTE_PHONE, "+1234567890123456"), model.PHONE_INVALID),
    ("language", _native_set(types_pb2.NATIVE_ATTRIBUTE_LANGUAGE, "FR"),
     _native_set(types_pb2.NATIVE_ATTRIBUTE_LANGUAGE, "xx"), model.LANGUAGE_INVALID),
    ("region", _native_set(types_pb2.NATIVE_ATTRIBUTE_REGION, "de"),
     _native_set(types_pb2.NATIVE_ATTRIBUTE_REGION, "UK"), model.REGION_INVALID),
    ("country", _native_set(types_pb2.NATIVE_ATTRIBUTE_COUNTRY, "GB"),
     _native_set(types_pb2.NATIVE_ATTRIBUTE_COUNTRY, "EU"), model.COUNTRY_INVALID),
    ("timezone", _native_set(types_pb2.NATIVE_ATTRIBUTE_TIMEZONE, "Europe/Paris"),
     _native_set(types_pb2.NATIVE_ATTRIBUTE_TIMEZONE, "Europe/Atlantis"), model.TIMEZONE_INVALID),
    ("avatar", _native_set(AVATAR, "https://a.io/x.png", "url_value"),
     _native_set(AVATAR, "ftp://a.io/x.png", "url_value"),
     model.VALUE_INVALID),
    ("first name 300", _native_set(types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME, "a" * 300),
     _native_set(types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME, "a" * 301), model.VALUE_INVALID),
    ("native operation", _native_set(EMAIL, "a@b.io"),
     _operation(types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT, native=EMAIL,
                value=lambda v: setattr(v, "number_value", 1)), model.OPERATION_INVALID),
    ("operation kind", _operation(SET, custom="c", value=lambda v: setattr(v, "bool_value", True)),
     _operation(0, custom="c", value=lambda v: setattr(v, "bool_value", True)),
     model.OPERATION_INVALID),
    ("increment number", _operation(types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT, custom="n",
                                    value=lambda v: setattr(v, "number_value", -2)),
     _operation(types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT, custom="n",
                value=lambda v: setattr(v, "string_value", "2")), model.VALUE_INVALID),
    ("unset takes no value", _operation(types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET, custom="c"),
     _operation(types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET, custom="c",
                value=lambda v: setattr(v, "bool_value", True)), model.VALUE_INVALID),
    ("custom attribute name", _operation(SET, custom="A" * 30,
                                         value=lambda v: setattr(v, "bool_value", True)),
     _operation(SET, custom="A" * 31, value=lambda v: setattr(v, "bool_value", True)),
     model.ATTRIBUTE_NAME_INVALID),
    ("operations 20", _operations(20), _operations(21), model.TOO_MANY_ATTRIBUTES),
    ("operations 1", _operations(1), _operations(0), model.PAYLOAD_MISSING),
    ("duration 24h", _session("session_end", seconds=86_400),
     _session("session_end", seconds=86_400, nanos=1000), model.DURATION_INVALID),
    ("duration 24h and 1 ns", _session("session_end", seconds=86_399, nanos=999_999_999),
     _session("session_end", seconds=86_400, nanos=1), model.DURATION_INVALID),
    ("duration sign", _session("session_heartbeat", seconds=0),
     _session("session_heartbeat", seconds=-1), model.DURATION_INVALID),
    ("subscription", _subscription(types_pb2.CHANNEL_SMS, types_pb2.SUBSCRIPTION_KIND_MARKETING),
     _subscription(types_pb2.CHANNEL_SMS, 0), model.SUBSCRIPTION_INVALID),
    ("app version 64", _update(app_version="v" * 64), _update(app_version="v" * 65),
     model.VALUE_INVALID),
    ("device model 128", _update(device_model="d" * 128), _update(device_model="d" * 129),
     model.VALUE_INVALID),
    ("push token 4096", _update(push_token="t" * 4096), _update(push_token="t" * 4097),
     model.VALUE_INVALID),
    ("installation language", _update(language="en"), _update(language="eng"),
     model.LANGUAGE_INVALID),
    ("installation timezone", _update(timezone="UTC"), _update(timezone="Mars/Base"),
     model.TIMEZONE_INVALID),
    # Files of the zone database that PostgreSQL refuses or that are no one's zone.
    ("timezone localtime", _native_set(types_pb2.NATIVE_ATTRIBUTE_TIMEZONE, "Asia/Tokyo"),
     _native_set(types_pb2.NATIVE_ATTRIBUTE_TIMEZONE, "localtime"), model.TIMEZONE_INVALID),
    ("installation timezone posix/", _update(timezone="Europe/Paris"),
     _update(timezone="posix/Europe/Paris"), model.TIMEZONE_INVALID),
    ("crash name", _crash("n" * 300), _crash("n" * 301), model.NAME_INVALID),
    ("crash reason", _crash("n", "r" * 300), _crash("n", "r" * 301), model.VALUE_INVALID),
    ("no NUL", lambda e: setattr(e.custom, "label", "ok"),
     lambda e: setattr(e.custom, "label", "a\x00b"), model.LABEL_INVALID),
]  # fmt: skip


@pytest.mark.parametrize(
    ("accepted", "rejected", "expected"),
    [pytest.param(a, r, x, id=name) for name, a, r, x in BOUNDARIES],
)
def test_each_rule_accepts_its_boundary_and_rejects_just_past_it(
    accepted: Edit, rejected: Edit, expected: str
) -> None:
    assert reason(edited(accepted)) == ""
    assert reason(edited(rejected)) == expected


def test_an_event_of_32_kib_is_accepted_and_one_byte_more_is_too_large() -> None:
    event = edited(_crash("Boom"))
    event.crash.stack_trace = "x"
    padding = limits.MAX_EVENT_BYTES - event.ByteSize()
    event.crash.stack_trace = "x" * (1 + padding)
    while event.ByteSize() > limits.MAX_EVENT_BYTES:  # the length prefix may have grown
        event.crash.stack_trace = event.crash.stack_trace[:-1]
    assert event.ByteSize() == limits.MAX_EVENT_BYTES
    assert reason(event) == ""
    event.crash.stack_trace += "x"
    assert reason(event) == model.EVENT_TOO_LARGE


def test_import_lifts_the_past_limit_but_not_the_future_one() -> None:
    old = edited(lambda e: e.event_time.FromDatetime(NOW - timedelta(days=3000)))
    assert reason(old, imported=True) == ""
    future = edited(lambda e: e.event_time.FromDatetime(NOW + timedelta(hours=1)))
    assert reason(future, imported=True) == model.EVENT_TIME_IN_FUTURE


def test_skew_correction_adds_receive_minus_send_time() -> None:
    event = edited(lambda e: e.event_time.FromDatetime(NOW - timedelta(hours=5, minutes=2)))
    event.send_time.FromDatetime(NOW - timedelta(hours=5))
    result = check(event)
    assert isinstance(result, ValidEvent)
    assert result.event_time == NOW - timedelta(minutes=2)


def test_the_request_send_time_applies_when_the_event_has_none() -> None:
    event = edited(lambda e: e.event_time.FromDatetime(NOW + timedelta(hours=3)))
    send = pb.TrackEventsRequest().send_time
    send.FromDatetime(NOW + timedelta(hours=3, seconds=1))
    result = validate_event(0, event, request_send_time=send, now=NOW)
    assert isinstance(result, ValidEvent)
    assert result.event_time == NOW - timedelta(seconds=1)


def test_a_malformed_timestamp_is_rejected_not_raised() -> None:
    # The contract's code for a Timestamp outside its range, as on every other request; a
    # missing event time is EVENT_TIME_MISSING (above).
    event = edited(lambda e: setattr(e.event_time, "nanos", -5))
    assert (reason(event), path(event)) == (model.TIMESTAMP_INVALID, "event_time")
    huge = edited(lambda e: setattr(e.event_time, "seconds", 2**62))
    assert (reason(huge), path(huge)) == (model.TIMESTAMP_INVALID, "event_time")
    sent = edited(lambda e: setattr(e.send_time, "seconds", -(2**40)))
    assert (reason(sent), path(sent)) == (model.TIMESTAMP_INVALID, "send_time")


def test_field_paths_name_the_offending_attribute() -> None:
    event = edited(_attr("price", lambda v: setattr(v, "string_value", "s" * 301)))
    assert path(event) == 'custom.attributes["price"]'
    event = edited(_native_set(EMAIL, "nope"))
    assert path(event) == "attribute_operations.operations[0].value"


def test_a_rejection_keeps_nothing_the_database_cannot_store() -> None:
    event = base_event()
    event.custom.attributes["a\x00b"].number_value = 1
    rejected = check(event)
    assert isinstance(rejected, RejectedEvent)
    assert rejected.rejection.reason == model.ATTRIBUTE_NAME_INVALID
    assert rejected.rejection.field_path == 'custom.attributes["a\\u0000b"]'
    assert "\x00" not in repr(rejected.raw)


def test_attribute_names_equal_once_lower_cased_are_rejected() -> None:
    event = base_event()
    event.custom.attributes["Price"].number_value = 1
    event.custom.attributes["price"].number_value = 2
    assert reason(event) == model.ATTRIBUTE_NAME_INVALID


def test_names_and_native_values_are_normalized() -> None:
    event = edited(_native_set(EMAIL, "Ann@Example.COM"))
    result = check(event)
    assert isinstance(result, ValidEvent)
    assert result.operations == (
        AttributeOperation("set", True, "email", Value("string", "ann@example.com")),
    )
    custom = check(edited(lambda e: setattr(e.custom, "name", "Add_To_Cart")))
    assert isinstance(custom, ValidEvent)
    assert custom.name == "add_to_cart"


def test_the_client_ip_is_dropped_and_never_kept_in_a_rejection() -> None:
    event = edited(_session("session_start"))
    event.session_start.client_ip = "203.0.113.9"
    event.event_id = ""  # rejected
    result = check(event)
    assert isinstance(result, RejectedEvent)
    assert "203.0.113.9" not in repr(result.raw)


def test_an_installation_update_keeps_only_the_fields_present() -> None:
    result = check(edited(_update(push_opt_in=False, push_token="")))
    assert isinstance(result, ValidEvent)
    assert result.installation_values == {
        "push_opt_in": False,
        "push_token": None,
    }
    assert "push_token" not in result.payload


@pytest.mark.parametrize(("count", "ok"), [(1, True), (1000, True), (1001, False), (0, False)])
def test_a_request_holds_1_to_1000_events(count: int, ok: bool) -> None:
    if ok:
        validate_request(count, 100)
    else:
        with pytest.raises(BatchInvalid):
            validate_request(count, 100)


def test_a_request_holds_at_most_4_mib() -> None:
    validate_request(1, limits.MAX_REQUEST_BYTES)
    with pytest.raises(BatchInvalid) as raised:
        validate_request(1, limits.MAX_REQUEST_BYTES + 1)
    assert raised.value.reason == "REQUEST_TOO_LARGE"
    assert [v.field for v in raised.value.violations] == ["events"]


def test_untranslated_message_is_rejected_with_the_gateways_reason_and_kept_whole() -> None:
    event = pb.Event(event_id="m1")
    event.untranslated.reason = "ALIAS_REFUSED"
    event.untranslated.dialect = "segment"
    event.untranslated.message.update({"type": "alias", "previousId": "u1", "userId": "u2"})
    result = check(event)
    assert isinstance(result, RejectedEvent)
    assert result.rejection.reason == "ALIAS_REFUSED"
    assert result.raw is not None
    assert result.raw["untranslated"]["message"]["previousId"] == "u1"


def test_untranslated_message_with_a_malformed_reason_is_rejected_as_untranslated() -> None:
    event = pb.Event(event_id="m1")
    event.untranslated.reason = "not a code"
    assert reason(event) == model.UNTRANSLATED


@pytest.mark.parametrize(
    "duration",
    [
        timedelta(0),
        timedelta(seconds=30),
        timedelta(hours=24),
        timedelta(seconds=1, milliseconds=500),
        timedelta(seconds=59, microseconds=1),
        timedelta(seconds=3, microseconds=120_000),
        timedelta(days=1, seconds=7, microseconds=999_999),
        timedelta(microseconds=10),
    ],
)
def test_duration_json_is_what_protobuf_spells(duration: timedelta) -> None:
    expected = Duration()
    expected.FromTimedelta(duration)
    assert duration_json(duration) == expected.ToJsonString()


def test_a_heartbeat_keeps_its_duration_to_the_microsecond() -> None:
    event = base_event()
    event.session_id = "s1"
    event.session_heartbeat.duration.seconds = 75
    event.session_heartbeat.duration.nanos = 250_000_999  # nanoseconds beyond the µs are cut
    result = check(event)
    assert isinstance(result, ValidEvent)
    assert result.session_duration == timedelta(seconds=75, microseconds=250_000)
    assert result.payload == {"duration": "75.250s"}
    expected = Duration()
    expected.FromTimedelta(timedelta(seconds=75, microseconds=250_000))
    assert result.detail.duration == expected  # type: ignore[attr-defined]


def test_validate_events_keeps_every_field_of_each_event() -> None:
    events = [base_event(), base_event(), base_event()]
    events[1].event_id = ""  # rejected
    events[2].event_id = "e3"
    events[2].session_id = "s"
    valid, rejected = validate_events(events, None, NOW)
    assert [r.index for r in rejected] == [1]
    assert valid == [check(events[0]), replace(check(events[2]), index=2)]
    assert valid[1].session_id == "s"
    assert valid[1].name == "view"
    assert valid[1].operations == ()


def test_an_imported_push_token_is_refused_when_padded_with_whitespace() -> None:
    for padded in (" apns-1", "apns-1\n", "\tapns-1", "apns-1 "):
        rejection = validate_token(
            0, pb.ImportedToken(platform=types_pb2.PLATFORM_IOS, push_token=padded)
        )
        assert isinstance(rejection, Rejection), padded
        assert (rejection.reason, rejection.field_path) == (model.PUSH_TOKEN_INVALID, "push_token")
    valid = validate_token(
        0, pb.ImportedToken(platform=types_pb2.PLATFORM_IOS, push_token="apns 1")
    )
    assert isinstance(valid, ValidToken)
    assert valid.push_token == "apns 1"


def test_an_event_time_sent_at_the_epoch_is_too_old_not_missing() -> None:
    # Validation asks for the event time's presence only when it reads as empty: one sent at
    # exactly 1970-01-01 reads as empty too, and is present.
    epoch = edited(lambda e: e.event_time.CopyFrom(Timestamp()))
    assert epoch.HasField("event_time")
    assert (reason(epoch), path(epoch)) == (model.EVENT_TIME_TOO_OLD, "event_time")
    imported = check(epoch, imported=True)  # after 1900: an import may hold it
    assert isinstance(imported, ValidEvent)
    assert imported.event_time == datetime(1970, 1, 1, tzinfo=UTC)
    missing = edited(lambda e: e.ClearField("event_time"))
    assert (reason(missing), path(missing)) == (model.EVENT_TIME_MISSING, "event_time")


def _batch_with_repeated_names() -> list[pb.Event]:
    """Events that share names in several spellings, valid and not, so that what one event's
    check remembers of a name (BatchValidator's per-batch names) shows in the next's."""
    events = []
    for index, (name, keys, operation) in enumerate(
        [
            ("View", ["Price", "item"], "Visits"),
            ("view", ["price", "Item"], "visits"),
            ("VIEW", ["PRICE", "price"], "not ok"),  # two keys equal once lower-cased
            ("bad name", ["price"], "visits"),
            ("view", ["bad key"], "VISITS"),
            ("view", ["Price"], "visits"),
        ]
    ):
        custom = base_event()
        custom.event_id = f"c{index}"
        custom.custom.name = name
        for key in keys:
            custom.custom.attributes[key].number_value = index
        operations = base_event()
        operations.event_id = f"o{index}"
        operations.ClearField("custom")
        ops = operations.attribute_operations.operations
        ops.add(
            kind=types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT, custom_attribute=operation
        ).value.number_value = 1
        ops.add(
            kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET, custom_attribute=keys[0]
        ).value.string_value = name
        events += [custom, operations]
    return events


def test_a_batch_checks_each_event_as_if_it_were_alone() -> None:
    events = _batch_with_repeated_names()
    valid, rejected = validate_events(events, None, NOW)
    by_index = {e.index: e for e in [*valid, *rejected]}
    assert sorted(by_index) == list(range(len(events)))
    for index, event in enumerate(events):
        alone = validate_event(index, event, request_send_time=None, now=NOW)
        assert by_index[index] == alone, index
    assert [r.index for r in rejected] == [4, 5, 6, 8, 9]
    assert by_index[2].payload == {  # type: ignore[union-attr]
        "name": "view",
        "attributes": {"price": {"number_value": 1.0}, "item": {"number_value": 1.0}},
    }
    assert by_index[3].operations == (  # type: ignore[union-attr]
        AttributeOperation("increment", False, "visits", Value("number", 1.0)),
        AttributeOperation("set", False, "price", Value("string", "view")),
    )


def test_a_checked_event_is_a_valid_event_like_any_other() -> None:
    # BatchValidator.check and renumbered build ValidEvents through a faster twin class: what
    # they give must be a ValidEvent in every respect, frozen, with the client IP out of its repr.
    event = edited(_session("session_start"))
    event.session_start.client_ip = "203.0.113.9"
    checked = check(event)
    assert type(checked) is ValidEvent
    values = {f.name: getattr(checked, f.name) for f in dataclasses.fields(ValidEvent)}
    assert values["client_ip"] == "203.0.113.9"
    plain = ValidEvent(**values)
    assert checked == plain
    assert repr(checked) == repr(plain)
    assert "203.0.113.9" not in repr(checked)
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.index = 1  # type: ignore[misc]
    moved = renumbered(checked, 5)
    assert type(moved) is ValidEvent
    assert moved == replace(plain, index=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        moved.session_id = "other"  # type: ignore[misc]
