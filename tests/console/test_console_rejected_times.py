"""The rejected events pages say how long ago each event was received, beside its time in UTC,
as the timeline, the users table and the profile's summary do (an operator's audit against
Batch, Countly, PostHog and Segment: "when" in UTC alone had to be worked out)."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta

from profiles.query.v1 import query_service_pb2 as query_pb
from services.console import present
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import identified_profile, query, reject
from tests.console.test_console_session_keys import get, signed_in
from tests.support.ingest import custom_event

# What the page writes beside a time received a moment ago (the test never reads a clock: a
# slow run may make it minutes or hours).
RECENT = re.compile(r"just now|\d+ min ago|\d+ h ago")


def received_cells(text: str, row_marker: str) -> list[tuple[str, str, str, str]]:
    """(UTC text, datetime, title, words) of the Received cell of each table row holding
    `row_marker`."""
    found = []
    for row in re.findall(r"<tr>(.*?)</tr>", text, re.S):
        if row_marker not in row:
            continue
        cell = re.match(r'<td class="when">(.*?)</td>', row, re.S)
        assert cell is not None, row[:400]
        utc = " ".join(re.findall(r"<span>([^<]*)</span>", cell.group(1)))
        ago = re.search(
            r'<time class="ago" datetime="([^"]+)" title="([^"]+)">([^<]+)</time>', cell.group(1)
        )
        assert ago is not None, cell.group(1)
        found.append((utc, ago.group(1), html.unescape(ago.group(2)), ago.group(3)))
    return found


async def test_rejected_events_say_how_long_ago_beside_their_utc_time(
    console_suite: ConsoleSuite,
) -> None:
    profile = await identified_profile(console_suite)
    profile_id = profile.summary.profile_id
    late = custom_event(
        profile.installations[0].installation_id,
        name="from_the_future",
        time=datetime.now(UTC) + timedelta(days=30),
    )
    assert await reject(console_suite, late) == ["EVENT_TIME_IN_FUTURE"]
    rows = await query(
        console_suite,
        "ListRejectedEvents",
        query_pb.ListRejectedEventsRequest(profile_id=profile_id, page_size=50),
    )
    stored = next(r for r in rows.rejected_events if late.event_id in r.raw_payload_json)
    utc, iso = present.when(stored.receive_time), present.iso(stored.receive_time)
    browser = await signed_in(console_suite, console_suite.project.keys["read"])

    # The rejected events page: the row's time in UTC, then how long ago (its UTC time as the
    # tooltip, its ISO time for the script that keeps it current).
    listed = await get(
        browser,
        f"{console_suite.url}/rejected?reason=EVENT_TIME_IN_FUTURE&profile={profile_id}",
    )
    assert listed.status_code == 200
    cells = received_cells(listed.text, late.event_id)
    assert len(cells) == 1, cells
    shown, datetime_attribute, title, words = cells[0]
    assert (shown, datetime_attribute, title) == (utc, iso, utc)
    assert RECENT.fullmatch(words), words

    # The profile page's Rejected events section, alike.
    page = await get(browser, f"{console_suite.url}/profiles/{profile_id}")
    section = re.search(r'<section id="rejected">(.*?)</section>', page.text, re.S)
    assert section is not None
    cells = received_cells(section.group(1), "EVENT_TIME_IN_FUTURE")
    assert cells, section.group(1)[:800]
    assert (utc, iso, utc) in [cell[:3] for cell in cells]
    assert all(RECENT.fullmatch(cell[3]) for cell in cells if cell[1] == iso)
