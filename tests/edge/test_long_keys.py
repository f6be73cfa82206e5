"""A key far longer than any the suite issues is an unknown key in every dialect (401; Countly's
"App does not exist"), not an overload: sent on, a key of 8 KB or more came back from gRPC as
RESOURCE_EXHAUSTED (its metadata limit), which the edge answered 429 or 503 with Retry-After,
and the SDKs resent forever."""

from __future__ import annotations

import asyncio

import pytest
import requests

from profiles.client import MAX_SENDABLE_KEY_LENGTH
from tests.edge.conftest import Edge


@pytest.mark.parametrize("length", [MAX_SENDABLE_KEY_LENGTH + 1, 9_000, 20_000])
async def test_an_overlong_key_is_an_unknown_key_in_every_dialect(edge: Edge, length: int) -> None:
    key = "prf_" + "x" * (length - 4)

    def send_all() -> list[tuple[int, object]]:
        segment = requests.post(
            f"{edge.url}/v1/batch",
            json={"writeKey": key, "batch": [{"type": "track", "anonymousId": "a", "event": "T"}]},
            timeout=10,
        )
        posthog = requests.post(
            f"{edge.url}/batch/",
            json={"api_key": key, "batch": [{"event": "T", "distinct_id": "d"}]},
            timeout=10,
        )
        countly = requests.post(
            f"{edge.url}/i",
            data={"app_key": key, "device_id": "d", "begin_session": "1"},
            timeout=10,
        )
        return [(r.status_code, r.json()) for r in (segment, posthog, countly)]

    segment, posthog, countly = await asyncio.to_thread(send_all)
    assert segment == (
        401,
        {"success": False, "code": "invalid_write_key", "message": "Invalid write key"},
    )
    assert posthog[0] == 401
    assert posthog[1]["code"] == "invalid_api_key"  # type: ignore[index]
    assert countly == (400, {"result": "App does not exist"})
