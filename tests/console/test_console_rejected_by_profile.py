"""One person's rejected events in the console: the profile page's section and the rejected
events page filtered by the profile, in a real browser against a real suite."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.async_api import expect

from profiles.common.v1 import types_pb2
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import reject, sign_in, stored_profile, track
from tests.support.ingest import custom_event


async def new_profile(suite: ConsoleSuite) -> tuple[str, str]:
    """A new installation with an accepted event, and its profile once query has it."""
    installation = f"console-{uuid.uuid4().hex}"
    await track(suite, custom_event(installation, time=datetime.now(UTC)))
    profile = await stored_profile(suite, installation)
    return installation, profile.summary.profile_id


def from_the_future(installation: str, name: str) -> Any:
    return custom_event(installation, name=name, time=datetime.now(UTC) + timedelta(days=30))


async def test_a_profile_shows_its_rejected_events_and_opens_them_all(
    page: Any, console_suite: ConsoleSuite
) -> None:
    mine, profile_id = await new_profile(console_suite)
    theirs, _ = await new_profile(console_suite)
    no_platform = custom_event(mine, time=datetime.now(UTC))
    no_platform.platform = types_pb2.PLATFORM_UNSPECIFIED
    # Six of this person's (one more than the section shows), and one of someone else's.
    mine_rejected = [from_the_future(mine, f"future_{n}") for n in range(5)]
    assert await reject(console_suite, *mine_rejected) == ["EVENT_TIME_IN_FUTURE"] * 5
    assert await reject(console_suite, no_platform) == ["PLATFORM_MISSING"]
    other = from_the_future(theirs, "someone_elses")
    assert await reject(console_suite, other) == ["EVENT_TIME_IN_FUTURE"]

    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    section = page.locator("section#rejected")
    await expect(section.get_by_role("heading", name="Rejected events")).to_be_visible()
    rows = section.locator("tbody tr")
    await expect(rows).to_have_count(5)
    # Newest first: the missing platform was the last one sent.
    await expect(rows.first).to_contain_text("PLATFORM_MISSING")
    await expect(rows.first).to_contain_text("platform")
    await expect(rows.nth(1)).to_contain_text("EVENT_TIME_IN_FUTURE")
    await expect(rows.nth(1).locator("code")).to_have_text("event_time")

    await section.get_by_role("link", name="All rejected events of this profile").click()
    await expect(page).to_have_url(re.compile(r"/rejected\?profile=" + profile_id + "$"))
    await expect(page.locator("#profile-filter")).to_contain_text(profile_id)
    table = page.locator("table.rejected tbody")
    await expect(table.locator("tr")).to_have_count(6)
    await expect(table).to_contain_text(mine)
    await expect(table).not_to_contain_text(theirs)
    # The reason chips count this person's only, and keep the profile.
    chip = page.locator("#reason-chips a", has_text="EVENT_TIME_IN_FUTURE")
    await expect(chip.locator(".count")).to_have_text("5")
    await chip.click()
    await expect(table.locator("tr")).to_have_count(5)
    query = parse_qs(urlsplit(page.url).query)
    assert query == {"profile": [profile_id], "reason": ["EVENT_TIME_IN_FUTURE"]}
    # Filtering by the form keeps it too.
    await page.get_by_label("Reason").fill("PLATFORM_MISSING")
    await page.get_by_role("button", name="Filter").click()
    await expect(table.locator("tr")).to_have_count(1)
    assert parse_qs(urlsplit(page.url).query)["profile"] == [profile_id]
    # The chip's remove link lists every profile's again, keeping the reason.
    await page.get_by_role("link", name="Show every profile").click()
    await expect(page.locator("#profile-filter")).to_have_count(0)
    assert parse_qs(urlsplit(page.url).query) == {"reason": ["PLATFORM_MISSING"]}
    await page.get_by_role("link", name="All reasons").click()
    await expect(table).to_contain_text(theirs)


async def test_a_profile_with_nothing_rejected_has_no_section(
    page: Any, console_suite: ConsoleSuite
) -> None:
    _, profile_id = await new_profile(console_suite)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    await expect(page.get_by_role("heading", name="Merges and splits")).to_be_visible()
    await expect(page.locator("section#rejected")).to_have_count(0)


async def test_an_unknown_or_mistyped_profile_filter_is_told_beside_its_chip(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    for value, words in ((str(uuid.uuid4()), "No such profile"), ("nope", "A profile ID is")):
        await page.goto(console_suite.url + f"/rejected?profile={value}")
        await expect(page.locator("#profile-error")).to_contain_text(words)
        await expect(page.locator("table.rejected")).to_have_count(0)
