"""A Countly app sends its metrics (and so its platform) with `begin_session` only; the edge, which
keeps no state, sends its later requests (events, user details, crashes, heartbeats, the end) on
PLATFORM_API. The session stays on the app's device in the profile's sessions (ingest's 0056)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import requests

from profiles.common.v1 import types_pb2
from tests.edge.conftest import Edge, eventually

DEVICE = "pixel-9-device"
BASE = int(time.time() * 1000) - 600_000  # the requests' timestamps: ten minutes ago onwards


async def send(edge: Edge, offset_ms: int, **params: Any) -> None:
    """One raw request of the device, `offset_ms` after BASE."""
    reply = await asyncio.to_thread(
        requests.get,
        f"{edge.url}/i",
        params={
            "app_key": edge.sdk_key,
            "device_id": DEVICE,
            "timestamp": BASE + offset_ms,
            **params,
        },
        timeout=10,
    )
    assert reply.json() == {"result": "Success"}


async def test_requests_without_metrics_leave_the_session_on_its_device(edge: Edge) -> None:
    await send(
        edge,
        0,
        begin_session=1,
        metrics=json.dumps({"_os": "Android", "_os_version": "15", "_device": "Pixel 9"}),
    )
    await send(edge, 20_000, events=json.dumps([{"key": "Opened", "count": 1}]))
    await send(edge, 30_000, user_details=json.dumps({"custom": {"tier": "gold"}}))
    await send(edge, 60_000, session_duration=60)
    await send(
        edge,
        70_000,
        crash=json.dumps({"_error": "java.lang.IllegalStateException", "_nonfatal": True}),
    )
    await send(edge, 90_000, end_session=1, session_duration=30)

    async def ended() -> bool:
        profile = await edge.profile(installation_id=DEVICE)
        sessions = await edge.sessions(profile.summary.profile_id)
        return len(sessions) == 1 and sessions[0].end_time.seconds > 0

    await eventually(ended)
    profile = await edge.profile(installation_id=DEVICE)
    (session,) = await edge.sessions(profile.summary.profile_id)
    (installation,) = profile.installations
    # The requests without metrics were sent on API and joined the session.
    platforms = {e.platform for e in await edge.events(profile.summary.profile_id)}
    assert platforms == {types_pb2.PLATFORM_ANDROID, types_pb2.PLATFORM_API}
    assert session.event_count == 6
    assert (session.platform, installation.platform) == (
        types_pb2.PLATFORM_ANDROID,
        types_pb2.PLATFORM_ANDROID,
    )
