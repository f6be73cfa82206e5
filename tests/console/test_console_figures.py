"""Figures that open what they count: every overview count of profiles opens the users table
filtered to exactly those profiles, rejected events are counted by reason with chips that
filter, and a profile's timeline is filtered by kind and name across its pages."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2
from playwright.async_api import expect

from profiles.client import open_channel
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import (
    EMAIL,
    MARKETING,
    profiles_listed_by,
    query,
    reject,
    sign_in,
    stored_profile,
    track,
)
from tests.support.ingest import attribute_event, custom_event, op
from tests.support.query import session_start, subscription


async def listed_total(page: Any) -> int:
    """The users table's total, from "Profiles 1 to 50 of 53" (0 for "No profile")."""
    text = await page.locator("#shown").inner_text()
    if text.startswith("No profile"):
        return 0
    found = re.fullmatch(r"Profiles [\d,]+ to [\d,]+ of ([\d,]+)", text)
    assert found is not None, text
    return int(found.group(1).replace(",", ""))


async def figure_opens_its_profiles(page: Any, overview: str, figure: str) -> int:
    """Clicks the overview figure `figure` (its data-figure) and checks the users table lists
    as many profiles as it says; returns that number. The overview and the users table are
    both fed by the bus, so a pair read while a previous test's events land is read again."""
    seen: list[tuple[int, int]] = []

    async def agree() -> bool:
        await page.goto(overview)
        link = page.locator(f'#overview a[data-figure="{figure}"]')
        await expect(link).to_have_count(1)
        count = int((await link.inner_text()).replace(",", ""))
        await link.click()
        await expect(page).to_have_url(re.compile(r"/users(\?|$)"))
        await expect(page.locator("#shown")).to_be_visible()
        seen.append((count, await listed_total(page)))
        return seen[-1][0] == seen[-1][1]

    try:
        await eventually(agree, within=20)
    except TimeoutError:
        raise AssertionError(f"{figure}: (figure, listed) read {seen[-3:]}") from None
    return seen[-1][0]


async def test_each_overview_figure_opens_the_profiles_it_counts(
    page: Any, console_suite: ConsoleSuite
) -> None:
    # Someone an email can reach (an address and email marketing consent): the demo's people
    # may have none.
    installation, now = f"console-reach-{uuid.uuid4().hex[:8]}", datetime.now(UTC)
    consent = subscription(installation, EMAIL, MARKETING, True, now)
    await track(
        console_suite,
        attribute_event(installation, [op("set", "EMAIL", "reach@example.com")], time=now),
        consent,
    )

    async def reachable() -> bool:
        reply = await query(console_suite, "GetOverview", query_pb.GetOverviewRequest())
        return any(r.reachable_profile_count for r in reply.overview.channel_reaches)

    await eventually(reachable, within=30)
    await sign_in(page, console_suite, land=False)
    everything = (await query(console_suite, "GetOverview", query_pb.GetOverviewRequest())).overview
    overview = console_suite.url + "/overview"
    language = everything.languages.top_values[0].value
    country = everything.countries.top_values[0].value
    smart = next(c for c in everything.smart_segments if c.profile_count)
    flagged = [f for c in everything.smart_segments for f in c.flags]
    figures = [
        "profiles",
        "identified",
        "anonymous",
        f"smart:{smart.segment}",
        f"flag:{flagged[0].flag}",
        f"language:{language}",
        f"country:{country}",
        "reach:email",
        "reach:push",
    ]
    counted = {
        figure: await figure_opens_its_profiles(page, overview, figure) for figure in figures
    }
    assert counted["identified"] > 0
    assert counted["anonymous"] > 0
    assert counted[f"language:{language}"] > 0
    assert counted[f"country:{country}"] > 0
    assert counted["reach:email"] > 0
    # The users table names the filters a figure opened, each removable.
    await page.goto(overview)
    await page.locator(f'#overview a[data-figure="language:{language}"]').click()
    chip = page.locator("ul.chips li", has_text=f"Language: {language}")
    await expect(chip).to_have_count(1)
    await chip.get_by_role("link").click()
    await expect(page.locator("ul.chips")).to_have_count(0)
    assert "language=" not in page.url

    # On one platform: the profile figures open the profiles installed there.
    ios = console_suite.url + "/overview?platform=ios"
    for figure in ("profiles", "identified", f"country:{country}", "reach:push"):
        await figure_opens_its_profiles(page, ios, figure)
    await expect(page).to_have_url(re.compile(r"platform=ios"))
    # Its smart segments are counted by sessions on the platform, unlike the users table's:
    # no link there, and the page says where the linked ones are.
    await page.goto(ios)
    smart_table = page.locator("#overview table", has=page.locator("caption", has_text="Smart"))
    await expect(smart_table.locator("a")).to_have_count(0)
    await expect(page.locator("#smart-platform")).to_contain_text("open no list")


async def test_the_users_table_pages_sorts_and_counts_by_language(
    page: Any, console_suite: ConsoleSuite
) -> None:
    # 53 people speaking a language no demo profile speaks: more than a page.
    language = "yo"
    await profiles_listed_by(console_suite, "LANGUAGE", language, language=language)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users?language=YO")
    shown, rows = page.locator("#shown"), page.locator("table.users tbody tr")
    await expect(shown).to_have_text("Profiles 1 to 50 of 53")
    await expect(page.locator("ul.chips")).to_have_text(re.compile("Language: yo"))
    # Sorting keeps the filter, and so do the pages and Previous.
    await page.get_by_role("link", name="Total sessions").click()
    await expect(page).to_have_url(re.compile(r"language=yo"))
    await expect(shown).to_have_text("Profiles 1 to 50 of 53")
    await page.get_by_role("link", name="Next page").click()
    await expect(shown).to_have_text("Profiles 51 to 53 of 53")
    await expect(rows).to_have_count(3)
    await page.get_by_role("link", name="Previous page").click()
    await expect(shown).to_have_text("Profiles 1 to 50 of 53")
    await expect(page).to_have_url(re.compile(r"sort=sessions"))
    # The name filter's form keeps the language.
    await page.get_by_role("button", name="Filter").click()
    await expect(shown).to_have_text("Profiles 1 to 50 of 53")
    # The Identified tab too: none of them logged in.
    await page.get_by_role("link", name="Identified", exact=True).click()
    await expect(shown).to_have_text("No profile")
    await expect(page).to_have_url(re.compile(r"language=yo"))


async def test_unknown_users_filters_are_named(page: Any, console_suite: ConsoleSuite) -> None:
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users?language=french&country=France&reach=fax")
    notices = page.locator("main .notice")
    await expect(notices).to_have_text(
        [
            "Unknown language “french”: showing every language.",
            "Unknown country “France”: showing every country.",
            "Unknown reach “fax”: showing every profile.",
        ]
    )
    await expect(page.locator("ul.chips")).to_have_count(0)
    await expect(page.locator("table.users tbody tr a").first).to_be_visible()
    await page.goto(console_suite.url + "/users?country=fr&reach=sms")
    await expect(notices).to_have_count(0)
    await expect(page.locator("ul.chips li")).to_have_text(["Country: FR ✕", "Reachable by SMS ✕"])


async def test_rejected_events_are_counted_by_reason_and_a_chip_filters_by_it(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-rejected-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    await reject(
        console_suite,
        custom_event(installation, name="ahead", time=now + timedelta(days=30)),
        custom_event(installation, name="ahead", time=now + timedelta(days=31)),
        custom_event(installation, name="behind", time=now - timedelta(days=40)),
    )
    # A range of whole minutes around now, as the page's boxes take it (UTC).
    start = (now - timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M")
    end = (now + timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M")
    listing = query_pb.ListRejectedEventsRequest(include_reason_counts=True, page_size=1)
    listing.start_time.FromDatetime(datetime.fromisoformat(start).replace(tzinfo=UTC))
    listing.end_time.FromDatetime(datetime.fromisoformat(end).replace(tzinfo=UTC))
    expected = {
        c.reason: c.count
        for c in (await query(console_suite, "ListRejectedEvents", listing)).reason_counts
    }
    assert expected["EVENT_TIME_IN_FUTURE"] >= 2
    assert expected["EVENT_TIME_TOO_OLD"] >= 1

    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/rejected?start={start}&end={end}")
    chips = page.locator("#reason-chips li")
    total = sum(expected.values())
    await expect(chips).to_have_text(
        [f"All reasons {total:,}", *(f"{reason} {n:,}" for reason, n in expected.items())]
    )
    await expect(page.locator("#reason-bounds")).to_have_count(0)
    await chips.filter(has_text="EVENT_TIME_TOO_OLD").get_by_role("link").click()
    await expect(page).to_have_url(re.compile(r"reason=EVENT_TIME_TOO_OLD"))
    # The time range is kept, every reason still counted, the chosen one marked.
    await expect(page.get_by_label("From (UTC)")).to_have_value(start)
    await expect(page.get_by_label("Until (UTC)")).to_have_value(end)
    await expect(chips).to_have_count(len(expected) + 1)
    current = page.locator("#reason-chips a[aria-current]")
    await expect(current).to_have_text(f"EVENT_TIME_TOO_OLD {expected['EVENT_TIME_TOO_OLD']:,}")
    reasons = page.locator("table.rejected tbody tr td:nth-child(2)")
    await expect(reasons).to_have_count(expected["EVENT_TIME_TOO_OLD"])
    assert set(await reasons.all_inner_texts()) == {"EVENT_TIME_TOO_OLD"}
    await chips.filter(has_text="All reasons").get_by_role("link").click()
    await expect(page).not_to_have_url(re.compile(r"reason="))
    await expect(page.get_by_label("From (UTC)")).to_have_value(start)
    await expect(page.locator("table.rejected tbody tr")).to_have_count(min(total, 50))
    # A row's reason filters by it too, within the same time range.
    await reasons.filter(has_text="EVENT_TIME_IN_FUTURE").first.get_by_role("link").click()
    await expect(page).to_have_url(re.compile(r"reason=EVENT_TIME_IN_FUTURE"))
    await expect(page.get_by_label("Until (UTC)")).to_have_value(end)


async def test_the_timeline_is_filtered_by_kind_and_name_across_its_pages(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-timeline-{uuid.uuid4().hex[:8]}"
    start = datetime.now(UTC) - timedelta(hours=2)
    await track(
        console_suite,
        session_start(installation, "timeline-1", start),
        *(
            custom_event(installation, name="tick", time=start + timedelta(seconds=n + 1))
            for n in range(55)
        ),
        *(
            custom_event(installation, name="tock", time=start + timedelta(minutes=5, seconds=n))
            for n in range(3)
        ),
    )

    profile = await stored_profile(
        console_suite, installation, lambda p: p.counters.event_count >= 59, within=30
    )
    profile_id = profile.summary.profile_id
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    titles = page.locator("#timeline > li strong")
    await page.get_by_label("Kind").select_option("custom")
    await page.get_by_label("Custom event name").fill("TICK")
    await page.get_by_role("button", name="Filter").click()
    await expect(page).to_have_url(re.compile(r"kind=custom&event_name=TICK"))
    await expect(page.locator("#events h2")).to_have_text("Events: custom events named “TICK”")
    await expect(titles).to_have_count(50)
    assert set(await titles.all_inner_texts()) == {"tick"}
    # The filter is kept by the timeline's pages, both ways.
    await page.get_by_role("link", name="Older events").click()
    await expect(titles).to_have_count(5)
    assert set(await titles.all_inner_texts()) == {"tick"}
    await expect(page.get_by_label("Custom event name")).to_have_value("TICK")
    await page.get_by_role("link", name="Latest events").click()
    await expect(titles).to_have_count(50)
    await expect(page).to_have_url(re.compile(r"kind=custom"))
    # A kind alone.
    await page.get_by_label("Custom event name").fill("")
    await page.get_by_label("Kind").select_option("session")
    await page.get_by_role("button", name="Filter").click()
    await expect(titles).to_have_text(["Session start"])
    # A session's link keeps the filter too.
    await page.locator("#sessions tbody tr a").first.click()
    await expect(page).to_have_url(re.compile(r"\?session=[^&]+&kind=session#events$"))
    await expect(titles).to_have_text(["Session start"])
    # A name no event can have is told beside its box; an unknown kind is named.
    await page.goto(console_suite.url + f"/profiles/{profile_id}?event_name=no+such+name!")
    await expect(page.locator("#event-name-error")).to_contain_text("1 to 30 letters")
    await expect(page.locator("#timeline > li")).to_have_count(0)
    await page.goto(console_suite.url + f"/profiles/{profile_id}?kind=emails")
    await expect(page.locator("#events .notice")).to_have_text(
        "Unknown kind “emails”: showing every kind."
    )
    await expect(titles).to_have_count(50)


async def test_a_funnel_shows_each_step_s_conversion_and_drop_off(
    page: Any, console_suite: ConsoleSuite
) -> None:
    # Step names no other test sends: two people open, one of them pays.
    suffix = uuid.uuid4().hex[:8]
    opened, paid = f"fopen_{suffix}", f"fpay_{suffix}"
    async with open_channel(
        console_suite.addresses["segments"], console_suite.project.keys["admin"]
    ) as channel:
        await segments_grpc.SegmentsServiceStub(channel).CreateFunnel(
            segments_pb.CreateFunnelRequest(
                display_name=f"Checkout {suffix}",
                steps=[funnels_pb2.FunnelStep(event_name=n) for n in (opened, paid)],
                conversion_window=duration_pb2.Duration(seconds=86_400),
            )
        )
    now = datetime.now(UTC)
    first, second = (f"console-funnel-{uuid.uuid4().hex[:8]}" for _ in range(2))
    await track(
        console_suite,
        custom_event(first, name=opened, time=now - timedelta(minutes=2)),
        custom_event(first, name=paid, time=now - timedelta(minutes=1)),
        custom_event(second, name=opened, time=now - timedelta(minutes=2)),
    )
    await sign_in(page, console_suite, land=False)
    table = page.locator("table.funnel-figures", has=page.locator(f"text={opened}"))

    async def counted() -> bool:  # the funnel reads events, stored as ingest answers
        await page.goto(console_suite.url + "/segments")
        cells = await table.locator("tbody tr td:nth-child(3)").all_inner_texts()
        return cells == ["2", "1"]

    await eventually(counted, within=30)
    rows = table.locator("tbody tr")
    await expect(rows.nth(0).locator("td")).to_have_text(["1", opened, "2", "—", "100.0 %", "—"])
    await expect(rows.nth(1).locator("td")).to_have_text(
        ["2", paid, "1", "50.0 %", "50.0 %", "1 (50.0 %)"]
    )
