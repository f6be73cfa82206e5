"""Live feeds over time: they end with the session, recover after a restart, say when the
profile is gone, and miss nothing stored while they were away."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from playwright.async_api import expect

from profiles.client import open_channel
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from services.console.app import build_app
from services.console.backend import Backend
from services.console.errors import ServiceDown
from shared.tenancy import TenancyRepository
from tests.console.conftest import ConsoleSuite, start_console
from tests.console.test_console_pages import sign_in, stored_profile, track
from tests.console.test_console_safety import _rest, session_cookie, sse_frames
from tests.support.ingest import custom_event

STATUS = "#live-status"


async def fresh_profile(suite: ConsoleSuite) -> tuple[str, str]:
    """A new profile of one event: its installation and profile IDs."""
    installation = f"console-live-{uuid.uuid4().hex[:8]}"
    await track(suite, custom_event(installation, name="arrived", time=datetime.now(UTC)))
    profile = await stored_profile(suite, installation)
    return installation, profile.summary.profile_id


async def test_signing_out_in_another_tab_stops_an_open_live_feed(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation, profile_id = await fresh_profile(console_suite)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    await expect(page.locator(STATUS)).to_have_text("Live updates on.")
    other = await page.context.new_page()
    await other.goto(console_suite.url + "/overview")
    await other.get_by_role("button", name="Sign out").click()
    await expect(other.get_by_label("Project key")).to_be_visible()
    # The open tab's feed ends within seconds, and says how to go on.
    await expect(page.locator(STATUS)).to_contain_text(
        "Live updates stopped: you signed out in another tab or window.", timeout=10_000
    )
    await expect(page.locator(STATUS).get_by_role("link", name="Sign in again")).to_be_visible()
    await track(
        console_suite, custom_event(installation, name="after_sign_out", time=datetime.now(UTC))
    )
    await expect(page.locator("#live-feed > li")).to_have_count(0)


async def test_a_revoked_key_ends_the_live_streams_already_open(
    page: Any, console_suite: ConsoleSuite
) -> None:
    _, profile_id = await fresh_profile(console_suite)
    pool = await asyncpg.create_pool(console_suite.settings.database_url, min_size=1, max_size=1)
    try:
        tenancy = TenancyRepository(pool)
        issued = await tenancy.create_key(console_suite.project.project_id, "read", "live")
        await page.goto(console_suite.url + "/signin")
        await page.get_by_label("Project key").fill(issued.plain_key)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
        cookie = await session_cookie(page)
        profile_feed = sse_frames(console_suite.url, f"/live/profiles/{profile_id}", cookie)
        segments_feed = sse_frames(console_suite.url, "/live/segments", cookie)
        async with asyncio.timeout(20):
            assert (await anext(profile_feed))["event"] == "started"
        await tenancy.revoke_key(issued.key.key_id)
    finally:
        await pool.close()

    async def end_of(frames: Any) -> dict[str, Any]:
        async for frame in frames:
            if frame["event"] == "ended":
                return dict(json.loads(frame["data"]))
        return {}

    # The services cache a verified key for a few seconds.
    async with asyncio.timeout(30):
        ends = await asyncio.gather(end_of(profile_feed), end_of(segments_feed))
    # Both say why: the key is no longer valid (whichever feed found it first ended the
    # session with that reason, which the other reads).
    assert [(end["reason"], end["why"]) for end in ends] == [("signed_out", "key")] * 2
    assert ends[0]["text"] == "the key you signed in with is no longer valid (revoked or unknown)."
    await profile_feed.aclose()
    await segments_feed.aclose()


async def test_an_erased_profile_s_live_feed_says_it_is_gone(
    page: Any, console_suite: ConsoleSuite
) -> None:
    _, profile_id = await fresh_profile(console_suite)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    await expect(page.locator(STATUS)).to_have_text("Live updates on.")
    async with open_channel(
        console_suite.addresses["identity"], console_suite.project.keys["admin"]
    ) as channel:
        await identity_grpc.IdentityServiceStub(channel).DeleteProfile(
            identity_pb.DeleteProfileRequest(profile_id=profile_id, request_id=str(uuid.uuid4()))
        )
    await expect(page.locator(STATUS)).to_have_text(
        "This profile no longer exists (it was erased): live updates stopped.", timeout=15_000
    )


async def test_a_live_feed_refused_while_query_restarts_retries_and_recovers(
    page: Any, console_suite: ConsoleSuite, monkeypatch: pytest.MonkeyPatch
) -> None:
    installation, profile_id = await fresh_profile(console_suite)
    call = Backend.call
    refusals = [2]

    async def restarting(self: Backend, key: str, service: str, method: str, request: Any) -> Any:
        # The feed's opening check (one event of this profile) meets a restarting query twice.
        opening = method == "ListEvents" and request.page_size == 1
        if opening and request.profile_id == profile_id and refusals[0] > 0:
            refusals[0] -= 1
            raise ServiceDown("query", timed_out=False, detail="UNAVAILABLE")
        return await call(self, key, service, method, request)

    monkeypatch.setattr(Backend, "call", restarting)
    # The page waits 1 s, then 2 s, before it opens its feed again: its clock is moved on by
    # those instead of sitting through them.
    await page.clock.install()
    async with start_console(build_app(console_suite.settings)) as url:
        await sign_in(page, ConsoleSuite(url, *_rest(console_suite)), land=False)
        await page.goto(url + f"/profiles/{profile_id}")
        await expect(page.locator(STATUS)).to_contain_text("Live updates paused, retrying in 1 s")
        await page.clock.run_for(1000)
        await expect(page.locator(STATUS)).to_contain_text("Live updates paused, retrying in 2 s")
        await page.clock.run_for(2000)
        await expect(page.locator(STATUS)).to_have_text("Live updates on.", timeout=15_000)
        assert refusals == [0]
        await track(
            console_suite,
            custom_event(installation, name="after_the_restart", time=datetime.now(UTC)),
        )
        await expect(page.locator("#live-feed > li", has_text="after_the_restart")).to_have_count(1)
        # Stopping this console waits for every response to end: the page leaves its feed.
        await page.goto("about:blank")


async def test_a_reconnecting_feed_gets_an_event_older_than_the_newest_it_showed(
    page: Any, console_suite: ConsoleSuite
) -> None:
    """A device that was offline sends late: an event stored while the feed was away, with an
    event time before the newest event the page shows, comes once after the reconnection."""
    installation, profile_id = await fresh_profile(console_suite)
    await sign_in(page, console_suite, land=False)
    cookie = await session_cookie(page)
    path = f"/live/profiles/{profile_id}"
    shown = custom_event(installation, name="shown_before_the_gap", time=datetime.now(UTC))
    async with asyncio.timeout(20):
        frames = sse_frames(console_suite.url, path, cookie)
        assert (await anext(frames))["event"] == "started"
        await track(console_suite, shown)
        async for frame in frames:
            if json.loads(frame["data"]).get("event_id") == shown.event_id:
                cursor = frame["id"]
                break
        await frames.aclose()
    late = custom_event(installation, name="sent_late", time=datetime.now(UTC) - timedelta(days=2))
    await track(console_suite, late)
    after = custom_event(installation, name="after_the_gap", time=datetime.now(UTC))
    seen: list[str] = []
    async with asyncio.timeout(20):
        frames = sse_frames(console_suite.url, path, cookie, {"Last-Event-ID": cursor})
        async for frame in frames:
            event_id = json.loads(frame["data"]).get("event_id", "")
            seen.append(event_id)
            if event_id == late.event_id:
                await track(console_suite, after)
            if event_id == after.event_id:
                break
        await frames.aclose()
    assert seen.count(late.event_id) == 1
    assert seen.count(after.event_id) == 1
