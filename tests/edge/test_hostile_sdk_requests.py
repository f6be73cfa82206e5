"""Over HTTP, through ingest, identity and query: requests that once answered 500 or lost the
good events beside a bad one, and posthog-js's logout (reset) and fast clock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import requests

from tests.conftest import eventually
from tests.edge.conftest import Edge
from tests.edge.test_http import send


async def custom_names(edge: Edge, **lookup: str) -> list[str]:
    profile = await edge.stored_profile(**lookup)
    if profile is None:  # not stored yet
        return []
    found = await edge.events(profile.summary.profile_id)
    return sorted(e.custom.name for e in found if e.HasField("custom"))


async def test_numbers_no_double_holds_and_deep_rejected_messages_keep_the_good_events(
    edge: Edge,
) -> None:
    deep = '{"k":' * 40 + '"leaf"' + "}" * 40
    body = (
        '{"writeKey": "KEY", "batch": ['
        '{"type": "track", "anonymousId": "hostile-1", "event": "Good", "messageId": "h-1"},'
        '{"type": "screenview", "anonymousId": "hostile-1", "messageId": "h-2",'
        ' "properties": DEEP},'
        '{"type": "track", "userId": 1e400, "event": "x", "messageId": "h-3"},'
        '{"type": "track", "anonymousId": NaN, "event": "x", "messageId": "h-4"},'
        '{"type": "track", "anonymousId": "hostile-1", "event": "Huge", "messageId": "h-5",'
        ' "properties": {"n": 1BIG}}]}'
    )
    body = body.replace("KEY", edge.sdk_key).replace("DEEP", deep).replace("BIG", "0" * 400)
    reply = await send(f"{edge.url}/v1/batch", body.encode())
    assert (reply.status_code, reply.json()) == (200, {"success": True})

    async def stored() -> bool:
        return await custom_names(edge, installation_id="hostile-1") == ["good"]

    await eventually(stored)
    reasons = sorted(r.reason for r in await edge.rejected())
    assert reasons == ["MESSAGE_TYPE_UNKNOWN", "ORIGIN_MISSING", "ORIGIN_MISSING", "VALUE_INVALID"]

    countly = await asyncio.to_thread(
        requests.get,
        f"{edge.url}/i",
        params={
            "app_key": edge.sdk_key,
            "device_id": "hostile-2",
            "timestamp": "inf",
            "events": '[{"key": "Tap", "count": 1, "timestamp": 1e400}]',
        },
        timeout=10,
    )
    assert countly.status_code == 200

    async def tapped() -> bool:
        return await custom_names(edge, installation_id="hostile-2") == ["tap"]

    await eventually(tapped)


def posthog_event(name: str, distinct_id: str, uuid: int, **properties: Any) -> dict[str, Any]:
    return {
        "event": name,
        "distinct_id": distinct_id,
        "uuid": f"0190a5f7-2c4b-7000-8000-{uuid:012d}",
        "properties": {"$lib": "web", **properties},
    }


async def test_posthog_js_reset_then_login_again_and_a_fast_clock(edge: Edge) -> None:
    device, visitor = "ph-device-1", "ph-after-reset-1"
    login = {"$device_id": device, "$anon_distinct_id": device, "$user_state": "identified"}
    batch = [
        posthog_event("before", device, 1, **{"$device_id": device, "$user_state": "anonymous"}),
        posthog_event("$identify", "ph-user-1", 2, **login),
        posthog_event(
            "as_user", "ph-user-1", 3, **{"$device_id": device, "$user_state": "identified"}
        ),
    ]
    reply = await send(f"{edge.url}/batch/", {"api_key": edge.sdk_key, "batch": batch})
    assert reply.status_code == 200
    # reset(): same $device_id, a new anonymous distinct_id. posthog-js sends its send time
    # only as `_` (ms); this browser's clock runs an hour fast.
    fast = int((time.time() + 3600) * 1000)
    later = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(fast / 1000))
    after = posthog_event(
        "after_reset", visitor, 4, **{"$device_id": device, "$user_state": "anonymous"}
    )
    after["timestamp"] = later
    reply = await send(
        f"{edge.url}/e/?_={fast}&ver=1.200.0", {"api_key": edge.sdk_key, "batch": [after]}
    )
    assert reply.status_code == 200

    async def split() -> bool:
        return await custom_names(edge, installation_id=visitor) == ["after_reset"]

    await eventually(split)
    assert await custom_names(edge, custom_id="ph-user-1") == ["as_user", "before"]
    assert await edge.rejected() == []

    # Logging in again merges the logged-out visit into the user.
    again = {"$device_id": device, "$anon_distinct_id": visitor, "$user_state": "identified"}
    reply = await send(
        f"{edge.url}/batch/",
        {"api_key": edge.sdk_key, "batch": [posthog_event("$identify", "ph-user-1", 5, **again)]},
    )
    assert reply.status_code == 200

    async def merged() -> bool:
        return await custom_names(edge, custom_id="ph-user-1") == [
            "after_reset",
            "as_user",
            "before",
        ]

    await eventually(merged)


async def test_one_badly_formatted_trait_is_listed_alone_and_the_others_kept(edge: Edge) -> None:
    def identify(user: str, phone: str, n: int) -> dict[str, Any]:
        return {
            "type": "identify",
            "messageId": f"traits-{n}",
            "anonymousId": f"anon-{user}",
            "userId": user,
            "traits": {
                "email": f"{user}@example.com",
                "firstName": "Ada",
                "phone": phone,
                "plan": "pro",
            },
        }

    batch = [identify("trait-1", "(555) 123-4567", 1), identify("trait-2", "+1 (555) 123-4567", 2)]
    reply = await send(f"{edge.url}/v1/batch", {"writeKey": edge.sdk_key, "batch": batch})
    assert reply.status_code == 200

    async def attributes(user: str) -> tuple[dict[str, str], dict[str, str]]:
        profile = await edge.stored_profile(custom_id=user)
        if profile is None:  # not stored yet
            return {}, {}
        native = {
            name: getattr(profile.native_attributes, name)
            for name in ("email", "first_name", "phone")
            if getattr(profile.native_attributes, name)
        }
        custom = {a.name: a.value.string_value for a in profile.custom_attributes}
        return native, custom

    async def stored() -> bool:
        return (
            len((await attributes("trait-2"))[0]) == 3
            and len((await attributes("trait-1"))[0]) == 2
        )

    await eventually(stored)
    assert await attributes("trait-1") == (
        {"email": "trait-1@example.com", "first_name": "Ada"},
        {"plan": "pro"},
    )
    assert (await attributes("trait-2"))[0]["phone"] == "+15551234567"
    assert [r.reason for r in await edge.rejected()] == ["PHONE_INVALID"]


async def test_a_send_time_no_timestamp_holds_and_a_bad_countly_device_keep_the_good_events(
    edge: Edge,
) -> None:
    # Both answered an error for the whole request and lost the good message beside the bad
    # one: a send time in year 10000 once in UTC (500), and a Countly session started under a
    # device ID identity refuses (its logout check answered INVALID_ARGUMENT: 400).
    good = {"type": "track", "anonymousId": "fuzz-1", "event": "Good", "messageId": "fz-1"}
    odd = {
        "type": "track",
        "anonymousId": "fuzz-2",
        "event": "Other",
        "messageId": "fz-2",
        "sentAt": "9999-12-31T23:59:59-14:00",
    }
    reply = await send(f"{edge.url}/v1/batch", {"writeKey": edge.sdk_key, "batch": [good, odd]})
    assert reply.status_code == 200, reply.text
    bulk = {
        "app_key": edge.sdk_key,
        "requests": [
            {"device_id": "a\u0000b", "begin_session": 1},
            {"device_id": "fuzz-3", "events": '[{"key": "good_too"}]'},
        ],
    }
    reply = await send(f"{edge.url}/i/bulk", bulk, {"Content-Type": "application/json"})
    assert reply.status_code == 200, reply.text

    async def stored() -> bool:
        return (
            await custom_names(edge, installation_id="fuzz-1") == ["good"]
            and await custom_names(edge, installation_id="fuzz-2") == ["other"]
            and await custom_names(edge, installation_id="fuzz-3") == ["good_too"]
        )

    await eventually(stored)
    assert [r.reason for r in await edge.rejected()] == ["INSTALLATION_ID_INVALID"]
