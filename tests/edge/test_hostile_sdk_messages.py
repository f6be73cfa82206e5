"""Messages real SDKs send that once broke the edge: numbers no double holds, deep rejected
messages, posthog-js's reset(), its query-string send time, its cookieless mode, and a browser
library on a phone's OS. Pure translation here; over HTTP in test_hostile_sdk_requests.py."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from services.edge.backend import KEPT_MESSAGE_DEPTH, untranslated_event
from services.edge.build import identifier
from services.edge.dialects import countly, posthog, segment
from services.edge.platforms import platform_of
from services.edge.properties import attribute_value
from services.edge.steps import Identify, Reject, RequestInvalid, Track

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)


def events(steps: Any) -> list[ingest_pb.Event]:
    return [e for s in steps if isinstance(s, Track) for e in s.events]


def rejects(steps: Any) -> list[Reject]:
    return [s for s in steps if isinstance(s, Reject)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.nan, ""),
        (math.inf, ""),
        (-math.inf, ""),
        (42.0, "42"),
        (1.5, "1.5"),
        (10**30, str(10**30)),
        (" u-1 ", "u-1"),
        (True, ""),
    ],
)
def test_an_identifier_is_text_or_missing_never_an_error(value: object, expected: str) -> None:
    assert identifier(value) == expected


def test_a_number_past_a_double_is_a_value_ingest_refuses_not_an_error() -> None:
    huge = attribute_value(10**400)
    assert huge is not None
    assert huge.number_value == math.inf
    assert attribute_value(-(10**400)).number_value == -math.inf  # type: ignore[union-attr]
    assert attribute_value(12).number_value == 12.0  # type: ignore[union-attr]


@pytest.mark.parametrize("user_id", [math.nan, math.inf, json.loads("1e400")])
def test_segment_a_non_finite_user_id_is_listed_and_the_good_message_kept(user_id: float) -> None:
    body = {
        "batch": [
            {"type": "track", "anonymousId": "a1", "event": "Good", "messageId": "r1"},
            {"type": "track", "userId": user_id, "event": "x", "messageId": "r2"},
        ]
    }
    steps = segment.translate_batch(body, NOW).steps
    assert [e.custom.name for e in events(steps) if e.HasField("custom")] == ["good"]
    assert [r.reason for r in rejects(steps)] == ["ORIGIN_MISSING"]


@pytest.mark.parametrize("stamp", ["inf", "nan", "1e400", "-inf", str(10**400)])
def test_countly_a_timestamp_no_double_holds_reads_as_missing(stamp: str) -> None:
    params = {"app_key": "k", "device_id": "d1", "timestamp": stamp, "begin_session": "1"}
    steps = countly.translate(params, receive_time=NOW).steps
    (start,) = [e for e in events(steps) if e.HasField("session_start")]
    assert start.event_time.ToDatetime(tzinfo=UTC) == NOW


def test_a_deep_rejected_message_is_kept_shallow_enough_to_send() -> None:
    deep: Any = "leaf"
    for _ in range(60):
        deep = {"k": deep}
    reject = Reject(
        "MESSAGE_TYPE_UNKNOWN",
        "type screenview",
        {"type": "screenview", "n": math.nan, "big": 2**60, "properties": deep},
        "e-1",
        "a2",
    )
    event = untranslated_event(reject, "segment")
    # The request the edge sends must survive protobuf's depth limit (100) on both sides.
    request = ingest_pb.TrackEventsRequest(events=[event])
    assert ingest_pb.TrackEventsRequest.FromString(request.SerializeToString()) == request
    kept = event.untranslated.message
    assert kept["n"] == "nan"
    assert kept["big"] == str(2**60)
    node: Any = kept["properties"]
    for _ in range(KEPT_MESSAGE_DEPTH - 1):
        node = node["k"]
    assert isinstance(node, str)
    assert node.startswith('{"k":{"k":')


def posthog_event(name: str, distinct_id: str, **properties: Any) -> dict[str, Any]:
    return {"event": name, "distinct_id": distinct_id, "properties": properties}


def installations(steps: Any) -> list[str]:
    return [e.installation_id for e in events(steps) if e.HasField("custom")]


def test_posthog_after_reset_the_visitor_is_a_new_installation_until_the_next_login() -> None:
    device = "0190a5f7-0000-7000-8000-0000000000d1"
    after_reset = "0190a5f7-0000-7000-8000-0000000000d2"
    batch = [
        posthog_event("first", device, **{"$device_id": device, "$user_state": "anonymous"}),
        posthog_event(
            "$identify",
            "user-1",
            **{"$device_id": device, "$anon_distinct_id": device, "$user_state": "identified"},
        ),
        posthog_event("as_user", "user-1", **{"$device_id": device, "$user_state": "identified"}),
        posthog_event(
            "after_reset", after_reset, **{"$device_id": device, "$user_state": "anonymous"}
        ),
        posthog_event(
            "$identify",
            "user-1",
            **{"$device_id": device, "$anon_distinct_id": after_reset, "$user_state": "identified"},
        ),
    ]
    steps = posthog.translate({"api_key": "k", "batch": batch}, NOW).steps
    assert installations(steps) == [device, device, after_reset]
    logins = [(s.installation_id, s.custom_id) for s in steps if isinstance(s, Identify)]
    assert (after_reset, "user-1") in logins
    assert (device, "user-1") in logins


def test_posthog_query_string_send_time_corrects_a_fast_clock() -> None:
    sent = posthog.query_send_time(str(int((NOW + timedelta(hours=1)).timestamp() * 1000)))
    assert sent == NOW + timedelta(hours=1)
    assert posthog.query_send_time(str(int(NOW.timestamp()))) == NOW  # 10 digits: seconds
    for junk in ("", "abc", "-5", "1" * 40, "١٢٣"):
        assert posthog.query_send_time(junk) is None
    message = posthog_event("tap", "d1", **{"$device_id": "d1"})
    message["timestamp"] = (NOW + timedelta(hours=1)).isoformat()
    (event,) = installations_events(posthog.translate([message], NOW, "", sent).steps)
    assert event.send_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(hours=1)
    # The body's sent_at loses to the query string's, as in PostHog's capture.
    body = {"batch": [message], "sent_at": NOW.isoformat()}
    (event,) = installations_events(posthog.translate(body, NOW, "", sent).steps)
    assert event.send_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(hours=1)


def installations_events(steps: Any) -> list[ingest_pb.Event]:
    return [e for e in events(steps) if e.HasField("custom")]


def test_posthog_cookieless_mode_is_listed_not_one_visitor_for_everyone() -> None:
    sentinel = posthog.COOKIELESS_SENTINEL
    batch = [
        posthog_event("pageview", sentinel, **{"$session_id": sentinel}),
        posthog_event("pageview", "real", **{"$session_id": sentinel}),
        posthog_event("pageview", "fine", **{"$device_id": "fine"}),
    ]
    steps = posthog.translate(batch, NOW).steps
    assert [r.reason for r in rejects(steps)] == ["COOKIELESS_UNSUPPORTED"] * 2
    assert installations(steps) == ["fine"]


@pytest.mark.parametrize("library", ["web", "posthog-js", "analytics.js"])
def test_a_browser_library_is_the_web_whatever_os_the_browser_runs_on(library: str) -> None:
    assert platform_of("iOS", library) == types_pb2.PLATFORM_WEB
    assert platform_of("Android", library) == types_pb2.PLATFORM_WEB
    assert platform_of("iOS", "posthog-react-native") == types_pb2.PLATFORM_IOS
    assert platform_of("iOS", "posthog-ios") == types_pb2.PLATFORM_IOS
    assert platform_of(None, "posthog-android") == types_pb2.PLATFORM_ANDROID


def test_a_send_time_no_timestamp_holds_is_no_send_time() -> None:
    # "9999-12-31T23:59:59-14:00" is year 10000 in UTC, "0001-01-01T00:00:00+01:00" year 0: no
    # Timestamp holds them (the edge answered 500 and lost the batch).
    for sent in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+01:00"):
        message = {"type": "track", "anonymousId": "a", "event": "E", "messageId": "m"}
        message["timestamp"] = "2030-01-15T11:00:00Z"
        (segment_event,) = events(
            segment.translate_batch({"batch": [{**message, "sentAt": sent}]}, NOW).steps
        )
        capture = {"event": "E", "distinct_id": "d", "timestamp": "2030-01-15T11:00:00Z"}
        posthog_events = events(
            posthog.translate({"api_key": "k", "sent_at": sent, "batch": [capture]}, NOW).steps
        )
        for event in (segment_event, *posthog_events):
            assert not event.HasField("send_time")
        out_of_range = {**message, "timestamp": sent}
        steps = segment.translate_batch({"batch": [out_of_range]}, NOW).steps
        assert [r.reason for r in rejects(steps)] == ["TIMESTAMP_INVALID"]


@pytest.mark.parametrize("kind", [["track"], {"a": 1}, 7])
def test_segment_a_type_that_is_no_text_is_listed_and_the_good_message_kept(kind: Any) -> None:
    body = {
        "batch": [
            {"type": "track", "anonymousId": "a1", "event": "Good", "messageId": "g"},
            {"type": kind, "anonymousId": "a1", "event": "x", "messageId": "b"},
        ]
    }
    steps = segment.translate_batch(body, NOW).steps
    assert [e.custom.name for e in events(steps) if e.HasField("custom")] == ["good"]
    assert [r.reason for r in rejects(steps)] == ["MESSAGE_TYPE_UNKNOWN"]


def test_an_ip_that_is_none_gives_way_to_the_connection_s() -> None:
    # Ingest refuses an event whose session IP is not an IP: the good event was lost.
    track = {
        "type": "track",
        "anonymousId": "a",
        "event": "E",
        "messageId": "m",
        "context": {"ip": "unknown"},
    }
    capture = {"event": "E", "distinct_id": "d", "properties": {"$ip": "unknown", "$lib": "web"}}
    for translation in (
        segment.translate_batch({"batch": [track]}, NOW, client_ip="203.0.113.9"),
        posthog.translate({"api_key": "k", "batch": [capture]}, NOW, client_ip="203.0.113.9"),
    ):
        found = [e for e in events(translation.steps) if e.HasField("custom")]
        assert [e.session_client_ip for e in found] == ["203.0.113.9"]


def test_a_message_without_time_takes_the_edge_s_clock_without_the_device_s_send_time() -> None:
    # With the device's send time, ingest would move the edge's own clock by the device's skew
    # (an hour slow: the event was refused as in the future).
    sent = "2030-01-15T11:00:00Z"
    track = {"type": "track", "anonymousId": "a", "event": "E", "messageId": "m", "sentAt": sent}
    capture = {"event": "E", "distinct_id": "d"}
    for translation in (
        segment.translate_batch({"batch": [track]}, NOW),
        posthog.translate({"api_key": "k", "sent_at": sent, "batch": [capture]}, NOW),
    ):
        (event,) = [e for e in events(translation.steps) if e.HasField("custom")]
        assert event.event_time.ToDatetime(tzinfo=UTC) == NOW
        assert not event.HasField("send_time")


@pytest.mark.parametrize("device_id", [math.nan, math.inf, json.loads("1e400")])
def test_countly_a_device_id_no_number_holds_is_missing(device_id: float) -> None:
    params = {"app_key": "k", "device_id": device_id, "events": '[{"key": "e"}]'}
    with pytest.raises(RequestInvalid):
        countly.check_request(params)
    assert countly._device_id(42.0) == "42"
