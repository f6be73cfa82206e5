"""The real posthog SDK (posthog-python), pointed at an edge started with the suite: what it
sends arrives once, on the right profiles, as query shows it."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from posthog import Posthog

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2 as query_pb
from tests.conftest import eventually
from tests.edge.conftest import (
    Edge,
    assert_lost_answer_is_retried,
    assert_sent_during_outage_arrives,
    assert_stored_once,
    custom_names,
    flush,
)


def sdk(edge: Edge) -> Posthog:
    return Posthog(edge.sdk_key, host=edge.url, gzip=True, max_retries=20, flush_interval=0.05)


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url, data=data, headers=headers or {}, timeout=10)


async def test_anonymous_events_then_an_alias_land_on_one_identified_profile(edge: Edge) -> None:
    client = sdk(edge)
    android = {"$os": "Android", "$os_version": "14", "$app_version": "3.2", "$session_id": "s-1"}
    client.capture(
        "$pageview",
        distinct_id="ph-anon",
        properties={**android, "$current_url": "https://shop.example/", "plan": "free"},
    )
    client.capture("Button Clicked", distinct_id="ph-anon", properties={**android, "n": 2})
    await flush(client)

    async def anonymous_history() -> bool:
        profile = await edge.profile(installation_id="ph-anon")
        return len(await custom_names(edge, profile.summary.profile_id)) == 2

    await eventually(anonymous_history)

    client.alias(previous_id="ph-anon", distinct_id="ph-user")
    client.set(distinct_id="ph-user", properties={"email": "bo@example.com", "tier": "gold"})
    client.capture("Purchased", distinct_id="ph-user", properties={"amount": 12})
    await flush(client)

    async def merged() -> bool:
        profile = await edge.profile(custom_id="ph-user")
        names = await custom_names(edge, profile.summary.profile_id)
        return profile.native_attributes.email != "" and names == [
            "button_clicked",
            "pageview",
            "purchased",
        ]

    await eventually(merged)
    profile = await edge.profile(custom_id="ph-user")
    assert profile.native_attributes.email == "bo@example.com"
    assert {a.name: a.value.string_value for a in profile.custom_attributes} == {"tier": "gold"}
    # posthog-python reports its host's OS: a server-side library is PLATFORM_API, and the
    # host's OS is no device's detail.
    server_side = [i for i in profile.installations if i.installation_id == "ph-anon"]
    assert server_side[0].platform == types_pb2.PLATFORM_API
    assert server_side[0].os_version == ""
    sessions = await edge.sessions(profile.summary.profile_id)
    assert "s-1" in {s.session_id for s in sessions}
    pageview = next(
        e for e in await edge.events(profile.summary.profile_id) if e.custom.name == "pageview"
    )
    assert pageview.custom.attributes["page_url"].url_value == "https://shop.example/"
    assert pageview.custom.attributes["plan"].string_value == "free"


async def test_a_retried_batch_stores_nothing_twice(edge: Edge) -> None:
    body = {
        "api_key": edge.sdk_key,
        "batch": [
            {
                "event": "Tap",
                "distinct_id": "ph-r",
                "uuid": f"0190a000-0000-7000-8000-00000000000{i}",
            }
            for i in range(3)
        ],
    }
    data = gzip.compress(json.dumps(body).encode())
    for _ in range(2):
        reply = await asyncio.to_thread(
            post, f"{edge.url}/batch/", data, {"Content-Encoding": "gzip"}
        )
        assert reply.status_code == 200
        assert reply.json() == {"status": 1}
    await assert_stored_once(edge, "ph-r", "tap")


async def test_events_sent_while_ingest_is_down_arrive_once_it_is_back(edge: Edge) -> None:
    async def send() -> None:
        client = sdk(edge)
        client.capture("Offline Tap", distinct_id="ph-down")
        await flush(client)

    await assert_sent_during_outage_arrives(edge, "posthog", send, "ph-down", ["offline_tap"])


async def test_an_event_with_too_many_properties_is_rejected_and_listed(edge: Edge) -> None:
    client = sdk(edge)
    client.capture(
        "Wide", distinct_id="ph-wide", properties={f"p{i}": i for i in range(25)}, uuid=None
    )
    client.capture("$$$", distinct_id="ph-wide")
    await flush(client)

    async def listed() -> bool:
        return len(await edge.rejected()) == 2

    await eventually(listed)
    assert sorted(r.reason for r in await edge.rejected()) == [
        "NAME_UNUSABLE",
        "TOO_MANY_ATTRIBUTES",
    ]


async def test_identify_with_anon_distinct_id_and_a_mobile_event_after_it(edge: Edge) -> None:
    body = {
        "api_key": edge.sdk_key,
        "batch": [
            {
                "event": "$identify",
                "distinct_id": "ph-id-user",
                "uuid": "0190a000-0000-7000-8000-0000000000a1",
                "properties": {"$anon_distinct_id": "ph-device", "$os": "iOS"},
                "$set": {"first_name": "Cy"},
            },
            {
                "event": "App Opened",
                "distinct_id": "ph-id-user",
                "uuid": "0190a000-0000-7000-8000-0000000000a2",
                "properties": {
                    "$device_id": "ph-device",
                    "$user_state": "identified",
                    "$lib": "posthog-ios",
                    "$os": "iOS",
                    "$os_version": "17.4",
                    "$app_version": "5.0",
                    "$device_model": "iPhone16,1",
                    "$ip": "203.0.113.7",
                },
            },
        ],
    }
    reply = await asyncio.to_thread(post, f"{edge.url}/capture/", body)
    assert reply.status_code == 200

    async def identified() -> bool:
        profile = await edge.profile(custom_id="ph-id-user")
        return profile.native_attributes.first_name == "Cy"

    await eventually(identified)
    profile = await edge.profile(installation_id="ph-device")
    assert profile.summary.custom_id == "ph-id-user"

    async def device_details() -> bool:
        found = await edge.profile(installation_id="ph-device")
        return any(i.app_version == "5.0" for i in found.installations)

    await eventually(device_details)
    device = next(
        i
        for i in (await edge.profile(installation_id="ph-device")).installations
        if i.installation_id == "ph-device"
    )
    assert (device.platform, device.os_version, device.device_model) == (
        types_pb2.PLATFORM_IOS,
        "17.4",
        "iPhone16,1",
    )


async def test_a_flush_whose_answer_was_lost_is_retried_and_stored_once(edge: Edge) -> None:
    async def send(url: str) -> None:
        client = Posthog(edge.sdk_key, host=url, gzip=True, max_retries=20)
        for n in range(3):
            client.capture("Lost Answer", distinct_id="ph-lost", properties={"n": n})
        await flush(client)

    await assert_lost_answer_is_retried(edge, "posthog", send, "ph-lost")


async def test_push_subscriptions_in_posthogs_documented_shape_reach_the_installation(
    edge: Edge,
) -> None:
    """What posthog-ios and posthog-android send (POST /api/push_subscriptions/ to register,
    DELETE to unregister), as raw requests: the SDK under test (posthog-python) has no push."""
    url = f"{edge.url}/api/push_subscriptions/"
    body = {
        "api_key": edge.sdk_key,
        "distinct_id": "ph-phone",
        "device_token": "ab" * 32,
        "platform": "ios",
        "app_id": "com.example.app",
    }

    async def send(method: str, payload: Any) -> requests.Response:
        return await asyncio.to_thread(requests.request, method, url, json=payload, timeout=10)

    registered = await send("POST", body)
    again = await send("POST", body)  # every launch: stored once a day
    assert (registered.status_code, again.status_code) == (200, 200)

    async def token_is(present: bool) -> bool:
        profile = await edge.profile(installation_id="ph-phone")
        (installation,) = profile.installations
        return installation.push_token_present is present

    await eventually(lambda: token_is(True))
    profile = await edge.profile(installation_id="ph-phone")
    assert profile.installations[0].platform == types_pb2.PLATFORM_IOS
    updates = [e for e in await edge.events(profile.summary.profile_id)]
    assert len(updates) == 1

    assert (await send("DELETE", body)).status_code == 200
    await eventually(lambda: token_is(False))

    missing = await send("POST", {k: v for k, v in body.items() if k != "device_token"})
    assert missing.status_code == 400
    assert "device_token" in missing.json()["detail"]
    other_platform = await send("POST", {**body, "platform": "windows_phone"})
    assert other_platform.status_code == 400
    unknown_key = await send("POST", {**body, "api_key": "phc_unknown"})
    assert unknown_key.status_code == 401


async def test_personless_events_make_no_profile_and_are_listed(edge: Edge) -> None:
    client = sdk(edge)
    # capture() without distinct_id: posthog-python makes one up, a new one per call, and
    # says the event is personless ($process_person_profile false).
    for n in range(3):
        client.capture("Health Check Ran", properties={"n": n})
    client.capture("Signed Up", distinct_id="ph-someone")  # after them, a person's event
    await flush(client)

    async def listed() -> bool:
        reply = await edge.query.ListProfiles(
            query_pb.ListProfilesRequest(page_size=10), metadata=edge.read()
        )
        return len(await edge.rejected()) == 3 and len(reply.profiles) >= 1

    await eventually(listed)
    assert {r.reason for r in await edge.rejected()} == {"PERSONLESS_EVENT"}
    reply = await edge.query.ListProfiles(
        query_pb.ListProfilesRequest(page_size=10), metadata=edge.read()
    )
    # One profile, the person's: none per personless event.
    (profile,) = reply.profiles
    someone = await edge.profile(installation_id="ph-someone")
    assert profile.profile_id == someone.summary.profile_id


async def test_a_full_name_fills_the_first_and_last_names(edge: Edge) -> None:
    client = sdk(edge)
    client.alias(previous_id="ph-name-device", distinct_id="ph-name")
    client.set(distinct_id="ph-name", properties={"name": "Grace Hopper", "plan": "pro"})
    await flush(client)

    async def named() -> bool:
        profile = await edge.stored_profile(custom_id="ph-name")
        if profile is None:  # not stored yet
            return False
        return bool(profile.native_attributes.first_name)

    await eventually(named)
    profile = await edge.profile(custom_id="ph-name")
    names = (profile.native_attributes.first_name, profile.native_attributes.last_name)
    assert names == ("Grace", "Hopper")
    assert "name" not in {a.name for a in profile.custom_attributes}


async def test_react_native_and_flutter_apps_before_login_are_their_devices(edge: Edge) -> None:
    # posthog-react-native (plain JSON to /batch/) and posthog-flutter (gzip to /batch) name
    # the OS `$os_name`, never `$os`, with a cross-platform `$lib`; their default
    # personProfiles "identified_only" sends every event before identify() as personless.
    # They are the app's device: stored, on iOS or Android, with its details.
    start = datetime.now(UTC) - timedelta(minutes=1)

    def event(n: int, distinct_id: str, lib: str, os_name: str) -> dict[str, Any]:
        return {
            "event": "Application Opened" if n == 0 else "$screen",
            "distinct_id": distinct_id,
            "timestamp": (start + timedelta(seconds=n)).isoformat(),
            "uuid": str(uuid.uuid4()),
            "properties": {
                "$lib": lib,
                "$lib_version": "4.1.0",
                "$os_name": os_name,
                "$os_version": "17.4" if os_name == "iOS" else "14",
                "$app_version": "3.1.0",
                "$device_model": "iPhone15,2" if os_name == "iOS" else "Pixel 7",
                "$is_identified": False,
                "$process_person_profile": False,
                "$session_id": f"01938000-0000-7000-8000-{distinct_id[-12:]:0>12}",
                "$screen_name": "Home",
            },
        }

    sent_at = {"sent_at": datetime.now(UTC).isoformat()}
    native = {"posthog-react-native": "iOS", "posthog-flutter": "Android"}
    for lib, os_name in native.items():
        distinct_id = f"anon-{lib[-7:]}"
        body = {
            "api_key": edge.sdk_key,
            "batch": [event(n, distinct_id, lib, os_name) for n in range(3)],
            **sent_at,
        }
        if lib == "posthog-flutter":
            reply = await asyncio.to_thread(
                post,
                f"{edge.url}/batch",
                gzip.compress(json.dumps(body).encode()),
                {"Content-Encoding": "gzip", "Content-Type": "application/json; charset=utf-8"},
            )
        else:
            reply = await asyncio.to_thread(post, f"{edge.url}/batch/", body)
        assert reply.status_code == 200, reply.text

    for lib, os_name in native.items():
        distinct_id = f"anon-{lib[-7:]}"

        async def stored(distinct_id: str = distinct_id) -> bool:
            found = await edge.stored_profile(installation_id=distinct_id)
            if found is None:  # not stored yet
                return False
            return found.counters.event_count >= 3 and any(
                i.app_version for i in found.installations
            )

        await eventually(stored)
        profile = await edge.profile(installation_id=distinct_id)
        (device,) = profile.installations
        platform = types_pb2.PLATFORM_IOS if os_name == "iOS" else types_pb2.PLATFORM_ANDROID
        assert (device.platform, device.app_version, device.device_model) == (
            platform,
            "3.1.0",
            "iPhone15,2" if os_name == "iOS" else "Pixel 7",
        ), lib
    assert await edge.rejected() == []
