"""What an operator met in Chromium: the short ID the users table shows searched back, a search
that names each lookup that found nothing, counts whose verbs agree, a session's events headed
by when it started, the live segment table saying what it lists, and the users table on a
375 px screen."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from playwright.async_api import expect

from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import timeline_pb2
from profiles.segments.v1 import filters_pb2
from services.console import present
from services.console.pages import dropped_title
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import query, sign_in, stored_profile, track
from tests.support.ingest import attribute_event, custom_event, op
from tests.support.query import session_start


async def listed_in_users_table(suite: ConsoleSuite, profile_id: str) -> None:
    """Waits until the users table (a projection fed by the bus) lists the profile."""

    async def listed() -> bool:
        request = query_pb.ListProfilesRequest(profile_id_prefix=profile_id)
        reply = await query(suite, "ListProfiles", request)
        return [r.profile_id for r in reply.profiles] == [profile_id]

    await eventually(listed, within=30)


async def every_profile_id(suite: ConsoleSuite) -> list[str]:
    ids: list[str] = []
    request = query_pb.ListProfilesRequest(page_size=500)
    while True:
        reply = await query(suite, "ListProfiles", request)
        ids += [r.profile_id for r in reply.profiles]
        if not reply.next_page_token:
            return ids
        request.page_token = reply.next_page_token


async def search_for(page: Any, text: str) -> None:
    await page.get_by_label("Find a profile").fill(text)
    await page.locator("form.search").get_by_role("button", name="Search").click()


async def test_the_short_id_the_users_table_shows_finds_the_profile(
    page: Any, console_suite: ConsoleSuite
) -> None:
    now = datetime.now(UTC)
    nameless = f"console-nameless-{uuid.uuid4().hex[:8]}"
    named = f"console-named-{uuid.uuid4().hex[:8]}"
    await track(
        console_suite,
        custom_event(nameless, time=now),
        attribute_event(named, [op("set", "FIRST_NAME", "Quillon")], time=now),
    )
    anonymous = (await stored_profile(console_suite, nameless)).summary.profile_id
    with_name = (await stored_profile(console_suite, named)).summary.profile_id
    for profile_id in (anonymous, with_name):
        await listed_in_users_table(console_suite, profile_id)
    await sign_in(page, console_suite, land=False)

    # What the users table shows of each: "Anonymous 1a2b3c4d", and "profile 5e6f7a8b" under
    # a name without a custom ID.
    await page.goto(console_suite.url + "/users?tab=anonymous")
    shown = page.locator(f'table.users a[href="/profiles/{anonymous}"]')
    await expect(shown).to_have_text(f"Anonymous {anonymous[:8]}")
    await page.goto(console_suite.url + "/users?name=quillon")
    row = page.locator("table.users tbody tr", has_text="Quillon")
    await expect(row.locator(".also")).to_have_text(f"profile {with_name[:8]}")

    for typed, profile_id in (
        (anonymous[:8], anonymous),
        (f"Anonymous {anonymous[:8]}", anonymous),
        (f"  anonymous {anonymous[:8].upper()} ", anonymous),
        (anonymous[:13], anonymous),  # more of it, with its dash
        (f"profile {with_name[:8]}", with_name),
        (with_name[:8].upper(), with_name),
    ):
        await search_for(page, typed)
        await expect(page).to_have_url(re.compile(f"/profiles/{profile_id}$"))

    # Several IDs start with it: the users table lists them, the filter shown as a chip.
    ids = await every_profile_id(console_suite)
    digit, count = Counter(i[0] for i in ids).most_common(1)[0]
    assert count >= 2
    await search_for(page, f"Anonymous {digit.upper()}")
    await expect(page).to_have_url(re.compile(f"/users\\?id={digit}$"))
    await expect(page.locator(".chips")).to_contain_text(f"Profile ID starting with {digit}")
    await expect(page.locator("#shown")).to_have_text(
        f"Profiles 1 to {count} of {count}" if count <= 50 else re.compile(f"of {count}$")
    )
    hrefs = await page.locator("table.users td.name a").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))"
    )
    assert hrefs
    assert all(h.startswith(f"/profiles/{digit}") for h in hrefs), hrefs
    # Lifting the chip lists everyone again.
    lift = f"Remove the filter Profile ID starting with {digit}"
    await page.get_by_role("link", name=lift).click()
    await expect(page.locator(".chips")).to_have_count(0)
    await page.goto(console_suite.url + "/users?id=zz")
    await expect(page.locator("p.notice")).to_contain_text(
        "Not the start of a profile ID “zz”: showing every profile."
    )

    # No ID starts with it: said so, and the name search it could also be is said too.
    taken = {uuid.UUID(i).hex[:8] for i in ids}
    nobody = next(f"{n:08x}" for n in range(1 << 32) if f"{n:08x}" not in taken)
    await search_for(page, nobody)
    await expect(page.locator("main p.found")).to_have_text(f"No profile matches “{nobody}”.")
    misses = page.locator("#search-misses li")
    await expect(misses).to_contain_text(
        [
            f"No profile has the custom ID “{nobody}”.",
            f"No profile has an ID starting with {nobody}.",
            f"No profile has a word of its name starting with “{nobody}”.",
        ]
    )
    # "Anonymous …" is no name: no name search.
    await search_for(page, f"Anonymous {nobody}")
    await expect(page.locator("main p.found")).to_contain_text("No profile matches")
    await expect(page.locator("#search-misses")).to_contain_text(
        f"No profile has an ID starting with {nobody}."
    )
    await expect(page.locator("#search-misses")).not_to_contain_text("name")


async def test_a_custom_id_nobody_has_is_said_plainly_before_the_name_search(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite)
    unknown = f"user-{uuid.uuid4().hex[:6]}"
    await search_for(page, unknown)
    await expect(page).to_have_url(re.compile("/search\\?"))
    await expect(page.locator("main p.found")).to_have_text(f"No profile matches “{unknown}”.")
    await expect(page.locator("#search-misses li")).to_have_text(
        [
            f"No profile has the custom ID “{unknown}”.",
            f"No profile has an installation with the ID “{unknown}”.",
            f"No profile has a custom ID starting with “{unknown}”.",
            f"No profile has an email address starting with “{unknown}” (in any case).",
            f"No profile has a word of its name starting with “{unknown}”.",
        ]
    )
    # Searched by custom ID only: that lookup alone, and the start of one.
    await page.goto(console_suite.url + f"/search?by=custom_id&q={quote(unknown)}")
    await expect(page.locator("#search-misses li")).to_have_text(
        [
            f"No profile has the custom ID “{unknown}”.",
            f"No profile has a custom ID starting with “{unknown}”.",
        ]
    )


async def test_one_profile_matches_a_new_segment_in_the_singular(
    page: Any, console_suite: ConsoleSuite
) -> None:
    plan = f"solo{uuid.uuid4().hex[:8]}"
    installation = f"console-solo-{uuid.uuid4().hex[:8]}"
    await track(
        console_suite,
        attribute_event(installation, [op("set", "console_plan", plan)], time=datetime.now(UTC)),
    )
    await stored_profile(console_suite, installation)
    name = f"Solo plan {uuid.uuid4().hex[:6]}"
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/segments/new")
    await page.get_by_label("Name", exact=True).fill(name)
    await page.locator("#c0-kind").select_option("attribute")
    await page.locator("#c0-attribute").select_option("custom")
    await page.locator("#c0-custom_name").fill("console_plan")
    await page.locator("#c0-operator").select_option("equals")
    await page.locator("#c0-value").fill(plan)
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#preview")).to_contain_text("Preview: 1 profile matches now.")
    await page.get_by_role("button", name="Create segment").click()
    await expect(page.locator("#created")).to_have_text(
        f"Segment “{name}” created: 1 profile matches it now."
    )


def test_every_count_the_console_words_agrees_with_its_number() -> None:
    assert [present.count_of(n, "profile", "matches", "match") for n in (0, 1, 2)] == [
        "0 profiles match",
        "1 profile matches",
        "2 profiles match",
    ]
    assert present.count_of(1, "box", "needs", "need", plural="boxes") == "1 box needs"
    assert present.count_of(3, "box", "needs", "need", plural="boxes") == "3 boxes need"
    assert present.byte_size(1) == "1 byte"
    assert present.shown_rows(1, 50, 1, 1, at_least=False) == "Profile 1 of 1"
    assert dropped_title(1).startswith("1 live item was lost")
    assert dropped_title(2).startswith("2 live items were lost")
    window = filters_pb2.FilterNode()
    window.condition.last_seen.within_last_days = 1
    assert present.filter_words(window) == "last seen within the last 1 day"
    counted = filters_pb2.FilterNode()
    counted.condition.event_count.event_name = "purchase"
    counted.condition.event_count.operator = filters_pb2.OPERATOR_GREATER_THAN
    counted.condition.event_count.count = 2
    counted.condition.event_count.within_last_days = 1
    assert present.filter_words(counted).endswith(" in the last 1 day")


async def test_a_session_s_events_are_headed_by_when_it_started(
    page: Any, console_suite: ConsoleSuite
) -> None:
    # 22 sessions: the oldest two are past the profile page's first 20.
    installation = f"console-sessions-{uuid.uuid4().hex[:8]}"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    sessions = [f"s{n:02d}-{uuid.uuid4().hex[:12]}" for n in range(22)]
    await track(
        console_suite,
        *[
            session_start(installation, session, start + timedelta(hours=n))
            for n, session in enumerate(sessions)
        ],
    )
    profile = await stored_profile(
        console_suite, installation, lambda p: p.counters.session_count == 22
    )
    profile_id = profile.summary.profile_id
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    heading = page.locator("#events h2")
    # The newest session, clicked in the list.
    await page.locator("#sessions tbody tr a").first.click()
    await expect(page).to_have_url(re.compile(f"session={sessions[-1]}"))
    started = present.when(start + timedelta(hours=21))
    await expect(heading).to_have_text(
        re.compile(f"^Events of the session started {started}\\s+session ID {sessions[-1]}$")
    )
    await expect(heading.locator(".session-id")).to_have_text(f"session ID {sessions[-1]}")
    # A session of the second page of sessions, clicked there: the link keeps that page.
    await page.get_by_role("link", name="Older sessions").click()
    await page.locator("#sessions tbody tr a").first.click()
    await expect(page).to_have_url(re.compile(f"session={sessions[1]}.*sessions_page="))
    await expect(heading).to_contain_text(
        f"Events of the session started {present.when(start + timedelta(hours=1))}"
    )
    # Opened by its address alone (not among the sessions listed): its start event tells.
    await page.goto(console_suite.url + f"/profiles/{profile_id}?session={sessions[0]}")
    await expect(heading).to_contain_text(f"Events of the session started {present.when(start)}")
    # A session the page cannot date: headed as one session, its ID after.
    await page.goto(console_suite.url + f"/profiles/{profile_id}?session=nowhere")
    await expect(heading).to_have_text(re.compile("^Events of one session\\s+session ID nowhere$"))


def test_a_session_start_is_read_from_the_sessions_else_from_its_start_event() -> None:
    started = datetime(2026, 12, 2, 20, 31, 5, tzinfo=UTC)
    listed = timeline_pb2.Session(session_id="a")
    listed.start_time.FromDatetime(started)
    event = timeline_pb2.TimelineEvent(session_id="b")
    event.session.type = timeline_pb2.SESSION_EVENT_TYPE_START
    event.event_time.FromDatetime(started + timedelta(hours=1))
    heartbeat = timeline_pb2.TimelineEvent(session_id="c")
    heartbeat.session.type = timeline_pb2.SESSION_EVENT_TYPE_HEARTBEAT
    assert present.session_started("a", [listed], [event]) == "2026-12-02 20:31:05 UTC"
    assert present.session_started("b", [listed], [event]) == "2026-12-02 21:31:05 UTC"
    assert present.session_started("c", [listed], [event, heartbeat]) == ""


async def test_the_live_segment_table_says_it_lists_the_changes_recorded_lately(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/segments")
    await expect(page.locator("#segment-status")).to_have_text(
        "Live: the changes recorded in the last hour, then as they are recorded."
    )
    meaning = page.locator("#segment-changes-meaning")
    await expect(meaning).to_contain_text("which can be days before it was recorded")


# Every word of the table's cells whose letters lie on more than one line (a word cut in two),
# and the cell it is in: a word is a run of text between spaces, read from the text nodes.
BROKEN_WORDS = """(table) => {
  const broken = [];
  const walker = document.createTreeWalker(table.tBodies[0], NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (const match of node.data.matchAll(/\\S+/g)) {
      const range = document.createRange();
      range.setStart(node, match.index);
      range.setEnd(node, match.index + match[0].length);
      const tops = new Set(Array.from(range.getClientRects()).filter((r) => r.width > 0)
        .map((r) => Math.round(r.top)));
      if (tops.size > 1) broken.push(match[0]);
    }
  }
  return broken;
}"""


async def test_the_users_table_keeps_words_whole_and_scrolls_in_place_on_a_phone(
    browser: Any, console_suite: ConsoleSuite
) -> None:
    context = await browser.new_context(viewport={"width": 375, "height": 800})
    try:
        page = await context.new_page()
        await sign_in(page, console_suite, land=False)
        await page.goto(console_suite.url + "/users")
        table = page.locator("table.users")
        await expect(table.locator("tbody tr").first).to_be_visible()
        assert await table.evaluate(BROKEN_WORDS) == []
        # A name takes one or two lines ("Anonymous" / "1a2b3c4d" at most), never one a letter.
        line = await page.locator("table.users td.name a").first.evaluate(
            "(a) => parseFloat(getComputedStyle(a).lineHeight)"
        )
        heights = await page.locator("table.users td.name a").evaluate_all(
            "links => links.map((a) => a.getBoundingClientRect().height)"
        )
        assert heights
        assert max(heights) <= 2 * line + 1, (line, heights)
        # The page itself never scrolls sideways: the table scrolls in its own box, and its
        # last column is reached by scrolling that box.
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375
        box = page.locator(".table-scroll")
        width, client = await box.evaluate("(b) => [b.scrollWidth, b.clientWidth]")
        assert width > client
        for header in ("Total time spent", "Smart segment"):
            cell = table.locator("thead th", has_text=header)
            await cell.scroll_into_view_if_needed()
            left, right, box_left, box_right = await cell.evaluate(
                """(c) => {
                    const r = c.getBoundingClientRect();
                    const b = c.closest(".table-scroll").getBoundingClientRect();
                    return [r.left, r.right, b.left, b.right];
                }"""
            )
            assert box_left - 1 <= left, (header, left, box_left)
            assert right <= box_right + 1, (header, right, box_right)
            assert await page.evaluate("document.documentElement.scrollWidth") <= 375
        time_spent = table.locator("tbody tr").first.locator("td").nth(4)
        await time_spent.scroll_into_view_if_needed()
        await expect(time_spent).to_be_in_viewport(ratio=1)
    finally:
        await context.close()
