"""The real segment-analytics-python SDK, pointed at an edge started with the suite: what it
sends arrives once, on the right profiles, as query shows it."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from segment.analytics.client import Client

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from tests.conftest import StartServices, eventually
from tests.edge.conftest import (
    Edge,
    assert_lost_answer_is_retried,
    assert_sent_during_outage_arrives,
    assert_stored_once,
    custom_names,
    flush,
)

# analytics-python's consumer collects a batch for `upload_interval` (0.5 s by default) before
# it sends, and a flush waits for it: 50 ms sends what a test queued at once, as the PostHog
# tests' flush_interval does.
UPLOAD_INTERVAL_S = 0.05


def sdk(edge: Edge, **options: Any) -> Client:
    return Client(
        edge.sdk_key, host=edge.url, max_retries=20, upload_interval=UPLOAD_INTERVAL_S, **options
    )


def post(url: str, body: Any, **kwargs: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return requests.post(url, data=data, headers=headers, timeout=10, **kwargs)


async def test_anonymous_events_then_a_login_land_on_one_identified_profile(edge: Edge) -> None:
    client = sdk(edge)
    ios = {"os": {"name": "iOS", "version": "17.1"}, "app": {"version": "2.0.1"}}
    client.track(
        anonymous_id="anon-1",
        event="Product Viewed",
        properties={"price": 9.5, "sku": "A1", "plan": {"tier": "pro"}},
        context=ios,
    )
    client.screen(anonymous_id="anon-1", name="Home", context=ios)
    await flush(client)

    async def anonymous_history() -> bool:
        profile = await edge.profile(installation_id="anon-1")
        return len(await custom_names(edge, profile.summary.profile_id)) == 2

    await eventually(anonymous_history)
    anonymous = await edge.profile(installation_id="anon-1")
    assert anonymous.summary.anonymous
    assert [(i.platform, i.app_version, i.os_version) for i in anonymous.installations] == [
        (types_pb2.PLATFORM_IOS, "2.0.1", "17.1")
    ]

    client.identify(
        user_id="user-1",
        anonymous_id="anon-1",
        traits={"email": "Ada@Example.com", "firstName": "Ada", "plan": "pro"},
        context=ios,
    )
    client.track(user_id="user-1", event="Order Completed", properties={"total": 30})
    await flush(client)

    async def merged() -> bool:
        profile = await edge.profile(custom_id="user-1")
        names = await custom_names(edge, profile.summary.profile_id)
        return profile.native_attributes.email != "" and sorted(names) == [
            "order_completed",
            "product_viewed",
            "screen",
        ]

    await eventually(merged)
    profile = await edge.profile(custom_id="user-1")
    assert not profile.summary.anonymous
    assert profile.native_attributes.email == "ada@example.com"
    assert profile.native_attributes.first_name == "Ada"
    assert {a.name: a.value.string_value for a in profile.custom_attributes} == {"plan": "pro"}
    events = {
        e.custom.name: e for e in await edge.events(profile.summary.profile_id) if e.custom.name
    }
    viewed = events["product_viewed"].custom
    assert {k: v.number_value or v.string_value for k, v in viewed.attributes.items()} == {
        "price": 9.5,
        "sku": "A1",
        "plan_tier": "pro",
    }
    assert events["screen"].custom.label == "Home"
    sessions = await edge.sessions(profile.summary.profile_id)
    assert [s.installation_id for s in sessions] == ["anon-1"]
    assert sessions[0].event_count >= 2


async def test_a_retried_batch_stores_nothing_twice(edge: Edge) -> None:
    batch = {
        "writeKey": edge.sdk_key,
        "batch": [
            {"type": "track", "messageId": f"m-{i}", "anonymousId": "anon-r", "event": "Tap"}
            for i in range(3)
        ],
    }
    for _ in range(2):  # the SDK's retry after a lost answer sends the same messages again
        reply = await asyncio.to_thread(post, f"{edge.url}/v1/batch", batch)
        assert reply.status_code == 200
        assert reply.json() == {"success": True}
    await assert_stored_once(edge, "anon-r", "tap")


async def test_events_sent_while_ingest_is_down_arrive_once_it_is_back(edge: Edge) -> None:
    async def send() -> None:
        client = sdk(edge)
        client.track(anonymous_id="anon-down", event="Offline Tap")
        await flush(client)

    await assert_sent_during_outage_arrives(edge, "segment", send, "anon-down", ["offline_tap"])


async def test_untranslatable_messages_are_listed_as_rejected_without_keys(edge: Edge) -> None:
    batch = {
        "writeKey": edge.sdk_key,
        "batch": [
            {"type": "bogus", "messageId": "b-1", "anonymousId": "anon-b"},
            {"type": "alias", "messageId": "b-2", "previousId": "user-a", "userId": "user-b"},
            {"type": "track", "messageId": "b-3", "anonymousId": "anon-b", "event": "???"},
            {"type": "track", "messageId": "b-4", "anonymousId": "anon-b", "event": "Fine"},
        ],
        "context": {"ip": "203.0.113.9"},
    }
    reply = await asyncio.to_thread(post, f"{edge.url}/v1/batch", batch)
    assert reply.status_code == 200

    async def listed() -> bool:
        return len(await edge.rejected()) == 3

    await eventually(listed)
    rejected = {r.event_id: r for r in await edge.rejected()}
    assert {k: r.reason for k, r in rejected.items()} == {
        "b-1": "MESSAGE_TYPE_UNKNOWN",
        "b-2": "ALIAS_REFUSED",
        "b-3": "NAME_UNUSABLE",
    }
    kept = json.loads(rejected["b-2"].raw_payload_json)
    assert kept["untranslated"]["message"]["previousId"] == "user-a"
    assert edge.sdk_key not in rejected["b-2"].raw_payload_json
    assert "203.0.113.9" not in "".join(r.raw_payload_json for r in rejected.values())


async def test_a_push_token_in_the_device_context_reaches_the_installation(edge: Edge) -> None:
    message = {
        "type": "track",
        "messageId": "p-1",
        "anonymousId": "anon-push",
        "event": "App Opened",
        "context": {
            "device": {"token": "ff" * 32, "model": "iPhone15,2"},
            "os": {"name": "iOS", "version": "17.2"},
            "locale": "fr-FR",
            "timezone": "Europe/Paris",
        },
    }
    auth = (edge.sdk_key, "")
    reply = await asyncio.to_thread(post, f"{edge.url}/v1/track", message, auth=auth)
    assert reply.status_code == 200

    async def has_token() -> bool:
        profile = await edge.profile(installation_id="anon-push")
        return any(i.push_token_present for i in profile.installations)

    await eventually(has_token)
    profile = await edge.profile(installation_id="anon-push")
    assert profile.installations[0].device_model == "iPhone15,2"
    assert profile.installations[0].platform == types_pb2.PLATFORM_IOS
    # A reported token is a device registered for push: the person is reachable by push.
    assert profile.installations[0].push_opt_in

    async def reachable() -> bool:
        reply = await edge.query.ListProfiles(
            query_pb.ListProfilesRequest(reachable_channel=types_pb2.CHANNEL_PUSH),
            metadata=edge.read(),
        )
        return [r.profile_id for r in reply.profiles] == [profile.summary.profile_id]

    await eventually(reachable)


async def test_a_derived_session_lasts_from_its_first_to_its_last_event(
    edge: Edge, start_services: StartServices
) -> None:
    segments = await start_services("segments", settings=edge.settings)
    engagement = segments_grpc.SegmentsServiceStub(segments["segments"].channel)
    # Two events six minutes apart, then one 40 minutes later: ingest derives two sessions
    # (30 minutes without events start a new one).
    first = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    client = sdk(edge)
    for minutes in (0, 6, 46):
        client.track(
            anonymous_id="anon-s",
            event="Read",
            timestamp=first + timedelta(minutes=minutes),
        )
    await flush(client)

    async def two_sessions() -> bool:
        profile = await edge.profile(installation_id="anon-s")
        sessions = await edge.sessions(profile.summary.profile_id)
        return [s.duration.seconds for s in sessions] == [0, 360]  # newest first

    await eventually(two_sessions)
    profile = await edge.profile(installation_id="anon-s")
    _, session = await edge.sessions(profile.summary.profile_id)
    assert session.platform == types_pb2.PLATFORM_API  # analytics-python: a server library
    assert session.event_count == 2  # the two events; no session start is stored

    async def engaged() -> bool:
        reply = await engagement.GetEngagement(
            segments_pb.GetEngagementRequest(profile_id=profile.summary.profile_id),
            metadata=edge.read(),
        )
        return reply.session_count == 2

    await eventually(engaged)


async def test_a_flush_whose_answer_was_lost_is_retried_and_stored_once(edge: Edge) -> None:
    async def send(url: str) -> None:
        # The three messages make one batch, sent once the third is queued (upload_size)
        # rather than when the consumer's batching interval ends.
        client = Client(edge.sdk_key, host=url, max_retries=20, upload_size=3)
        for n in range(3):
            client.track(anonymous_id="anon-lost", event="Lost Answer", properties={"n": n})
        await flush(client)

    await assert_lost_answer_is_retried(edge, "segment", send, "anon-lost")


async def test_a_back_end_event_on_a_device_s_anonymous_id_keeps_the_device_platform(
    edge: Edge,
) -> None:
    """A server library (analytics-python: platform API) tracking with the anonymousId a phone
    uses: the event is stored on that installation, which stays an iOS one (migration 0040)."""
    earlier = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    phone = {
        "type": "track",
        "messageId": "phone-1",
        "anonymousId": "anon-shared",
        "event": "App Opened",
        "timestamp": earlier,
        "context": {"os": {"name": "iOS", "version": "17.2"}},
    }
    reply = await asyncio.to_thread(post, f"{edge.url}/v1/track", phone, auth=(edge.sdk_key, ""))
    assert reply.status_code == 200
    client = sdk(edge)
    client.track(anonymous_id="anon-shared", event="Order Shipped", properties={"order": "A-1"})
    await flush(client)

    async def both_stored() -> bool:
        profile = await edge.profile(installation_id="anon-shared")
        return len(await custom_names(edge, profile.summary.profile_id)) == 2

    await eventually(both_stored)
    profile = await edge.profile(installation_id="anon-shared")
    events = await edge.events(profile.summary.profile_id)
    platforms = {e.custom.name: e.platform for e in events if e.HasField("custom")}
    assert platforms == {
        "app_opened": types_pb2.PLATFORM_IOS,
        "order_shipped": types_pb2.PLATFORM_API,
    }
    assert [i.platform for i in profile.installations] == [types_pb2.PLATFORM_IOS]


async def test_a_time_zone_ingest_refuses_costs_no_other_detail(edge: Edge) -> None:
    client = sdk(edge)
    # Android reports custom zones such as "GMT+05:30", which no IANA name spells.
    android = {
        "os": {"name": "Android", "version": "14"},
        "app": {"version": "5.1"},
        "device": {"model": "Pixel 8", "token": "fcm-token-123"},
        "locale": "hi-IN",
        "timezone": "GMT+05:30",
        "library": {"name": "analytics-android", "version": "4.11.3"},
    }
    client.track(anonymous_id="seg-zone", event="App Opened", context=android)
    await flush(client)

    async def stored() -> bool:
        profile = await edge.stored_profile(installation_id="seg-zone")
        if profile is None:  # not stored yet
            return False
        return bool(profile.installations and profile.installations[0].app_version)

    await eventually(stored)
    (installation,) = (await edge.profile(installation_id="seg-zone")).installations
    assert (installation.app_version, installation.os_version, installation.device_model) == (
        "5.1",
        "14",
        "Pixel 8",
    )
    # The zone alone is refused, and listed.
    assert [r.reason for r in await edge.rejected()] == ["TIMEZONE_INVALID"]


async def test_reserved_traits_name_and_company_as_the_spec_defines_them(edge: Edge) -> None:
    client = sdk(edge)
    company = {"name": "Acme", "plan": "enterprise"}
    traits = {"name": "Ada Lovelace", "company": company, "nick": "ada"}
    client.identify(user_id="seg-traits", traits=traits)
    await flush(client)

    async def named() -> bool:
        profile = await edge.stored_profile(custom_id="seg-traits")
        if profile is None:  # not stored yet
            return False
        return bool(profile.native_attributes.first_name)

    await eventually(named)
    profile = await edge.profile(custom_id="seg-traits")
    # `name` is the full name (Segment's spec): it fills the first and last names.
    names = (profile.native_attributes.first_name, profile.native_attributes.last_name)
    assert names == ("Ada", "Lovelace")
    assert {a.name for a in profile.custom_attributes} == {"company_name", "company_plan", "nick"}

    # A null clears a trait, the fields an object trait became included.
    client.identify(user_id="seg-traits", traits={"company": None, "nick": None})
    await flush(client)

    async def cleared() -> bool:
        profile = await edge.profile(custom_id="seg-traits")
        return not profile.custom_attributes

    await eventually(cleared)
