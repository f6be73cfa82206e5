"""What an operator's comparison with Batch and Countly found missing on the profile page, its
timeline and the rejected events page: identified or anonymous said in the header, one story of
push (device opt-in apart from a recorded choice, on the profile and the overview), the
timeline's days, hidden heartbeats and event name suggestions, and rejected events that open
their person and name their attribute."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.async_api import expect

from profiles.client import open_channel
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import reject, sign_in, stored_profile, track
from tests.support.ingest import attribute_event, custom_event, op
from tests.support.query import base_event, installation_update, session_end, session_start


async def identify(suite: ConsoleSuite, installation: str, custom_id: str) -> None:
    async with open_channel(suite.addresses["identity"], suite.project.keys["sdk"]) as channel:
        await identity_grpc.IdentityServiceStub(channel).Identify(
            identity_pb.IdentifyRequest(installation_id=installation, custom_id=custom_id)
        )


def heartbeat(installation: str, session_id: str, time: datetime, seconds: int) -> ingest_pb.Event:
    event = base_event(installation, time)
    event.session_id = session_id
    event.session_heartbeat.duration.FromTimedelta(timedelta(seconds=seconds))
    return event


async def test_the_header_says_anonymous_or_identified_whatever_the_name(
    page: Any, console_suite: ConsoleSuite
) -> None:
    now = datetime.now(UTC)
    anonymous = f"console-anon-{uuid.uuid4().hex[:8]}"
    # A name set by attributes, no login: headed by the name, and still anonymous.
    await track(
        console_suite,
        attribute_event(
            anonymous, [op("set", "FIRST_NAME", "Nadia"), op("set", "LAST_NAME", "Roy")], time=now
        ),
    )
    named = await stored_profile(
        console_suite, anonymous, lambda p: p.summary.first_name == "Nadia"
    )
    logged_in = f"console-login-{uuid.uuid4().hex[:8]}"
    custom_id = f"user-{uuid.uuid4().hex[:8]}"
    await track(
        console_suite,
        attribute_event(logged_in, [op("set", "FIRST_NAME", "Nadia")], time=now),
    )
    await identify(console_suite, logged_in, custom_id)
    identified = await stored_profile(
        console_suite, logged_in, lambda p: p.summary.custom_id == custom_id
    )

    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{named.summary.profile_id}")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Nadia Roy")
    state = page.locator("#identity-state")
    await expect(state).to_contain_text("Anonymous — not logged in: no custom ID")
    await expect(state).to_contain_text("the name comes from its attributes")

    await page.goto(console_suite.url + f"/profiles/{identified.summary.profile_id}")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Nadia")
    await expect(state).to_have_text(f"Identified — logged in with custom ID {custom_id}")


async def test_push_reads_as_device_opt_in_apart_from_the_recorded_choice(
    page: Any, console_suite: ConsoleSuite
) -> None:
    now = datetime.now(UTC)
    phone, tablet = (f"console-push-{uuid.uuid4().hex[:8]}" for _ in range(2))
    custom_id = f"push-{uuid.uuid4().hex[:8]}"
    for n, installation in enumerate((phone, tablet)):
        await track(
            console_suite,
            installation_update(
                installation, now - timedelta(minutes=n), push_token=f"tok-{n}", push_opt_in=True
            ),
        )
        await identify(console_suite, installation, custom_id)
    profile = await stored_profile(
        console_suite, phone, lambda p: len(p.installations) == 2, within=30
    )
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile.summary.profile_id}")
    devices = page.locator("#push-devices td")
    await expect(devices.nth(1)).to_have_text("Devices (notifications allowed)")
    await expect(devices.nth(2)).to_have_text("opted in on 2 of 2 devices with a token")
    # The choice is still told as such, and the card says how the two differ.
    marketing = page.locator("#subscriptions tr[data-subscription='Push Marketing'] td")
    await expect(marketing.nth(2)).to_have_text("no choice recorded")
    await expect(page.locator("#push-meaning")).to_contain_text("need not be recorded")

    # The overview labels push reach and the push subscription rates apart.
    await page.goto(console_suite.url + "/overview")
    await expect(page.locator('tr[data-reach="push"] td').first).to_have_text(
        "Push (devices opted in)"
    )
    await expect(page.locator('tr[data-reach="email"] td').first).to_have_text(
        "Email (address and consent)"
    )
    push_rate = page.locator('#subscription-rates tr[data-rate="Push Marketing"] td').first
    await expect(push_rate).to_have_text("Push (recorded choice)")
    await expect(page.locator("#reach-meaning")).to_contain_text("needs no push subscription")
    await expect(page.locator("#rates-meaning")).to_contain_text("apart from the device")


async def test_the_timeline_filters_by_days_hides_heartbeats_and_suggests_names(
    page: Any, console_suite: ConsoleSuite
) -> None:
    installation = f"console-days-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    earlier = now - timedelta(days=3)
    day = earlier.date().isoformat()
    began = now - timedelta(hours=1)
    await track(
        console_suite,
        # Three days ago: 52 ticks and a view, more than a page.
        *(
            custom_event(
                installation, name="tick", time=earlier.replace(hour=12) + timedelta(seconds=n)
            )
            for n in range(52)
        ),
        custom_event(installation, name="view_item", time=earlier.replace(hour=11)),
        # Today: a session whose heartbeats clutter the timeline, and a purchase.
        session_start(installation, "s-days", began),
        *(
            heartbeat(installation, "s-days", began + timedelta(seconds=10 * n), 10 * n)
            for n in range(1, 6)
        ),
        custom_event(installation, name="purchase", time=began + timedelta(seconds=15)),
        session_end(installation, "s-days", began + timedelta(seconds=70), 70),
    )
    profile = await stored_profile(
        console_suite, installation, lambda p: p.counters.event_count >= 61, within=30
    )
    profile_id = profile.summary.profile_id
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    titles = page.locator("#timeline > li strong")
    await expect(titles.filter(has_text="Session heartbeat")).to_have_count(5)

    # Hiding the heartbeats: a box remembered in the URL; the session's start and end stay.
    await page.get_by_label("Hide session heartbeats").check()
    await page.get_by_role("button", name="Filter").click()
    await expect(page).to_have_url(re.compile(r"heartbeats=hide"))
    await expect(page.locator("#events h2")).to_have_text("Events: without session heartbeats")
    await expect(titles.filter(has_text="Session heartbeat")).to_have_count(0)
    await expect(titles.filter(has_text="Session start")).to_have_count(1)
    await expect(titles.filter(has_text="Session end")).to_have_count(1)
    await expect(page.get_by_label("Hide session heartbeats")).to_be_checked()

    # One day, in UTC: that day's events only, kept with the box by the pages' links.
    await page.get_by_label("From (UTC)", exact=True).fill(day)
    await page.get_by_label("To (UTC)", exact=True).fill(day)
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("#events h2")).to_have_text(
        f"Events: on {day} (UTC), without session heartbeats"
    )
    await expect(titles).to_have_count(50)
    await page.get_by_role("link", name="Older events").click()
    await expect(titles).to_have_count(3)
    assert set(await titles.all_inner_texts()) == {"tick", "view_item"}
    query = parse_qs(urlsplit(page.url).query)
    assert (query["from"], query["to"], query["heartbeats"]) == ([day], [day], ["hide"])
    await expect(page.get_by_label("From (UTC)", exact=True)).to_have_value(day)

    # A typo in the name: the names this profile has, the closest first, each a link.
    await page.goto(console_suite.url + f"/profiles/{profile_id}?event_name=purchse")
    miss = page.locator("#event-name-miss")
    await expect(miss).to_contain_text("No event named “purchse”. Did you mean purchase?")
    await expect(miss).to_contain_text("are named: purchase, tick, view_item.")
    await miss.get_by_role("link", name="purchase").first.click()
    await expect(page).to_have_url(re.compile(r"event_name=purchase#events$"))
    await expect(titles).to_have_text(["purchase"])
    # A name it has, left out by the other filters, is told so.
    await page.goto(
        console_suite.url + f"/profiles/{profile_id}?event_name=purchase&from={day}&to={day}"
    )
    await expect(miss).to_contain_text("has “purchase” events, but none matches the other filters")

    # Days the console cannot read, or reversed, are told beside their box.
    await page.goto(console_suite.url + f"/profiles/{profile_id}?from=2026-02-30")
    await expect(page.locator("#events-from-error")).to_contain_text("Not a day")
    await expect(page.locator("#timeline > li")).to_have_count(0)
    await page.goto(console_suite.url + f"/profiles/{profile_id}?from=2026-03-02&to=2026-03-01")
    await expect(page.locator("#events-to-error")).to_contain_text("before the first")
    await expect(page.locator("#events-to")).to_have_attribute("aria-invalid", "true")


async def test_a_rejected_row_opens_its_person_and_names_its_attribute(
    page: Any, console_suite: ConsoleSuite
) -> None:
    known = f"console-rej-{uuid.uuid4().hex[:8]}"
    await track(console_suite, custom_event(known, time=datetime.now(UTC)))
    profile_id = (await stored_profile(console_suite, known)).summary.profile_id
    bad_email = attribute_event(
        known, [op("set", "plan", "gold"), op("set", "EMAIL", "no-at")], time=datetime.now(UTC)
    )
    bad_price = custom_event(known, name="checkout", time=datetime.now(UTC), price=float("nan"))
    assert await reject(console_suite, bad_email, bad_price) == ["EMAIL_INVALID", "VALUE_INVALID"]
    stranger = f"console-rej-unknown-{uuid.uuid4().hex[:8]}"
    assert await reject(
        console_suite, custom_event(stranger, time=datetime.now(UTC) + timedelta(days=30))
    ) == ["EVENT_TIME_IN_FUTURE"]

    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/rejected?profile={profile_id}")
    email = page.locator("table.rejected tbody tr", has_text="EMAIL_INVALID")
    wrong = email.locator("td").nth(2)
    await expect(wrong.locator("bdi")).to_have_text("email: not a valid email")
    # The exact path stays, beside the words.
    await expect(wrong.locator("code.path")).to_have_text(
        "attribute_operations.operations[1].value"
    )
    price = page.locator("table.rejected tbody tr", has_text="VALUE_INVALID")
    await expect(price.locator("td").nth(2).locator("bdi")).to_have_text(
        "price: not a finite number"
    )
    # The row opens the profile it belongs to.
    link = email.get_by_role("link", name=f"profile {profile_id[:8]}")
    await expect(link).to_have_attribute("href", f"/profiles/{profile_id}")
    await link.click()
    await expect(page).to_have_url(re.compile(f"/profiles/{profile_id}$"))
    # Its profile page's section says it in the same words.
    section = page.locator("section#rejected")
    await expect(section).to_contain_text("email: not a valid email")

    # An installation with no profile recorded: a search by that installation.
    await page.goto(console_suite.url + "/rejected?reason=EVENT_TIME_IN_FUTURE")
    row = page.locator("table.rejected tbody tr", has_text=stranger)
    find = row.get_by_role("link", name="Find its profile")
    await expect(find).to_have_attribute("href", f"/search?q={stranger}&by=installation_id")
