"""One average session length, two windows: GetProfile's `average_session_duration` (all time)
and GetEngagement's first sub-score (the last 168 hours) agree when every closed session is in
the window, and neither counts an open session. Identity, ingest (its idle sweep every 50 ms),
segments and query run on one frozen clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from services.ingest.app import make_build
from tests.conftest import eventually
from tests.support.identity import new_id
from tests.support.ingest_running import session_event
from tests.support.query import NOW, Suite, start_suite


@pytest.fixture
async def stack(start_services, settings_for_test, project, database_url) -> Any:  # type: ignore[no-untyped-def]
    suite = await start_suite(
        start_services,
        settings_for_test,
        project,
        database_url,
        ingest_build=make_build(sweep_interval_s=0.05),
    )
    handles = await start_services("segments", clock=suite.clock)
    return suite, segments_grpc.SegmentsServiceStub(handles["segments"].channel)


def session(
    inst: str, session_id: str, start: timedelta, *steps: tuple[str, timedelta]
) -> list[Any]:
    """A session started `start` before NOW, then each (kind, offset from its start): "end" and
    "heartbeat" carry the offset as their duration, any other kind is a custom event."""
    begin = NOW - start
    events = [session_event("start", inst, session_id, begin)]
    for kind, offset in steps:
        duration = offset if kind in ("end", "heartbeat") else None
        events.append(session_event(kind, inst, session_id, begin + offset, duration=duration))
    return events


def seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


async def test_five_closed_sessions_in_the_window_give_one_average_in_both_views(
    stack: Any,
) -> None:
    suite: Suite
    suite, segments = stack
    inst = new_id()
    hours = timedelta(hours=1)
    reply = await suite.track(
        # Three sessions the SDK ended: 60 s, 90 s (a heartbeat on the way), 30 s.
        *session(inst, "a", 100 * hours, ("end", seconds(60))),
        *session(inst, "b", 50 * hours, ("heartbeat", seconds(30)), ("end", seconds(90))),
        *session(inst, "c", 30 * hours, ("end", seconds(30))),
        # Two the idle sweep closes at their last activity: 100 s and 80 s.
        *session(inst, "d", 20 * hours, ("heartbeat", seconds(45)), ("view", seconds(100))),
        *session(inst, "e", 10 * hours, ("view", seconds(80))),
        # Two still open (active in the last 30 minutes): their length is not known yet.
        *session(inst, "f", seconds(600), ("heartbeat", seconds(60))),
        *session(inst, "g", seconds(300), ("view", seconds(120))),
    )
    profile_id = reply.results[0].profile_id
    project_id = suite.project.project_id

    async def swept_and_handled() -> bool:
        closed = await suite.fetchval(
            "SELECT count(*) FROM sessions WHERE project_id = $1 AND closed", project_id
        )
        ended = await suite.fetchval(
            "SELECT count(*) FROM segment_sessions WHERE project_id = $1 AND ended", project_id
        )
        return bool(closed == 5 and ended == 5)

    await eventually(swept_and_handled, within=20)
    average = seconds((60 + 90 + 30 + 100 + 80) / 5)  # 72 s: score1 1.2, under its cap of 2

    async def both() -> tuple[Any, Any]:
        view = (await suite.get(profile_id=profile_id)).profile
        engagement = await segments.GetEngagement(
            segments_pb.GetEngagementRequest(profile_id=profile_id),
            metadata=suite.project.metadata("read"),
            timeout=10,
        )
        return view, engagement

    view, engagement = await both()
    assert view.counters.session_count == 7
    assert engagement.session_count == 7
    assert view.counters.average_session_duration.ToTimedelta() == average
    assert engagement.average_session_duration.ToTimedelta() == average
    assert engagement.score1 == pytest.approx(1.2)
    assert view.engagement.score1 == pytest.approx(engagement.score1)
    assert view.engagement.score == pytest.approx(engagement.score)

    # A closed session older than 168 hours moves the all-time average only.
    await suite.track(*session(inst, "old", 200 * hours, ("end", seconds(600))))

    async def old_handled() -> bool:
        ended = await suite.fetchval(
            "SELECT count(*) FROM segment_sessions WHERE project_id = $1 AND ended", project_id
        )
        return bool(ended == 6)

    await eventually(old_handled)
    view, engagement = await both()
    assert view.counters.average_session_duration.ToTimedelta() == seconds(960 / 6)
    assert engagement.average_session_duration.ToTimedelta() == average
    assert view.engagement.score1 == pytest.approx(engagement.score1)
