"""What an operator's review found missing or misleading: the timeline's push, uninstall and
origin details (stack traces collapsed), a merged-away ID's notice, imported tokens not yet
seen, phones typed with spaces, the overview's rates and regions, the activity chart's table
and scale, the users table's look-alike names, the attributes' layout and the wording of the
engagement card."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from playwright.async_api import expect

from profiles.client import open_channel
from profiles.common.v1 import types_pb2
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import query, sign_in, stored_profile, track
from tests.support.ingest import attribute_event, custom_event, op
from tests.support.query import crash, installation_update, session_start

HOSTILE_TRACE = '<script>alert("x")</script>\n  at Checkout.pay (checkout.js:12)'


async def test_the_timeline_tells_push_uninstall_origin_label_and_a_collapsed_stack_trace(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-review-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    labelled = custom_event(installation, name="purchase", time=now - timedelta(minutes=5))
    labelled.custom.label = "spring sale"
    failed = crash(installation, now - timedelta(minutes=4), name="PaymentError")
    failed.crash.stack_trace = HOSTILE_TRACE
    await track(
        console_suite,
        session_start(installation, f"s-{uuid.uuid4().hex[:8]}", now - timedelta(minutes=6)),
        labelled,
        installation_update(
            installation, now - timedelta(minutes=3), push_token="tok-1", push_opt_in=True
        ),
        failed,
        installation_update(installation, now - timedelta(minutes=2), uninstalled=True),
    )
    profile = await stored_profile(
        console_suite, installation, lambda p: p.counters.event_count >= 5
    )
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    timeline = page.locator("#timeline > li")
    registered = timeline.filter(has_text="Installation updated").filter(has_text="push token")
    await expect(registered.locator(".details").first).to_contain_text("push token registered")
    await expect(registered.locator(".details").first).to_contain_text("push opt-in on")
    uninstalled = timeline.filter(has_text="app uninstalled")
    await expect(uninstalled).to_have_count(1)
    # Where each came from: the installation and platform.
    await expect(uninstalled.locator(".origin")).to_contain_text(f"installation {installation}")
    await expect(uninstalled.locator(".origin")).to_contain_text("platform iOS")
    await expect(timeline.filter(has_text="purchase")).to_contain_text("label spring sale")
    # The stack trace: collapsed, then shown as text (never markup).
    trace = timeline.filter(has_text="Crash: PaymentError").locator("details.trace")
    await expect(trace.locator("pre")).to_be_hidden()
    await trace.locator("summary").click()
    await expect(trace.locator("pre")).to_have_text(HOSTILE_TRACE)
    # Score 1 is not the Counters' average session.
    await expect(page.locator("#engagement")).not_to_contain_text("Average session")
    await expect(page.locator("#engagement dt").first).to_have_text(
        "Score 1: session length in minutes, last 7 days, capped at 2"
    )

    # The live feed tells the same.
    await expect(page.locator("#live-status")).to_have_text("Live updates on.")
    late_crash = crash(installation, datetime.now(UTC), name="LiveError")
    late_crash.crash.stack_trace = HOSTILE_TRACE
    await track(
        console_suite,
        installation_update(installation, datetime.now(UTC), push_opt_in=False),
        late_crash,
    )
    live = page.locator("#live-feed > li", has_text="push opt-in off")
    await expect(live).to_have_count(1)
    await expect(live.locator(".origin")).to_contain_text(f"installation {installation}")
    live_trace = page.locator("#live-feed > li", has_text="LiveError").locator("details.trace")
    await expect(live_trace.locator("pre")).to_be_hidden()
    await live_trace.locator("summary").click()
    await expect(live_trace.locator("pre")).to_have_text(HOSTILE_TRACE)


async def merge(suite: ConsoleSuite, source: str, target: str) -> None:
    async with open_channel(suite.addresses["identity"], suite.project.keys["admin"]) as channel:
        await identity_grpc.IdentityServiceStub(channel).MergeProfiles(
            identity_pb.MergeProfilesRequest(source_profile_id=source, target_profile_id=target)
        )


async def test_a_merged_away_profile_id_opens_its_survivor_which_says_so(
    page: Any, console_suite: ConsoleSuite
) -> None:
    now = datetime.now(UTC)
    first, second = (f"console-merge-{uuid.uuid4().hex[:8]}" for _ in range(2))
    await track(
        console_suite,
        custom_event(first, name="before_merge", time=now - timedelta(minutes=2)),
        custom_event(second, name="survivor_event", time=now - timedelta(minutes=1)),
    )
    source = (await stored_profile(console_suite, first)).summary.profile_id
    target = (await stored_profile(console_suite, second)).summary.profile_id
    await merge(console_suite, source, target)
    await stored_profile(console_suite, first, lambda p: p.summary.profile_id == target)
    await sign_in(page, console_suite, land=False)

    await page.goto(console_suite.url + f"/profiles/{source}")
    await expect(page).to_have_url(re.compile(f"/profiles/{target}\\?merged_from={source}$"))
    await expect(page.locator("#merged-from")).to_contain_text(
        f"{source} was merged into this profile"
    )
    # The history links the profile merged away, and marks this one.
    row = page.locator("#identity-history tbody tr").first
    await expect(row.get_by_role("link", name=source)).to_have_attribute(
        "href", f"/profiles/{source}"
    )
    await expect(row).to_contain_text(f"{target} (this profile)")
    # The timeline's merge entry says what merged into what; the merged event says where from.
    entry = page.locator("#timeline > li", has_text="Merge (operator merge)")
    await expect(entry.locator(".details")).to_contain_text(f"from {source}")
    await expect(entry.locator(".details")).to_contain_text(f"into {target}")
    moved = page.locator("#timeline > li", has_text="before_merge")
    await expect(moved.locator(".origin")).to_contain_text(f"merged from profile {source}")

    # An altered link claims no merge.
    for forged in (str(uuid.uuid4()), target, "<b>x</b>"):
        await page.goto(console_suite.url + f"/profiles/{target}?merged_from={forged}")
        await expect(page.locator("#identity")).to_be_visible()
        await expect(page.locator("#merged-from")).to_have_count(0)


async def test_an_imported_token_not_yet_seen_is_said_so_and_its_profile_has_no_activity(
    page: Any, console_suite: ConsoleSuite
) -> None:
    custom_id = f"imported-{uuid.uuid4().hex[:8]}"
    async with open_channel(
        console_suite.addresses["ingest"], console_suite.project.keys["admin"]
    ) as channel:
        reply = await ingest_grpc.IngestServiceStub(channel).ImportTokens(
            ingest_pb.ImportTokensRequest(
                tokens=[
                    ingest_pb.ImportedToken(
                        platform=types_pb2.PLATFORM_IOS,
                        push_token=f"token-{uuid.uuid4().hex}",
                        custom_id=custom_id,
                        push_opt_in=True,
                    )
                ]
            )
        )
    assert reply.imported_count == 1, reply
    found: list[Any] = []

    async def stored() -> bool:
        try:
            answer = await query(
                console_suite, "GetProfile", query_pb.GetProfileRequest(custom_id=custom_id)
            )
        except Exception:
            return False
        found[:] = [answer.profile]
        return bool(answer.profile.installations)

    await eventually(stored, within=10)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{found[0].summary.profile_id}")
    row = page.locator("table tbody tr", has_text="imported token")
    await expect(row.locator("td").last).to_have_text("imported, not seen yet")
    await expect(page.locator("#no-activity")).to_have_text("No activity in the last 30 days.")


async def test_a_phone_typed_with_spaces_dashes_or_brackets_finds_its_profile(
    page: Any, console_suite: ConsoleSuite
) -> None:
    digits = f"{uuid.uuid4().int % 10**7:07d}"
    installation = f"console-phone-{uuid.uuid4().hex[:8]}"
    await track(
        console_suite,
        attribute_event(
            installation, [op("set", "PHONE", f"+1555{digits}")], time=datetime.now(UTC)
        ),
    )
    profile = await stored_profile(
        console_suite, installation, lambda p: p.native_attributes.phone == f"+1555{digits}"
    )
    await sign_in(page, console_suite)
    for typed in (f"+1 555 {digits[:3]} {digits[3:]}", f"+1 (555) {digits[:3]}-{digits[3:]}"):
        await page.get_by_label("Find a profile").fill(typed)
        await page.locator("form.search").get_by_role("button", name="Search").click()
        await expect(page).to_have_url(re.compile(f"/profiles/{profile.summary.profile_id}$"))
    # A phone nobody has: how phones are matched.
    await page.goto(console_suite.url + "/search?q=%2B1+555+000+00+00+99")
    await expect(page.locator("p.found")).to_contain_text("No profile matches")
    await expect(page.locator("#search-hint")).to_contain_text("matched in E.164 form")


async def test_the_overview_shows_subscription_rates_regions_and_what_push_reach_counts(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/overview?platform=ios")
    await expect(page.locator("#reach-platform")).to_contain_text("reachable on any platform")
    reply = await query(
        console_suite,
        "GetOverview",
        query_pb.GetOverviewRequest(platform=types_pb2.PLATFORM_IOS, top_values=10),
    )
    rates = page.locator("#subscription-rates tbody tr")
    await expect(rates).to_have_count(len(reply.overview.subscription_rates))
    email = next(
        r
        for r in reply.overview.subscription_rates
        if r.channel == types_pb2.CHANNEL_EMAIL and r.kind == types_pb2.SUBSCRIPTION_KIND_MARKETING
    )
    cells = page.locator('#subscription-rates tr[data-rate="Email Marketing"] td')
    await expect(cells.nth(2)).to_have_text(str(email.subscribed_profile_count))
    await expect(cells.nth(3)).to_have_text(str(email.addressable_profile_count))
    await expect(page.locator("table.breakdown caption", has_text="Region")).to_have_count(1)
    # What a token is: visible on request, not only in a hover text.
    meaning = page.locator("#token-meaning")
    await meaning.locator("summary").click()
    await expect(meaning).to_contain_text("APNs")


async def test_the_activity_chart_names_its_zone_and_lists_each_day_with_a_scale(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-days-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    await track(
        console_suite,
        attribute_event(installation, [op("set", "TIMEZONE", "UTC")], time=now),
        *(custom_event(installation, name="tap", time=now - timedelta(seconds=n)) for n in (1, 2)),
    )
    profile = await stored_profile(
        console_suite, installation, lambda p: p.counters.event_count >= 3
    )
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    await expect(page.locator("#activity-heading")).to_have_text(
        "Events per day, last 30 days (UTC)"
    )
    await expect(page.locator("#activity .scale").first).to_have_text("3")
    days = page.locator("#activity-days")
    await days.locator("summary").click()
    today = days.locator("tbody tr", has_text=now.date().isoformat())
    await expect(today.locator("td").nth(2)).to_have_text("3")


async def test_users_of_the_same_name_are_told_apart_and_user_details_is_a_tab(
    page: Any, console_suite: ConsoleSuite
) -> None:
    surname = f"Twin{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC)
    custom_ids = [f"crm-{surname.lower()}-{n}" for n in (1, 2)]
    events = []
    for custom_id in custom_ids:
        event = attribute_event(
            None, [op("set", "FIRST_NAME", "Ana"), op("set", "LAST_NAME", surname)], time=now
        )
        event.custom_id = custom_id
        event.platform = types_pb2.PLATFORM_API
        events.append(event)
    await track(console_suite, *events)

    async def listed() -> bool:
        request = query_pb.ListProfilesRequest(name_prefix=surname, page_size=10)
        return len((await query(console_suite, "ListProfiles", request)).profiles) == 2

    await eventually(listed, within=30)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/users?name={surname}")
    rows = page.locator("table.users tbody tr")
    await expect(rows).to_have_count(2)
    for custom_id in custom_ids:
        await expect(rows.filter(has_text=custom_id)).to_have_count(1)
    # What the marker means is on the page, not only in a hover text.
    await expect(page.locator("#marker-meaning")).to_contain_text("details, no ID")
    tab = page.get_by_role("link", name="With user details")
    await tab.click()
    await expect(tab).to_have_attribute("aria-current", "page")
    await expect(rows).to_have_count(2)
    total = await query(
        console_suite,
        "ListProfiles",
        query_pb.ListProfilesRequest(
            identity_filter=query_pb.PROFILE_IDENTITY_FILTER_HAS_USER_DETAILS,
            include_total_size=True,
            page_size=1,
        ),
    )
    await page.goto(console_suite.url + "/users?tab=details")
    await expect(page.locator("#shown")).to_contain_text(f"of {total.total_size:,}")


async def test_attribute_names_stay_whole_and_the_native_table_keeps_its_height(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-attrs-{uuid.uuid4().hex[:8]}"
    long_value = " ".join(["delivered-to-the-back-door"] * 10)
    operations = [op("set", "FIRST_NAME", "Lay")] + [
        op("set", f"preferred_delivery_window_{n}", long_value) for n in range(6)
    ]
    await track(console_suite, attribute_event(installation, operations, time=datetime.now(UTC)))
    profile = await stored_profile(
        console_suite, installation, lambda p: len(p.custom_attributes) >= 6
    )
    await page.set_viewport_size({"width": 1024, "height": 900})
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    name = page.locator('#custom-attributes tr[data-attribute="preferred_delivery_window_0"] td')
    # One line: the name is not broken between its letters.
    lines = await name.first.evaluate(
        """(cell) => {
            const range = document.createRange();
            range.selectNodeContents(cell);
            return new Set(Array.from(range.getClientRects()).map((r) => Math.round(r.top))).size;
        }"""
    )
    assert lines == 1
    native = await page.locator("#native-attributes").bounding_box()
    custom = await page.locator("#custom-attributes").bounding_box()
    assert native is not None
    assert custom is not None
    assert native["height"] < custom["height"] / 2, (native, custom)
