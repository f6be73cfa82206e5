"""The console in a real browser, against a real suite fed by the demo: what a person sees."""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from playwright.async_api import expect

from profiles.client import open_channel
from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from profiles.segments.v1 import filters_pb2, funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite
from tests.support.ingest import attribute_event, custom_event, op
from tests.support.query import session_start, subscription
from tests.support.segments_custom import attribute

ROOT = Path(__file__).resolve().parents[2]
# Screenshots of every page are written only when asked, so a test run leaves the tree clean:
# PROFILES_CONSOLE_SCREENSHOTS=docs/console (relative to the repository, or absolute).
SCREENSHOTS_ENV = "PROFILES_CONSOLE_SCREENSHOTS"
EMAIL, SMS, PUSH = types_pb2.CHANNEL_EMAIL, types_pb2.CHANNEL_SMS, types_pb2.CHANNEL_PUSH
MARKETING = types_pb2.SUBSCRIPTION_KIND_MARKETING
TRANSACTIONAL = types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL
PAGE_BUDGET_BYTES = 200_000


async def sign_in(page: Any, suite: ConsoleSuite, role: str = "read", *, land: bool = True) -> None:
    """Signs the page's browser in with the project's `role` key: the sign-in form's own GET
    and POST, sent from the page's context (its cookie jar, as the form would), without
    rendering the form; then the overview, where a sign-in lands, unless `land` is false (the
    test opens another page next). Rendering and filling the form took about a second per
    test; the form itself is driven by sign_in_with_the_form and the sign-in tests."""
    form = await page.request.get(suite.url + "/signin")
    token = re.search(r'name="csrf_token" value="([^"]+)"', await form.text())
    assert token is not None, await form.text()
    posted = await page.request.post(
        suite.url + "/signin",
        form={"csrf_token": token[1], "key": suite.project.keys[role]},
        max_redirects=0,
    )
    assert posted.status == 303, await posted.text()
    assert posted.headers["location"] == "/overview"
    if land:
        await page.goto(suite.url + "/overview")
        await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()


async def sign_in_with_the_form(page: Any, suite: ConsoleSuite, role: str = "read") -> None:
    """Signs in as a person does: the form filled and sent, landing on the overview."""
    await page.goto(suite.url + "/signin")
    await page.get_by_label("Project key").fill(suite.project.keys[role])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()


async def query(suite: ConsoleSuite, method: str, request: Any) -> Any:
    async with open_channel(suite.addresses["query"], suite.project.keys["read"]) as channel:
        return await getattr(query_grpc.QueryServiceStub(channel), method)(request)


async def track(suite: ConsoleSuite, *events: ingest_pb.Event) -> None:
    async with open_channel(suite.addresses["ingest"], suite.project.keys["sdk"]) as channel:
        reply = await ingest_grpc.IngestServiceStub(channel).TrackEvents(
            ingest_pb.TrackEventsRequest(events=events)
        )
    assert reply.accepted_count == len(events), reply


async def reject(suite: ConsoleSuite, *events: ingest_pb.Event) -> list[str]:
    """Sends events ingest must reject; their reasons, in order."""
    async with open_channel(suite.addresses["ingest"], suite.project.keys["sdk"]) as channel:
        reply = await ingest_grpc.IngestServiceStub(channel).TrackEvents(
            ingest_pb.TrackEventsRequest(events=events)
        )
    assert all(result.reason for result in reply.results), reply
    return [result.reason for result in reply.results]


async def profiles_listed_by(
    suite: ConsoleSuite, native: str, value: str, count: int = 53, **filters: Any
) -> None:
    """`count` new profiles whose native attribute is `value`, once the users table (a
    projection fed by the bus) lists them all under `filters`: more than a page by default."""
    now = datetime.now(UTC)
    await track(
        suite,
        *[
            attribute_event(
                f"console-{uuid.uuid4().hex}",
                [op("set", native, value)],
                time=now - timedelta(seconds=n),
            )
            for n in range(count)
        ],
    )

    async def listed() -> bool:
        request = query_pb.ListProfilesRequest(include_total_size=True, **filters)
        return (await query(suite, "ListProfiles", request)).total_size == count

    await eventually(listed, within=30)


async def stored_profile(
    suite: ConsoleSuite,
    installation: str,
    ready: Callable[[Any], bool] = lambda profile: True,
    within: float = 10.0,
) -> Any:
    """The installation's profile once query has it and `ready(profile)` holds."""
    found: list[Any] = []

    async def stored() -> bool:
        request = query_pb.GetProfileRequest(installation_id=installation)
        try:
            reply = await query(suite, "GetProfile", request)
        except grpc.aio.AioRpcError:
            return False
        found[:] = [reply.profile]
        return ready(reply.profile)

    await eventually(stored, within=within)
    return found[0]


async def identified_profile(suite: ConsoleSuite) -> Any:
    """A demo profile with an email and at least one session (the fullest profile page)."""
    reply = await query(
        suite,
        "ListProfiles",
        query_pb.ListProfilesRequest(
            identity_filter=query_pb.PROFILE_IDENTITY_FILTER_IDENTIFIED,
            order_by=query_pb.PROFILE_ORDER_BY_SESSION_COUNT,
            page_size=50,
        ),
    )
    for row in reply.profiles:
        view = await query(
            suite, "GetProfile", query_pb.GetProfileRequest(profile_id=row.profile_id)
        )
        if view.profile.native_attributes.email and view.profile.installations:
            return view.profile
    raise AssertionError("the demo made no identified profile with an email")


async def test_a_wrong_key_and_an_sdk_key_are_refused(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await page.goto(console_suite.url + "/users")
    await expect(page).to_have_url(re.compile(r"/signin\?next=%2Fusers"))
    await page.get_by_label("Project key").fill("not-a-key")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("not valid")
    await page.get_by_label("Project key").fill(console_suite.project.keys["sdk"])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("SDK key")
    cookies = await page.context.cookies()
    assert not [c for c in cookies if c["name"] == "profiles_console_session"]


async def test_a_key_no_header_can_carry_is_told_not_valid(
    page: Any, console_suite: ConsoleSuite
) -> None:
    """A key gRPC metadata cannot carry (not printable ASCII) failed in the console's own gRPC
    client: a bare 500 instead of the sign-in page's refusal."""
    await page.goto(console_suite.url + "/signin")
    for key in ("clé-inconnue", "prf_\u200bzz"):
        await page.get_by_label("Project key").fill(key)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("alert")).to_contain_text("not valid")


async def test_a_person_finds_a_profile_by_email_reads_it_and_signs_out(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    await sign_in_with_the_form(page, console_suite)
    session_cookie = next(
        c for c in await page.context.cookies() if c["name"] == "profiles_console_session"
    )
    assert session_cookie["httpOnly"]
    assert session_cookie["sameSite"] == "Strict"
    assert console_suite.project.keys["read"] not in session_cookie["value"]

    await page.get_by_label("Find a profile").fill(profile.native_attributes.email.upper())
    await page.get_by_role("button", name="Search").click()
    await expect(page).to_have_url(re.compile(f"/profiles/{profile.summary.profile_id}$"))
    await expect(page.locator("#identity")).to_have_text(profile.summary.custom_id)
    assert console_suite.project.keys["read"] not in await page.content()
    sessions = page.locator("#sessions tbody tr a")
    await expect(sessions.first).to_be_visible()
    await expect(page.locator("#timeline > li").first).to_be_visible()
    # Each engagement figure under the label of what it counts (Countly's three scores).
    engagement = page.locator("#engagement")
    for label, value in (
        ("Score 2: sessions", str(profile.engagement.score2)),
        ("Score 3: days with a session", str(profile.engagement.score3)),
    ):
        await expect(engagement.locator("div", has_text=label).locator("dd")).to_have_text(value)

    # Clicking a session shows that session's events only.
    reply = await query(
        console_suite,
        "ListSessions",
        query_pb.ListSessionsRequest(profile_id=profile.summary.profile_id, page_size=1),
    )
    chosen = reply.sessions[0]
    await sessions.first.click()
    await expect(page).to_have_url(re.compile(f"session={chosen.session_id}"))
    await expect(page.locator("#events h2")).to_contain_text(chosen.session_id)
    events = await query(
        console_suite,
        "ListEvents",
        query_pb.ListEventsRequest(
            profile_id=profile.summary.profile_id, session_id=chosen.session_id, page_size=50
        ),
    )
    await expect(page.locator("#timeline > li")).to_have_count(len(events.events))
    shown = await page.locator("#timeline > li").evaluate_all(
        "items => items.map(i => i.dataset.eventId)"
    )
    assert shown == [e.event_id for e in events.events]

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


async def test_the_users_table_sorts_by_clicking_a_header(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users")
    await page.get_by_role("link", name="Total sessions").click()
    header = page.locator("th[aria-sort]")
    await expect(header).to_have_attribute("aria-sort", "descending")
    await expect(page).to_have_url(re.compile(r"sort=sessions&order=desc"))
    counts = [
        int(t) for t in await page.locator("table.users td.num:nth-child(3)").all_inner_texts()
    ]
    assert counts == sorted(counts, reverse=True)
    assert len(counts) > 1
    await page.get_by_role("link", name=re.compile("Total sessions")).click()
    await expect(header).to_have_attribute("aria-sort", "ascending")
    counts = [
        int(t) for t in await page.locator("table.users td.num:nth-child(3)").all_inner_texts()
    ]
    assert counts == sorted(counts)
    await page.get_by_role("link", name="Name", exact=True).click()
    await expect(header).to_have_attribute("aria-sort", "ascending")
    names = await page.locator("table.users tbody td:first-child a").all_inner_texts()
    named = [n.lower() for n in names if not n.startswith("Anonymous ")]
    assert named == sorted(named)
    assert len(named) > 1
    await page.get_by_role("link", name=re.compile("Total sessions")).click()
    # The Identified tab keeps the sort (a deep link of tab and sort).
    await page.get_by_role("link", name="Identified", exact=True).click()
    await expect(page).to_have_url(re.compile(r"tab=identified&sort=sessions&order=desc"))


async def test_the_users_table_marks_user_details_without_a_custom_id(
    page: Any, console_suite: ConsoleSuite
) -> None:
    # An email alone is a user detail (no name to show): the marker comes from the row's
    # has_user_details, not from the names the row happens to carry.
    now = datetime.now(UTC)
    with_email, without = f"console-email-{uuid.uuid4().hex}", f"console-bare-{uuid.uuid4().hex}"
    await track(
        console_suite,
        attribute_event(with_email, [op("set", "EMAIL", "no.id@example.com")], time=now),
        custom_event(without, name="console_bare_check", time=now),
    )
    profile_ids: dict[str, str] = {}

    async def listed() -> bool:
        # The users table is a projection fed by the bus: wait until it has both profiles.
        for name, installation in (("email", with_email), ("bare", without)):
            try:
                reply = await query(
                    console_suite,
                    "GetProfile",
                    query_pb.GetProfileRequest(installation_id=installation),
                )
            except grpc.aio.AioRpcError:
                return False
            profile_ids[name] = reply.profile.summary.profile_id
        rows = await query(
            console_suite,
            "ListProfiles",
            query_pb.ListProfilesRequest(
                identity_filter=query_pb.PROFILE_IDENTITY_FILTER_ANONYMOUS, page_size=20
            ),
        )
        return set(profile_ids.values()) <= {r.profile_id for r in rows.profiles}

    await eventually(listed, within=30)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users?tab=anonymous")

    def row_of(profile_id: str) -> Any:
        return page.locator("table.users tbody tr").filter(
            has=page.locator(f'a[href="/profiles/{profile_id}"]')
        )

    await expect(row_of(profile_ids["email"]).locator(".marker")).to_have_text("details, no ID")
    await expect(row_of(profile_ids["bare"])).to_have_count(1)
    await expect(row_of(profile_ids["bare"]).locator(".marker")).to_have_count(0)
    # The demo's anonymous visitors told their names: they carry it too.
    assert await page.locator("table.users .marker").count() > 1


async def test_a_person_finds_profiles_by_a_word_of_their_name(
    page: Any, console_suite: ConsoleSuite
) -> None:
    # A family name no demo profile has; two people share it, one is also "Élodie".
    family = "Marchetti" + uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    people = {
        "Élodie": f"console-elodie-{uuid.uuid4().hex}",
        "Anaïs": f"console-anais-{uuid.uuid4().hex}",
    }
    await track(
        console_suite,
        *[
            attribute_event(
                installation,
                [op("set", "FIRST_NAME", first), op("set", "LAST_NAME", family)],
                time=now,
            )
            for first, installation in people.items()
        ],
    )

    async def listed() -> bool:  # the users table is a projection fed by the bus
        reply = await query(
            console_suite, "ListProfiles", query_pb.ListProfilesRequest(name_prefix=family)
        )
        return len(reply.profiles) == 2

    await eventually(listed, within=30)
    elodie = await query(
        console_suite, "GetProfile", query_pb.GetProfileRequest(installation_id=people["Élodie"])
    )
    await sign_in(page, console_suite)
    # The header's search: no identifier is this text, so the users table lists the names.
    await page.get_by_label("Find a profile").fill(family.lower())
    await page.get_by_role("button", name="Search").click()
    await expect(page).to_have_url(re.compile(r"/users\?name="))
    rows = page.locator("table.users tbody tr")
    await expect(rows).to_have_count(2)
    await expect(page.locator("table.users caption")).to_contain_text(family.lower())
    # The users table's own filter, case and accents folded, sorting kept while filtering.
    await page.get_by_role("link", name="Total sessions").click()
    await expect(rows).to_have_count(2)
    await page.get_by_label("Name", exact=True).fill(f"ÉLODIE  {family[:9]}")
    await page.get_by_role("button", name="Filter").click()
    await expect(page).to_have_url(re.compile(r"sort=sessions"))
    await expect(rows).to_have_count(1)
    await rows.first.get_by_role("link").click()
    await expect(page).to_have_url(re.compile(f"/profiles/{elodie.profile.summary.profile_id}$"))
    # One person by that name: the search opens her profile.
    await page.get_by_label("Find a profile").fill(f"anaïs {family}")
    await page.get_by_role("button", name="Search").click()
    anais = await query(
        console_suite, "GetProfile", query_pb.GetProfileRequest(installation_id=people["Anaïs"])
    )
    await expect(page).to_have_url(re.compile(f"/profiles/{anais.profile.summary.profile_id}$"))
    # Nobody by that name: the search says so, after the identifiers it tried.
    await page.goto(console_suite.url + "/search?q=" + family + "zz")
    await expect(page.locator("main p.found")).to_contain_text("No profile matches")
    await expect(page.locator("#search-misses li").last).to_have_text(
        f"No profile has a word of its name starting with “{family}zz”."
    )


async def test_the_users_table_counts_its_rows_and_pages_back(
    page: Any, console_suite: ConsoleSuite
) -> None:
    family = "Pagerson" + uuid.uuid4().hex[:8]
    await profiles_listed_by(console_suite, "LAST_NAME", family, name_prefix=family)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users?name=" + family)
    shown, rows = page.locator("#shown"), page.locator("table.users tbody tr")
    await expect(shown).to_have_text("Profiles 1 to 50 of 53")
    await expect(page.get_by_role("link", name="Previous page")).to_have_count(0)
    links = page.locator("table.users tbody td:first-child a")
    first_page = await links.evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert len(set(first_page)) == 50
    await page.get_by_role("link", name="Next page").click()
    await expect(shown).to_have_text("Profiles 51 to 53 of 53")
    await expect(rows).to_have_count(3)
    await expect(page.get_by_role("link", name="Next page")).to_have_count(0)
    await page.get_by_role("link", name="Previous page").click()
    await expect(shown).to_have_text("Profiles 1 to 50 of 53")
    assert await links.evaluate_all("links => links.map(a => a.getAttribute('href'))") == (
        first_page
    )
    await expect(page.get_by_role("link", name="Previous page")).to_have_count(0)


async def test_the_overview_switches_platform(page: Any, console_suite: ConsoleSuite) -> None:
    await sign_in(page, console_suite)
    ios = await query(
        console_suite,
        "GetOverview",
        query_pb.GetOverviewRequest(platform=types_pb2.PLATFORM_IOS),
    )
    everything = await query(console_suite, "GetOverview", query_pb.GetOverviewRequest())
    await expect(page.locator("#installs")).to_have_text(str(everything.overview.install_count))
    # Native segments read as words: platforms by name, an app version with its platform.
    platforms = page.locator("table.breakdown", has=page.locator("caption", has_text="Platform"))
    await expect(platforms.locator("tbody td:first-child").first).to_have_text(
        re.compile(r"^(iOS|Android|Web)$")
    )
    versions = page.locator("table.breakdown", has=page.locator("caption", has_text="App version"))
    await expect(versions.locator("tbody td:first-child").first).to_have_text(
        re.compile(r"^\S+ \((iOS|Android|Web)\)$")
    )
    await expect(page.locator("#smart-platform")).to_have_count(0)  # all platforms: one population
    await page.get_by_role("link", name="iOS", exact=True).click()
    await expect(page).to_have_url(re.compile(r"/overview\?platform=ios$"))
    await expect(page.locator("#installs")).to_have_text(str(ios.overview.install_count))
    await expect(page.get_by_role("link", name="iOS", exact=True)).to_have_attribute(
        "aria-current", "page"
    )
    # On one platform the profiles and the smart segments count two populations: each says so.
    await expect(page.locator(".card", has_text="Profiles").locator(".hint")).to_contain_text(
        "profiles with an installation on iOS"
    )
    await expect(page.locator("#smart-platform")).to_contain_text("sessions on iOS only")
    # What the page's script fetches every 10 s to refresh the figures in place.
    refresh = await page.locator("#overview").get_attribute("data-refresh")
    assert refresh == "/overview/fragment?platform=ios"
    fragment = await page.request.get(console_suite.url + refresh)
    assert f'id="installs">{ios.overview.install_count}<' in await fragment.text()


async def test_a_new_event_appears_live_on_an_open_profile_page(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    await expect(page.locator("#live-status")).to_have_text("Live updates on.")
    installation = profile.installations[0].installation_id
    await track(
        console_suite,
        custom_event(installation, name="console_live_check", time=datetime.now(UTC), item="mug"),
    )
    feed = page.locator("#live-feed > li")
    await expect(feed).to_have_count(1)
    await expect(feed.first).to_contain_text("console_live_check")
    # A reload shows it once, in the timeline, and the live feed starts empty again.
    await page.reload()
    await expect(page.locator("#live-status")).to_have_text("Live updates on.")
    await expect(page.locator("#timeline > li", has_text="console_live_check")).to_have_count(1)
    await expect(page.locator("#live-feed > li")).to_have_count(0)


async def test_the_live_feed_shows_each_change_once_and_the_cards_follow(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-feed-{uuid.uuid4().hex[:8]}"
    await track(console_suite, custom_event(installation, name="arrived", time=datetime.now(UTC)))

    profile = await stored_profile(console_suite, installation)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    await expect(page.locator("#live-status")).to_have_text("Live updates on.")
    email = page.locator("#subscriptions tr[data-subscription='Email Marketing']")
    await expect(email.locator("td").nth(2)).to_have_text("no choice recorded")
    # One TrackEvents: an attribute set and an email opt-in, as the tester sent them.
    now = datetime.now(UTC)
    opt_in = subscription(installation, EMAIL, MARKETING, True, now)
    await track(
        console_suite,
        attribute_event(installation, [op("set", "fav_html", "<b>tea</b>")], time=now),
        opt_in,
    )
    # Then a marker: the stream keeps its order, so whatever the two caused came before it.
    await track(console_suite, custom_event(installation, name="feed_marker", time=now))
    feed = page.locator("#live-feed > li")
    await expect(feed.filter(has_text="feed_marker")).to_have_count(1)
    titles = await feed.locator("strong").all_inner_texts()
    assert sorted(titles) == [
        "Attributes changed: fav_html",
        "Email Marketing: subscribed",
        "feed_marker",
    ]
    # The cards say what the feed says, without a reload.
    await expect(email.locator("td").nth(2)).to_have_text("subscribed")
    custom = page.locator("#custom-attributes tr[data-attribute='fav_html']")
    await expect(custom.locator("td.value")).to_have_text("<b>tea</b>")
    # After a reload each change appears once, in the timeline, and the cards agree.
    await page.reload()
    await expect(page.locator("#live-status")).to_have_text("Live updates on.")
    await expect(page.locator("#live-feed > li")).to_have_count(0)
    await expect(email.locator("td").nth(2)).to_have_text("subscribed")
    await expect(custom.locator("td.value")).to_have_text("<b>tea</b>")


async def test_a_hostile_attribute_value_is_shown_as_text(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    hostile = "<script>window.hacked = 1</script><b>bold</b>"
    installation = profile.installations[0].installation_id
    await track(
        console_suite,
        attribute_event(installation, [op("set", "nickname", hostile)], time=datetime.now(UTC)),
    )
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    cell = page.locator("#custom-attributes tr", has_text="nickname").locator("td.value")
    await expect(cell).to_have_text(hostile)
    assert await cell.locator("b").count() == 0
    assert await page.evaluate("typeof window.hacked") == "undefined"


async def test_only_an_admin_key_can_download_the_gdpr_export(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    url = console_suite.url + f"/profiles/{profile.summary.profile_id}"
    await sign_in(page, console_suite, "read", land=False)
    await page.goto(url)
    await expect(page.get_by_role("link", name="Export (GDPR)")).to_have_count(0)
    refused = await page.request.get(url + "/export")
    assert refused.status == 403
    await page.get_by_role("button", name="Sign out").click()

    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(url)
    async with page.expect_download() as waiting:
        await page.get_by_role("link", name="Export (GDPR)").click()
    download = await waiting.value
    exported = await asyncio.to_thread(Path(await download.path()).read_text)
    document = json.loads(exported)
    assert document["profile"]["profileId"] == profile.summary.profile_id
    assert isinstance(document["events"], list)
    assert document["events"]
    # Segments' sections close the document, the object ones whole: what segments keeps
    # about the person (the demo's profiles have sessions, hence a smart segment).
    assert list(document)[-3:] == ["segments", "engagement", "funnelProgress"]
    assert set(document["segments"]) == {"custom", "smart"}
    assert document["segments"]["smart"]
    # The engagement section is segments' own score of the person: the demo's sessions are
    # recent, so it counts some, and as many as GetEngagement does.
    async with open_channel(
        console_suite.addresses["segments"], console_suite.project.keys["read"]
    ) as channel:
        engagement = await segments_grpc.SegmentsServiceStub(channel).GetEngagement(
            segments_pb.GetEngagementRequest(profile_id=profile.summary.profile_id)
        )
    assert document["engagement"]["sessionCount"] == engagement.session_count > 0
    assert isinstance(document["funnelProgress"], list)


async def test_rejected_events_are_listed_with_their_reason_and_filtered(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    future = custom_event(
        profile.installations[0].installation_id,
        name="from_the_future",
        time=datetime.now(UTC) + timedelta(days=30),
    )
    assert await reject(console_suite, future) == ["EVENT_TIME_IN_FUTURE"]
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/rejected")
    await page.get_by_label("Reason").fill("EVENT_TIME_IN_FUTURE")
    await page.get_by_role("button", name="Filter").click()
    await expect(page).to_have_url(re.compile(r"reason=EVENT_TIME_IN_FUTURE"))
    row = page.locator("table.rejected tbody tr", has_text=future.event_id)
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("EVENT_TIME_IN_FUTURE")
    await page.goto(console_suite.url + "/rejected?reason=NAME_INVALID")
    await expect(page.locator("table.rejected tbody")).to_contain_text("Nothing rejected")


async def test_the_segments_page_streams_entries_and_exits(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/segments")
    await expect(page.locator("#segment-status")).to_contain_text("Live")
    # The demo's profiles entered smart segments within the hour the stream starts from.
    rows = page.locator("#segment-changes tbody tr")
    await expect(rows.first).to_be_visible()
    await expect(rows.first.locator("td").nth(2)).to_have_text(re.compile("entered|left"))
    # Newest "When" first, as the caption says.
    times = await rows.locator("td:first-child").all_inner_texts()
    assert times == sorted(times, reverse=True), times
    # A person who enters a segment now is shown by name, linked, with the whole profile ID
    # under it (eight characters of it can be two profiles).
    # (Named first: the users table, which the names are read from, lags writes by the bus.)
    installation = f"console-{uuid.uuid4().hex}"
    now = datetime.now(UTC)
    await track(
        console_suite,
        attribute_event(
            installation,
            [op("set", "FIRST_NAME", "Zélie"), op("set", "LAST_NAME", "Streamer")],
            time=now - timedelta(seconds=2),
        ),
    )
    profile = await stored_profile(console_suite, installation)

    async def named_in_the_users_table() -> bool:
        request = query_pb.ListProfilesRequest(name_prefix="Zélie Streamer")
        listed = (await query(console_suite, "ListProfiles", request)).profiles
        return [r.profile_id for r in listed] == [profile.summary.profile_id]

    await eventually(named_in_the_users_table, within=20)
    await track(console_suite, session_start(installation, "s1", now - timedelta(seconds=1)))
    row = rows.filter(has_text="Zélie Streamer").first
    await expect(row).to_be_visible(timeout=20_000)
    link = row.locator("td").nth(1).get_by_role("link")
    await expect(link).to_have_text("Zélie Streamer")
    assert await link.get_attribute("href") == f"/profiles/{profile.summary.profile_id}"
    await expect(row.locator("td").nth(1).locator(".hint")).to_have_text(profile.summary.profile_id)


PAGES = (
    ("overview", "/overview"),
    ("users", "/users"),
    ("profile", None),
    ("segments", "/segments"),
    ("rejected", "/rejected"),
    # The same, one profile's (its link on the profile page): the profile's chip.
    ("rejected-profile", "/rejected?profile={profile}"),
    ("search", "/search?q=nobody%40example.com"),
    # The admin's pages ({profile}: the checked profile's ID).
    ("erase", "/profiles/{profile}/delete"),
    ("segment-new", "/segments/new"),
    ("funnel-new", "/funnels/new"),
)


async def test_every_page_is_accessible_and_light(
    page: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    profile = await identified_profile(console_suite)
    # A rejected event, so that the rejected page's rows and reason chips are checked (and
    # shown in its screenshot). Its reason is one no other test filters to an empty page.
    future = custom_event(
        profile.installations[0].installation_id,
        name="from_the_future",
        time=datetime.now(UTC) + timedelta(days=1),
    )
    assert await reject(console_suite, future) == ["EVENT_TIME_IN_FUTURE"]
    # A custom segment and a funnel over the demo's own data, so that the segments page's
    # tables (the funnel's conversion figures among them) are checked and shown too.
    async with open_channel(
        console_suite.addresses["segments"], console_suite.project.keys["admin"]
    ) as channel:
        segments = segments_grpc.SegmentsServiceStub(channel)
        created = await segments.CreateSegment(
            segments_pb.CreateSegmentRequest(
                display_name="Signed up from ads",
                filter=attribute("signup_source", filters_pb2.OPERATOR_EQUALS, "ads"),
            )
        )
        await segments.CreateFunnel(
            segments_pb.CreateFunnelRequest(
                display_name="Browse to purchase",
                steps=[
                    funnels_pb2.FunnelStep(event_name=name)
                    for name in ("view_item", "add_to_cart", "purchase")
                ],
                conversion_window=duration_pb2.Duration(seconds=86_400),
            )
        )
    wanted = os.environ.get(SCREENSHOTS_ENV, "")
    screenshots = ROOT / wanted if wanted else None
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)

    async def screenshot(name: str, *, full_page: bool = False, tab: Any = page) -> None:
        if screenshots is not None:
            await tab.screenshot(path=screenshots / f"{name}.png", full_page=full_page)

    async def check(name: str, tab: Any = page) -> None:
        # Evaluated through the DevTools protocol: the page's CSP (rightly) refuses inline scripts.
        await tab.evaluate(axe_source)
        result = await tab.evaluate(
            "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
            ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
            ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))"
        )
        assert result == [], f"{name}: {result}"
        weight = await tab.evaluate(
            "() => performance.getEntriesByType('navigation')[0].encodedBodySize +"
            " performance.getEntriesByType('resource')"
            ".reduce((sum, r) => sum + r.encodedBodySize, 0)"
        )
        assert weight < PAGE_BUDGET_BYTES, f"{name} weighs {weight} bytes"

    async def check_pages(tab: Any, pages: Any) -> None:
        for name, path in pages:
            target = (path or "/profiles/{profile}").format(profile=profile.summary.profile_id)
            await tab.goto(console_suite.url + target)
            await expect(tab.locator("main h1")).to_be_visible()
            await screenshot(name, full_page=name == "profile", tab=tab)
            await check(name, tab)

    await page.goto(console_suite.url + "/signin")
    await screenshot("signin")
    await check("signin")
    await sign_in(page, console_suite, "admin", land=False)
    # Two tabs of the same session check half the pages each, side by side: axe-core takes
    # seconds on the fullest pages, each tab's on a core of its own (the pages change nothing).
    other = await page.context.new_page()
    async with asyncio.TaskGroup() as group:
        group.create_task(check_pages(page, PAGES[::2]))
        group.create_task(check_pages(other, PAGES[1::2]))
    await other.close()
    # The admin forms with refusals beside their boxes, a deletion's confirmation, an erasure.
    await page.goto(console_suite.url + "/segments/new")
    await page.get_by_label("Name", exact=True).fill("Refused")
    await page.locator("#c0-custom_name").fill("not a name!")
    await page.get_by_role("button", name="Create segment").click()
    await expect(page.locator("#c0-custom_name-error")).to_be_visible()
    await check("segment-refused")
    await page.goto(console_suite.url + "/funnels/new")
    await page.get_by_label("Name", exact=True).fill("Refused")
    await page.locator("#s0-event_name").fill("¡¿!")
    await page.locator("#s1-event_name").fill("purchase")
    await page.get_by_role("button", name="Create funnel").click()
    await expect(page.locator("#s0-event_name-error")).to_be_visible()
    await check("funnel-refused")
    # And with a preview (validate_only) of what they would create.
    await page.locator("#s0-event_name").fill("view")
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#preview")).to_be_visible()
    await check("funnel-preview")
    await page.goto(console_suite.url + "/segments/new")
    await page.get_by_label("Name", exact=True).fill("Previewed")
    await page.locator("#c0-custom_name").fill("plan")
    await page.locator("#c0-operator").select_option("exists")
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#preview")).to_contain_text("match")
    await check("segment-preview")
    await page.goto(console_suite.url + f"/segments/{created.segment.segment_id}/delete")
    await check("segment-delete")
    custom_id = f"axe-{uuid.uuid4().hex[:8]}"
    await track(console_suite, custom_event(None, custom_id=custom_id, time=datetime.now(UTC)))
    erasable = await stored_profile_by_custom_id(console_suite, custom_id)
    await page.goto(console_suite.url + f"/profiles/{erasable}/delete")
    await page.get_by_label(f"To confirm, type {custom_id}").fill("no")
    await page.get_by_role("button", name="Delete this profile permanently").click()
    await check("erase-refused")
    await page.get_by_label(f"To confirm, type {custom_id}").fill(custom_id)
    await page.get_by_role("button", name="Delete this profile permanently").click()
    await expect(page.get_by_role("heading", name="Profile erased")).to_be_visible()
    await check("erased")


async def stored_profile_by_custom_id(suite: ConsoleSuite, custom_id: str) -> str:
    """The profile ID of `custom_id` once query has it."""
    found: list[str] = []

    async def stored() -> bool:
        try:
            reply = await query(
                suite, "GetProfile", query_pb.GetProfileRequest(custom_id=custom_id)
            )
        except grpc.aio.AioRpcError:
            return False
        found[:] = [reply.profile.summary.profile_id]
        return True

    await eventually(stored, within=15)
    return found[0]


async def test_every_session_of_a_profile_is_reachable_page_by_page(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-sessions-{uuid.uuid4().hex[:8]}"
    start = datetime.now(UTC) - timedelta(days=2)
    await track(
        console_suite,
        *(session_start(installation, f"s{i:02d}", start + timedelta(hours=i)) for i in range(23)),
    )

    async def all_counted() -> bool:
        reply = await query(
            console_suite, "GetProfile", query_pb.GetProfileRequest(installation_id=installation)
        )
        return reply.profile.counters.session_count == 23

    await eventually(all_counted)
    profile = await query(
        console_suite, "GetProfile", query_pb.GetProfileRequest(installation_id=installation)
    )
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.profile.summary.profile_id}")
    rows = page.locator("#sessions tbody tr")
    await expect(rows).to_have_count(20)
    await expect(page.locator("#sessions")).to_contain_text("23 sessions in all.")
    await page.get_by_role("link", name="Older sessions").click()
    await expect(rows).to_have_count(3)
    await expect(page.get_by_role("link", name="Older sessions")).to_have_count(0)
    await page.get_by_role("link", name="Newest sessions").click()
    await expect(rows).to_have_count(20)


async def test_an_unknown_address_and_a_stale_page_link_get_the_console_s_own_words(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    missing = await page.goto(console_suite.url + "/no-such-page")
    assert missing is not None
    assert missing.status == 404
    await expect(page.get_by_role("heading", name="No such page")).to_be_visible()
    await page.goto(console_suite.url + "/users?page_token=not-a-token")
    await expect(page.get_by_text("This page link is out of date or was altered")).to_be_visible()
    await page.goto(console_suite.url + "/rejected?page_token=not-a-token")
    await expect(page.get_by_text("This page link is out of date or was altered")).to_be_visible()


async def test_no_page_scrolls_sideways_on_a_phone_sized_screen(
    page: Any, console_suite: ConsoleSuite
) -> None:
    profile = await identified_profile(console_suite)
    await sign_in(page, console_suite, land=False)
    await page.set_viewport_size({"width": 390, "height": 844})
    for path in (
        "/overview",
        "/users",
        "/segments",
        "/rejected",
        f"/profiles/{profile.summary.profile_id}",
    ):
        await page.goto(console_suite.url + path)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{path} is {width} px wide"


async def test_a_profile_with_only_an_open_session_has_no_average_yet(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-open-{uuid.uuid4().hex[:8]}"
    await track(console_suite, session_start(installation, "open-1", datetime.now(UTC)))

    profile = await stored_profile(console_suite, installation)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    average = page.locator("dl.pairs div", has_text="Average closed session").locator("dd")
    await expect(average).to_have_text("none closed yet")
