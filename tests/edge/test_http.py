"""What every dialect shares over HTTP: size limits before reading, gzip bombs, bad JSON, keys,
rate limiting, CORS preflight, /healthz, and keys never in a log line."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import pytest
import requests
import structlog

from tests.conftest import eventually
from tests.edge.conftest import Edge, serve_edge


def post(url: str, data: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}, timeout=10
    )


async def send(url: str, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await asyncio.to_thread(post, url, data, headers)


def segment_batch(key: str, count: int = 1, padding: int = 0) -> dict[str, Any]:
    return {
        "writeKey": key,
        "batch": [
            {
                "type": "track",
                "messageId": f"x-{i}",
                "anonymousId": "anon-limits",
                "event": "Tap",
                "properties": {"pad": "p" * padding},
            }
            for i in range(count)
        ],
    }


async def test_segment_refuses_an_oversized_batch_or_message_with_400(edge: Edge) -> None:
    big = await send(f"{edge.url}/v1/batch", segment_batch(edge.sdk_key, 20, 30_000))
    assert big.status_code == 400
    assert big.json()["success"] is False
    single = await send(
        f"{edge.url}/v1/track",
        {
            "writeKey": edge.sdk_key,
            "anonymousId": "a",
            "event": "e",
            "properties": {"p": "x" * 40_000},
        },
    )
    assert single.status_code == 400


async def test_an_oversized_message_inside_a_batch_is_rejected_and_listed(edge: Edge) -> None:
    body = segment_batch(edge.sdk_key, 1, 40_000)
    reply = await send(f"{edge.url}/v1/batch", body)
    assert reply.status_code == 200
    rejected = await edge.rejected()
    assert [r.reason for r in rejected] == ["MESSAGE_TOO_LARGE"]


async def test_malformed_json_unknown_keys_and_missing_keys_are_refused(edge: Edge) -> None:
    assert (await send(f"{edge.url}/v1/batch", b"{not json")).status_code == 400
    assert (await send(f"{edge.url}/batch/", b"[1, 2")).status_code == 400
    assert (await send(f"{edge.url}/v1/batch", segment_batch(""))).status_code == 401
    unknown = await send(f"{edge.url}/v1/batch", segment_batch("not-a-key"))
    assert unknown.status_code == 401
    posthog = await send(
        f"{edge.url}/batch/",
        {"api_key": "not-a-key", "batch": [{"event": "x", "distinct_id": "d"}]},
    )
    assert posthog.status_code == 401
    assert posthog.json()["code"] == "invalid_api_key"
    no_key = await send(f"{edge.url}/batch/", {"batch": [{"event": "x", "distinct_id": "d"}]})
    assert no_key.status_code == 401
    assert no_key.json()["code"] == "missing_api_key"
    read_key = await send(f"{edge.url}/v1/batch", segment_batch(edge.project.keys["read"]))
    assert read_key.status_code == 403
    assert read_key.json()["success"] is False
    assert await edge.rejected() == []


async def test_a_key_that_may_not_send_is_told_so_in_each_dialect_s_shape(edge: Edge) -> None:
    read = edge.project.keys["read"]
    posthog = await send(f"{edge.url}/batch/", {"api_key": read, "batch": [{"event": "x"}]})
    assert posthog.status_code == 403
    assert posthog.json()["type"] == "authentication_error"
    countly = await asyncio.to_thread(
        requests.get,
        f"{edge.url}/i",
        params={"app_key": read, "device_id": "d", "begin_session": "1"},
        timeout=10,
    )
    assert countly.status_code == 403
    assert "SDK key" in countly.json()["result"]


async def test_a_body_holding_no_events_is_refused_not_stored_as_nothing(edge: Edge) -> None:
    key = edge.sdk_key
    for body in ({"writeKey": key, "batch": "x"}, {"writeKey": key, "nobatch": True}):
        reply = await send(f"{edge.url}/v1/batch", body)
        assert reply.status_code == 400, body
        assert reply.json() == {
            "success": False,
            "code": "invalid_request",
            "message": "The body has no batch list",
        }
    for body in ({"api_key": key, "batch": "x"}, {"api_key": key}):
        reply = await send(f"{edge.url}/batch/", body)
        assert reply.status_code == 400, body
        assert reply.json()["code"] == "invalid_payload"
    # Empty lists are nothing to store, and no error; a key on a list's first event is read.
    assert (await send(f"{edge.url}/v1/batch", {"writeKey": key, "batch": []})).status_code == 200
    assert (await send(f"{edge.url}/batch/", {"api_key": key, "batch": []})).status_code == 200
    listed = [{"event": "Tap", "distinct_id": "d-list", "api_key": key}]
    assert (await send(f"{edge.url}/batch/", listed)).status_code == 200
    assert await edge.rejected() == []


async def test_a_request_with_nothing_to_store_is_still_refused_for_a_wrong_key(
    edge: Edge,
) -> None:
    read = edge.project.keys["read"]
    for key, status in (("not-a-key", 401), (read, 403), (edge.sdk_key, 200)):
        segment_reply = await send(f"{edge.url}/v1/batch", {"writeKey": key, "batch": []})
        assert segment_reply.status_code == status, key
        posthog_reply = await send(f"{edge.url}/batch/", {"api_key": key, "batch": []})
        assert posthog_reply.status_code == status, key
    for params in (
        {"app_key": "nope", "device_id": "d1"},
        {"app_key": "nope", "device_id": "d1", "hc": '{"el":0}', "metrics": '{"_os":"Linux"}'},
    ):
        countly = await asyncio.to_thread(requests.get, f"{edge.url}/i", params=params, timeout=10)
        assert countly.status_code == 400, params
        assert countly.json() == {"result": "App does not exist"}
    # countly-sdk-web's health check with the right key: answered, and nothing stored.
    health_check = {"app_key": edge.sdk_key, "device_id": "d-hc", "hc": '{"el":0}', "tz": "60"}
    countly = await asyncio.to_thread(
        requests.get, f"{edge.url}/i", params=health_check, timeout=10
    )
    assert countly.json() == {"result": "Success"}
    assert await edge.rejected() == []


@pytest.mark.parametrize("key", ["é", "prf_zz\x00", "a\nb"])
async def test_a_key_no_header_can_carry_is_an_unknown_key_in_each_dialect(
    edge: Edge, key: str
) -> None:
    """gRPC metadata carries printable ASCII only: such a key failed in the edge's own gRPC
    client (500, which posthog-js retries forever) instead of being told it is unknown."""
    segment = await send(f"{edge.url}/v1/batch", segment_batch(key))
    assert segment.status_code == 401
    for path in ("/batch/", "/capture/"):
        posthog = await send(
            f"{edge.url}{path}",
            {"api_key": key, "event": "x", "distinct_id": "d", "batch": [{"event": "x"}]},
        )
        assert posthog.status_code == 401, path
        assert posthog.json()["code"] == "invalid_api_key"
    for method in ("get", "post"):
        countly = await asyncio.to_thread(
            getattr(requests, method),
            f"{edge.url}/i",
            params={"app_key": key, "device_id": "d", "begin_session": "1"},
            timeout=10,
        )
        assert countly.status_code == 400, method
        assert countly.json() == {"result": "App does not exist"}
    bulk = await asyncio.to_thread(
        requests.post,
        f"{edge.url}/i/bulk",
        json={"requests": [{"device_id": "bk1", "app_key": key, "events": [{"key": "a"}]}]},
        timeout=10,
    )
    assert bulk.status_code < 500
    assert await edge.rejected() == []


async def test_a_gzip_bomb_stops_at_ten_megabytes(edge: Edge) -> None:
    bomb = gzip.compress(b"[" + b" " * (11 * 1024 * 1024) + b"]")
    assert len(bomb) < 5 * 1024 * 1024
    reply = await send(f"{edge.url}/batch/", bomb, {"Content-Encoding": "gzip"})
    assert reply.status_code == 413
    corrupt = await send(f"{edge.url}/batch/", b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"})
    assert corrupt.status_code == 400


async def test_posthog_js_gzip_without_a_content_encoding_is_read(edge: Edge) -> None:
    # posthog-js's default: gzip bytes sent as text/plain, no Content-Encoding, no ?compression=.
    body = {
        "api_key": edge.sdk_key,
        "batch": [{"event": "Button Clicked", "distinct_id": "ph-gzip", "uuid": "gz-1"}],
    }
    reply = await send(
        f"{edge.url}/e/", gzip.compress(json.dumps(body).encode()), {"Content-Type": "text/plain"}
    )
    assert reply.status_code == 200, reply.text
    profile = await edge.profile(installation_id="ph-gzip")
    names = [e.custom.name for e in await edge.events(profile.summary.profile_id)]
    assert "button_clicked" in names


async def test_a_posthog_body_over_five_megabytes_is_refused_before_being_read(edge: Edge) -> None:
    reply = await send(f"{edge.url}/batch/", b"[" + b" " * (5 * 1024 * 1024 + 10) + b"]")
    assert reply.status_code == 413


async def test_a_key_over_its_rate_is_answered_429_with_retry_after(edge: Edge) -> None:
    # One token per 100 s: however slow this machine, no token comes back during the test.
    settings = edge.settings.with_changes(edge_rate_limit=0.01, edge_rate_burst=2)
    url, stop = await serve_edge(settings)
    try:
        statuses = []
        for _ in range(3):
            reply = await send(f"{url}/v1/batch", segment_batch(edge.sdk_key))
            statuses.append(reply.status_code)
        assert statuses == [200, 200, 429]
        assert 1 <= int(reply.headers["Retry-After"]) <= 100
        other_key = await send(f"{url}/v1/batch", segment_batch("another-key"))
        assert other_key.status_code == 401  # its own bucket: limited later, refused for its key
        # PostHog's SDKs drop a 429 (posthog-js retries 5xx only): theirs is 503, kept.
        posthog = {"api_key": edge.sdk_key, "batch": [{"event": "e", "distinct_id": "d"}]}
        limited = await send(f"{url}/batch/", posthog)
        assert limited.status_code == 503
        assert limited.json()["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 100
    finally:
        await stop()


async def test_browsers_get_a_cors_preflight_answer(edge: Edge) -> None:
    def preflight() -> requests.Response:
        return requests.options(
            f"{edge.url}/i/v0/e/",
            headers={
                "Origin": "https://shop.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
            timeout=10,
        )

    reply = await asyncio.to_thread(preflight)
    assert reply.status_code == 200
    assert reply.headers["Access-Control-Allow-Origin"] in ("*", "https://shop.example")
    assert "POST" in reply.headers["Access-Control-Allow-Methods"]
    simple = await send(
        f"{edge.url}/v1/batch", segment_batch(edge.sdk_key), {"Origin": "https://shop.example"}
    )
    assert simple.headers["Access-Control-Allow-Origin"] == "*"


async def test_healthz_is_ready_only_while_ingest_answers(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stopped ingest is found unready once the health check's wait for a connection (2 s in
    # production, for a channel still backing off after an outage) runs out: a shorter wait
    # gives the same answers.
    monkeypatch.setattr("services.edge.backend.HEALTH_TIMEOUT_SECONDS", 0.5)

    def health(url: str) -> int:
        return requests.get(f"{url}/healthz", timeout=10).status_code

    assert await asyncio.to_thread(health, edge.url) == 200
    await edge.stop_ingest()
    assert await asyncio.to_thread(health, edge.url) == 503
    await edge.restart_ingest()

    async def ready_again() -> bool:
        return await asyncio.to_thread(health, edge.url) == 200

    await eventually(ready_again)


async def test_refusals_are_logged_without_keys_or_query_strings(edge: Edge) -> None:
    with structlog.testing.capture_logs() as logs:
        await send(f"{edge.url}/v1/batch?writeKey={edge.sdk_key}", segment_batch("bad-key"))
        await send(f"{edge.url}/batch/?token=secret-token", b"{oops")
    assert [entry["status"] for entry in logs if entry["event"] == "edge_request_refused"] == [
        401,
        400,
    ]
    text = repr(logs)
    assert "bad-key" not in text
    assert "secret-token" not in text
    assert edge.sdk_key not in text


async def test_analytics_js_short_paths_and_text_plain_bodies_are_segment_calls(edge: Edge) -> None:
    message = {"writeKey": edge.sdk_key, "anonymousId": "anon-ajs", "event": "Clicked"}
    reply = await send(f"{edge.url}/v1/t", message, {"Content-Type": "text/plain"})
    assert reply.status_code == 200

    async def stored() -> bool:
        profile = await edge.profile(installation_id="anon-ajs")
        events = await edge.events(profile.summary.profile_id)
        return [e.custom.name for e in events if e.HasField("custom")] == ["clicked"]

    await eventually(stored)


async def test_a_hostile_query_string_is_refused_before_it_is_parsed(edge: Edge) -> None:
    query = "&".join(f"x{i}=1" for i in range(2000))
    reply = await send(f"{edge.url}/batch/?{query}", {"api_key": edge.sdk_key, "batch": []})
    assert reply.status_code == 400


async def test_json_nested_past_reading_is_400_in_every_dialect(edge: Edge) -> None:
    deep = '{"a":' * 1000 + "1" + "}" * 1000
    segment = (
        '{"writeKey": "KEY", "batch": [{"type": "track", "anonymousId": "d", "event": "e",'
        ' "properties": DEEP}]}'.replace("KEY", edge.sdk_key).replace("DEEP", deep)
    )
    reply = await send(f"{edge.url}/v1/batch", segment.encode())
    assert (reply.status_code, reply.json()["success"]) == (400, False)
    posthog = '{"api_key": "' + edge.sdk_key + '", "batch": [' + "[" * 5000 + "]" * 5000 + "]}"
    reply = await send(f"{edge.url}/batch/", posthog.encode())
    assert (reply.status_code, reply.json()["code"]) == (400, "invalid_payload")
    countly = await asyncio.to_thread(
        requests.get,
        f"{edge.url}/i",
        params={"app_key": edge.sdk_key, "device_id": "d", "events": "[" * 5000 + "]" * 5000},
        timeout=10,
    )
    assert countly.status_code == 200  # Countly's way: the parameter is listed as invalid
    assert [r.reason for r in await edge.rejected()] == ["PARAMETER_INVALID"]


async def test_a_lone_surrogate_is_read_as_a_replacement_character(edge: Edge) -> None:
    """An unpaired UTF-16 escape (which no store can hold) reads as U+FFFD, as Go's JSON does:
    the message is stored, and so is the good one beside it."""
    body = (
        '{"writeKey": "KEY", "batch": ['
        '{"type": "track", "messageId": "m-1", "anonymousId": "anon-sur", "event": "Good"},'
        '{"type": "track", "messageId": "m-2", "anonymousId": "anon-sur", "event": "Odd",'
        ' "properties": {"s": "a\\ud800b"}}]}'
    ).replace("KEY", edge.sdk_key)
    reply = await send(f"{edge.url}/v1/batch", body.encode())
    assert reply.status_code == 200
    posthog = (
        '{"api_key": "KEY", "batch": [{"event": "Tap", "distinct_id": "ph-\\udc00",'
        ' "uuid": "0190a5f7-2c4b-7000-8000-0000000000aa"}]}'
    ).replace("KEY", edge.sdk_key)
    assert (await send(f"{edge.url}/batch/", posthog.encode())).status_code == 200

    async def stored() -> bool:
        profile = await edge.stored_profile(installation_id="anon-sur")
        if profile is None:  # not stored yet
            return False
        return len(await edge.events(profile.summary.profile_id)) >= 2

    await eventually(stored)
    profile = await edge.profile(installation_id="anon-sur")
    names = {
        e.custom.name: dict(e.custom.attributes)
        for e in await edge.events(profile.summary.profile_id)
        if e.HasField("custom")
    }
    assert set(names) == {"good", "odd"}
    assert names["odd"]["s"].string_value == "a\ufffdb"
    assert (await edge.profile(installation_id="ph-\ufffd")).summary.profile_id
    assert await edge.rejected() == []


async def test_countly_web_s_server_config_request_is_answered_as_countly_does(
    edge: Edge,
) -> None:
    # countly-sdk-web asks for it on every page load; an empty object leaves its settings be.
    query = {"method": "sc", "app_key": edge.sdk_key, "device_id": "d-1", "sdk_name": "web"}
    answer = await asyncio.to_thread(requests.get, f"{edge.url}/o/sdk", params=query, timeout=10)
    assert (answer.status_code, answer.json()) == (200, {})
    other = await asyncio.to_thread(
        requests.get, f"{edge.url}/o/sdk", params={**query, "method": "nope"}, timeout=10
    )
    assert other.status_code == 400
    assert "result" in other.json()
