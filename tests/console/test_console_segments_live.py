"""The segments page in a real browser, against a real suite fed by the demo: a new segment's
first members on the live table, the table filtered by segment (in the URL, by the service),
people the users table does not list (not yet, merged away, erased) told as such, and each
funnel's conversion window with its steps."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2
from playwright.async_api import expect

from profiles.client import open_channel
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import filters_pb2, funnels_pb2, segments_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from services.console.app import build_app
from services.console.backend import Backend
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite, start_console
from tests.console.test_console_pages import query, sign_in, stored_profile, track
from tests.console.test_console_safety import _rest
from tests.support.ingest import attribute_event, op
from tests.support.segments_custom import attribute

ROWS = "#segment-changes tbody tr"
EXISTS = filters_pb2.OPERATOR_EXISTS


@asynccontextmanager
async def segments_admin(suite: ConsoleSuite) -> AsyncIterator[segments_grpc.SegmentsServiceStub]:
    async with open_channel(suite.addresses["segments"], suite.project.keys["admin"]) as channel:
        yield segments_grpc.SegmentsServiceStub(channel)


async def create_segment(suite: ConsoleSuite, name: str, marker: str) -> segments_pb2.Segment:
    """A custom segment of the profiles that have the custom attribute `marker`."""
    async with segments_admin(suite) as segments:
        reply = await segments.CreateSegment(
            segments_pb.CreateSegmentRequest(display_name=name, filter=attribute(marker, EXISTS))
        )
    return reply.segment


async def marked(suite: ConsoleSuite, marker: str, *names: str) -> list[str]:
    """New profiles with the custom attribute `marker`, named `names` ("" for none), once the
    users table lists them; their profile IDs."""
    installations = [f"console-seg-{uuid.uuid4().hex[:10]}" for _ in names]
    now = datetime.now(UTC)
    events = []
    for installation, name in zip(installations, names, strict=True):
        operations = [op("set", marker, 1)]
        if name:
            first, last = name.split(" ")
            operations += [op("set", "FIRST_NAME", first), op("set", "LAST_NAME", last)]
        events.append(attribute_event(installation, operations, time=now - timedelta(seconds=1)))
    await track(suite, *events)
    ids = [(await stored_profile(suite, i)).summary.profile_id for i in installations]

    async def listed() -> bool:
        reply = await query(
            suite, "GetProfileRows", query_pb.GetProfileRowsRequest(profile_ids=ids)
        )
        return not reply.missing_profile_ids

    await eventually(listed, within=30)
    return ids


def person_cell(row: Any) -> Any:
    return row.locator("td").nth(1)


async def test_a_new_segments_first_members_show_as_entries(
    page: Any, console_suite: ConsoleSuite
) -> None:
    marker = f"m{uuid.uuid4().hex[:10]}"
    ids = await marked(console_suite, marker, "Ana Premiere", "Bo Premiere")
    name = f"French buyers {marker}"
    segment = await create_segment(console_suite, name, marker)
    assert segment.size == 2
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/segments?segment=custom:{segment.segment_id}")
    # Its two members entered it at its creation, by its definition: two entries, and only
    # this segment's (the filter).
    rows = page.locator(ROWS)
    await expect(rows).to_have_count(2, timeout=20_000)
    for index in range(2):
        row = rows.nth(index)
        await expect(row.locator("td").nth(2)).to_contain_text("entered")
        await expect(row.locator("td").nth(2).locator("div")).to_have_text(
            "by the segment's definition"
        )
        await expect(row.locator("td").nth(3)).to_have_text(name)
    hrefs = {
        await person_cell(rows.nth(i)).get_by_role("link").get_attribute("href") for i in range(2)
    }
    assert hrefs == {f"/profiles/{i}" for i in ids}
    await expect(person_cell(rows.filter(has_text="Ana Premiere"))).to_contain_text(ids[0])


async def test_the_live_table_shows_the_segment_chosen_and_keeps_it_in_the_url(
    page: Any, console_suite: ConsoleSuite
) -> None:
    marker = f"m{uuid.uuid4().hex[:10]}"
    name = f"Filtered {marker}"
    segment = await create_segment(console_suite, name, marker)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/segments")
    rows = page.locator(ROWS)
    # Every segment's changes: the demo's smart segment entries of the last hour among them.
    await expect(rows.first).to_be_visible(timeout=20_000)
    await expect(rows.filter(has_not_text=name).first).to_be_visible()
    choice = page.get_by_label("Segment", exact=True)
    await choice.select_option(label=name)
    await page.get_by_role("button", name="Show").click()
    await expect(page).to_have_url(re.compile(rf"segment=custom%3A{segment.segment_id}$"))
    await expect(choice).to_have_value(f"custom:{segment.segment_id}")
    await expect(page.locator("#segment-status")).to_have_text(
        f"Live: the changes of “{name}” recorded in the last hour, then as they are recorded."
    )
    # Nothing of the other segments; a profile entering this one by an event comes in.
    await expect(rows).to_have_count(0)
    (entering,) = await marked(console_suite, marker, "Cleo Filtered")
    # Found by the start of its ID, which the row shows whether or not the users table lists
    # the person yet (naming a person the table lags on is the next test's).
    row = rows.filter(has_text=entering[:8])
    await expect(row).to_have_count(1, timeout=20_000)
    await expect(row.locator("td").nth(2).locator("div")).to_have_text("by an event")
    await expect(rows).to_have_count(1)

    # A smart segment or a flag is chosen alike; a segment the project does not have is named
    # and every segment shown.
    await page.goto(console_suite.url + "/segments?segment=flag:3")
    await expect(choice).to_have_value("flag:3")
    await expect(page.locator("#segment-status")).to_contain_text("the changes of “Risky Engaged”")
    await page.goto(console_suite.url + "/segments?segment=custom:no-such-segment")
    await expect(page.locator("#unknown-segment")).to_have_text(
        "Unknown segment “custom:no-such-segment”: showing the changes of every segment."
    )
    await expect(choice).to_have_value("")
    await expect(rows.first).to_be_visible(timeout=20_000)


async def test_merged_and_erased_people_say_so_instead_of_a_bare_id(
    page: Any, console_suite: ConsoleSuite
) -> None:
    marker = f"m{uuid.uuid4().hex[:10]}"
    survivor_installation = f"console-seg-{uuid.uuid4().hex[:10]}"
    custom_id = f"survivor-{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    await track(
        console_suite,
        attribute_event(
            survivor_installation,
            [op("set", "FIRST_NAME", "Sura"), op("set", "LAST_NAME", "Vivor")],
            time=now - timedelta(seconds=2),
        ),
    )
    merged_id, erased_id = await marked(console_suite, marker, "", "")
    segment = await create_segment(console_suite, f"Gone {marker}", marker)
    assert segment.size == 2
    merged_installation = (
        (await query(console_suite, "GetProfile", query_pb.GetProfileRequest(profile_id=merged_id)))
        .profile.installations[0]
        .installation_id
    )
    async with open_channel(
        console_suite.addresses["identity"], console_suite.project.keys["admin"]
    ) as channel:
        identity = identity_grpc.IdentityServiceStub(channel)
        for installation in (survivor_installation, merged_installation):
            # The survivor logs in first; the marked anonymous profile logging in with the
            # same custom ID is merged into it.
            await identity.Identify(
                identity_pb.IdentifyRequest(
                    installation_id=installation, custom_id=custom_id, request_id=str(uuid.uuid4())
                )
            )
        await identity.DeleteProfile(
            identity_pb.DeleteProfileRequest(profile_id=erased_id, request_id=str(uuid.uuid4()))
        )

    async def gone_from_the_users_table() -> bool:
        request = query_pb.GetProfileRowsRequest(profile_ids=[merged_id, erased_id])
        reply = await query(console_suite, "GetProfileRows", request)
        return set(reply.missing_profile_ids) == {merged_id, erased_id}

    await eventually(gone_from_the_users_table, within=30)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/segments?segment=custom:{segment.segment_id}")
    merged = page.locator(f"{ROWS}[data-profile-id='{merged_id}']")
    erased = page.locator(f"{ROWS}[data-profile-id='{erased_id}']")
    await expect(merged.first).to_be_visible(timeout=20_000)
    # Looked up again, each row says what became of the person, by the start of the ID.
    for row in await merged.all():
        await expect(person_cell(row).locator(".person-note")).to_have_text(
            "merged into Sura Vivor", timeout=15_000
        )
        await expect(person_cell(row).get_by_role("link")).to_have_text(f"profile {merged_id[:8]}")
        await expect(person_cell(row).locator(".hint")).to_have_text(merged_id)
    await expect(erased.first).to_be_visible(timeout=20_000)
    for row in await erased.all():
        await expect(person_cell(row).locator(".person-note")).to_have_text(
            "erased", timeout=15_000
        )
        await expect(person_cell(row).get_by_role("link")).to_have_count(0)
        await expect(person_cell(row).locator("bdi")).to_have_text(f"profile {erased_id[:8]}")


async def test_a_person_not_in_the_users_table_yet_is_named_once_it_is(
    page: Any, console_suite: ConsoleSuite, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = f"m{uuid.uuid4().hex[:10]}"
    (lagging,) = await marked(console_suite, marker, "Lou Behind")
    segment = await create_segment(console_suite, f"Lagging {marker}", marker)
    call = Backend.call
    first_look = [True]

    async def table_behind(self: Backend, key: str, service: str, method: str, request: Any) -> Any:
        # The users table's lag behind the bus, once: the first look-up of this person finds
        # no row, as when the change arrives before the projection has them.
        reply = await call(self, key, service, method, request)
        if method == "GetProfileRows" and lagging in request.profile_ids and first_look[0]:
            first_look[0] = False
            rows = [r for r in reply.profiles if r.profile_id != lagging]
            return query_pb.GetProfileRowsResponse(
                profiles=rows, missing_profile_ids=[*reply.missing_profile_ids, lagging]
            )
        return reply

    monkeypatch.setattr(Backend, "call", table_behind)
    async with start_console(build_app(console_suite.settings)) as url:
        await sign_in(page, ConsoleSuite(url, *_rest(console_suite)), land=False)
        await page.goto(url + f"/segments?segment=custom:{segment.segment_id}")
        cell = person_cell(page.locator(ROWS).first)
        await expect(cell.locator(".person-note")).to_have_text(
            "not in the users table yet", timeout=20_000
        )
        await expect(cell.get_by_role("link")).to_have_text(f"profile {lagging[:8]}")
        # Looked up again shortly: named, the note gone.
        await expect(cell.get_by_role("link")).to_have_text("Lou Behind", timeout=15_000)
        await expect(cell.locator(".person-note")).to_have_count(0)
        await expect(cell.locator(".hint")).to_have_text(lagging)
        # Stopping this console waits for every response to end: the page leaves its feed.
        await page.goto("about:blank")
    assert first_look == [False]


async def test_each_funnel_shows_its_steps_and_conversion_window(
    page: Any, console_suite: ConsoleSuite
) -> None:
    suffix = uuid.uuid4().hex[:8]
    windows = {f"Hour funnel {suffix}": 3600, f"Long funnel {suffix}": 90 * 60 + 86_400}
    ids = {}
    async with segments_admin(console_suite) as segments:
        for name, seconds in windows.items():
            reply = await segments.CreateFunnel(
                segments_pb.CreateFunnelRequest(
                    display_name=name,
                    steps=[
                        funnels_pb2.FunnelStep(event_name="view_item"),
                        funnels_pb2.FunnelStep(event_name="purchase"),
                    ],
                    conversion_window=duration_pb2.Duration(seconds=seconds),
                )
            )
            ids[name] = reply.funnel.funnel_id
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/segments")
    hour, long = (page.locator(f"#funnel-{ids[name]}-definition") for name in windows)
    await expect(hour).to_have_text(
        "2 steps: view_item → purchase. Conversion window: the last step within 1 hour of the"
        " first."
    )
    await expect(long).to_contain_text("within 1 day 1 hour 30 minutes of the first")
    # Each count opens the profiles behind it (ListFunnelProfiles): who reached each of the two
    # steps, and who dropped off after the first.
    figures = page.locator(f"table[aria-labelledby='funnel-{ids[next(iter(windows))]}']")
    await expect(figures.get_by_role("link")).to_have_count(3)
    await expect(page.get_by_text("Each count opens the profiles it counts")).to_be_visible()
