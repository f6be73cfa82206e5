"""The console against a hostile client or tenant: request bodies capped before sign-in, no
file taken, a sign-out from another site ignored, one project's share of the live watches, an
erasure whose custom ID no text box holds, SDK data in links, the overview's refresh not
keeping a session alive, and Secure cookies behind a TLS proxy."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import requests
from playwright.async_api import expect
from redis.asyncio import Redis

from profiles.client import open_channel
from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.console import present
from services.console.app import (
    MAX_DEFINITION_FORM_BYTES,
    MAX_FORM_BYTES,
    build_app,
    server_config,
)
from services.console.live import project_share
from shared.settings import Settings
from shared.tenancy import TenancyRepository
from tests.conftest import create_test_project
from tests.console.conftest import ConsoleSuite, start_console
from tests.console.test_console_pages import (
    identified_profile,
    sign_in,
    stored_profile,
    stored_profile_by_custom_id,
    track,
)
from tests.console.test_console_safety import session_cookie, sse_frames
from tests.support.ingest import custom_event, stamp
from tests.support.serving import served

COOKIE = "profiles_console_session"
TOO_LARGE = b"Too much to send"


async def exchange(
    base: str, head: list[str], body: Iterable[bytes] = (), *, within: float = 5.0
) -> tuple[int, dict[str, list[str]], bytes]:
    """One HTTP/1.1 request written by hand (`head`: its request line and headers; the
    connection is asked to close after it), the answer read until the server closes: status,
    headers (lower-case names) and body. Fails when no answer comes `within` seconds."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        lines = [*head, f"Host: {parts.netloc}", "Connection: close"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        for chunk in body:
            writer.write(chunk)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            async with asyncio.timeout(within):
                data = await reader.read()
        except TimeoutError:
            pytest.fail(f"no answer within {within} s to {head[0]}: the server waits for the body")
    finally:
        writer.close()
    header_block, _, content = data.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status_line.split(" ")[1]), headers, content


def chunked(*pieces: bytes, end: bool = True) -> list[bytes]:
    """`pieces` as HTTP/1.1 chunks; with `end`, the last (empty) chunk too."""
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces]
    return [*chunks, b"0\r\n\r\n"] if end else chunks


def multipart_with_a_file() -> tuple[str, bytes]:
    body = (
        b'--B\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\nx\r\n'
        b'--B\r\nContent-Disposition: form-data; name="f"; filename="f.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + b"a" * 1024 + b"\r\n--B--\r\n"
    )
    return "multipart/form-data; boundary=B", body


def http_sign_in(base: str, key: str) -> requests.Session:
    """A requests session signed in to the console with `key` (as the sign-in form does)."""
    session = requests.Session()
    form = session.get(base + "/signin", timeout=5)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    signed = session.post(
        base + "/signin",
        data={"csrf_token": token.group(1), "key": key, "next": "/overview"},
        allow_redirects=False,
        timeout=10,
    )
    assert signed.status_code == 303, signed.text[:300]
    return session


def csrf_token_of(page_text: str) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', page_text)
    assert token is not None
    return token.group(1)


# -- request bodies -------------------------------------------------------------------------------


async def test_a_body_declared_over_the_cap_is_refused_before_a_byte_is_read(
    console_suite: ConsoleSuite,
) -> None:
    """POST /signin and /signout read their form before any session check: a body announced
    at 300 MB gets 413 at once (the console's page), not a wait for the 300 MB."""
    base = console_suite.url
    for path, size in (
        ("/signin", 300 << 20),
        ("/signout", 300 << 20),
        ("/signin", MAX_FORM_BYTES + 1),
        (f"/profiles/{uuid.uuid4()}/delete", 300 << 20),
        ("/segments/new", MAX_DEFINITION_FORM_BYTES + 1),
    ):
        status, headers, content = await exchange(
            base,
            [
                f"POST {path} HTTP/1.1",
                "Content-Type: application/x-www-form-urlencoded",
                f"Content-Length: {size}",
            ],
        )
        assert status == 413, (path, size, status)
        assert TOO_LARGE in content, content[:300]
        assert "default-src 'none'" in headers["content-security-policy"][0]


async def test_a_chunked_body_is_counted_as_it_arrives(console_suite: ConsoleSuite) -> None:
    """A chunked body announces no length: once the bytes received pass the cap the form is
    refused with 413 (the rest is never read); a small chunked form is read as any other."""
    base = console_suite.url
    head = [
        "POST /signin HTTP/1.1",
        "Content-Type: application/x-www-form-urlencoded",
        "Transfer-Encoding: chunked",
    ]
    piece = b"f=" + b"a" * (16 * 1024 - 2)
    over = MAX_FORM_BYTES // len(piece) + 2
    # Never ended: a console that reads on waits for the rest, and the answer never comes.
    status, _, content = await exchange(base, head, chunked(*[piece] * over, end=False))
    assert status == 413
    assert TOO_LARGE in content
    small = await exchange(base, head, chunked(b"key=prf_x&csrf_token=guessed"))
    assert small[0] == 403  # read, and refused for its token as the sign-in form is


async def test_no_form_takes_a_file_and_a_sign_out_without_a_session_reads_nothing(
    console_suite: ConsoleSuite,
) -> None:
    base = console_suite.url
    content_type, body = multipart_with_a_file()
    head = ["Content-Type: " + content_type, f"Content-Length: {len(body)}"]
    # Before sign-in: a file part is refused, never spooled to disk.
    status, _, _ = await exchange(base, ["POST /signin HTTP/1.1", *head], [body])
    assert status == 400
    # A sign-out without a session cookie: nothing to sign out, the form is not read (the file
    # would be refused), and no cookie is touched.
    status, headers, _ = await exchange(base, ["POST /signout HTTP/1.1", *head], [body])
    assert status == 303
    assert headers["location"] == ["/signin"]
    assert "set-cookie" not in headers
    # Signed in, the sign-out form is read, without a file too.
    signed = await asyncio.to_thread(http_sign_in, base, console_suite.project.keys["read"])
    cookie = signed.cookies[COOKIE]
    status, _, _ = await exchange(
        base, ["POST /signout HTTP/1.1", *head, f"Cookie: {COOKIE}={cookie}"], [body]
    )
    assert status == 400
    still = await asyncio.to_thread(signed.get, base + "/users", allow_redirects=False, timeout=5)
    assert still.status_code == 200


def largest_segment_form(csrf_token: str) -> list[tuple[str, str]]:
    """The segment form at the contract's limits: 31 conditions, each an IN list of 64 values
    of 300 characters, every one a 4-byte UTF-8 character (12 bytes percent-encoded)."""
    value = ",".join(["\U0001f600" * 300] * 64)
    fields = [
        ("csrf_token", csrf_token),
        ("request_id", str(uuid.uuid4())),
        ("name", "largest"),
        ("description", "d" * 1000),
        ("join", "and"),
        ("conditions", "31"),
        ("action", "add"),  # the form again, as typed: no service call
    ]
    for i in range(31):
        p = f"c{i}-"
        fields += [
            (p + "kind", "attribute"),
            (p + "attribute", "custom"),
            (p + "custom_name", "a" * 30),
            (p + "operator", "in"),
            (p + "value_type", "string"),
            (p + "value", value),
            (p + "countries", ", ".join(["FR"] * 64)),
        ]
    return fields


async def test_the_largest_definition_form_fits_its_cap(console_suite: ConsoleSuite) -> None:
    base = console_suite.url
    admin = await asyncio.to_thread(http_sign_in, base, console_suite.project.keys["admin"])
    form = await asyncio.to_thread(admin.get, base + "/segments/new", timeout=10)
    fields = largest_segment_form(csrf_token_of(form.text))
    encoded = requests.models.RequestEncodingMixin._encode_params(fields)
    assert 7_000_000 < len(encoded) <= MAX_DEFINITION_FORM_BYTES
    answer = await asyncio.to_thread(
        admin.post,
        base + "/segments/new",
        data=encoded,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        allow_redirects=False,
        timeout=60,
    )
    assert answer.status_code == 200, answer.text[:300]
    assert "c30-value" in answer.text


# -- sign-out from another site -------------------------------------------------------------------


@contextlib.contextmanager
def another_site(html: str) -> Iterator[str]:
    """Serves `html` at http://localhost:<port>/: another site than the console's 127.0.0.1."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


async def test_another_site_cannot_sign_the_person_out(
    page: Any, console_suite: ConsoleSuite
) -> None:
    """A page of another site posts to /signout as a top-level navigation: the browser sends
    it without the SameSite=Strict cookie, and the console leaves that cookie alone."""
    base = console_suite.url
    await sign_in(page, console_suite, "read")
    before = await session_cookie(page)
    html = (
        f'<form method="post" action="{base}/signout"></form>'
        "<script>document.forms[0].submit()</script>"
    )
    with another_site(html) as site:
        await page.goto(site)
        await page.wait_for_url(base + "/signin", timeout=5000)
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    assert cookies.get(COOKIE) == before, "a form of another site signed the person out"
    await page.goto(base + "/users")
    await expect(page.get_by_role("heading", name="Users", exact=True)).to_be_visible()


# -- live watches ---------------------------------------------------------------------------------


async def test_one_project_cannot_pause_another_project_s_live_updates(
    console_suite: ConsoleSuite,
) -> None:
    """The cap on upstream watches is per process, across projects: one project opens at most
    its share of it, so another project's pages stay live."""
    other = await create_test_project(console_suite.settings.database_url)
    b_suite = ConsoleSuite(
        console_suite.url, other, console_suite.addresses, console_suite.settings
    )
    installations = [f"tenant-b-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    await track(
        b_suite, *[custom_event(i, name="x", time=datetime.now(UTC)) for i in installations]
    )
    b_profiles = [(await stored_profile(b_suite, i)).summary.profile_id for i in installations]
    a_profile = (await identified_profile(console_suite)).summary.profile_id
    app = build_app(console_suite.settings, max_watches=4)
    assert project_share(4) == 1
    async with start_console(app) as url:
        b = await asyncio.to_thread(http_sign_in, url, other.keys["read"])
        a = await asyncio.to_thread(http_sign_in, url, console_suite.project.keys["read"])
        feeds = []
        try:
            async with asyncio.timeout(20):
                for i, profile_id in enumerate(b_profiles):
                    feed = sse_frames(url, f"/live/profiles/{profile_id}", b.cookies[COOKIE])
                    feeds.append(feed)
                    expected = "started" if i == 0 else "paused"
                    assert (await anext(feed))["event"] == expected, (i, expected)
                mine = sse_frames(url, f"/live/profiles/{a_profile}", a.cookies[COOKIE])
                feeds.append(mine)
                assert (await anext(mine))["event"] == "started"
                assert app.hub.watch_count == 2
        finally:
            for feed in feeds:
                await feed.aclose()


async def test_a_project_s_many_keys_share_one_share_of_the_live_watches(
    console_suite: ConsoleSuite,
) -> None:
    """Project B signs in with four read keys, each in its own browser, each following another
    of B's profiles: together they open B's one share of the cap (1 of 4), the other three are
    paused, and project A's page still goes live. Counted per key, B's four keys would take
    the whole cap."""
    other = await create_test_project(console_suite.settings.database_url)
    pool = await asyncpg.create_pool(console_suite.settings.database_url, min_size=1, max_size=1)
    try:
        tenancy = TenancyRepository(pool)
        extra = [(await tenancy.create_key(other.project_id, "read")).plain_key for _ in range(3)]
    finally:
        await pool.close()
    b_keys = [other.keys["read"], *extra]
    b_suite = ConsoleSuite(
        console_suite.url, other, console_suite.addresses, console_suite.settings
    )
    installations = [f"tenant-b-{uuid.uuid4().hex[:8]}" for _ in b_keys]
    await track(
        b_suite, *[custom_event(i, name="x", time=datetime.now(UTC)) for i in installations]
    )
    b_profiles = [(await stored_profile(b_suite, i)).summary.profile_id for i in installations]
    a_profile = (await identified_profile(console_suite)).summary.profile_id
    app = build_app(console_suite.settings, max_watches=4)
    async with start_console(app) as url:
        b_cookies = [
            (await asyncio.to_thread(http_sign_in, url, key)).cookies[COOKIE] for key in b_keys
        ]
        a = await asyncio.to_thread(http_sign_in, url, console_suite.project.keys["read"])
        feeds = []
        try:
            async with asyncio.timeout(20):
                events = []
                for cookie, profile_id in zip(b_cookies, b_profiles, strict=True):
                    feed = sse_frames(url, f"/live/profiles/{profile_id}", cookie)
                    feeds.append(feed)
                    events.append((await anext(feed))["event"])
                assert events == ["started", "paused", "paused", "paused"]
                # A second tab of B on the profile already followed joins its stream.
                joined = sse_frames(url, f"/live/profiles/{b_profiles[0]}", b_cookies[1])
                feeds.append(joined)
                assert (await anext(joined))["event"] == "started"
                mine = sse_frames(url, f"/live/profiles/{a_profile}", a.cookies[COOKIE])
                feeds.append(mine)
                assert (await anext(mine))["event"] == "started"
                assert app.hub.watch_count == 2
        finally:
            for feed in feeds:
                await feed.aclose()


# -- erasure --------------------------------------------------------------------------------------


def test_a_custom_id_no_text_box_holds_is_confirmed_by_the_profile_id() -> None:
    profile_id = str(uuid.uuid4())
    for custom_id in ("a\nb", "a\rb", "a\r\nb", "a\tb", "a\x01b", "a\u2028b"):
        assert present.erasure_word(custom_id, profile_id) == profile_id, repr(custom_id)
        assert "text box cannot hold" in present.erasure_word_instead(custom_id)
    assert present.erasure_word("user-1", profile_id) == "user-1"
    assert present.erasure_word("", profile_id) == "delete"
    assert present.erasure_word_instead("user-1") == ""
    assert present.erasure_word_instead("") == ""


async def test_a_profile_whose_custom_id_holds_a_line_break_can_be_erased(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, "admin", land=False)
    for line_break in ("\n", "\r"):
        custom_id = f"gdpr{line_break}block-{uuid.uuid4().hex[:6]}"
        async with open_channel(
            console_suite.addresses["ingest"], console_suite.project.keys["sdk"]
        ) as channel:
            reply = await ingest_grpc.IngestServiceStub(channel).TrackEvents(
                ingest_pb.TrackEventsRequest(
                    events=[custom_event(None, custom_id=custom_id, time=datetime.now(UTC))]
                )
            )
        assert not reply.results[0].reason, reply  # a custom ID the suite takes
        profile_id = await stored_profile_by_custom_id(console_suite, custom_id)
        await page.goto(console_suite.url + f"/profiles/{profile_id}/delete")
        await expect(page.locator("#confirmation-hint")).to_contain_text("text box cannot hold")
        await page.get_by_label(f"To confirm, type {profile_id}").fill(profile_id)
        await page.get_by_role("button", name="Delete this profile permanently").click()
        await expect(page.get_by_role("heading", name="Profile erased")).to_be_visible()


# -- links built from SDK data --------------------------------------------------------------------


async def test_a_session_id_with_url_characters_opens_its_own_session(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"hostile-sid-{uuid.uuid4().hex[:8]}"
    session_id = "real&session=decoy&kind=crash#"
    now = datetime.now(UTC) - timedelta(minutes=3)
    start = ingest_pb.Event(
        event_id=uuid.uuid4().hex,
        installation_id=installation,
        platform=types_pb2.PLATFORM_IOS,
        event_time=stamp(now),
        session_id=session_id,
        session_start=ingest_pb.SessionStart(country="FR"),
    )
    inside = custom_event(installation, name="bought_in_session", time=now + timedelta(seconds=5))
    inside.session_id = session_id
    await track(console_suite, start, inside)
    profile = await stored_profile(
        console_suite, installation, lambda p: p.counters.session_count >= 1
    )
    await sign_in(page, console_suite, "read", land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    await page.locator("table.sessions tbody tr a").first.click()
    await expect(page.locator("table.sessions tr.selected")).to_have_count(1)
    await expect(page.locator("#timeline")).to_contain_text("bought_in_session")
    # The "every kind" link of a filtered timeline keeps the session whole too.
    await page.goto(
        console_suite.url
        + f"/profiles/{profile.summary.profile_id}?"
        + requests.compat.urlencode({"session": session_id, "kind": "custom"})
    )
    await page.get_by_role("link", name="Every kind of event").click()
    await expect(page.locator("table.sessions tr.selected")).to_have_count(1)
    await expect(page.locator("#timeline")).to_contain_text("bought_in_session")


# -- sessions -------------------------------------------------------------------------------------


async def test_the_overview_s_automatic_refresh_does_not_keep_the_session_alive(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await page.clock.install()  # the page's timers run on a clock this test moves forward
    await sign_in(page, console_suite, "read", land=False)
    digest = hashlib.sha256((await session_cookie(page)).encode()).hexdigest()
    name = f"{console_suite.settings.redis_prefix}:console:session:{digest}"
    redis = Redis.from_url(console_suite.settings.redis_url)
    try:
        await page.goto(console_suite.url + "/overview")
        await redis.expire(name, 60)  # as if the person had left 7 h 59 min ago
        async with page.expect_response(
            lambda r: "/overview/fragment" in r.url, timeout=20_000
        ) as refreshed:
            # The page refreshes itself every 10 s, nobody touching anything: its clock moves on
            # 10.5 s at once, and its own timer sends the refresh.
            await page.clock.run_for(10_500)
        assert (await refreshed.value).status == 200
        assert 0 < await redis.ttl(name) <= 60
        # A page the person opens renews it.
        await page.goto(console_suite.url + "/users")
        assert await redis.ttl(name) > 60
    finally:
        await redis.aclose()


# -- Secure cookies -------------------------------------------------------------------------------


def set_cookies(base: str, headers: dict[str, str] | None = None) -> str:
    answer = requests.get(base + "/signin", headers=headers or {}, timeout=5)
    assert answer.status_code == 200
    return answer.headers["set-cookie"]


async def test_cookies_are_secure_behind_a_believed_proxy_or_when_the_settings_say_so(
    console_suite: ConsoleSuite,
) -> None:
    https = {"X-Forwarded-Proto": "https"}
    # Plain http, no proxy: no Secure (the browser would drop the cookie).
    assert "Secure" not in await asyncio.to_thread(set_cookies, console_suite.url)
    forced = console_suite.settings.with_changes(console_secure_cookies=True)
    async with start_console(build_app(forced)) as url:
        assert "Secure" in await asyncio.to_thread(set_cookies, url)
    # The served console believes X-Forwarded-Proto from the proxies the settings name only.
    for allowed, secure in (("127.0.0.1", True), ("10.255.0.1", False), ("*", True)):
        settings = console_suite.settings.with_changes(console_forwarded_allow_ips=allowed)
        async with served(server_config(settings, build_app(settings))) as url:
            cookie = await asyncio.to_thread(set_cookies, url, https)
        assert ("Secure" in cookie) is secure, (allowed, cookie)


def test_the_console_s_proxy_settings_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "PROFILES_CONSOLE_FORWARDED_ALLOW_IPS": "10.0.0.0/8,192.168.1.7",
            "PROFILES_CONSOLE_SECURE_COOKIES": "True",
        }
    )
    assert settings.console_forwarded_allow_ips == "10.0.0.0/8,192.168.1.7"
    assert settings.console_secure_cookies is True
    assert Settings.from_env({}).console_secure_cookies is False
    assert Settings.from_env({}).console_forwarded_allow_ips == "127.0.0.1"
    with pytest.raises(ValueError, match="PROFILES_CONSOLE_SECURE_COOKIES"):
        Settings.from_env({"PROFILES_CONSOLE_SECURE_COOKIES": "maybe"})
