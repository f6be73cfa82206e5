"""What the console says about what a person typed or a URL holds: a refused filter is told
next to its box in the page's words (never a contract field's name), a stale page link offers
the first page, a search that cannot match says "no match", and an unknown parameter is named."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from playwright.async_api import expect

from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import (
    EMAIL,
    MARKETING,
    PUSH,
    SMS,
    TRANSACTIONAL,
    identified_profile,
    reject,
    sign_in,
    stored_profile,
    track,
)
from tests.support.ingest import custom_event
from tests.support.query import subscription

# The contract's words, which mean nothing to a person reading a page.
CONTRACT_WORDS = re.compile(
    r"name_prefix|reasons\[|end_time|start_time|profile_id|installation_id|page_token must"
    r"|email is not|must hold"
)


async def text_of(page: Any) -> str:
    text: str = await page.locator("main").inner_text()
    return text


async def no_sideways_scroll(page: Any) -> None:
    width = await page.evaluate("document.documentElement.scrollWidth")
    viewport = await page.evaluate("window.innerWidth")
    assert width <= viewport, f"{page.url[:80]} is {width} px wide"


async def test_an_over_long_name_filter_is_refused_beside_the_name_box(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users?name=" + "x" * 5000)
    name_box = page.get_by_label("Name", exact=True)
    await expect(page.locator("#name-error")).to_have_text(
        "A name search holds at most 100 characters; this one has 5,000."
    )
    await expect(name_box).to_have_attribute("aria-invalid", "true")
    text = await text_of(page)
    assert "No profile" not in text  # neither "No profile matches." nor the count's "No profile"
    assert not CONTRACT_WORDS.search(text), text[:300]
    assert "x" * 100 not in text  # the page repeats the filter shortened, if at all
    await no_sideways_scroll(page)
    # A name within the limit but longer than a caption shows: repeated with an ellipsis.
    await page.goto(console_suite.url + "/users?name=" + "y" * 90)
    caption = page.locator("table.users caption")
    await expect(caption).to_contain_text("yyy…”")
    assert "y" * 41 not in await caption.inner_text()
    await expect(page.locator("table.users tbody")).to_contain_text("No profile matches.")


async def test_a_stale_page_link_of_the_users_table_says_only_so_and_offers_the_first_page(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users?tab=identified&page_token=altered&trail=0&page=2")
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("This page link is out of date or was altered")
    text = await text_of(page)
    assert "No profile" not in text
    await expect(page.locator("#shown")).to_have_count(0)
    await alert.get_by_role("link", name="First page").click()
    await expect(page).to_have_url(re.compile(r"/users\?tab=identified(&|$)"))
    assert "page_token" not in page.url
    await expect(page.locator("table.users tbody tr a").first).to_be_visible()


async def test_refused_rejected_filters_are_told_beside_their_box_with_the_form(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    cases = (
        ("start=2026-12-06T16:58&end=2026-12-06T16:57", "#end-error", "after the start"),
        ("reason=" + "A" * 65, "#reason-error", "1 to 64 characters"),
        ("start=yesterday", "#start-error", "Not a date and time"),
    )
    for query_string, error, words in cases:
        reply = await page.goto(console_suite.url + "/rejected?" + query_string)
        assert reply is not None
        await expect(page.get_by_role("heading", name="Rejected events")).to_be_visible()
        await expect(page.locator(error)).to_contain_text(words)
        await expect(page.get_by_role("button", name="Filter")).to_be_visible()
        text = await text_of(page)
        assert "Nothing rejected" not in text
        assert not CONTRACT_WORDS.search(text), text[:300]
        assert "Back to the overview" not in text
    await page.goto(console_suite.url + "/rejected?reason=NAME_INVALID&page_token=altered")
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("This page link is out of date or was altered")
    await alert.get_by_role("link", name="First page").click()
    await expect(page).to_have_url(re.compile(r"/rejected\?reason=NAME_INVALID$"))
    await expect(page.locator("table.rejected")).to_be_visible()


async def test_the_reason_box_offers_real_codes_and_reads_them_in_any_case(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    # Not NAME_INVALID: another test expects none of those.
    stale = custom_event(
        profile.installations[0].installation_id,
        name="from_long_ago",
        time=datetime.now(UTC) - timedelta(days=40),
    )
    assert await reject(console_suite, stale) == ["EVENT_TIME_TOO_OLD"]
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/rejected")
    reason = page.get_by_label("Reason")
    await expect(reason).to_have_attribute("placeholder", re.compile("EVENT_TIME_IN_FUTURE"))
    offered = await page.locator("datalist#reasons option").evaluate_all(
        "options => options.map(o => o.value)"
    )
    assert {"NAME_INVALID", "EVENT_TIME_IN_FUTURE", "EVENT_TIME_TOO_OLD"} <= set(offered)
    assert "INVALID_EVENT_TIME" not in offered
    await reason.fill(" event_time_too_old ")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.get_by_label("Reason")).to_have_value("EVENT_TIME_TOO_OLD")
    row = page.locator("table.rejected tbody tr", has_text=stale.event_id)
    await expect(row).to_have_count(1)


async def test_a_search_that_cannot_match_says_no_match_with_a_hint(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    await sign_in(page, console_suite, land=False)
    status = page.locator("main p.found")
    for typed, shown, hint in (
        ("q" * 300, "No profile matches “" + "q" * 39 + "…”.", ""),
        ("@", "No profile matches “@”.", "An email address looks like name@example.com."),
        (uuid.uuid4().hex, "No profile matches", ""),
    ):
        await page.goto(console_suite.url + "/search?q=" + typed)
        await expect(status).to_contain_text(shown)
        text = await text_of(page)
        assert not CONTRACT_WORDS.search(text), text[:300]
        if hint:
            await expect(page.locator("#search-hint")).to_have_text(hint)
        await no_sideways_scroll(page)
    # A profile ID copied without its dashes, in capitals, is still that profile's ID.
    profile_id = profile.summary.profile_id
    await page.goto(console_suite.url + "/search?q=" + profile_id.replace("-", "").upper())
    await expect(page).to_have_url(re.compile(f"/profiles/{profile_id}$"))


async def test_a_profile_address_that_is_no_profile_says_no_such_profile_with_a_search(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    for path in ("/profiles/user-1", f"/profiles/{uuid.uuid4()}"):
        reply = await page.goto(console_suite.url + path)
        assert reply is not None
        assert reply.status == 404
        await expect(page.get_by_role("heading", level=1)).to_have_text("No such profile")
        assert not CONTRACT_WORDS.search(await text_of(page))
        await page.get_by_label("Email, phone, any ID or a name").fill("@")
        await page.get_by_role("main").get_by_role("button", name="Search").click()
        await expect(page.locator("main p.found")).to_contain_text("No profile matches")


async def test_a_stale_events_page_link_keeps_the_profile_and_offers_the_first_page(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    profile_id = profile.summary.profile_id
    await sign_in(page, console_suite, land=False)
    reply = await page.goto(console_suite.url + f"/profiles/{profile_id}?events_page=garbage")
    assert reply is not None
    await expect(page.locator("#identity")).to_be_visible()
    events = page.locator("#events")
    await expect(events.get_by_role("alert")).to_contain_text("out of date or was altered")
    await events.get_by_role("link", name="First page of the events").click()
    await expect(page).to_have_url(re.compile(f"/profiles/{profile_id}\\?#events$"))
    await expect(page.locator("#timeline > li[data-event-id]").first).to_be_visible()
    await page.goto(console_suite.url + f"/profiles/{profile_id}?sessions_page=garbage")
    sessions = page.locator("#sessions")
    await expect(sessions.get_by_role("alert")).to_contain_text("out of date or was altered")
    await sessions.get_by_role("link", name="First page of the sessions").click()
    await expect(page.locator("#sessions tbody tr a").first).to_be_visible()


async def test_an_unknown_url_parameter_is_named_not_silently_ignored(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    for path, notice in (
        ("/overview?platform=windows", "Unknown platform “windows”: showing all platforms."),
        ("/users?tab=foo", "Unknown tab “foo”: showing all profiles."),
        ("/users?segment=smart:9", "Unknown segment “smart:9”: showing every profile."),
        ("/users?sort=age&platform=windows", "Unknown sort “age”: sorted by last seen."),
    ):
        await page.goto(console_suite.url + path)
        await expect(page.locator("main .notice").first).to_have_text(notice)
    await expect(page.locator("main .notice")).to_have_count(2)  # the sort and the platform
    # Known values say nothing.
    await page.goto(console_suite.url + "/users?tab=identified&segment=smart:3&platform=ios")
    await expect(page.locator("table.users")).to_be_visible()
    await expect(page.locator("main .notice")).to_have_count(0)


async def test_subscription_words_stay_whole_on_a_laptop_screen(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-subscriptions-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    events = []
    for n, (channel, kind, subscribed) in enumerate(
        (
            (EMAIL, TRANSACTIONAL, False),
            (PUSH, MARKETING, True),
            (SMS, TRANSACTIONAL, False),
        )
    ):
        events.append(
            subscription(installation, channel, kind, subscribed, now - timedelta(seconds=n))
        )
    await track(console_suite, *events)

    def changed_thrice(profile: Any) -> bool:
        return sum(s.HasField("last_change_time") for s in profile.subscriptions) == 3

    profile = await stored_profile(console_suite, installation, changed_thrice, within=30)
    await sign_in(page, console_suite, land=False)
    await page.set_viewport_size({"width": 1366, "height": 768})
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    table = page.locator("#subscriptions")
    await expect(table).to_contain_text("Transactional")
    # Every word of the card on one line: a word split across lines has several line boxes.
    split = await table.evaluate(
        """table => {
          const split = [];
          const walker = document.createTreeWalker(table, NodeFilter.SHOW_TEXT);
          for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            for (const match of node.textContent.matchAll(/\\S+/g)) {
              const range = document.createRange();
              range.setStart(node, match.index);
              range.setEnd(node, match.index + match[0].length);
              const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
              if (tops.size > 1) split.push(match[0]);
            }
          }
          return split;
        }"""
    )
    assert split == []
    # And the table fits its card at this width, its last column in sight without scrolling.
    box = table.locator("xpath=..")
    assert await box.evaluate("box => box.scrollWidth <= box.clientWidth")
    await no_sideways_scroll(page)
