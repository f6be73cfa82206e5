"""What segment-analytics-python reads from the edge's error answers: every status the edge
answers Segment's SDKs with an error carries the `code` and `message` the SDK's request.post
reads (without them it logs "Unknown error: [503] Service Unavailable" and keeps only the
status)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from segment.analytics.request import APIError, post

from tests.edge.conftest import Edge, serve_edge


async def sdk_error(url: str, key: str, **body: Any) -> APIError:
    """The APIError the SDK's own request function raises for what the edge answered."""
    batch = body.pop("batch", [{"type": "track", "anonymousId": "anon-err", "event": "Tap"}])
    with pytest.raises(APIError) as raised:
        await asyncio.to_thread(post, key, host=url, timeout=10, batch=batch, **body)
    return raised.value


async def test_every_segment_error_answer_carries_the_code_and_message_the_sdk_reads(
    edge: Edge,
) -> None:
    invalid = await sdk_error(edge.url, edge.sdk_key, batch="not a list")
    assert (invalid.status, invalid.code, invalid.message) == (
        400,
        "invalid_request",
        "The body has no batch list",
    )

    with structlog.testing.capture_logs() as refused_logs:
        unknown_key = await sdk_error(edge.url, "not-a-key")
    assert (unknown_key.status, unknown_key.code, unknown_key.message) == (
        401,
        "invalid_write_key",
        "Invalid write key",
    )

    read_key = await sdk_error(edge.url, edge.project.keys["read"])
    assert (read_key.status, read_key.code) == (403, "forbidden")
    assert "SDK key" in read_key.message

    # One token per 100 s: however slow this machine, no token comes back during the test.
    settings = edge.settings.with_changes(edge_rate_limit=0.01, edge_rate_burst=1)
    url, stop = await serve_edge(settings)
    try:
        await asyncio.to_thread(post, edge.sdk_key, host=url, timeout=10, batch=[])
        limited = await sdk_error(url, edge.sdk_key)
    finally:
        await stop()
    assert (limited.status, limited.code) == (429, "rate_limited")

    await edge.stop_ingest()
    try:
        with structlog.testing.capture_logs() as outage_logs:
            unavailable = await sdk_error(edge.url, edge.sdk_key)
    finally:
        await edge.restart_ingest()
    assert (unavailable.status, unavailable.code, unavailable.message) == (
        503,
        "unavailable",
        "Try again later",
    )
    assert unavailable.response is not None
    assert unavailable.response.headers["Retry-After"] == "2"

    # The outage is the operator's business (a warning); a bad key is the client's (info).
    assert backend_failures(outage_logs) == [("warning", "unavailable")]
    assert backend_failures(refused_logs) == [("info", "unauthenticated")]


def backend_failures(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["log_level"], e["kind"]) for e in logs if e["event"] == "edge_backend_failed"]
