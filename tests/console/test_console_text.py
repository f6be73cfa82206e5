"""What pages say and how they lay out what people typed: the activity chart's days, search by
a custom ID with "@", right-to-left names, long values, the overview's refresh, sign-out, bad
URL parameters and the wording of empty or open things."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from playwright.async_api import expect

from profiles.client import open_channel
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import filters_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from services.console import present
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import query, sign_in, stored_profile, track
from tests.support.ingest import attribute_event, custom_event, op
from tests.support.query import session_start
from tests.support.segments_custom import attribute

RLO = "\u202e"
# The elements reaching past the viewport's right edge, innermost last: what widens a page.
WIDEST = """Array.from(document.querySelectorAll("body *"))
    .filter((node) => node.getBoundingClientRect().right > window.innerWidth + 1)
    .slice(0, 6).map((node) => node.tagName + "." + node.className + "#" + node.id + ":"
        + Math.round(node.getBoundingClientRect().right))"""


async def test_the_activity_chart_ends_on_today_in_the_zone_it_counts_in(
    page: Any, console_suite: ConsoleSuite
) -> None:
    now = datetime.now(UTC)
    # A zone whose date is not UTC's right now: ahead of it late in the UTC day, behind early.
    zone = "Pacific/Kiritimati" if now.hour >= 10 else "Pacific/Pago_Pago"
    today = now.astimezone(ZoneInfo(zone)).date()
    assert today != now.date()
    installation = f"console-zone-{uuid.uuid4().hex[:8]}"
    await track(
        console_suite,
        attribute_event(installation, [op("set", "TIMEZONE", zone)], time=now),
        custom_event(installation, name="today_there", time=now),
    )
    profile = await stored_profile(console_suite, installation)
    assert profile.summary.timezone == zone, profile
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    await expect(page.locator("#activity-heading")).to_contain_text(f"({zone})")
    bars = page.locator("#activity svg.chart g > title")
    await expect(bars).to_have_count(30)
    await expect(bars.last).to_contain_text(f"{today.isoformat()}: ")
    await expect(bars.last).to_contain_text("2 events")
    await expect(bars.first).to_contain_text(f"{(today - timedelta(days=29)).isoformat()}: ")


async def test_the_header_search_finds_a_custom_id_that_looks_like_an_email(
    page: Any, console_suite: ConsoleSuite
) -> None:
    custom_id = f"someone.{uuid.uuid4().hex[:6]}@example.org"
    await track(console_suite, custom_event(None, custom_id=custom_id, time=datetime.now(UTC)))
    await sign_in(page, console_suite)
    found = False
    for _ in range(20):  # identity stores the custom ID as the event is tracked; query reads it
        await page.get_by_label("Find a profile").fill(custom_id)
        await page.locator("form.search").get_by_role("button", name="Search").click()
        await page.wait_for_load_state()
        if "/profiles/" in page.url:
            found = True
            break
    assert found, await page.locator("main").inner_text()
    await expect(page.locator("#identity")).to_have_text(custom_id)
    await expect(page.locator("p.notice")).to_have_text("Found by custom ID.")


async def test_a_right_to_left_override_in_a_name_does_not_turn_the_page_s_words(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-bidi-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    await track(
        console_suite,
        attribute_event(
            installation,
            [op("set", "FIRST_NAME", "Zed"), op("set", "LAST_NAME", f"{RLO}Hostile")],
            time=now,
        ),
    )
    profile = await stored_profile(console_suite, installation)

    async def listed() -> bool:  # the users table is a projection fed by the bus
        request = query_pb.ListProfilesRequest(name_prefix="zed", page_size=50)
        rows = (await query(console_suite, "ListProfiles", request)).profiles
        return profile.summary.profile_id in {row.profile_id for row in rows}

    await eventually(listed, within=30)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users?name=zed")
    row = page.locator("table.users tbody tr", has_text="Hostile")
    await expect(row.locator(".marker")).to_have_text("details, no ID")
    # Drawn left to right: the marker's first letter left of its last one.
    first_left, last_left = await row.locator(".marker").evaluate(
        """(node) => {
            const text = node.firstChild, range = document.createRange();
            range.setStart(text, 0); range.setEnd(text, 1);
            const first = range.getBoundingClientRect().left;
            range.setStart(text, text.length - 1); range.setEnd(text, text.length);
            return [first, range.getBoundingClientRect().left];
        }"""
    )
    assert first_left < last_left
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    title = await page.title()
    assert title.endswith(" · Profiles console")
    # The name is isolated in the title (first strong isolate ... pop), so " · Profiles
    # console" keeps its direction.
    assert title.startswith("\u2068")
    assert "\u2069 · Profiles console" in title
    assert await page.locator("h1 bdi").count() == 1


async def test_long_values_without_spaces_never_widen_a_page(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-wide-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    await track(
        console_suite,
        attribute_event(
            installation,
            [op("set", "FIRST_NAME", "W" * 300), op("set", "motto", "m" * 250)],
            time=now,
        ),
        custom_event(installation, name="wide", time=now, note="n" * 250),
    )
    profile = await stored_profile(console_suite, installation)
    async with open_channel(
        console_suite.addresses["segments"], console_suite.project.keys["admin"]
    ) as channel:
        await segments_grpc.SegmentsServiceStub(channel).CreateSegment(
            segments_pb.CreateSegmentRequest(
                display_name="S" * 100,
                description="d" * 900,
                filter=attribute("motto", filters_pb2.OPERATOR_EQUALS, "m" * 250),
            )
        )
    await sign_in(page, console_suite, land=False)
    for width in (375, 1440):
        await page.set_viewport_size({"width": width, "height": 900})
        for path in (
            f"/profiles/{profile.summary.profile_id}",
            "/users?name=" + "w" * 50,
            "/segments",
        ):
            await page.goto(console_suite.url + path)
            wide = await page.evaluate("document.documentElement.scrollWidth")
            widest = await page.evaluate(WIDEST)
            assert wide <= width, f"{path} is {wide} px wide at {width} px: {widest}"


async def test_the_overview_refresh_keeps_the_keyboard_focus(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await page.clock.install()
    await sign_in(page, console_suite)
    link = page.locator("#overview a").first
    await link.focus()
    await page.evaluate("window.focused = document.activeElement")
    # What a refresh removes from the region (nothing but changed text, when it patches).
    await page.evaluate(
        """window.removed = [];
        new MutationObserver((records) => records.forEach((record) =>
            record.removedNodes.forEach((node) => window.removed.push(node.nodeName))
        )).observe(document.getElementById("overview"), {childList: true, subtree: true})"""
    )
    installation = f"console-focus-{uuid.uuid4().hex[:8]}"
    before = await page.locator("#installs").inner_text()
    await track(console_suite, session_start(installation, "s-1", datetime.now(UTC)))
    for _ in range(30):  # each run_for is one refresh; the rollups follow the bus
        await page.clock.run_for(10_500)
        if await page.locator("#installs").inner_text() != before:
            break
    await expect(page.locator("#installs")).not_to_have_text(before)
    assert await page.evaluate("window.focused.isConnected"), await page.evaluate("window.removed")
    # Only text changed: no element left the region (a screen reader hears the new figures).
    assert "A" not in await page.evaluate("window.removed")
    assert await page.evaluate("document.activeElement === window.focused"), "focus moved"


async def test_signing_out_after_signing_in_in_another_tab_still_signs_out(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite)
    other = await page.context.new_page()
    await sign_in(
        other, console_suite, land=False
    )  # a new session: this tab's form holds the old token
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sign out?")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("Project key")).to_be_visible()
    await other.goto(console_suite.url + "/users")
    await expect(other.get_by_label("Project key")).to_be_visible()


async def test_a_bad_session_parameter_is_named_beside_the_timeline(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-badsession-{uuid.uuid4().hex[:8]}"
    await track(console_suite, custom_event(installation, name="kept", time=datetime.now(UTC)))
    profile = await stored_profile(console_suite, installation)
    await sign_in(page, console_suite, land=False)
    for bad in ("s" * 65, "%00"):
        response = await page.goto(
            console_suite.url + f"/profiles/{profile.summary.profile_id}?session={bad}"
        )
        assert response is not None
        assert response.status == 200
        await expect(page.locator("#timeline")).to_contain_text("No such session")
        await expect(page.get_by_role("heading", name="Attributes")).to_be_visible()
        await expect(
            page.get_by_role("link", name="Show the events of every session")
        ).to_be_visible()


async def test_a_utc_time_range_in_the_url_fills_the_rejected_events_boxes(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    await page.goto(
        console_suite.url + "/rejected?start=2026-12-01T10:30:00Z&end=2026-12-02T08:00:00%2B00:00"
    )
    await expect(page.get_by_label("From (UTC)")).to_have_value("2026-12-01T10:30")
    await expect(page.get_by_label("Until (UTC)")).to_have_value("2026-12-02T08:00")
    await page.get_by_role("button", name="Filter").click()
    assert "start=2026-12-01T10%3A30" in page.url
    assert "end=2026-12-02T08%3A00" in page.url


async def test_an_open_session_s_length_says_it_is_open(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-open-{uuid.uuid4().hex[:8]}"
    await track(console_suite, session_start(installation, "open-1", datetime.now(UTC)))
    profile = await stored_profile(console_suite, installation)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    length = page.locator("table.sessions tbody tr").first.locator("td").nth(1)
    await expect(length).to_contain_text("open, ")
    await expect(length).to_contain_text(" so far")


async def test_a_channel_without_a_recorded_choice_says_so(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-nochoice-{uuid.uuid4().hex[:8]}"
    await track(console_suite, custom_event(installation, name="arrived", time=datetime.now(UTC)))
    profile = await stored_profile(console_suite, installation)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    row = page.locator("#subscriptions tr[data-subscription='SMS Marketing']")
    await expect(row.locator("td").nth(2)).to_have_text("no choice recorded")
    await expect(row.locator("td").nth(3)).to_have_text("—")


def test_a_rate_over_no_installation_reads_a_dash() -> None:
    assert present.percent_of(0, 0.0) == "—"
    assert present.percent_of(4, 0.5) == "50.0 %"


async def test_a_refused_name_search_says_what_was_wrong(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users?name=x%00")
    await expect(page.locator("#name-error")).to_contain_text("control characters")
    await page.goto(console_suite.url + "/users?name=" + "a" * 140)
    await expect(page.locator("#name-error")).to_have_text(
        "A name search holds at most 100 characters; this one has 140."
    )
