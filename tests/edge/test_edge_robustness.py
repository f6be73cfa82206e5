"""Over HTTP, through ingest, identity and query: what an HTTP fuzzer found the edge doing wrong.
A message a translator fails on cost the whole request (a 500); a gzip body cut short was read
as far as it went; 400s spoke Python ("'utf-8' codec can't decode..."); `/o/sdk` read a gzip
body as text."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import requests
import structlog

from services.edge.backend import KEPT_MESSAGE_DEPTH
from services.edge.dialects import countly, posthog, segment
from services.edge.handlers import UNTRANSLATED
from services.edge.limits import (
    MAX_DECOMPRESSED_BYTES,
    MAX_GZIP_MEMBERS,
    BodyTooLarge,
    BodyUnreadable,
    decompress,
)
from tests.conftest import eventually
from tests.edge.conftest import Edge
from tests.edge.test_http import send

# A message nested this deep once reached a path no translator rule expected: json reads it (its
# limit is near 1,000 levels), but a rejected message was cleaned of secrets recursively, which
# 600 levels took past Python's recursion limit. That copy is iterative now (steps.scrub), and
# these messages are listed with their own reasons (test_deep_messages_are_listed_with_their_
# reasons). No input is known to fail a translator any more, so the backstop's tests inject what
# such a bug raises into the translator's per-message function (fail_on), for the same messages.
DEPTH = 600
DEEP_OBJECT = '{"k":' * DEPTH + '"leaf"' + "}" * DEPTH
DEEP_LIST = "[" * DEPTH + '"leaf"' + "]" * DEPTH


async def custom_names(edge: Edge, **lookup: str) -> list[str]:
    profile = await edge.stored_profile(**lookup)
    if profile is None:  # not stored yet
        return []
    found = await edge.events(profile.summary.profile_id)
    return sorted(e.custom.name for e in found if e.HasField("custom"))


async def stored_names(edge: Edge, names: list[str], **lookup: str) -> None:
    async def stored() -> bool:
        return await custom_names(edge, **lookup) == names

    await eventually(stored)


def failures_logged(logs: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    return [
        (e["dialect"], e["count"], e["error"])
        for e in logs
        if e["event"] == "edge_message_untranslated"
    ]


def fail_on(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, marked: Callable[..., bool]
) -> None:
    """Makes `module.name` (a translator's per-message function) raise RecursionError, as the
    recursive copy did, for the calls `marked` picks; the others run as they are."""
    original = getattr(module, name)

    def failing(*args: Any) -> Any:
        if marked(*args):
            raise RecursionError("maximum recursion depth exceeded (injected)")
        return original(*args)

    monkeypatch.setattr(module, name, failing)


def form(url: str, data: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    return requests.post(url, data=data, headers=headers, timeout=10)


# --- 1. A message a translator fails on is rejected alone ----------------------------------


async def test_segment_message_a_translator_fails_on_is_listed_and_its_batch_stored(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on(monkeypatch, segment, "_translate", lambda _, message, *rest: "properties" in message)
    body = (
        '{"writeKey": "KEY", "batch": ['
        '{"type": "track", "anonymousId": "backstop-1", "event": "First", "messageId": "bs-1"},'
        '{"type": "screenview", "anonymousId": "backstop-1", "messageId": "bs-2",'
        ' "properties": DEEP},'
        '{"type": "track", "anonymousId": "backstop-1", "event": "Third", "messageId": "bs-3"}'
        "]}"
    )
    body = body.replace("KEY", edge.sdk_key).replace("DEEP", DEEP_OBJECT)
    failed = UNTRANSLATED.labels("segment")
    before = failed._value.get()
    with structlog.testing.capture_logs() as logs:
        reply = await send(f"{edge.url}/v1/batch", body.encode())

    # As for a batch holding an unknown message type: 200, the good messages stored.
    assert (reply.status_code, reply.json()) == (200, {"success": True})
    await stored_names(edge, ["first", "third"], installation_id="backstop-1")
    (rejected,) = await edge.rejected()
    assert (rejected.reason, rejected.event_id, rejected.installation_id) == (
        "TRANSLATION_FAILED",
        "bs-2",
        "backstop-1",
    )
    assert "RecursionError" in rejected.message
    kept = json.loads(rejected.raw_payload_json)["untranslated"]["message"]
    assert kept == {"type": "screenview", "anonymousId": "backstop-1", "messageId": "bs-2"}
    assert failures_logged(logs) == [("segment", 1, "RecursionError")]
    assert failed._value.get() == before + 1


async def test_posthog_event_a_translator_fails_on_is_listed_and_its_batch_stored(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on(monkeypatch, posthog, "_translate", lambda _, message, *rest: "event" not in message)

    def event(name: str, n: int) -> str:
        return (
            f'{{"event": "{name}", "distinct_id": "ph-backstop",'
            f' "uuid": "0190a5f7-2c4b-7000-8000-00000000000{n}"}}'
        )

    # No event name (refused), properties too deep to clean: the refusal itself fails.
    nameless = (
        '{"distinct_id": "ph-backstop", "uuid": "0190a5f7-2c4b-7000-8000-000000000002",'
        ' "properties": {"deep": DEEP}}'
    ).replace("DEEP", DEEP_OBJECT)
    body = (
        f'{{"api_key": "{edge.sdk_key}", "batch": [{event("first", 1)}, {nameless},'
        f" {event('third', 3)}]}}"
    )
    with structlog.testing.capture_logs() as logs:
        reply = await send(f"{edge.url}/batch/", body.encode())

    assert (reply.status_code, reply.json()) == (200, {"status": 1})
    await stored_names(edge, ["first", "third"], installation_id="ph-backstop")
    (rejected,) = await edge.rejected()
    assert (rejected.reason, rejected.event_id, rejected.installation_id) == (
        "TRANSLATION_FAILED",
        "0190a5f7-2c4b-7000-8000-000000000002",
        "ph-backstop",
    )
    assert failures_logged(logs) == [("posthog", 1, "RecursionError")]


async def test_countly_event_or_request_a_translator_fails_on_is_listed_and_the_rest_stored(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on(monkeypatch, countly, "_one_event", lambda *args: "segmentation" in args[-1])
    fail_on(
        monkeypatch, countly, "_translate_parts", lambda params, *rest: "user_details" in params
    )
    device = "cly-backstop"
    stamp = int(time.time() * 1000)
    requests_json = (
        "["
        '{"device_id": "D", "timestamp": T1, "events": [{"key": "First"}]},'
        '{"device_id": "D", "timestamp": T2, "events":'
        ' [{"key": "Tap"}, {"segmentation": DEEP_OBJECT}, {"key": "Also"}]},'
        '{"device_id": "D", "timestamp": T3, "user_details":'
        ' {"custom": DEEP_LIST}},'
        '{"device_id": "D", "timestamp": T4, "events": [{"key": "Last"}]}'
        "]"
    )
    requests_json = (
        requests_json.replace("DEEP_OBJECT", DEEP_OBJECT)
        .replace("DEEP_LIST", DEEP_LIST)
        .replace('"D"', f'"{device}"')
    )
    for n in range(1, 5):  # the requests' times, in milliseconds as the SDKs send them
        requests_json = requests_json.replace(f"T{n}", str(stamp + n))
    data = {"app_key": edge.sdk_key, "requests": requests_json}
    with structlog.testing.capture_logs() as logs:
        reply = await asyncio.to_thread(requests.post, f"{edge.url}/i/bulk", data=data, timeout=10)

    # Countly's SDKs resend a request not answered 2xx forever: it is answered Success.
    assert (reply.status_code, reply.json()) == (200, {"result": "Success"})
    await stored_names(edge, ["also", "first", "last", "tap"], installation_id=device)
    rejected = await edge.rejected()
    assert sorted((r.reason, r.message.partition(":")[0]) for r in rejected) == [
        ("TRANSLATION_FAILED", "events[1]"),  # the event alone
        ("TRANSLATION_FAILED", "requests[2]"),  # the bulk's request, whose details failed
    ]
    assert {r.installation_id for r in rejected} == {device}
    assert failures_logged(logs) == [("countly", 2, "RecursionError")]


async def test_deep_messages_are_listed_with_their_reasons(edge: Edge) -> None:
    """The messages above, without a fault: each listed with the reason its content calls for,
    its deep part kept as text past KEPT_MESSAGE_DEPTH, its secrets removed at every depth;
    nothing logged as a translation failure."""
    deep_secret = '{"k":' * DEPTH + '{"writeKey": "SECRET"}' + "}" * DEPTH
    segment_body = (
        f'{{"writeKey": "{edge.sdk_key}", "batch": ['
        '{"type": "track", "anonymousId": "deep-1", "event": "First", "messageId": "dp-1"},'
        '{"type": "screenview", "anonymousId": "deep-1", "messageId": "dp-2",'
        f' "properties": {deep_secret}}}]}}'
    )
    nameless = (
        '{"distinct_id": "ph-deep", "uuid": "0190a5f7-2c4b-7000-8000-0000000000d2",'
        f' "properties": {{"deep": {DEEP_OBJECT}}}}}'
    )
    posthog_body = f'{{"api_key": "{edge.sdk_key}", "batch": [{nameless}]}}'
    with structlog.testing.capture_logs() as logs:
        segment_reply = await send(f"{edge.url}/v1/batch", segment_body.encode())
        posthog_reply = await send(f"{edge.url}/batch/", posthog_body.encode())
    assert segment_reply.status_code == posthog_reply.status_code == 200
    await stored_names(edge, ["first"], installation_id="deep-1")

    async def both_listed() -> bool:
        return len(await edge.rejected()) == 2

    await eventually(both_listed)
    reasons = {r.event_id: r for r in await edge.rejected()}
    assert reasons["dp-2"].reason == "MESSAGE_TYPE_UNKNOWN"
    assert reasons["0190a5f7-2c4b-7000-8000-0000000000d2"].reason == "NAME_UNUSABLE"
    assert "SECRET" not in reasons["dp-2"].raw_payload_json
    node: Any = json.loads(reasons["dp-2"].raw_payload_json)["untranslated"]["message"]
    for key in ["properties"] + ["k"] * (KEPT_MESSAGE_DEPTH - 1):
        node = node[key]
    assert isinstance(node, str)  # the part past the depth, as JSON text
    assert node.startswith('{"k":{"k":')
    assert failures_logged(logs) == []


# --- 2. A compressed body cut short, or followed by junk, is refused ------------------------


def test_a_compressed_stream_is_read_whole_or_refused() -> None:
    whole = gzip.compress(b'{"a": 1}')
    assert decompress(whole[:-8] + whole[-8:], "gzip") == b'{"a": 1}'
    for cut in (whole[:-8], whole[:-4], whole[:-1], whole[:12]):
        with pytest.raises(BodyUnreadable, match="truncated"):
            decompress(cut, "gzip")
    with pytest.raises(BodyUnreadable, match="after its end"):
        decompress(whole + b"junk", "gzip")
    # What gzip allows after a member: another member, zero padding.
    assert decompress(whole + gzip.compress(b" ") + b"\0" * 4, "gzip") == b'{"a": 1} '
    with pytest.raises(BodyUnreadable, match="gzip members"):
        decompress(gzip.compress(b"") * (MAX_GZIP_MEMBERS + 1), "gzip")
    with pytest.raises(BodyTooLarge):
        decompress(gzip.compress(b" " * MAX_DECOMPRESSED_BYTES) + gzip.compress(b" "), "gzip")
    deflated = zlib.compress(b'{"a": 1}')
    assert decompress(deflated, "deflate") == b'{"a": 1}'
    with pytest.raises(BodyUnreadable, match="truncated"):
        decompress(deflated[:-4], "deflate")
    with pytest.raises(BodyUnreadable, match="after its end"):
        decompress(deflated + b"\0", "deflate")


async def test_a_gzip_body_without_its_trailer_is_refused_in_every_dialect(edge: Edge) -> None:
    segment = json.dumps(
        {
            "writeKey": edge.sdk_key,
            "batch": [{"type": "track", "anonymousId": "gz-cut", "event": "Cut"}],
        }
    ).encode()
    # Every byte of the JSON is there: only the CRC and length (8 bytes) are missing.
    cut = gzip.compress(segment)[:-8]
    reply = await send(f"{edge.url}/v1/batch", cut, {"Content-Encoding": "gzip"})
    assert (reply.status_code, reply.json()) == (
        400,
        {
            "success": False,
            "code": "invalid_request",
            "message": "The compressed body is truncated",
        },
    )
    junk = await send(
        f"{edge.url}/v1/batch", gzip.compress(segment) + b"junk", {"Content-Encoding": "gzip"}
    )
    assert (junk.status_code, junk.json()) == (
        400,
        {
            "success": False,
            "code": "invalid_request",
            "message": "The compressed body has bytes after its end",
        },
    )

    posthog = json.dumps(
        {"api_key": edge.sdk_key, "batch": [{"event": "Cut", "distinct_id": "gz-cut"}]}
    ).encode()
    truncated = {
        "type": "validation_error",
        "code": "invalid_payload",
        "detail": "The compressed body is truncated",
    }
    for path, headers in (
        ("/batch/?compression=gzip-js", {}),  # posthog-js's parameter
        ("/e/", {"Content-Type": "text/plain"}),  # posthog-js's default: gzip, unannounced
        ("/batch/", {"Content-Encoding": "gzip"}),
    ):
        reply = await send(f"{edge.url}{path}", gzip.compress(posthog)[:-8], headers)
        assert (reply.status_code, reply.json()) == (400, truncated), path

    countly = f"app_key={edge.sdk_key}&device_id=gz-cut&events=%5B%7B%22key%22%3A%22Cut%22%7D%5D"
    reply = await asyncio.to_thread(
        form, f"{edge.url}/i", gzip.compress(countly.encode())[:-8], {"Content-Encoding": "gzip"}
    )
    assert (reply.status_code, reply.json()) == (
        400,
        {"result": "The compressed body is truncated"},
    )
    assert await edge.rejected() == []
    assert await custom_names(edge, installation_id="gz-cut") == []

    # Two gzip members (what `cat a.gz b.gz` makes) are one body, as gzip reads them.
    half = len(segment) // 2
    members = gzip.compress(segment[:half]) + gzip.compress(segment[half:])
    reply = await send(f"{edge.url}/v1/batch", members, {"Content-Encoding": "gzip"})
    assert (reply.status_code, reply.json()) == (200, {"success": True})
    await stored_names(edge, ["cut"], installation_id="gz-cut")


# --- 3. A 400 says what is wrong in the edge's words, never Python's ------------------------


async def test_unreadable_bodies_are_refused_in_the_edge_s_own_words(edge: Edge) -> None:
    answers: list[str] = []

    async def refused(
        path: str, data: bytes, expected: str, headers: dict[str, str] | None = None
    ) -> None:
        reply = await send(f"{edge.url}{path}", data, headers)
        assert reply.status_code == 400, (path, reply.text)
        body = reply.json()
        message = body.get("message") or body.get("detail") or body.get("result")
        assert message == expected, path
        answers.append(reply.text)

    await refused(
        "/v1/batch",
        b'{"writeKey": "k", "batch": ["\xff"]}',
        "The body is not valid UTF-8 (byte 29)",
    )
    await refused(
        "/v1/batch",
        b'{"writeKey": "k",\n "batch": [}',
        "The body is not valid JSON (line 2, column 12)",
    )
    urlencoded = {"Content-Type": "application/x-www-form-urlencoded"}
    await refused("/batch/", b"data=\xfe\xff", "The body is not valid UTF-8 (byte 5)", urlencoded)
    # posthog-js's form: base64 JSON in `data`; here not base64 (not even ASCII), or not JSON.
    await refused("/batch/", b"data=%C3%A9", "The data field is not base64", urlencoded)
    await refused(
        "/batch/",
        b"data=" + b"&x=1" * 30,
        "The form has too many fields",
        urlencoded,
    )
    await refused("/e/", b"data=e3g", "The body is not valid JSON (line 1, column 2)", urlencoded)
    await refused(
        "/i", b"app_key=k&device_id=\xff", "The body is not valid UTF-8 (byte 20)", urlencoded
    )
    await refused(
        "/i", b'{"app_key": "k", "device_id": }', "The body is not valid JSON (line 1, column 31)"
    )
    await refused(
        "/v1/batch", b"not gzip", "Unsupported content encoding 'br'", {"Content-Encoding": "br"}
    )
    for answer in answers:
        assert "codec" not in answer
        assert "Expecting" not in answer
        assert "position" not in answer


# --- 4. Countly's /o/sdk reads its body as /i does ------------------------------------------


async def test_countly_sdk_read_api_decodes_its_body_as_i_does(edge: Edge) -> None:
    url = f"{edge.url}/o/sdk"
    gzipped = {"Content-Encoding": "gzip"}

    async def post(data: bytes, headers: dict[str, str] | None = None) -> requests.Response:
        return await asyncio.to_thread(form, url, data, headers)

    config = f"method=sc&app_key={edge.sdk_key}&device_id=d-1".encode()
    reply = await post(gzip.compress(config), gzipped)
    assert (reply.status_code, reply.json()) == (200, {})
    enrol = f"method=ab&keys=%5B%22x%22%5D&app_key={edge.sdk_key}&device_id=d-1".encode()
    reply = await post(zlib.compress(enrol), {"Content-Encoding": "deflate"})
    assert (reply.status_code, reply.json()) == (200, {"result": "Success"})

    reply = await post(gzip.compress(config)[:-8], gzipped)
    assert (reply.status_code, reply.json()) == (
        400,
        {"result": "The compressed body is truncated"},
    )
    # The limits of /i: 10 MB decompressed...
    bomb = gzip.compress(config + b"&pad=" + b"x" * MAX_DECOMPRESSED_BYTES)
    reply = await post(bomb, gzipped)
    assert reply.status_code == 400
    assert reply.json()["result"].startswith("Request too large")
    # ... and its readings: a JSON body, whose `method` may be no text at all.
    reply = await asyncio.to_thread(
        requests.post, url, json={"method": ["ab"], "app_key": edge.sdk_key}, timeout=10
    )
    assert (reply.status_code, reply.json()) == (
        400,
        {"result": "This server offers no such SDK method"},
    )
    reply = await post(b"method=sc&device_id=\xff")
    assert (reply.status_code, reply.json()) == (
        400,
        {"result": "The body is not valid UTF-8 (byte 20)"},
    )
    assert await edge.rejected() == []
