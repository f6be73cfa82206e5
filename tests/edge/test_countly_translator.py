"""The Countly translator with the payloads Countly's SDKs and write API documentation show:
pure functions, no I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from services.edge.countly_routes import parameters
from services.edge.dialects import countly
from services.edge.steps import Identify, Logout, Reject, RequestInvalid, Track, Translation

NOW = datetime(2026, 12, 2, 20, 0, tzinfo=UTC)
T0 = int(NOW.timestamp() * 1000)
NODE_SDK = "javascript_native_nodejs"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


def request(**params: Any) -> dict[str, Any]:
    """An /i request as a Countly SDK builds it (every SDK adds these to each request)."""
    return {
        "app_key": "app-key-1",
        "device_id": "device-1",
        "timestamp": str(T0),
        "hour": "20",
        "dow": "3",
        "tz": "60",
        "sdk_name": NODE_SDK,
        "sdk_version": "24.10.4",
        **params,
    }


def translate(params: Mapping[str, Any]) -> Translation:
    return countly.translate(params, receive_time=NOW, client_ip="203.0.113.7")


def events_of(translation: Translation) -> list[ingest_pb.Event]:
    return [event for step in translation.steps if isinstance(step, Track) for event in step.events]


def rejects_of(translation: Translation) -> list[Reject]:
    return [step for step in translation.steps if isinstance(step, Reject)]


def payloads(translation: Translation) -> list[str]:
    return [str(event.WhichOneof("payload")) for event in events_of(translation)]


def at(milliseconds: int) -> datetime:
    return datetime.fromtimestamp(milliseconds / 1000, UTC)


METRICS = {
    "_os": "Android",
    "_os_version": "14",
    "_device": "Pixel 8",
    "_resolution": "1080x2400",
    "_carrier": "Orange",
    "_app_version": "3.2.1",
    "_locale": "fr_FR",
}


def test_begin_session_starts_a_session_and_sets_installation_details() -> None:
    translation = translate(request(begin_session="1", metrics=json.dumps(METRICS)))

    start, details, zone, locale = events_of(translation)
    assert start.WhichOneof("payload") == "session_start"
    assert start.session_id
    assert start.installation_id == "device-1"
    assert start.event_time.ToDatetime(UTC) == NOW
    assert start.session_start.client_ip == "203.0.113.7"
    update = details.installation_update
    assert (update.app_version, update.os_version, update.device_model) == (
        "3.2.1",
        "14",
        "Pixel 8",
    )
    assert not update.HasField("push_token")
    # The time zone in an update of its own (countly-sdk-web sends `tz` with every request).
    assert [f.name for f, _ in zone.installation_update.ListFields()] == ["timezone"]
    assert zone.installation_update.timezone == "Etc/GMT-1"
    # Its own update: a language ingest refuses costs nothing else.
    assert [f.name for f, _ in locale.installation_update.ListFields()] == ["language"]
    assert locale.installation_update.language == "fr"


def test_the_web_sdks_health_check_stores_nothing() -> None:
    # countly-sdk-web sends it on every page load, consent or not, with the app version and tz:
    # stored, each made an installation update and a profile for a visitor who did nothing.
    health_check = request(
        hc=json.dumps({"el": 0, "wl": 0, "sc": -1, "em": "", "cr": 0}),
        metrics=json.dumps({"_app_version": "1.0"}),
        sdk_name="javascript_native_web",
    )
    assert events_of(translate(health_check)) == []
    # Metrics sent at a session's start still count.
    started = translate({**health_check, "begin_session": "1"})
    assert "installation_update" in payloads(started)


def test_parameters_as_objects_translate_as_json_text_does() -> None:
    as_text = translate(request(begin_session=1, metrics=json.dumps(METRICS)))
    as_objects = translate(request(begin_session=1, metrics=METRICS))

    assert events_of(as_text) == events_of(as_objects)


def test_the_session_country_comes_from_the_address_not_country_code() -> None:
    (start,) = events_of(translate(request(begin_session="1", country_code="UK", tz="330")))

    assert not start.session_start.country
    assert start.session_start.client_ip == "203.0.113.7"


def test_heartbeats_and_ends_ask_ingest_for_the_devices_open_session() -> None:
    """The edge keeps no session state: ingest attaches them to the session `begin_session`
    started and computes their durations (services/ingest/derived_sessions.py)."""
    start = events_of(translate(request(begin_session="1")))[0]
    beat = translate(request(timestamp=str(T0 + 60_000), session_duration="60"))
    end = translate(request(timestamp=str(T0 + 75_000), end_session="1", session_duration="15"))

    (heartbeat,) = events_of(beat)
    (ending,) = events_of(end)
    assert start.session_id
    assert start.session_rule == ingest_pb.SESSION_RULE_UNSPECIFIED
    for event in (heartbeat, ending):
        assert event.session_id == ""
        assert event.session_rule == ingest_pb.SESSION_RULE_OPEN_SESSION
    # Countly's own seconds, which ingest uses only for a session they start.
    assert heartbeat.session_heartbeat.duration.ToTimedelta() == timedelta(seconds=60)
    assert ending.session_end.duration.ToTimedelta() == timedelta(seconds=15)
    assert ending.event_time.ToDatetime(UTC) == at(T0 + 75_000)


def test_each_begin_session_is_a_new_session() -> None:
    first = events_of(translate(request(begin_session="1")))[0]
    later = request(timestamp=str(T0 + 3_600_000), begin_session="1")
    second = events_of(translate(later))[0]

    assert first.session_id != second.session_id


def test_a_retried_request_gives_the_same_ids_and_durations() -> None:
    end = request(timestamp=str(T0 + 10_000), end_session="1", session_duration="10")

    assert events_of(translate(end)) == events_of(translate(end))


EVENTS = [
    {
        "key": "Order Completed",
        "count": 2,
        "sum": 19.9,
        "dur": 3,
        "segmentation": {"plan": {"tier": "pro"}, "coupon": "XMAS", "items": ["a", "b"]},
        "timestamp": T0 - 5_000,
        "hour": 19,
        "dow": 3,
    },
    {
        "key": "[CLY]_view",
        "count": 1,
        "segmentation": {"name": "home", "visit": 1},
        "timestamp": T0 - 4_000,
    },
]


def test_events_become_custom_events_with_normalized_names_and_attributes() -> None:
    order, view = events_of(translate(request(events=json.dumps(EVENTS))))

    assert order.custom.name == "order_completed"
    attributes = order.custom.attributes
    assert set(attributes) == {"plan_tier", "coupon", "items", "count", "sum", "dur"}
    assert attributes["plan_tier"].string_value == "pro"
    assert list(attributes["items"].string_list_value.values) == ["a", "b"]
    assert (attributes["count"].number_value, attributes["sum"].number_value) == (2, 19.9)
    assert attributes["dur"].number_value == 3
    assert order.event_time.ToDatetime(UTC) == at(T0 - 5_000)
    assert order.platform == types_pb2.PLATFORM_API
    assert view.custom.name == "cly_view"


def test_timestamps_in_seconds_are_read_as_seconds() -> None:
    seconds = T0 // 1000
    (event,) = events_of(
        translate(request(timestamp=str(seconds), events=[{"key": "a", "timestamp": seconds}]))
    )

    assert event.event_time.ToDatetime(UTC) == NOW


def test_without_a_timestamp_the_receive_time_is_the_event_time() -> None:
    params = request(events=[{"key": "a"}])
    del params["timestamp"]

    (event,) = events_of(translate(params))

    assert event.event_time.ToDatetime(UTC) == NOW


def test_event_ids_are_the_same_on_retry_and_distinct_within_a_request() -> None:
    same_twice = [{"key": "tap", "count": 1, "timestamp": T0}] * 2
    params = request(events=json.dumps(same_twice))

    first = [e.event_id for e in events_of(translate(params))]
    retried = [e.event_id for e in events_of(translate(params))]
    other_request = [e.event_id for e in events_of(translate({**params, "timestamp": T0 + 1}))]

    assert first == retried
    assert len(set(first)) == 2
    assert not set(first) & set(other_request)
    assert all(1 <= len(event_id) <= 64 for event_id in first)


def test_an_event_without_a_usable_name_is_rejected_without_the_app_key() -> None:
    translation = translate(
        request(ip_address="198.51.100.1", events=[{"key": "!!!", "count": 1}, {"key": "ok"}])
    )

    (reject,) = rejects_of(translation)
    assert reject.reason == countly.NAME_UNUSABLE
    assert reject.installation_id == "device-1"
    assert reject.event_id
    assert reject.message == {"events": [{"key": "!!!", "count": 1}]}
    assert [e.custom.name for e in events_of(translation)] == ["ok"]
    assert translation.message_count == 2


def test_a_segmentation_key_without_a_usable_name_rejects_its_event() -> None:
    (reject,) = rejects_of(translate(request(events=[{"key": "a", "segmentation": {"***": 1}}])))

    assert reject.reason == countly.PROPERTY_NAME_UNUSABLE
    assert "***" in reject.explanation


def test_events_that_are_not_json_are_rejected_and_listed() -> None:
    (reject,) = rejects_of(translate(request(events="[{not json")))

    assert reject.reason == countly.PARAMETER_INVALID
    assert reject.message == {"events": "[{not json"}


def operations_of(translation: Translation) -> list[types_pb2.AttributeOperation]:
    return [
        operation
        for event in events_of(translation)
        for operation in event.attribute_operations.operations
    ]


def by_attribute(
    operations: list[types_pb2.AttributeOperation],
) -> dict[str, list[tuple[int, Any]]]:
    found: dict[str, list[tuple[int, Any]]] = {}
    for operation in operations:
        which = operation.WhichOneof("attribute")
        name = (
            types_pb2.NativeAttribute.Name(operation.native_attribute)
            if which == "native_attribute"
            else operation.custom_attribute
        )
        value = operation.value
        kind = value.WhichOneof("value")
        shown = (
            list(value.string_list_value.values)
            if kind == "string_list_value"
            else (getattr(value, kind) if kind else None)
        )
        found.setdefault(name, []).append((operation.kind, shown))
    return found


USER_DETAILS = {
    "name": "Ada King Lovelace",
    "username": "ada",
    "email": "Ada@Example.com",
    "organization": "Analytical Engines",
    "phone": "+44 (20) 7946-0958",
    "picture": "https://example.com/ada.png",
    "gender": "F",
    "byear": 1815,
}


def test_user_details_go_to_native_attributes_where_native_and_custom_otherwise() -> None:
    translation = translate(request(user_details=json.dumps(USER_DETAILS)))

    found = by_attribute(operations_of(translation))
    set_ = types_pb2.ATTRIBUTE_OPERATION_KIND_SET
    assert found == {
        "NATIVE_ATTRIBUTE_FIRST_NAME": [(set_, "Ada")],
        "NATIVE_ATTRIBUTE_LAST_NAME": [(set_, "King Lovelace")],
        "NATIVE_ATTRIBUTE_EMAIL": [(set_, "Ada@Example.com")],
        "NATIVE_ATTRIBUTE_PHONE": [(set_, "+442079460958")],
        "NATIVE_ATTRIBUTE_AVATAR_URL": [(set_, "https://example.com/ada.png")],
        "username": [(set_, "ada")],
        "organization": [(set_, "Analytical Engines")],
        "gender": [(set_, "F")],
        "byear": [(set_, 1815.0)],
    }
    # One event per property: an invalid value is rejected alone.
    assert len(events_of(translation)) == 8


def test_empty_user_details_unset_the_attributes() -> None:
    found = by_attribute(operations_of(translate(request(user_details={"email": "", "name": ""}))))

    unset = types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET
    assert found == {
        "NATIVE_ATTRIBUTE_EMAIL": [(unset, None)],
        "NATIVE_ATTRIBUTE_FIRST_NAME": [(unset, None)],
        "NATIVE_ATTRIBUTE_LAST_NAME": [(unset, None)],
    }


def test_custom_modifiers_become_attribute_operations() -> None:
    # What Countly.userData.set/set_once/increment_by/push/push_unique/pull/unset + save() send.
    custom = {
        "twitter": "ada_l",
        "plan": {"$setOnce": "free"},
        "logins": {"$inc": 2},
        "visited": {"$push": ["home", "cart"]},
        "categories": {"$addToSet": ["IT"]},
        "wishlist": {"$pull": ["socks"]},
        "nickname": "",
        "Favourite Colour": {"$set": "blue"},
    }

    found = by_attribute(operations_of(translate(request(user_details={"custom": custom}))))

    k = types_pb2
    assert found == {
        "twitter": [(k.ATTRIBUTE_OPERATION_KIND_SET, "ada_l")],
        "plan": [(k.ATTRIBUTE_OPERATION_KIND_SET_ONCE, "free")],
        "logins": [(k.ATTRIBUTE_OPERATION_KIND_INCREMENT, 2.0)],
        "visited": [(k.ATTRIBUTE_OPERATION_KIND_APPEND, ["home", "cart"])],
        "categories": [
            (k.ATTRIBUTE_OPERATION_KIND_REMOVE, ["IT"]),
            (k.ATTRIBUTE_OPERATION_KIND_APPEND, ["IT"]),
        ],
        "wishlist": [(k.ATTRIBUTE_OPERATION_KIND_REMOVE, ["socks"])],
        "nickname": [(k.ATTRIBUTE_OPERATION_KIND_UNSET, None)],
        "favourite_colour": [(k.ATTRIBUTE_OPERATION_KIND_SET, "blue")],
    }


@pytest.mark.parametrize("modifier", ["$mul", "$min", "$max"])
def test_modifiers_the_contract_lacks_are_refused_per_property(modifier: str) -> None:
    custom = {"score": {modifier: 3}, "level": {"$inc": 1}}

    translation = translate(request(user_details={"custom": custom}))

    (reject,) = rejects_of(translation)
    assert reject.reason == countly.OPERATION_UNSUPPORTED
    assert modifier in reject.explanation
    assert reject.message == {"user_details": {"custom": {"score": {modifier: 3}}}}
    assert list(by_attribute(operations_of(translation))) == ["level"]


def test_an_increment_that_is_not_a_number_is_rejected() -> None:
    (reject,) = rejects_of(translate(request(user_details={"custom": {"n": {"$inc": "many"}}})))

    assert reject.reason == countly.VALUE_INVALID


def test_a_crash_keeps_its_stack_and_names_its_exception() -> None:
    crash = {
        "_os": "Linux",
        "_os_version": "6.1",
        "_error": "TypeError: x is undefined\n    at main (app.js:3:9)",
        "_app_version": "1.0",
        "_run": 12,
        "_nonfatal": False,
        "_custom": {"screen": "cart"},
    }

    (event,) = events_of(translate(request(crash=json.dumps(crash))))

    assert event.crash.name == "TypeError"
    assert event.crash.reason == "x is undefined"
    assert event.crash.stack_trace == crash["_error"]
    assert event.crash.fatal
    handled = {**crash, "_nonfatal": True, "_name": "Handled"}
    (handled_event,) = events_of(translate(request(crash=handled)))
    assert (handled_event.crash.name, handled_event.crash.fatal) == ("Handled", False)


# What countly-sdk-ios 26.1.2 sends (CountlyCrashReporter.m): for an NSException or a Swift
# error, `_name` is the exception's description (its message) and `_type` its name; for a
# crash of the previous run, PLCrashReporter's iOS text report as `_error`, with `_plcrash`.
IOS_STACK = (
    "0   CoreFoundation   0x00000001804f0d88 __exceptionPreprocess + 164\n"
    "1   libobjc.A.dylib  0x000000018005c1c4 objc_exception_throw + 56"
)
PLCRASH_HEADER = (
    "Incident Identifier: 8F5E3E1A-3B7C-4B9C-9F0E-1D2C3B4A5E6F\n"
    "CrashReporter Key:   TODO\n"
    "Hardware Model:      iPhone14,2\n"
    "Process:         MyApp [1234]\n"
    "Exception Type:  SIGSEGV\n"
    "Exception Codes: SEGV_MAPERR at 0x0\n"
    "Crashed Thread:  0\n"
)


def test_an_ios_exception_is_named_by_its_type_with_its_message_as_reason() -> None:
    message = "*** -[__NSArrayM objectAtIndex:]: index 5 beyond bounds [0 .. 2]"
    crash = {"_error": IOS_STACK, "_name": message, "_type": "NSRangeException", "_nonfatal": True}

    (event,) = events_of(translate(request(sdk_name="objc-native-ios", crash=crash)))

    assert (event.crash.name, event.crash.reason) == ("NSRangeException", message)
    assert event.crash.stack_trace == IOS_STACK
    assert not event.crash.fatal


def test_an_ios_plcrash_report_is_named_by_its_signal_or_uncaught_exception() -> None:
    signal = {"_error": PLCRASH_HEADER, "_os": "iOS", "_plcrash": True, "_custom": {}}
    uncaught = {
        "_error": PLCRASH_HEADER.replace("SIGSEGV", "SIGABRT")
        + "\nApplication Specific Information:\n"
        "*** Terminating app due to uncaught exception 'NSInvalidArgumentException', "
        "reason: '-[NSNull length]: unrecognized selector sent to instance 0x1'\n",
        "_plcrash": True,
    }

    (by_signal,) = events_of(translate(request(sdk_name="objc-native-ios", crash=signal)))
    (by_exception,) = events_of(translate(request(sdk_name="objc-native-ios", crash=uncaught)))

    assert (by_signal.crash.name, by_signal.crash.reason) == ("SIGSEGV", "SEGV_MAPERR at 0x0")
    assert by_signal.crash.fatal
    assert by_signal.crash.stack_trace == PLCRASH_HEADER
    assert (by_exception.crash.name, by_exception.crash.reason) == (
        "NSInvalidArgumentException",
        "-[NSNull length]: unrecognized selector sent to instance 0x1",
    )


def test_an_android_crash_is_still_named_by_its_first_lines_exception() -> None:
    """countly-sdk-android 26.1.2 (DeviceInfo.getCrashDataJSON) sends no `_name` nor `_type`:
    the Java stack trace and `_nonfatal` as text."""
    crash = {
        "_os": "Android",
        "_error": "java.lang.IllegalStateException: cart is empty\n"
        "\tat com.example.shop.CartActivity.checkout(CartActivity.java:42)",
        "_nonfatal": "true",
    }

    (event,) = events_of(translate(request(sdk_name="java-native-android", crash=crash)))

    assert (event.crash.name, event.crash.reason) == (
        "java.lang.IllegalStateException",
        "cart is empty",
    )
    assert not event.crash.fatal


def test_events_crashes_and_user_details_ask_ingest_for_the_devices_open_session() -> None:
    """Countly sends them without a session; ingest joins them to the session `begin_session`
    started (and stores them without one when none is open)."""
    translation = translate(
        request(
            user_details={"email": "ada@example.com", "custom": {"plan": "pro"}},
            crash={"_error": "TypeError: x is undefined"},
            events=[{"key": "Tap", "timestamp": T0}],
        )
    )

    kinds = payloads(translation)
    assert kinds == ["attribute_operations", "attribute_operations", "crash", "custom"]
    for event in events_of(translation):
        assert event.session_id == ""
        assert event.session_rule == ingest_pb.SESSION_RULE_OPEN_SESSION
    # Installation details and push tokens are the installation's state, not activity.
    details = translate(
        request(begin_session="1", metrics=METRICS, token_session="1", ios_token="t")
    )
    for event in events_of(details):
        if not event.HasField("session_start"):
            assert event.session_rule == ingest_pb.SESSION_RULE_UNSPECIFIED


def test_an_ios_push_token_sets_the_installation_token_on_ios() -> None:
    params = request(token_session="1", ios_token="a1b2c3", test_mode="0")
    del params["sdk_name"]

    (event,) = events_of(translate(params))

    assert event.platform == types_pb2.PLATFORM_IOS
    assert event.installation_update.push_token == "a1b2c3"
    assert event.installation_update.push_opt_in


def test_an_empty_token_clears_it_and_android_tokens_are_android() -> None:
    params = request(token_session=1, android_token="", test_mode=2, locale="de")
    del params["sdk_name"]

    (event,) = events_of(translate(params))

    assert event.platform == types_pb2.PLATFORM_ANDROID
    assert event.installation_update.HasField("push_token")
    assert event.installation_update.push_token == ""
    assert not event.installation_update.push_opt_in
    assert event.installation_update.language == "de"


def test_a_session_start_logs_its_device_out_unless_it_is_its_profiles_custom_id() -> None:
    # A device ID a login merged into a user names nobody on Countly's server afterwards: a
    # session starting under it (iOS's logout returns to it) is a new person's.
    translation = translate(request(begin_session="1"))

    logout, track = translation.steps
    assert isinstance(logout, Logout)
    assert (logout.installation_id, logout.unless_custom_id) == ("device-1", "device-1")
    assert 0 < len(logout.request_id) <= 64
    assert isinstance(track, Track)
    assert track.events[0].WhichOneof("payload") == "session_start"
    assert translate(request(begin_session="1")).steps[0] == logout  # a retry: the same key
    assert not any(isinstance(step, Logout) for step in translate(request(events="[]")).steps)


def test_a_device_id_change_with_merge_logs_both_ids_in() -> None:
    change = request(device_id="user-42", old_device_id="anon-uuid", timestamp=str(T0 + 20_000))

    translation = translate(change)

    # No session event: the SDK's next heartbeat, under the new ID, finds no open session of
    # that installation and starts one; ingest closes the old ID's after 30 idle minutes.
    identify_old, identify_new = translation.steps
    assert isinstance(identify_old, Identify)
    assert isinstance(identify_new, Identify)
    assert identify_old == Identify("anon-uuid", "user-42", identify_old.request_id)
    assert identify_new == Identify("user-42", "user-42", identify_new.request_id)
    assert identify_old.request_id != identify_new.request_id
    later = translate(request(device_id="user-42", timestamp=str(T0 + 50_000), session_duration=30))
    assert events_of(later)[0].installation_id == "user-42"
    assert translate(change).steps == translation.steps


def test_a_change_to_the_same_id_does_nothing() -> None:
    assert translate(request(old_device_id="device-1")).steps == ()


@pytest.mark.parametrize("missing", ["app_key", "device_id"])
def test_a_request_without_key_or_device_is_refused_as_countly_does(missing: str) -> None:
    params = request(events=[{"key": "a"}])
    del params[missing]

    with pytest.raises(RequestInvalid) as refused:
        translate(params)

    assert refused.value.status == 400
    assert refused.value.message == 'Missing parameter "app_key" or "device_id"'


def test_the_zero_advertising_id_is_ignored_as_countly_does() -> None:
    with pytest.raises(RequestInvalid, match="Ignoring device_id"):
        translate(request(device_id=countly.ZERO_IDFA, begin_session="1"))


def test_a_bulk_request_translates_each_request_in_order() -> None:
    bulk = {
        "app_key": "app-key-1",
        "requests": json.dumps(
            [
                {"device_id": "a", "timestamp": T0, "events": [{"key": "first"}]},
                {"device_id": "b", "app_key": "app-key-1", "begin_session": 1},
                {"timestamp": T0, "events": [{"key": "lost"}]},
                {"device_id": "c", "app_key": "another-app", "events": [{"key": "elsewhere"}]},
                "junk",
            ]
        ),
    }

    translation = countly.translate_bulk(bulk, receive_time=NOW)

    assert [(e.installation_id, e.WhichOneof("payload")) for e in events_of(translation)] == [
        ("a", "custom"),
        ("b", "session_start"),
    ]
    reasons = [(r.reason, r.installation_id) for r in rejects_of(translation)]
    assert reasons == [
        (countly.DEVICE_ID_MISSING, ""),
        (countly.APP_KEY_MISMATCH, "c"),
        (countly.PARAMETER_INVALID, ""),
    ]
    assert all("app_key" not in r.message for r in rejects_of(translation))


def test_a_bulk_request_without_requests_is_refused() -> None:
    with pytest.raises(RequestInvalid, match='"requests"'):
        countly.translate_bulk({"app_key": "k", "requests": "[oops"}, receive_time=NOW)


def test_the_app_key_of_a_bulk_request_can_come_from_its_requests() -> None:
    assert (
        countly.request_app_key({"requests": [{"app_key": "inner", "device_id": "a"}]}) == "inner"
    )
    assert countly.request_app_key({"app_key": "outer", "requests": "[]"}) == "outer"
    assert countly.request_app_key({}) == ""


@pytest.mark.parametrize(
    ("sdk_name", "os_name", "platform"),
    [
        ("java-native-android", "Android", types_pb2.PLATFORM_ANDROID),
        ("objc-native-ios", "iOS", types_pb2.PLATFORM_IOS),
        ("dart-flutterb-ios", None, types_pb2.PLATFORM_IOS),
        ("js-rnb-android", None, types_pb2.PLATFORM_ANDROID),
        ("javascript_native_web", "Android", types_pb2.PLATFORM_WEB),
        (NODE_SDK, "Linux", types_pb2.PLATFORM_API),
        (None, "iPadOS", types_pb2.PLATFORM_IOS),
        (None, None, types_pb2.PLATFORM_API),
    ],
)
def test_platform_comes_from_the_sdk_name_then_the_os_then_defaults_to_api(
    sdk_name: str | None, os_name: str | None, platform: int
) -> None:
    params = request(begin_session="1", metrics={"_os": os_name} if os_name else {})
    if sdk_name is None:
        del params["sdk_name"]
    else:
        params["sdk_name"] = sdk_name

    assert {e.platform for e in events_of(translate(params))} == {platform}


@pytest.mark.parametrize(
    ("tz", "zone"), [("0", "Etc/UTC"), ("-300", "Etc/GMT+5"), ("540", "Etc/GMT-9"), ("330", "")]
)
def test_whole_hour_offsets_become_fixed_zones(tz: str, zone: str) -> None:
    (start, *details) = events_of(translate(request(begin_session="1", tz=tz)))

    assert start.WhichOneof("payload") == "session_start"
    assert [d.installation_update.timezone for d in details] == ([zone] if zone else [])


def test_secrets_are_removed_from_rejected_messages() -> None:
    bulk = {
        "app_key": "k",
        "requests": [{"app_key": "other", "ios_token": "t", "ip_address": "1.2.3.4", "x": 1}],
    }

    (reject,) = rejects_of(countly.translate_bulk(bulk, receive_time=NOW))

    assert reject.message == {"x": 1}


def test_a_session_duration_that_is_not_a_number_is_rejected() -> None:
    (reject,) = rejects_of(translate(request(session_duration="soon")))

    assert reject.reason == countly.PARAMETER_INVALID


def test_query_form_json_and_multipart_parameters_are_read_alike() -> None:
    form = parameters("app_key=k&device_id=d", b"events=%5B%5D&device_id=e", FORM)
    as_json = parameters("app_key=k", b'{"device_id": "d", "metrics": {"_os": "iOS"}}', JSON)
    multipart = parameters(
        "",
        b"--XX\r\n"
        b'Content-Disposition: form-data; name="app_key"\r\n\r\nk\r\n'
        b"--XX\r\n"
        b'Content-Disposition: form-data; name="user_picture"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n"
        b"--XX--\r\n",
        "multipart/form-data; boundary=XX",
    )

    assert form == {"app_key": "k", "device_id": "e", "events": "[]"}
    assert as_json == {"app_key": "k", "device_id": "d", "metrics": {"_os": "iOS"}}
    assert multipart == {"app_key": "k"}


@pytest.mark.parametrize(
    ("query", "body", "content_type"),
    [
        ("&".join(f"p{i}=1" for i in range(500)), b"", ""),
        ("", b"<xml/>", "application/xml"),
        ("", b"[1, 2]", JSON),
    ],
)
def test_hostile_or_unreadable_parameters_are_refused(
    query: str, body: bytes, content_type: str
) -> None:
    with pytest.raises(RequestInvalid):
        parameters(query, body, content_type)


@pytest.mark.parametrize(("ip_address", "kept"), [("198.51.100.4", "198.51.100.4"), ("?", "")])
def test_the_ip_address_parameter_stands_for_the_connection_when_it_is_one(
    ip_address: str, kept: str
) -> None:
    (start,) = events_of(translate(request(begin_session="1", ip_address=ip_address, tz="330")))

    assert start.session_start.client_ip == (kept or "203.0.113.7")


def test_metrics_every_request_repeats_are_one_update_a_day() -> None:
    # countly-sdk-web 26.1.1 sends `metrics` (with `_ua`) and `tz` with every request.
    metrics = json.dumps({"_app_version": "3.1.0", "_ua": "Mozilla/5.0"})
    web = {"sdk_name": "javascript_native_web", "metrics": metrics}

    def update_ids(milliseconds: int, **params: Any) -> list[str]:
        found = translate(request(timestamp=str(milliseconds), **web, **params))
        return [e.event_id for e in events_of(found) if e.HasField("installation_update")]

    first = update_ids(T0, begin_session="1")
    assert len(first) == 2  # the app version, the time zone
    assert update_ids(T0 + 5_000, events=json.dumps([{"key": "Tap", "count": 1}])) == first
    assert update_ids(T0 + 9_000, session_duration="60") == first
    # The next day, once again; another zone, another update (the app version's the same).
    assert not set(update_ids(T0 + 86_400_000)) & set(first)
    assert update_ids(T0 + 10_000, tz="120") == [first[0], update_ids(T0, tz="120")[1]]
    assert update_ids(T0, tz="120")[1] != first[1]
