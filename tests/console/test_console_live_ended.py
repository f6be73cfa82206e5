"""A live feed that stops because its session ended says why, as the sign-in page says it of a
full page (an operator's audit against Batch, Countly, PostHog and Segment: "you are signed
out" whatever happened read like a fault): the session expired, the person signed out in
another tab, or signed in again there (with a key of another role: the page offers to reload
with it rather than to sign in)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import expect
from redis.asyncio import Redis

from tests.console.conftest import ConsoleSuite
from tests.console.test_console_live import STATUS, fresh_profile
from tests.console.test_console_pages import sign_in
from tests.console.test_console_safety import session_cookie
from tests.console.test_console_session_keys import record_name

SHOTS = os.environ.get("PROFILES_CONSOLE_TEST_SHOTS", "")
# A feed re-reads its session every 2 seconds (0.2 s in these tests: LIVE_CHECKS in
# conftest.py): well within this.
WITHIN_MS = 10_000


@pytest.fixture
async def redis(console_suite: ConsoleSuite) -> AsyncIterator[Redis]:
    client = Redis.from_url(console_suite.settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def following(page: Any, suite: ConsoleSuite) -> str:
    """Opens a new profile's page, once its live feed is on; the page's path."""
    _, profile_id = await fresh_profile(suite)
    path = f"/profiles/{profile_id}"
    await page.goto(suite.url + path)
    await expect(page.locator(STATUS)).to_have_text("Live updates on.")
    return path


async def test_an_expired_session_stops_the_feeds_saying_so(
    page: Any, console_suite: ConsoleSuite, redis: Redis
) -> None:
    await sign_in(page, console_suite, land=False)
    path = await following(page, console_suite)
    segments = await page.context.new_page()
    await segments.goto(console_suite.url + "/segments")
    segments_status = segments.locator("#segment-status")
    await expect(segments_status).to_contain_text("Live:")
    # Redis lets the session go (idle for 8 hours, or a week old).
    await redis.delete(record_name(console_suite, await session_cookie(page)))
    await expect(page.locator(STATUS)).to_have_text(
        "Live updates stopped: your session expired. Sign in again", timeout=WITHIN_MS
    )
    again = page.locator(STATUS).get_by_role("link", name="Sign in again")
    await expect(again).to_have_attribute("href", "/signin?next=" + path.replace("/", "%2F"))
    await expect(segments_status).to_have_text(
        "Live entries and exits stopped: your session expired. Sign in again", timeout=WITHIN_MS
    )
    # The link's sign-in page says it too.
    await again.click()
    await expect(page.locator("#session-ended")).to_have_text(
        "Your session expired; sign in again."
    )


async def test_signing_out_in_another_tab_is_told_as_such(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    await following(page, console_suite)
    other = await page.context.new_page()
    await other.goto(console_suite.url + "/overview")
    await other.get_by_role("button", name="Sign out").click()
    await expect(other.get_by_label("Project key")).to_be_visible()
    await expect(page.locator(STATUS)).to_have_text(
        "Live updates stopped: you signed out in another tab or window. Sign in again",
        timeout=WITHIN_MS,
    )


async def test_signing_in_again_with_another_role_offers_to_reload_with_it(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, "read", land=False)
    path = await following(page, console_suite)
    await expect(page.get_by_role("link", name="Delete this profile")).to_have_count(0)
    # Another tab signs in with the admin key: this tab's read session is replaced.
    other = await page.context.new_page()
    await sign_in(other, console_suite, "admin", land=False)
    await expect(page.locator(STATUS)).to_have_text(
        "Live updates stopped: you signed in again in another tab or window, with an admin key"
        " (this page was opened with a read key). Reload this page",
        timeout=WITHIN_MS,
    )
    if SHOTS:
        await page.locator("#live").screenshot(path=f"{SHOTS}/live-ended-role.png")
    reload = page.locator(STATUS).get_by_role("link", name="Reload this page")
    await expect(reload).to_have_attribute("href", path)
    await reload.click()
    await expect(page.get_by_role("link", name="Delete this profile")).to_be_visible()
    await expect(page.locator(STATUS)).to_have_text("Live updates on.")

    # Signed in again with a key of the same role: no role to name.
    await sign_in(other, console_suite, "admin", land=False)
    await expect(page.locator(STATUS)).to_have_text(
        "Live updates stopped: you signed in again in another tab or window. Reload this page",
        timeout=WITHIN_MS,
    )
