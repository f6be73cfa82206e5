"""The Segment and PostHog translators and the shared rules, on the payloads the dialects
document (Segment's HTTP Tracking API spec, PostHog's capture API docs). Pure: no I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from services.edge.dialects import posthog, segment
from services.edge.names import normalize_name
from services.edge.steps import SECRET_KEYS, Identify, Reject, RequestInvalid, Track, scrub

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)


def events(steps: Any) -> list[Any]:
    return [e for s in steps if isinstance(s, Track) for e in s.events]


def kinds(steps: Any) -> list[str]:
    return [type(s).__name__ for s in steps]


# Segment's documented track call (segment.com/docs/connections/spec/track/), trimmed.
SEGMENT_TRACK = {
    "anonymousId": "23adfd82-aa0f-45a7-a756-24f2a7a4c895",
    "context": {
        "library": {"name": "analytics.js", "version": "2.11.1"},
        "page": {"path": "/academy/", "url": "https://segment.com/academy/"},
        "userAgent": "Mozilla/5.0",
        "ip": "108.0.78.21",
        "locale": "en-US",
    },
    "event": "Course Clicked",
    "messageId": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
    "properties": {"title": "Intro to Analytics"},
    "receivedAt": "2030-01-15T11:59:59.000Z",
    "sentAt": "2030-01-15T11:59:58.000Z",
    "timestamp": "2030-01-15T11:59:57.000Z",
    "type": "track",
    "userId": "97980cfea0067",
    "originalTimestamp": "2030-01-15T11:59:57.000Z",
}


def test_segment_track_with_both_ids_logs_in_then_tracks_on_the_installation() -> None:
    steps = segment.translate_batch({"batch": [SEGMENT_TRACK]}, NOW).steps
    assert kinds(steps) == ["Identify", "Track"]
    assert steps[0] == Identify(
        "23adfd82-aa0f-45a7-a756-24f2a7a4c895", "97980cfea0067", steps[0].request_id
    )
    (custom,) = [e for e in events(steps) if not e.HasField("installation_update")]
    # No session ID: ingest derives the session, the IP giving its country.
    assert custom.session_id == ""
    assert custom.session_rule == ingest_pb.SESSION_RULE_INACTIVITY
    assert custom.session_client_ip == "108.0.78.21"
    assert custom.event_id == "ajs-f8ca1e4de5024d9430b3928bd8ac6b96"
    assert custom.installation_id == "23adfd82-aa0f-45a7-a756-24f2a7a4c895"
    assert custom.platform == types_pb2.PLATFORM_WEB
    assert custom.custom.name == "course_clicked"
    assert custom.custom.attributes["title"].string_value == "Intro to Analytics"
    assert custom.event_time.ToDatetime(UTC) == datetime(2030, 1, 15, 11, 59, 57, tzinfo=UTC)
    assert custom.send_time.ToDatetime(UTC) == datetime(2030, 1, 15, 11, 59, 58, tzinfo=UTC)


def test_segment_server_side_track_has_the_custom_id_as_origin_and_no_session() -> None:
    message = {"type": "track", "userId": "u1", "event": "Refund", "messageId": "m1"}
    steps = segment.translate_batch({"batch": [message]}, NOW).steps
    (only,) = events(steps)
    assert only.custom_id == "u1"
    assert only.platform == types_pb2.PLATFORM_API
    assert only.session_id == ""
    assert only.session_rule == ingest_pb.SESSION_RULE_UNSPECIFIED
    assert only.event_time.ToDatetime(UTC) == NOW


def test_segment_identify_traits_go_to_native_and_custom_attributes() -> None:
    message = {
        "type": "identify",
        "messageId": "m2",
        "anonymousId": "a1",
        "userId": "u1",
        "traits": {
            "email": "peter@example.com",
            "firstName": "Peter",
            "lastName": "Gibbons",
            "phone": "+33612345678",
            "plan": "premium",
            "logins": 5,
            "address": {"city": "Paris", "country": "FR"},
        },
    }
    steps = segment.translate_batch({"batch": [message]}, NOW).steps
    assert kinds(steps) == ["Identify", "Track"]
    # One event for the traits ingest takes as they are, one for each it checks the format of
    # (email, phone, country), so that one badly formatted trait is rejected alone.
    attribute_events = [e for e in events(steps) if e.HasField("attribute_operations")]
    assert [len(e.attribute_operations.operations) for e in attribute_events] == [5, 1, 1, 1]
    assert len({e.event_id for e in attribute_events}) == 4
    by_target = {
        op.custom_attribute or types_pb2.NativeAttribute.Name(op.native_attribute): op.value
        for e in attribute_events
        for op in e.attribute_operations.operations
    }
    assert by_target["NATIVE_ATTRIBUTE_EMAIL"].string_value == "peter@example.com"
    assert by_target["NATIVE_ATTRIBUTE_FIRST_NAME"].string_value == "Peter"
    assert by_target["NATIVE_ATTRIBUTE_PHONE"].string_value == "+33612345678"
    assert by_target["NATIVE_ATTRIBUTE_COUNTRY"].string_value == "FR"
    assert by_target["plan"].string_value == "premium"
    assert by_target["logins"].number_value == 5
    assert by_target["address_city"].string_value == "Paris"


def test_segment_alias_of_an_anonymous_id_is_a_login_and_of_a_custom_id_is_refused() -> None:
    login = {"type": "alias", "previousId": "23adfd82-aa0f-45a7-a756-24f2a7a4c895", "userId": "u"}
    refused = {"type": "alias", "previousId": "old-user", "userId": "u", "messageId": "m3"}
    steps = segment.translate_batch({"batch": [login, refused]}, NOW).steps
    assert kinds(steps) == ["Identify", "Reject"]
    assert isinstance(steps[1], Reject)
    assert steps[1].reason == "ALIAS_REFUSED"
    assert steps[1].event_id == "m3"
    # analytics-swift's alias() of an anonymous user: no previousId, its anonymousId instead.
    swift = {"type": "alias", "anonymousId": "anon-7", "userId": "u7", "messageId": "m4"}
    (login,) = segment.translate_batch({"batch": [swift]}, NOW).steps
    assert isinstance(login, Identify)
    assert (login.installation_id, login.custom_id) == ("anon-7", "u7")


def test_segment_page_and_screen_are_custom_events_labelled_with_their_name() -> None:
    page = {
        "type": "page",
        "anonymousId": "a",
        "name": "Pricing",
        "properties": {"url": "https://x.io/p"},
    }
    screen = {
        "type": "screen",
        "anonymousId": "a",
        "name": "Home",
        "context": {"os": {"name": "Android"}},
    }
    found = events(segment.translate_batch({"batch": [page, screen]}, NOW).steps)
    customs = [e for e in found if e.HasField("custom")]
    assert [(e.custom.name, e.custom.label) for e in customs] == [
        ("page", "Pricing"),
        ("screen", "Home"),
    ]
    # A page call's `url` property is its page's URL: `page_url`, as on every other event.
    assert customs[0].custom.attributes["page_url"].url_value == "https://x.io/p"
    assert customs[1].platform == types_pb2.PLATFORM_ANDROID


def test_segment_message_without_id_gets_the_same_derived_id_on_a_retry() -> None:
    message = {
        "type": "track",
        "anonymousId": "a",
        "event": "E",
        "timestamp": "2030-01-15T10:00:00Z",
    }
    first = events(segment.translate_batch({"batch": [message]}, NOW).steps)[-1]
    again = events(segment.translate_batch({"batch": [dict(message)]}, NOW).steps)[-1]
    assert first.event_id == again.event_id
    assert 1 <= len(first.event_id) <= 64


def test_segment_unknown_type_and_missing_origin_are_rejected_with_the_message() -> None:
    unknown = {"type": "boom", "anonymousId": "a", "writeKey": "secret"}
    no_origin = {"type": "track", "event": "E"}
    steps = segment.translate_batch({"batch": [unknown, no_origin]}, NOW).steps
    assert [s.reason for s in steps if isinstance(s, Reject)] == [
        "MESSAGE_TYPE_UNKNOWN",
        "ORIGIN_MISSING",
    ]
    assert "writeKey" not in steps[0].message  # type: ignore[union-attr]


def test_segment_context_gives_installation_details_once_per_request() -> None:
    context = {
        "app": {"version": "3.0"},
        "os": {"name": "iOS", "version": "17.0"},
        "device": {"model": "iPhone15,2", "token": "abc"},
        "locale": "fr-FR",
        "timezone": "Europe/Paris",
    }
    batch = [
        {"type": "track", "anonymousId": "a", "event": f"E{i}", "context": context}
        for i in range(3)
    ]
    updates = [
        e
        for e in events(segment.translate_batch({"batch": batch}, NOW).steps)
        if e.HasField("installation_update")
    ]
    # Once per request: the device's details together, and each value ingest checks alone
    # (push token, language, time zone) in an update of its own.
    common, token, language, timezone = (u.installation_update for u in updates)
    assert (common.app_version, common.os_version, common.device_model) == (
        "3.0",
        "17.0",
        "iPhone15,2",
    )
    assert [u.ListFields()[0][1] for u in (token, language, timezone)] == [
        "abc",
        "fr",
        "Europe/Paris",
    ]
    # A reported token is a device registered for push: opted in.
    assert (token.push_token, token.push_opt_in) == ("abc", True)
    # Stored once per installation and token: a later day's repeat (a duplicate) does not undo
    # an opt-out recorded since, where the other details are stored again each day.
    tomorrow = [{**batch[0], "timestamp": "2030-01-16T10:00:00Z"}]
    later = [
        e
        for e in events(segment.translate_batch({"batch": tomorrow}, NOW).steps)
        if e.HasField("installation_update")
    ]
    ids = {u.installation_update.push_token != "": u.event_id for u in updates}
    later_ids = {u.installation_update.push_token != "": u.event_id for u in later}
    assert later_ids[True] == ids[True]
    assert later_ids[False] != ids[False]
    assert all(len(u.ListFields()) == 1 for u in (language, timezone))


@pytest.mark.parametrize(
    ("locale", "language"),
    [("in-ID", "id"), ("iw_IL", "he"), ("ji", "yi"), ("id-ID", "id"), ("en-US", "en"), ("x", "")],
)
def test_android_s_legacy_language_codes_are_today_s(locale: str, language: str) -> None:
    # analytics-kotlin builds the locale from Java's Locale, which says "in", "iw" and "ji".
    context = {"locale": locale}
    batch = [{"type": "track", "anonymousId": "a", "event": "E", "context": context}]
    found = [
        e.installation_update.language
        for e in events(segment.translate_batch({"batch": batch}, NOW).steps)
        if e.HasField("installation_update") and e.installation_update.HasField("language")
    ]
    assert found == ([language] if language else [])


def test_events_without_sdk_session_ask_ingest_to_derive_it_and_start_none() -> None:
    times = ["2030-01-15T10:00:00Z", "2030-01-15T10:20:00Z", "2030-01-15T10:31:00Z"]
    batch = [{"type": "track", "anonymousId": "a", "event": "E", "timestamp": t} for t in times]
    found = events(segment.translate_batch({"batch": batch}, NOW).steps)
    assert not [e for e in found if e.HasField("session_start")]
    customs = [e for e in found if e.HasField("custom")]
    assert [(e.session_id, e.session_rule) for e in customs] == [
        ("", ingest_pb.SESSION_RULE_INACTIVITY)
    ] * 3
    capture = {"api_key": "k", "event": "clicked", "distinct_id": "d", "properties": {}}
    (one,) = [e for e in events(posthog.translate(capture, NOW).steps) if e.HasField("custom")]
    assert (one.session_id, one.session_rule) == ("", ingest_pb.SESSION_RULE_INACTIVITY)


# PostHog's documented capture payloads (posthog.com/docs/api/capture).
POSTHOG_BATCH = {
    "api_key": "phc_key",
    "batch": [
        {
            "event": "$pageview",
            "distinct_id": "anon-1",
            "uuid": "0190a5f7-2c4b-7000-8000-000000000001",
            "timestamp": "2030-01-15T11:00:00Z",
            "properties": {
                "$current_url": "https://example.com/pricing",
                "$session_id": "0190a5f7-0000-7000-8000-00000000beef",
                "$lib": "web",
                "$ip": "203.0.113.5",
                "plan": "free",
            },
        },
        {
            "event": "$identify",
            "distinct_id": "user-9",
            "uuid": "0190a5f7-2c4b-7000-8000-000000000002",
            "properties": {"$anon_distinct_id": "anon-1", "$set": {"email": "a@b.co"}},
            "$set_once": {"first_plan": "free"},
        },
    ],
}


def test_posthog_pageview_then_identify() -> None:
    assert posthog.api_key_of(POSTHOG_BATCH) == "phc_key"
    steps = posthog.translate(POSTHOG_BATCH, NOW).steps
    assert kinds(steps) == ["Track", "Identify", "Identify", "Track"]
    start, pageview = steps[0].events  # type: ignore[union-attr]
    assert start.session_id == pageview.session_id == "0190a5f7-0000-7000-8000-00000000beef"
    assert start.session_start.client_ip == "203.0.113.5"
    assert pageview.event_id == "0190a5f7-2c4b-7000-8000-000000000001"
    assert pageview.platform == types_pb2.PLATFORM_WEB
    assert pageview.custom.name == "pageview"
    assert pageview.custom.attributes["page_url"].url_value == "https://example.com/pricing"
    assert set(pageview.custom.attributes) == {"page_url", "plan"}
    assert steps[1] == Identify("anon-1", "user-9", steps[1].request_id)  # type: ignore[union-attr]
    self_login = steps[2]
    assert isinstance(self_login, Identify)
    assert (self_login.installation_id, self_login.custom_id) == ("user-9", "user-9")
    # The user's own ID, an installation of platform API (an update that changes nothing),
    # once identity accepted it as a custom ID.
    (platform,) = self_login.then
    assert (platform.installation_id, platform.platform) == ("user-9", types_pb2.PLATFORM_API)
    assert not platform.installation_update.ListFields()
    first_plan, email = steps[3].events  # type: ignore[union-attr]
    # The email (whose format ingest checks) in an event of its own: see attribute_events.
    assert [
        (o.kind, o.native_attribute or o.custom_attribute)
        for e in (email, first_plan)
        for o in e.attribute_operations.operations
    ] == [
        (types_pb2.ATTRIBUTE_OPERATION_KIND_SET, types_pb2.NATIVE_ATTRIBUTE_EMAIL),
        (types_pb2.ATTRIBUTE_OPERATION_KIND_SET_ONCE, "first_plan"),
    ]


def test_posthog_create_alias_logs_the_previous_distinct_id_in() -> None:
    alias = {
        "event": "$create_alias",
        "distinct_id": "anon-2",
        "properties": {"distinct_id": "anon-2", "alias": "user-2"},
    }
    steps = posthog.translate({"api_key": "k", "batch": [alias]}, NOW).steps
    assert [(s.installation_id, s.custom_id) for s in steps if isinstance(s, Identify)] == [
        ("anon-2", "user-2"),
        ("user-2", "user-2"),
    ]


def test_posthog_alias_of_an_identified_user_is_refused_not_a_switch() -> None:
    # posthog-js's alias() after identify(): distinct_id is the user's ID. Identify would move
    # the browser to a profile of the alias; a profile holds one custom ID.
    alias = {
        "event": "$create_alias",
        "distinct_id": "user-1",
        "properties": {"alias": "crm-42", "$user_state": "identified", "$is_identified": True},
    }
    steps = posthog.translate({"api_key": "k", "batch": [alias]}, NOW).steps
    assert not [s for s in steps if isinstance(s, Identify)]
    assert [s.reason for s in steps if isinstance(s, Reject)] == ["ALIAS_REFUSED"]


def test_posthog_null_set_once_sets_nothing_and_erases_nothing() -> None:
    # posthog-js sends its campaign keys as nulls in $set_once on every identify.
    identify = {
        "event": "$identify",
        "distinct_id": "user-3",
        "properties": {"$anon_distinct_id": "anon-3"},
        "$set_once": {"utm_source": None, "gclid": None, "first_plan": "free"},
        "$set": {"plan": None},
    }
    steps = posthog.translate({"api_key": "k", "batch": [identify]}, NOW).steps
    operations = [
        (o.kind, o.custom_attribute)
        for e in events(steps)
        for o in e.attribute_operations.operations
    ]
    assert operations == [
        (types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET, "plan"),
        (types_pb2.ATTRIBUTE_OPERATION_KIND_SET_ONCE, "first_plan"),
    ]


def test_segment_message_size_is_counted_in_utf8_bytes() -> None:
    # 8,000 "é" are 16,000 bytes in UTF-8 (what analytics-node measures), 48,000 as \u00e9.
    accented = {**SEGMENT_TRACK, "properties": {"text": "é" * 8_000}}
    steps = segment.translate_batch({"batch": [accented, accented]}, NOW, body_size=40_000).steps
    assert not [s for s in steps if isinstance(s, Reject)]
    too_large = {**SEGMENT_TRACK, "properties": {"text": "é" * 17_000}}
    steps = segment.translate_batch({"batch": [too_large]}, NOW, body_size=40_000).steps
    assert [s.reason for s in steps if isinstance(s, Reject)] == ["MESSAGE_TOO_LARGE"]


def test_posthog_exceptions_are_crashes_and_merge_dangerously_is_refused() -> None:
    # What posthog-js's exception autocapture sends for an uncaught error.
    exception = {
        "event": "$exception",
        "distinct_id": "anon-4",
        "uuid": "ex-1",
        "properties": {
            "$exception_level": "error",
            "$exception_list": [
                {
                    "type": "TypeError",
                    "value": "x is undefined",
                    "mechanism": {"handled": False, "synthetic": False},
                    "stacktrace": {
                        "type": "raw",
                        "frames": [
                            {
                                "filename": "https://shop.example/app.js",
                                "function": "main",
                                "lineno": 10,
                                "colno": 3,
                            },
                            {
                                "filename": "https://shop.example/cart.js",
                                "function": "total",
                                "lineno": 42,
                                "colno": 17,
                            },
                        ],
                    },
                }
            ],
        },
    }
    merge = {
        "event": "$merge_dangerously",
        "distinct_id": "user-4",
        "properties": {"alias": "user-5"},
    }
    steps = posthog.translate({"api_key": "k", "batch": [exception, merge]}, NOW).steps
    (crash,) = [e for e in events(steps) if e.HasField("crash")]
    assert (crash.crash.name, crash.crash.reason, crash.crash.fatal) == (
        "TypeError",
        "x is undefined",
        True,
    )
    assert crash.crash.stack_trace.splitlines() == [
        "TypeError: x is undefined",
        "    at total (https://shop.example/cart.js:42:17)",
        "    at main (https://shop.example/app.js:10:3)",
    ]
    assert [s.reason for s in steps if isinstance(s, Reject)] == ["ALIAS_REFUSED"]
    assert not [s for s in steps if isinstance(s, Identify)]


def test_posthog_single_event_and_token_in_properties() -> None:
    body = {"event": "Signed Up", "properties": {"distinct_id": "d", "token": "phc_t"}}
    assert posthog.api_key_of(body) == "phc_t"
    (custom,) = [e for e in events(posthog.translate(body, NOW).steps) if e.HasField("custom")]
    assert custom.custom.name == "signed_up"
    assert dict(custom.custom.attributes) == {}


def test_posthog_key_on_a_list_s_first_event() -> None:
    event = {"event": "e", "distinct_id": "d"}
    assert posthog.api_key_of([{**event, "api_key": "phc_a"}, event]) == "phc_a"
    assert posthog.api_key_of([{**event, "token": "phc_b"}]) == "phc_b"
    assert posthog.api_key_of([event, {**event, "api_key": "phc_later"}]) == ""
    assert posthog.api_key_of({"api_key": "phc_top", "batch": [{**event, "api_key": "x"}]}) == (
        "phc_top"
    )


POSTHOG_NO_EVENTS = ({"batch": "x"}, {"batch": {"event": "e"}}, {"api_key": "k"}, {"x": 1})
SEGMENT_NO_BATCH = ({"batch": "x"}, {"nobatch": True}, {"batch": {"type": "track"}})
NO_EVENTS: list[tuple[Any, dict[str, Any]]] = [
    *((posthog.messages_of, body) for body in POSTHOG_NO_EVENTS),
    *((segment.batch_of, body) for body in SEGMENT_NO_BATCH),
]


@pytest.mark.parametrize(("events_of", "body"), NO_EVENTS)
def test_a_body_holding_no_events_list_is_refused(events_of: Any, body: dict[str, Any]) -> None:
    """Refused where the handler reads the body, and by the translator all the same."""
    with pytest.raises(RequestInvalid):
        events_of(body)
    translate = posthog.translate if events_of is posthog.messages_of else segment.translate_batch
    with pytest.raises(RequestInvalid):
        translate(body, NOW)


def test_empty_lists_hold_no_events_and_are_no_error() -> None:
    assert posthog.translate([], NOW).message_count == 0
    assert posthog.translate({"batch": []}, NOW).message_count == 0
    assert segment.translate_batch({"batch": []}, NOW).message_count == 0


def test_names_follow_one_rule() -> None:
    assert normalize_name("Order Completed") == "order_completed"
    assert normalize_name("$current_url") == "current_url"
    assert normalize_name("plan.tier") == "plan_tier"
    assert normalize_name("Größe") == "groe"
    assert normalize_name("!!!") is None
    long = normalize_name("a very long event name that goes on and on")
    assert long is not None
    assert len(long) <= 30
    assert long != normalize_name("a very long event name that goes on and off")


def test_scrub_removes_keys_and_ips_at_any_depth() -> None:
    message = {"writeKey": "k", "context": {"ip": "1.2.3.4", "app": {"name": "x"}}, "token": "t"}
    assert scrub(message) == {"context": {"app": {"name": "x"}}}


def scrubbed_by_the_rule(message: Any, secrets: frozenset[str]) -> Any:
    """The rule scrub keeps, written the plain (recursive) way: the model it is checked with."""
    if isinstance(message, dict):
        return {
            str(k): scrubbed_by_the_rule(v, secrets)
            for k, v in message.items()
            if str(k).lower() not in secrets
        }
    if isinstance(message, list):
        return [scrubbed_by_the_rule(v, secrets) for v in message]
    return message


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["a", "B", "Token", "IP", "writeKey", "k", "app_key", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=30,
)


@given(message=JSON_VALUES)
def test_scrub_is_the_rule_on_any_message(message: Any) -> None:
    for secrets in (SECRET_KEYS, frozenset({"k"})):
        copy = scrub(message, secrets)
        assert copy == scrubbed_by_the_rule(message, secrets)
        # Same keys in the same order (a kept message's JSON text is what the operator reads).
        assert json.dumps(copy) == json.dumps(scrubbed_by_the_rule(message, secrets))


def test_scrub_copies_a_message_as_deep_as_json_reads() -> None:
    deep: Any = "leaf"
    for _ in range(5_000):
        deep = {"k": [deep], "api_key": "secret"}
    node = scrub(deep)
    for _ in range(5_000):
        assert set(node) == {"k"}
        (node,) = node["k"]
    assert node == "leaf"


def test_compose_runs_the_edge_with_documented_variables_only() -> None:
    from pathlib import Path

    import yaml

    from shared.settings import SETTINGS

    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
    edge = compose["services"]["edge"]
    assert edge["command"] == ["serve", "edge"]
    assert "8340:8340" in edge["ports"]
    assert set(edge["environment"]) <= {s.env for s in SETTINGS}
    assert "PROFILES_DATABASE_URL" not in edge["environment"]


def test_edge_added_events_already_acknowledged_are_not_sent_again() -> None:
    from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
    from services.edge.backend import AcknowledgedEvents

    acknowledged = AcknowledgedEvents(capacity=2)
    start = ingest_pb.Event(event_id="session:abc", installation_id="i1")
    custom = ingest_pb.Event(event_id="m-1", installation_id="i1")
    assert acknowledged.needed("k", [start, custom]) == [start, custom]
    duplicate = ingest_pb.EventResult(outcome=ingest_pb.EVENT_OUTCOME_DUPLICATE)
    acknowledged.record("k", [start, custom], [duplicate, duplicate])
    assert acknowledged.needed("k", [start, custom]) == [custom]  # SDK events always go
    assert acknowledged.needed("other key", [start]) == [start]
    for n in range(2):  # the least recently used is forgotten first
        other = ingest_pb.Event(event_id=f"details:{n}", installation_id="i1")
        acknowledged.record("k", [other], [duplicate])
    assert acknowledged.needed("k", [start]) == [start]


def test_logins_of_a_batch_of_users_go_out_together_before_their_events() -> None:
    batch = [
        {"type": "track", "anonymousId": f"a{n}", "userId": f"u{n}", "event": "E"} for n in range(3)
    ]
    batch.append({"type": "track", "anonymousId": "a0", "event": "Before Switch"})
    batch.append({"type": "identify", "anonymousId": "a0", "userId": "other"})
    steps = segment.translate_batch({"batch": batch}, NOW).steps
    assert kinds(steps) == ["Identify", "Identify", "Identify", "Track", "Identify"]
    # a0's second login waits for a0's events sent before it.
    assert steps[4] == Identify("a0", "other", steps[4].request_id)  # type: ignore[union-attr]


def test_posthog_push_subscriptions_set_and_clear_the_installations_token() -> None:
    body = {
        "api_key": "phc_key",
        "distinct_id": "user-1",
        "device_token": "fcm-token",
        "platform": "android",
        "app_id": "my-firebase-project",
    }
    subscription = posthog.push_subscription_of(body)
    register = posthog.translate_push_subscription(subscription, NOW, register=True)
    (added,) = events(register.steps)
    (removed,) = events(
        posthog.translate_push_subscription(subscription, NOW, register=False).steps
    )
    assert (added.installation_id, added.platform) == ("user-1", types_pb2.PLATFORM_ANDROID)
    assert added.installation_update.push_token == "fcm-token"
    assert added.installation_update.push_opt_in
    assert removed.installation_update.HasField("push_token")
    assert removed.installation_update.push_token == ""
    assert not removed.installation_update.push_opt_in
    assert added.event_id != removed.event_id
    again = events(posthog.translate_push_subscription(subscription, NOW, register=True).steps)
    assert again[0].event_id == added.event_id  # a retry is stored once
    assert "fcm-token" not in repr(subscription)


# What posthog-js 1.449.2 sends: `$is_identified` on every event, never `$user_state`.
def posthog_js_event(name: str, distinct_id: str, identified: bool, **extra: Any) -> Any:
    properties = {"$device_id": "dev-1", "$lib": "web", "$is_identified": identified, **extra}
    return {"event": name, "distinct_id": distinct_id, "properties": properties}


def test_posthog_js_is_identified_says_who_the_event_is_of() -> None:
    batch = [
        posthog_js_event("as user", "user-1", True),
        # After reset(): a new anonymous distinct_id on the same $device_id.
        posthog_js_event("logged out", "anon-2", False),
        posthog_js_event("first visit", "dev-1", False),
    ]
    steps = posthog.translate({"api_key": "k", "batch": batch}, NOW).steps
    assert [(s.installation_id, s.custom_id) for s in steps if isinstance(s, Identify)] == [
        ("dev-1", "user-1")
    ]
    customs = [e for e in events(steps) if e.HasField("custom")]
    assert [(e.custom.name, e.installation_id) for e in customs] == [
        ("as_user", "dev-1"),
        ("logged_out", "anon-2"),
        ("first_visit", "dev-1"),
    ]


def test_posthog_js_bootstrapped_as_identified_logs_the_device_in() -> None:
    message = posthog_js_event("Dashboard Opened", "boot-user", True)
    steps = posthog.translate({"api_key": "k", "batch": [message]}, NOW).steps
    assert steps[0] == Identify("dev-1", "boot-user", steps[0].request_id)  # type: ignore[union-attr]


def test_posthog_personless_server_events_are_listed_not_profiles() -> None:
    # posthog-python's capture() without distinct_id: a new made-up distinct_id each call.
    server = {
        "event": "Health Check Ran",
        "distinct_id": "0f0e7b0c-3b8a-4d5e-9a51-1c2d3e4f5a6b",
        "properties": {"$lib": "posthog-python", "$process_person_profile": False},
    }
    # posthog-js's default (person_profiles "identified_only") before identify: the device's.
    browser = posthog_js_event("Viewed", "dev-1", False, **{"$process_person_profile": False})
    steps = posthog.translate({"api_key": "k", "batch": [server, browser]}, NOW).steps
    assert [(s.reason, s.installation_id) for s in steps if isinstance(s, Reject)] == [
        ("PERSONLESS_EVENT", "0f0e7b0c-3b8a-4d5e-9a51-1c2d3e4f5a6b")
    ]
    (viewed,) = [e for e in events(steps) if e.HasField("custom")]
    assert viewed.installation_id == "dev-1"


def test_a_bad_time_zone_in_the_context_costs_nothing_else() -> None:
    context = {
        "os": {"name": "Android", "version": "14"},
        "app": {"version": "5.1"},
        "device": {"model": "Pixel 8", "token": "fcm-token-123"},
        "locale": "hi-IN",
        "timezone": "GMT+05:30",
    }
    message = {"type": "track", "event": "App Opened", "anonymousId": "a", "context": context}
    found = events(segment.translate_batch({"batch": [message]}, NOW).steps)
    updates = [e.installation_update for e in found if e.HasField("installation_update")]
    # The zone ingest refuses travels alone: the app version and the rest are kept.
    assert [u for u in updates if u.HasField("timezone")] == [
        ingest_pb.InstallationUpdate(timezone="GMT+05:30")
    ]
    (common,) = [u for u in updates if u.HasField("app_version")]
    assert (common.app_version, common.device_model) == ("5.1", "Pixel 8")
    assert not common.HasField("timezone")
    # posthog's $timezone likewise.
    capture = {
        "event": "opened",
        "distinct_id": "d",
        "properties": {"$os": "Android", "$app_version": "5.1", "$timezone": "GMT+05:30"},
    }
    found = events(posthog.translate({"api_key": "k", "batch": [capture]}, NOW).steps)
    updates = [e.installation_update for e in found if e.HasField("installation_update")]
    assert [len(u.ListFields()) for u in updates] == [1, 1]


def test_the_same_details_on_another_request_of_the_day_carry_the_same_ids() -> None:
    def detail_ids(version: str) -> list[str]:
        context = {"app": {"version": version}, "os": {"name": "iOS"}, "timezone": "Europe/Paris"}
        message = {"type": "track", "event": "E", "anonymousId": "a", "context": context}
        found = events(segment.translate_batch({"batch": [message]}, NOW).steps)
        return [e.event_id for e in found if e.HasField("installation_update")]

    first, zone = detail_ids("1.0")
    assert detail_ids("1.0") == [first, zone]
    # A new app version is a new update; the unchanged zone is the same event.
    newer, same_zone = detail_ids("1.1")
    assert newer != first
    assert same_zone == zone


@pytest.mark.parametrize(
    ("traits", "first", "last"),
    [
        ({"name": "Ada Lovelace"}, "Ada", "Lovelace"),
        ({"name": "Ada King Lovelace"}, "Ada", "King Lovelace"),
        ({"name": "Ada"}, "Ada", None),
        ({"name": None}, None, None),
    ],
)
def test_a_full_name_trait_fills_first_and_last_names(
    traits: dict[str, Any], first: str | None, last: str | None
) -> None:
    message = {"type": "identify", "userId": "u", "traits": traits}
    operations = [
        o
        for e in events(segment.translate_batch({"batch": [message]}, NOW).steps)
        for o in e.attribute_operations.operations
    ]
    by_native = {o.native_attribute: o for o in operations if o.native_attribute}
    assert set(by_native) == {
        types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME,
        types_pb2.NATIVE_ATTRIBUTE_LAST_NAME,
    }
    for native, expected in (
        (types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME, first),
        (types_pb2.NATIVE_ATTRIBUTE_LAST_NAME, last),
    ):
        operation = by_native[native]
        if expected is None:
            assert operation.kind == types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET
        else:
            assert operation.value.string_value == expected
    assert not [o for o in operations if o.custom_attribute == "name"]


def test_a_name_beside_first_and_last_names_is_a_custom_attribute() -> None:
    traits = {"name": "Ada L.", "firstName": "Ada", "lastName": "Lovelace"}
    message = {"event": "$set", "distinct_id": "u", "properties": {"$set": traits}}
    operations = [
        o
        for e in events(posthog.translate({"api_key": "k", "batch": [message]}, NOW).steps)
        for o in e.attribute_operations.operations
    ]
    assert [(o.native_attribute, o.custom_attribute, o.value.string_value) for o in operations] == [
        (0, "name", "Ada L."),
        (types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME, "", "Ada"),
        (types_pb2.NATIVE_ATTRIBUTE_LAST_NAME, "", "Lovelace"),
    ]


def test_a_null_reserved_object_trait_unsets_the_fields_it_became() -> None:
    message = {"type": "identify", "userId": "u", "traits": {"company": None, "nick": None}}
    operations = [
        o
        for e in events(segment.translate_batch({"batch": [message]}, NOW).steps)
        for o in e.attribute_operations.operations
    ]
    assert {o.kind for o in operations} == {types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET}
    assert {o.custom_attribute for o in operations} == {
        "company",
        "company_name",
        "company_id",
        "company_industry",
        "company_employee_count",
        "company_plan",
        "nick",
    }
