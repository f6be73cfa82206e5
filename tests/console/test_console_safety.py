"""What the console does when things go wrong: revoked keys, forged forms, down or slow
services, reconnecting live feeds and the cap on upstream watches."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from playwright.async_api import expect

from profiles.client import open_channel
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from services.console.app import build_app
from services.console.live import LiveHub
from shared.ports import free_port
from shared.tenancy import TenancyRepository
from tests.console.conftest import ConsoleSuite, start_console
from tests.console.test_console_pages import identified_profile, query, sign_in, track
from tests.support.ingest import custom_event

COOKIE = "profiles_console_session"


async def session_cookie(page: Any) -> str:
    return next(c["value"] for c in await page.context.cookies() if c["name"] == COOKIE)


async def sse_frames(
    base_url: str, path: str, cookie: str, headers: dict[str, str] | None = None
) -> AsyncIterator[dict[str, str]]:
    """The frames of a server-sent event stream, read over a plain HTTP/1.1 connection."""
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", f"Cookie: {COOKIE}={cookie}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    try:
        status = await reader.readline()
        assert b" 200 " in status, status
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        buffer = ""
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)  # chunked encoding
            if size == 0:
                return
            buffer += (await reader.readexactly(size + 2))[:-2].decode()
            while "\n\n" in buffer:
                frame, buffer = buffer.split("\n\n", 1)
                fields: dict[str, str] = {}
                for line in frame.splitlines():
                    name, _, value = line.partition(": ")
                    if name and not name.startswith(":"):
                        fields[name] = value
                fields.setdefault("event", "message")
                if "data" in fields:
                    yield fields
    finally:
        writer.close()


async def test_a_key_revoked_meanwhile_signs_the_person_out(
    page: Any, console_suite: ConsoleSuite
) -> None:
    pool = await asyncpg.create_pool(console_suite.settings.database_url, min_size=1, max_size=1)
    try:
        tenancy = TenancyRepository(pool)
        issued = await tenancy.create_key(console_suite.project.project_id, "read", "console")
        await page.goto(console_suite.url + "/signin")
        await page.get_by_label("Project key").fill(issued.plain_key)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
        await tenancy.revoke_key(issued.key.key_id)
    finally:
        await pool.close()
    # The services cache a verified key for a few seconds: reload until the refusal arrives.
    async with asyncio.timeout(20):
        while "/signin" not in page.url:
            await page.goto(console_suite.url + "/users")
    await expect(page.get_by_role("status")).to_contain_text(
        "The key you signed in with is no longer valid (revoked or unknown)"
    )
    assert "next=%2Fusers" in page.url
    assert COOKIE not in {c["name"] for c in await page.context.cookies()}


async def test_forged_sign_in_and_sign_out_forms_are_refused(
    page: Any, console_suite: ConsoleSuite
) -> None:
    forged = await page.request.post(
        console_suite.url + "/signin",
        form={"key": console_suite.project.keys["read"], "csrf_token": "guessed"},
        max_redirects=0,
    )
    assert forged.status == 403
    assert COOKIE not in {c["name"] for c in await page.context.cookies()}

    await sign_in(page, console_suite, land=False)
    refused = await page.request.post(
        console_suite.url + "/signout", form={"csrf_token": "guessed"}, max_redirects=0
    )
    assert refused.status == 403
    still = await page.request.get(console_suite.url + "/users", max_redirects=0)
    assert still.status == 200


def _blackhole() -> socket.socket:
    """A port that accepts connections and never answers: a hung service."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def test_a_down_or_slow_service_is_named_and_the_rest_keeps_working(
    page: Any, console_suite: ConsoleSuite
) -> None:
    hung = _blackhole()
    try:
        down = console_suite.settings.with_changes(
            addresses={**console_suite.addresses, "segments": f"127.0.0.1:{free_port()}"}
        )
        slow = console_suite.settings.with_changes(
            addresses={**console_suite.addresses, "segments": f"127.0.0.1:{hung.getsockname()[1]}"}
        )
        async with (
            start_console(build_app(down)) as down_url,
            start_console(build_app(slow, call_timeout=1.0)) as slow_url,
        ):
            for url, message in ((down_url, "unavailable"), (slow_url, "slow")):
                await sign_in(page, ConsoleSuite(url, *_rest(console_suite)), land=False)
                await page.goto(url + "/segments")
                await expect(page.get_by_role("heading", level=1)).to_have_text(
                    f"The segments service is {message}"
                )
                await page.goto(url + "/users")
                await expect(page.get_by_role("heading", name="Users")).to_be_visible()
                await expect(page.locator("table.users tbody tr").first).to_be_visible()
                await expect(page.get_by_role("status")).to_contain_text(
                    "segments service is not answering"
                )
    finally:
        hung.close()


@asynccontextmanager
async def _answering_late(upstream: str, delay_s: float) -> AsyncIterator[str]:
    """A TCP proxy to `upstream` whose answers reach the client `delay_s` late (requests go at
    once): a service that takes that long over every call. Yields its address."""
    host, port = upstream.rsplit(":", 1)
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        # Each chunk goes on `delay` after it was read, while the next ones are read: a chunk
        # waiting behind the one before would add the delay again for every chunk of an
        # answer (a new HTTP/2 connection's settings, then the answer's frames).
        loop = asyncio.get_running_loop()
        late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await late.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not chunk:
                    return
                writer.write(chunk)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while chunk := await reader.read(65536):
                late.put_nowait((loop.time() + delay, chunk))
            late.put_nowait((loop.time() + delay, b""))
            await delivering
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            delivering.cancel()
            with suppress(ConnectionError, asyncio.CancelledError):
                await delivering  # its failure (the client gone) taken here, not logged
            writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, int(port))
        for task in (
            asyncio.ensure_future(pipe(client_r, server_w, 0.0)),
            asyncio.ensure_future(pipe(server_r, client_w, delay_s)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()


async def test_creating_a_segment_waits_for_the_service_beyond_a_page_s_deadline(
    page: Any, console_suite: ConsoleSuite
) -> None:
    """A segment over a large project takes seconds to create (its members evaluated, stored
    and announced); the console waited only as long as for a page's read, told the person the
    service was slow, and the service created it anyway."""
    name = f"Slow {uuid.uuid4().hex[:6]}"
    async with _answering_late(console_suite.addresses["segments"], 1.5) as late:
        settings = console_suite.settings.with_changes(
            addresses={**console_suite.addresses, "segments": late}
        )
        async with start_console(build_app(settings, call_timeout=1.0)) as url:
            await sign_in(page, ConsoleSuite(url, *_rest(console_suite)), "admin", land=False)
            await page.goto(url + "/segments/new")
            await page.get_by_label("Name", exact=True).fill(name)
            await page.locator("#c0-custom_name").fill("plan")
            await page.locator("#c0-value").fill("gold")
            await page.get_by_role("button", name="Create segment").click()
            await expect(page).to_have_url(re.compile(r"/segments\?created=segment:"))
    async with open_channel(
        console_suite.addresses["segments"], console_suite.project.keys["read"]
    ) as channel:
        listed = await segments_grpc.SegmentsServiceStub(channel).ListSegments(
            segments_pb.ListSegmentsRequest(page_size=100)
        )
    assert [s.display_name for s in listed.segments].count(name) == 1


def _rest(suite: ConsoleSuite) -> tuple[Any, ...]:
    return (suite.project, suite.addresses, suite.settings)


class ErrorLog(logging.Handler):
    """The errors logged while attached: by the server (uvicorn's "Exception in ASGI
    application"), by asyncio (a task's exception never retrieved), or reaching the root."""

    LOGGERS = ("uvicorn.error", "asyncio", "")

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def attach(self) -> None:
        """Once uvicorn runs: its start configures its loggers afresh, removing handlers."""
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def __enter__(self) -> ErrorLog:
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


async def test_leaving_the_segments_page_logs_no_error(
    page: Any, console_suite: ConsoleSuite
) -> None:
    with ErrorLog() as errors:
        # Stopping the console (leaving this block) waits for every request it serves to end.
        async with start_console(build_app(console_suite.settings)) as url:
            errors.attach()
            await sign_in(page, ConsoleSuite(url, *_rest(console_suite)), land=False)
            await page.goto(url + "/segments")
            await expect(page.locator("#segment-status")).to_contain_text("Live")
            await expect(page.locator("#segment-changes tbody tr").first).to_be_visible()
            # The live table's stream now waits for the next change: the browser leaves.
            await page.goto(url + "/overview")
            await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    assert errors.messages == []


async def test_a_reconnecting_live_feed_rereads_what_it_missed_and_shows_nothing_twice(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await reconnect_and_follow(page, console_suite)


async def test_a_reconnecting_live_feed_rereads_only_once_the_upstream_watch_is_live(
    page: Any, console_suite: ConsoleSuite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Query's watch subscribes a moment after the console asks for it (seen under load): an
    event stored after the re-read but before that subscription would reach neither, so the
    feed re-reads once the watch has started."""
    pump = LiveHub._pump

    async def slow_pump(self: LiveHub, *args: Any) -> None:
        await asyncio.sleep(1.0)
        await pump(self, *args)

    monkeypatch.setattr(LiveHub, "_pump", slow_pump)
    await reconnect_and_follow(page, console_suite)


async def reconnect_and_follow(page: Any, console_suite: ConsoleSuite) -> None:
    """Reconnects with the Last-Event-ID of a moment before an event stored while away, then,
    once that event came, stores another: each must come exactly once."""
    profile = await identified_profile(console_suite)
    installation = profile.installations[0].installation_id
    await sign_in(page, console_suite, land=False)
    cookie = await session_cookie(page)
    missed_time = datetime.now(UTC).replace(microsecond=0)
    missed = custom_event(installation, name="missed_while_away", time=missed_time)
    await track(console_suite, missed)
    # The browser's EventSource sends the last event time it saw as Last-Event-ID.
    last_seen = (missed_time - timedelta(seconds=1)).isoformat()
    path = f"/live/profiles/{profile.summary.profile_id}"
    seen: list[str] = []
    live = custom_event(installation, name="after_reconnect", time=datetime.now(UTC))
    async with asyncio.timeout(20):
        frames = sse_frames(console_suite.url, path, cookie, {"Last-Event-ID": last_seen})
        async for frame in frames:
            if frame["event"] != "message":
                continue
            item = json.loads(frame["data"])
            seen.append(item.get("event_id", ""))
            if item.get("event_id") == missed.event_id:
                live.event_time.FromDatetime(datetime.now(UTC))
                await track(console_suite, live)
            if item.get("event_id") == live.event_id:  # another test's may be re-read too
                break
        await frames.aclose()
    assert seen.count(missed.event_id) == 1
    assert seen.count(live.event_id) == 1


async def test_one_upstream_watch_per_profile_and_a_cap_beyond_which_live_pauses(
    page: Any, console_suite: ConsoleSuite
) -> None:
    app = build_app(console_suite.settings, max_watches=1)
    profile = await identified_profile(console_suite)
    other = next(p for p in await _two_profiles(console_suite) if p != profile.summary.profile_id)
    async with start_console(app) as url:
        await sign_in(page, ConsoleSuite(url, *_rest(console_suite)), land=False)
        cookie = await session_cookie(page)
        path = f"/live/profiles/{profile.summary.profile_id}"
        first = sse_frames(url, path, cookie)
        second = sse_frames(url, path, cookie)
        installation = profile.installations[0].installation_id
        async with asyncio.timeout(20):
            # Both tabs are live (the shared stream's `started` reaches the later one too).
            assert (await anext(first))["event"] == "started"
            assert (await anext(second))["event"] == "started"
            assert app.hub.watch_count == 1  # two tabs, one upstream stream
            tasks = [asyncio.ensure_future(anext(f)) for f in (first, second)]
            event = custom_event(installation, name="shared_watch", time=datetime.now(UTC))
            await track(console_suite, event)
            for task in tasks:
                assert json.loads((await task)["data"])["event_id"] == event.event_id
            paused = sse_frames(url, f"/live/profiles/{other}", cookie)
            frame = await anext(paused)
            assert frame["event"] == "paused"
            await paused.aclose()
        await first.aclose()
        await second.aclose()


async def _two_profiles(suite: ConsoleSuite) -> list[str]:
    reply = await query(suite, "ListProfiles", query_pb.ListProfilesRequest(page_size=2))
    return [row.profile_id for row in reply.profiles]
