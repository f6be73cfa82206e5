"""PostHog's and Countly's SDKs meet the edge's overload and outage answers in their own
dialect's shape: PostHog's `{"type", "code", "detail"}`, Countly's `{"result"}` (the SDKs log
these fields), with Retry-After. Segment's are in test_segment_error_bodies.py."""

from __future__ import annotations

import asyncio
from typing import Any

import requests

from tests.edge.conftest import Edge, serve_edge


def posthog_capture(url: str, key: str) -> requests.Response:
    body = {"api_key": key, "batch": [{"event": "Tap", "distinct_id": "ph-err"}]}
    return requests.post(f"{url}/batch/", json=body, timeout=10)


def countly_request(url: str, key: str) -> requests.Response:
    events = '[{"key":"Tap","count":1}]'
    return requests.get(
        f"{url}/i", params={"app_key": key, "device_id": "cly-err", "events": events}, timeout=10
    )


def shape(reply: requests.Response) -> tuple[int, Any, str | None]:
    return reply.status_code, reply.json(), reply.headers.get("Retry-After")


async def test_overload_and_outage_answers_are_in_each_dialects_shape(edge: Edge) -> None:
    # One token per 100 s: however slow this machine, no token comes back during the test.
    settings = edge.settings.with_changes(edge_rate_limit=0.01, edge_rate_burst=1)
    url, stop = await serve_edge(settings)
    try:
        await asyncio.to_thread(posthog_capture, url, edge.sdk_key)
        posthog_limited = await asyncio.to_thread(posthog_capture, url, edge.sdk_key)
        countly_limited = await asyncio.to_thread(countly_request, url, edge.sdk_key)
    finally:
        await stop()
    assert posthog_limited.status_code == 503  # posthog-js retries 5xx only
    assert set(posthog_limited.json()) == {"type", "code", "detail"}
    assert posthog_limited.json()["code"] == "rate_limited"
    assert shape(countly_limited)[:2] == (429, {"result": "Too many requests"})
    assert countly_limited.headers.get("Retry-After")

    await edge.stop_ingest()
    try:
        posthog_down = await asyncio.to_thread(posthog_capture, edge.url, edge.sdk_key)
        countly_down = await asyncio.to_thread(countly_request, edge.url, edge.sdk_key)
    finally:
        await edge.restart_ingest()
    assert shape(posthog_down) == (
        503,
        {"type": "server_error", "code": "unavailable", "detail": "Try again later"},
        "2",
    )
    assert shape(countly_down) == (503, {"result": "Try again later"}, "2")
