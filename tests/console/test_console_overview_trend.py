"""The overview's last 30 days: active and new profiles per UTC day, as a person reads them on
the server-rendered page (its charts' text and the table of each day)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, time, timedelta

from profiles.client import open_channel
from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from tests.conftest import create_test_project, eventually
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_hardening import http_sign_in
from tests.support.identity import new_id
from tests.support.query import custom_event, session_start

ROW = re.compile(
    r'<tr data-day="([0-9-]+)"><td>[0-9-]+</td><td class="num">(\d+)</td>'
    r'<td class="num">(\d+)</td></tr>'
)


async def test_the_overview_shows_active_and_new_profiles_of_each_of_the_last_30_days(
    console_suite: ConsoleSuite,
) -> None:
    # A project of its own, so that the demo's profiles do not count.
    project = await create_test_project(console_suite.settings.database_url)
    today = datetime.now(UTC).date()
    midday = datetime.combine(today, time(12), UTC)

    def at(days_ago: int) -> datetime:
        return midday - timedelta(days=days_ago)

    a, b = new_id(), new_id()
    events = [
        session_start(a, "a1", at(9), platform=types_pb2.PLATFORM_IOS),
        session_start(a, "a2", at(2), platform=types_pb2.PLATFORM_IOS),
        custom_event(b, time=at(5)),
        session_start(b, "b1", at(2), platform=types_pb2.PLATFORM_IOS),
    ]
    async with open_channel(console_suite.addresses["ingest"], project.keys["sdk"]) as channel:
        reply = await ingest_grpc.IngestServiceStub(channel).TrackEvents(
            ingest_pb.TrackEventsRequest(events=events), timeout=20
        )
        assert all(r.status.code == 0 for r in reply.results), reply

    async with open_channel(console_suite.addresses["query"], project.keys["read"]) as channel:
        query = query_grpc.QueryServiceStub(channel)

        async def counted() -> bool:
            overview = (
                await query.GetOverview(query_pb.GetOverviewRequest(trend_days=30), timeout=10)
            ).overview
            return sum(d.active_profile_count + d.new_profile_count for d in overview.daily) == 5

        await eventually(counted, within=20)

    browser = await asyncio.to_thread(http_sign_in, console_suite.url, project.keys["read"])
    page = await asyncio.to_thread(browser.get, console_suite.url + "/overview", timeout=10)
    assert page.status_code == 200
    html = page.text
    assert "Last 30 days" in html
    assert "Active profiles per day" in html
    assert "New profiles per day" in html
    # Each chart is an image named by its heading and scale, for a screen reader.
    assert 'aria-labelledby="trend-active-heading trend-active-scale"' in html
    assert "Scale: 0 to 2 profiles a day" in html
    assert "Scale: 0 to 1 profile a day" in html
    rows = ROW.findall(html)
    shown = datetime.now(UTC).date()  # the page's today (a midnight may have passed)
    assert [day for day, _, _ in rows] == [
        (shown - timedelta(days=n)).isoformat() for n in reversed(range(30))
    ]
    figures = {day: (int(active), int(new)) for day, active, new in rows if active + new != "00"}
    assert figures == {
        (today - timedelta(days=9)).isoformat(): (1, 1),
        (today - timedelta(days=5)).isoformat(): (0, 1),
        (today - timedelta(days=2)).isoformat(): (2, 0),
    }
