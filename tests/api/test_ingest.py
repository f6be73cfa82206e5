"""TrackEvents over real gRPC, PostgreSQL and Redis, with identity resolving installations."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.ingest.v1 import ingest_service_pb2 as pb
from tests.conftest import create_test_project
from tests.support.ingest import NOW, Ingest, custom_event, stamp

if TYPE_CHECKING:
    from tests.conftest import TestProject

ACCEPTED, DUPLICATE, REJECTED = (
    pb.EVENT_OUTCOME_ACCEPTED,
    pb.EVENT_OUTCOME_DUPLICATE,
    pb.EVENT_OUTCOME_REJECTED,
)


def violations(status) -> list[error_details_pb2.BadRequest.FieldViolation]:  # type: ignore[no-untyped-def]
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.extend(bad.field_violations)
    return found


def reason_of(status) -> str:  # type: ignore[no-untyped-def]
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def test_a_valid_event_is_stored_on_a_new_anonymous_profile(ingest: Ingest) -> None:
    reply = await ingest.track(custom_event("inst-1", event_id="e1", name="Purchase", price=3))
    assert [r.outcome for r in reply.results] == [ACCEPTED]
    assert reply.accepted_count == 1
    result = reply.results[0]
    assert result.event_id == "e1"
    assert result.status.code == 0
    rows = await ingest.fetch(
        "SELECT e.profile_id, e.name, e.kind, p.custom_id FROM events e"
        " JOIN profiles p USING (project_id, profile_id)"
    )
    assert len(rows) == 1
    assert str(rows[0]["profile_id"]) == result.profile_id
    assert rows[0]["name"] == "purchase"
    assert rows[0]["custom_id"] is None
    installations = await ingest.fetch("SELECT profile_id FROM installations")
    assert [str(r["profile_id"]) for r in installations] == [result.profile_id]


async def test_a_partial_batch_stores_the_valid_events_and_rejects_the_invalid_alone(
    ingest: Ingest,
) -> None:
    bad_name = custom_event("inst-1", event_id="bad", name="no spaces allowed")
    reply = await ingest.track(
        custom_event("inst-1", event_id="ok1"), bad_name, custom_event("inst-2", event_id="ok2")
    )
    assert [r.outcome for r in reply.results] == [ACCEPTED, REJECTED, ACCEPTED]
    assert (reply.accepted_count, reply.rejected_count) == (2, 1)
    rejected = reply.results[1]
    assert (rejected.event_id, rejected.reason, rejected.field_path) == (
        "bad",
        "NAME_INVALID",
        "custom.name",
    )
    assert rejected.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reason_of(rejected.status) == "NAME_INVALID"
    assert [v.field for v in violations(rejected.status)] == ["events[1].custom.name"]
    # By event ID: the two installations' profiles may fall in different write partitions,
    # whose transactions number their events in either order.
    stored = await ingest.fetch("SELECT event_id FROM events ORDER BY event_id")
    assert [r["event_id"] for r in stored] == ["ok1", "ok2"]
    kept = await ingest.fetch("SELECT event_id, reason, field_path, payload FROM rejected_events")
    assert [(r["event_id"], r["reason"], r["field_path"]) for r in kept] == [
        ("bad", "NAME_INVALID", "custom.name")
    ]
    assert kept[0]["payload"]["custom"]["name"] == "no spaces allowed"


@pytest.mark.parametrize(
    ("events", "reason"),
    [(0, "EVENTS_MISSING"), (1001, "TOO_MANY_EVENTS")],
)
async def test_a_malformed_request_is_invalid_argument_with_a_violation_on_events(
    ingest: Ingest, events: int, reason: str
) -> None:
    batch = [custom_event("inst-1", event_id=f"e{i}") for i in range(events)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ingest.track(*batch)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert reason_of(status) == reason
    assert [v.field for v in violations(status)] == ["events"]
    assert await ingest.fetch("SELECT 1 FROM events") == []


async def test_an_empty_request_checks_the_key_and_stores_nothing(
    ingest: Ingest, project: TestProject
) -> None:
    # The contract's way to check a key without an event (the edge's, for an empty SDK batch):
    # the key is judged before the request is read.
    empty = pb.TrackEventsRequest()
    for metadata, code in (
        ((("authorization", "Bearer prf_0000000000000000_not-a-key"),), "UNAUTHENTICATED"),
        (project.metadata("read"), "PERMISSION_DENIED"),
        (ingest.metadata, "INVALID_ARGUMENT"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await ingest.stub.TrackEvents(empty, metadata=metadata)
        assert raised.value.code().name == code
    assert await ingest.fetch("SELECT 1 FROM events") == []


async def test_a_request_over_4_mib_is_invalid_argument(ingest: Ingest) -> None:
    trace = "x" * 30_000  # each event stays under 32 KiB, the request goes over 4 MiB
    batch = []
    for i in range(145):
        event = custom_event("inst-1", event_id=f"e{i}")
        event.ClearField("custom")
        event.crash.name = "Boom"
        event.crash.stack_trace = trace
        batch.append(event)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ingest.track(*batch)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(rpc_status.from_call(raised.value)) == "REQUEST_TOO_LARGE"  # type: ignore[arg-type]


async def test_a_retried_batch_is_answered_duplicate_and_stored_once(ingest: Ingest) -> None:
    batch = [custom_event("inst-1", event_id="a"), custom_event("inst-1", event_id="b")]
    first = await ingest.track(*batch)
    again = await ingest.track(*batch)
    assert [r.outcome for r in first.results] == [ACCEPTED, ACCEPTED]
    assert [r.outcome for r in again.results] == [DUPLICATE, DUPLICATE]
    assert again.duplicate_count == 2
    assert len(await ingest.fetch("SELECT 1 FROM events")) == 2


async def test_a_repeat_inside_one_batch_is_a_duplicate(ingest: Ingest) -> None:
    reply = await ingest.track(
        custom_event("inst-1", event_id="same"),
        custom_event("inst-1", event_id="same"),
        custom_event("inst-2", event_id="same"),  # another origin: not a duplicate
    )
    assert [r.outcome for r in reply.results] == [ACCEPTED, DUPLICATE, ACCEPTED]
    assert len(await ingest.fetch("SELECT 1 FROM events")) == 2


async def test_concurrent_retries_store_each_event_once(ingest: Ingest) -> None:
    batch = [custom_event(f"inst-{i % 3}", event_id=f"e{i}") for i in range(30)]
    replies = await asyncio.gather(*(ingest.track(*batch) for _ in range(6)))
    for position in range(30):
        outcomes = [reply.results[position].outcome for reply in replies]
        assert outcomes.count(ACCEPTED) == 1
        assert outcomes.count(DUPLICATE) == 5
    rows = await ingest.fetch("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events")
    assert (rows[0]["n"], rows[0]["d"]) == (30, 30)


async def test_clock_skew_is_corrected_with_the_send_time(ingest: Ingest) -> None:
    # The device's clock is 2 hours behind: it sent at its 10:00 what happened at its 09:59.
    device_now = NOW - timedelta(hours=2)
    event = custom_event("inst-1", event_id="skewed", time=device_now - timedelta(minutes=1))
    reply = await ingest.track(event, send_time=device_now)
    assert reply.results[0].outcome == ACCEPTED
    rows = await ingest.fetch("SELECT event_time, receive_time FROM events")
    assert rows[0]["event_time"] == NOW - timedelta(minutes=1)
    assert rows[0]["receive_time"] == NOW


async def test_an_event_per_event_send_time_wins_over_the_request_send_time(
    ingest: Ingest,
) -> None:
    event = custom_event("inst-1", event_id="own", time=NOW + timedelta(hours=1))
    event.send_time.CopyFrom(stamp(NOW + timedelta(hours=1, minutes=5)))
    reply = await ingest.track(event, send_time=NOW - timedelta(days=3))
    assert reply.results[0].outcome == ACCEPTED
    rows = await ingest.fetch("SELECT event_time FROM events")
    assert rows[0]["event_time"] == NOW - timedelta(minutes=5)


@pytest.mark.parametrize(
    ("offset", "outcome", "reason"),
    [
        (timedelta(minutes=10), ACCEPTED, ""),
        (timedelta(minutes=10, seconds=1), REJECTED, "EVENT_TIME_IN_FUTURE"),
        (-timedelta(days=30), ACCEPTED, ""),
        (-timedelta(days=30, seconds=1), REJECTED, "EVENT_TIME_TOO_OLD"),
    ],
)
async def test_event_time_limits_follow_the_injected_clock(
    ingest: Ingest, offset: timedelta, outcome: int, reason: str
) -> None:
    reply = await ingest.track(custom_event("inst-1", time=NOW + offset))
    assert reply.results[0].outcome == outcome
    assert reply.results[0].reason == reason


async def test_import_events_accepts_old_history_and_marks_it_imported(ingest: Ingest) -> None:
    old = custom_event("inst-1", event_id="old", time=NOW - timedelta(days=400))
    tracked = await ingest.track(old)
    assert tracked.results[0].reason == "EVENT_TIME_TOO_OLD"
    imported = await ingest.stub.ImportEvents(
        pb.ImportEventsRequest(events=[old]), metadata=ingest.admin, timeout=20
    )
    assert imported.results[0].outcome == ACCEPTED
    rows = await ingest.fetch("SELECT imported FROM events")
    assert [r["imported"] for r in rows] == [True]


async def test_import_events_is_refused_to_an_sdk_key(ingest: Ingest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ingest.stub.ImportEvents(
            pb.ImportEventsRequest(events=[custom_event()]), metadata=ingest.metadata, timeout=20
        )
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_server_side_events_by_custom_id_land_on_the_identified_profile(
    ingest: Ingest,
) -> None:
    reply = await ingest.track(
        custom_event(custom_id="user-42", event_id="s1"),
        custom_event(custom_id="user-42", event_id="s2"),
        custom_event(custom_id="null", event_id="junk"),
        custom_event(custom_id="'Guest'", event_id="quoted"),
        custom_event(custom_id=" user-42", event_id="padded"),
    )
    assert [r.outcome for r in reply.results] == [ACCEPTED, ACCEPTED] + [REJECTED] * 3
    # Junk custom IDs are identity's rule: ingest rejects what ResolveProfiles refuses.
    assert [(r.reason, r.field_path) for r in reply.results[2:]] == [
        ("CUSTOM_ID_INVALID", "custom_id")
    ] * 3
    kept = await ingest.fetch("SELECT reason FROM rejected_events WHERE event_id = 'junk'")
    assert [r["reason"] for r in kept] == ["CUSTOM_ID_INVALID"]
    assert reply.results[0].profile_id == reply.results[1].profile_id
    rows = await ingest.fetch(
        "SELECT p.custom_id, e.custom_id AS origin FROM events e"
        " JOIN profiles p USING (project_id, profile_id)"
    )
    assert {(r["custom_id"], r["origin"]) for r in rows} == {("user-42", "user-42")}
    # The same event ID from an installation is another origin, not a duplicate.
    other = await ingest.track(custom_event("inst-1", event_id="s1"))
    assert other.results[0].outcome == ACCEPTED


async def test_a_known_installation_keeps_its_profile_across_batches(ingest: Ingest) -> None:
    first = await ingest.track(custom_event("inst-1"))
    second = await ingest.track(custom_event("inst-1"), custom_event("inst-2"))
    assert second.results[0].profile_id == first.results[0].profile_id
    assert second.results[1].profile_id != first.results[0].profile_id


async def test_tracking_bumps_the_profile_version_and_enqueues_one_message(
    ingest: Ingest,
) -> None:
    first = await ingest.track(custom_event("inst-1"))
    profile_id = first.results[0].profile_id
    before = await ingest.fetch(
        "SELECT version FROM profiles WHERE profile_id = $1::uuid", profile_id
    )
    await ingest.track(custom_event("inst-1"), custom_event("inst-1"))
    after = await ingest.fetch(
        "SELECT version FROM profiles WHERE profile_id = $1::uuid", profile_id
    )
    assert after[0]["version"] == before[0]["version"] + 1


async def test_projects_are_isolated(ingest: Ingest, database_url: str) -> None:
    other = await create_test_project(database_url)
    mine = await ingest.track(custom_event("shared-inst", event_id="e1"))
    theirs = await ingest.stub.TrackEvents(
        pb.TrackEventsRequest(events=[custom_event("shared-inst", event_id="e1")]),
        metadata=other.metadata("sdk"),
        timeout=20,
    )
    # Same installation and event IDs in two projects: two events on two profiles.
    assert mine.results[0].outcome == theirs.results[0].outcome == ACCEPTED
    assert mine.results[0].profile_id != theirs.results[0].profile_id
    rows = await ingest.fetch("SELECT project_id FROM events")
    assert len({r["project_id"] for r in rows}) == 2


async def test_a_read_key_cannot_track(ingest: Ingest, project) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ingest.stub.TrackEvents(
            pb.TrackEventsRequest(events=[custom_event()]),
            metadata=project.metadata("read"),
            timeout=20,
        )
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
