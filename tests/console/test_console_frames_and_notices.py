"""What a person reads when a page cannot be shown or a session ends, and times and values
that keep their shape: an unknown address inside the console's frame, the role a refused
action needs, the session store away, why a session ended (with the way back), a page trail
that cannot have led to the page, the date boxes' words, relative times beside UTC ones, and
durations, IDs and the header that do not break."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from playwright.async_api import expect
from redis.asyncio import Redis

from services.console import present
from services.console.app import build_app
from services.console.sessions import COOKIE, seal
from shared.ports import free_port
from tests.console.conftest import ConsoleSuite, start_console
from tests.console.test_console_pages import identified_profile, sign_in
from tests.console.test_console_safety import sse_frames
from tests.console.test_console_session_keys import get, record_name, signed_in


def location_query(response: requests.Response) -> dict[str, list[str]]:
    assert response.status_code == 303, response.status_code
    target = urlsplit(response.headers["location"])
    assert target.path == "/signin", target
    return parse_qs(target.query)


async def test_an_unknown_address_keeps_the_frame_and_a_refusal_names_the_role(
    console_suite: ConsoleSuite,
) -> None:
    profile_id = (await identified_profile(console_suite)).summary.profile_id
    browser = await signed_in(console_suite, console_suite.project.keys["read"])

    missing = await get(browser, f"{console_suite.url}/profiles/{profile_id}/y")
    assert missing.status_code == 404
    assert "No such page" in missing.text
    # The header of every page: the menu, the search and the sign-out.
    assert '<nav aria-label="Main">' in missing.text
    assert 'id="top-search"' in missing.text
    assert f'<a href="/profiles/{profile_id}">' in missing.text

    refused = await get(browser, f"{console_suite.url}/profiles/{profile_id}/delete")
    assert refused.status_code == 403
    said = re.search(r'<p id="role-needed">([^<]+)</p>', refused.text)
    assert said is not None, refused.text[-1500:]
    assert said.group(1).startswith(
        "Only admin keys may erase a profile; you are signed in with a read key."
    )


async def test_with_the_session_store_away_the_page_says_no_page_opens(
    console_suite: ConsoleSuite,
) -> None:
    settings = console_suite.settings.with_changes(redis_url=f"redis://127.0.0.1:{free_port()}")
    async with start_console(build_app(settings)) as url:
        page = await asyncio.to_thread(
            requests.get, url + "/overview", cookies={COOKIE: "any"}, timeout=10
        )
    assert page.status_code == 503
    assert "Pages that do not need it keep working" not in page.text
    assert "no page can open until it answers again" in page.text


async def test_an_expired_session_and_a_refused_key_say_why_and_lead_back(
    console_suite: ConsoleSuite,
) -> None:
    key = console_suite.project.keys["read"]
    redis = Redis.from_url(console_suite.settings.redis_url)
    try:
        # Expired (Redis let the record go): the notice, and back to the page after.
        browser = await signed_in(console_suite, key)
        await redis.delete(record_name(console_suite, browser.cookies[COOKIE]))
        away = await get(browser, console_suite.url + "/users?tab=anonymous")
        query = location_query(away)
        assert query == {"next": ["/users?tab=anonymous"], "expired": ["1"]}, query
        form = await get(browser, console_suite.url + away.headers["location"])
        assert "Your session expired; sign in again." in form.text

        # A key the services no longer know (revoked, or unknown): sealed into the session as
        # the console seals it, refused at once.
        browser = await signed_in(console_suite, key)
        cookie = browser.cookies[COOKIE]
        name = record_name(console_suite, cookie)
        role, project = (await redis.hmget(name, "role", "project"))[:2]
        assert role is not None
        assert project is not None
        gone = seal(cookie, "prf_0000000000000000_unknown", role.decode(), project.decode())
        await redis.hset(name, "sealed_key", gone)
        away = await get(browser, console_suite.url + "/segments")
        assert location_query(away) == {"next": ["/segments"], "expired": ["key"]}
        form = await get(browser, console_suite.url + away.headers["location"])
        assert "no longer valid (revoked or unknown)" in form.text
        assert "Your session" not in form.text

        # A live feed that found the key refused: the next page, and the feed's own "Sign in
        # again" link, tell it too.
        profile_id = (await identified_profile(console_suite)).summary.profile_id
        browser = await signed_in(console_suite, key)
        cookie = browser.cookies[COOKIE]
        name = record_name(console_suite, cookie)
        await redis.hset(
            name, "sealed_key", seal(cookie, "prf_0_x", role.decode(), project.decode())
        )
        async with asyncio.timeout(10):
            feed = sse_frames(console_suite.url, f"/live/profiles/{profile_id}", cookie)
            try:
                frame = await anext(feed)
            finally:
                await feed.aclose()
        assert frame["event"] == "ended"
        link = await get(browser, f"{console_suite.url}/signin?next=/profiles/{profile_id}")
        assert "no longer valid (revoked or unknown)" in link.text
        assert f'name="next" value="/profiles/{profile_id}"' in link.text
        away = await get(browser, console_suite.url + "/users")
        assert location_query(away) == {"next": ["/users"], "expired": ["key"]}
    finally:
        await redis.aclose()


async def test_a_trail_without_a_page_token_is_ignored(console_suite: ConsoleSuite) -> None:
    browser = await signed_in(console_suite, console_suite.project.keys["read"])
    page = await get(browser, console_suite.url + "/users?trail=garbage,garbage&page=3")
    assert page.status_code == 200
    assert re.search(r"Profiles 1 to \d+ of", page.text), page.text[:2000]
    assert 'rel="prev"' not in page.text


async def test_day_boxes_word_their_help_for_every_locale_and_times_say_how_long_ago(
    console_suite: ConsoleSuite,
) -> None:
    profile_id = (await identified_profile(console_suite)).summary.profile_id
    browser = await signed_in(console_suite, console_suite.project.keys["read"])
    page = await get(browser, f"{console_suite.url}/profiles/{profile_id}?from=2026-13-45")
    error = re.search(r'id="events-from-error"[^>]*>([^<]+)<', page.text)
    assert error is not None
    # A date box shows the browser's order (12/06/2026 in the US) and sends year-month-day:
    # the help points at the box, and says how a link writes a day.
    assert "pick one in the box" in error.group(1)
    assert "write it as" not in error.group(1)

    ago = r'<time class="ago" datetime="[^"]+" title="[^"]+ UTC">(just now|\d+ (min|h|days?|months?|years?) ago)</time>'  # noqa: E501
    assert re.search(r'<dd id="last-visit">[^<]+ UTC ' + ago, page.text), page.text[:3000]
    timeline = await get(browser, f"{console_suite.url}/profiles/{profile_id}")
    assert re.search(r'<span class="time">[^<]+ UTC ' + ago, timeline.text)
    users = await get(browser, console_suite.url + "/users")
    assert re.search(r"<span>UTC</span> " + ago, users.text)

    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    assert present.ago(now - timedelta(seconds=30), now) == "just now"
    assert present.ago(now - timedelta(minutes=5, seconds=59), now) == "5 min ago"
    assert present.ago(now - timedelta(hours=47), now) == "47 h ago"
    assert present.ago(now - timedelta(days=1, hours=0), now) == "24 h ago"
    assert present.ago(now - timedelta(days=2), now) == "2 days ago"
    assert present.ago(now - timedelta(days=61), now) == "2 months ago"
    assert present.ago(now - timedelta(days=800), now) == "2 years ago"
    assert present.ago(now + timedelta(minutes=3), now) == "in 3 min"
    assert present.ago(None, now) == ""


async def lines_of(page: Any, selector: str) -> int:
    """How many lines the text of the first element matching `selector` takes."""
    count: int = await page.evaluate(
        """(selector) => {
            const range = document.createRange();
            range.selectNodeContents(document.querySelector(selector));
            const tops = new Set(Array.from(range.getClientRects(), (r) => Math.round(r.top)));
            return tops.size;
        }""",
        selector,
    )
    return count


async def test_a_duration_an_id_and_the_header_keep_their_lines(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    await sign_in(page, console_suite, "admin")
    # 1280 px wide (the fixture's): the key's role and "Sign out" on the header's first row.
    brand = await page.locator(".top .brand").bounding_box()
    signout = await page.locator(".top .signout").bounding_box()
    assert brand is not None
    assert signout is not None
    assert signout["y"] < brand["y"] + brand["height"], (brand, signout)

    await page.set_viewport_size({"width": 375, "height": 800})
    await page.goto(f"{console_suite.url}/profiles/{profile.summary.profile_id}")
    await expect(page.locator("#identity-state bdi")).to_have_text(profile.summary.custom_id)
    # Squeezed well past a phone's width: the ID and the duration still hold one line each.
    await page.evaluate(
        """() => {
            document.getElementById("identity-state").style.width = "4em";
            for (const dd of document.querySelectorAll("dd.duration")) {
                dd.parentElement.style.width = "1px";
            }
        }"""
    )
    assert "-" in profile.summary.custom_id
    assert await lines_of(page, "#identity-state bdi") == 1
    assert await lines_of(page, "dd.duration") == 1
