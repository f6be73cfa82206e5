"""Write partitions over gRPC (services/ingest/batch_groups.py `partitioned`): a batch whose
events fall in two partitions is stored by one transaction in each, and answered as one. Should
one of them fail, the batch fails, the other's events stay stored, and a retry of the batch
answers them DUPLICATE and stores the rest (as a retry does after a timeout)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest.batch_groups import partition_of
from services.ingest.repository import IngestRepository
from services.ingest.validation import ValidEvent
from shared.clock import FrozenClock
from shared.settings import Settings
from tests.support.identity import new_id
from tests.support.ingest import NOW, Ingest, custom_event, ingest_client, start_ingest

if TYPE_CHECKING:
    from tests.conftest import TestProject

ACCEPTED = pb.EVENT_OUTCOME_ACCEPTED
DUPLICATE = pb.EVENT_OUTCOME_DUPLICATE
WRITE_PARTITIONS = 2


@pytest.fixture
async def ingest(
    start_services: Any, settings_for_test: Settings, project: TestProject, database_url: str
) -> Ingest:
    """Ingest with two write partitions, one writer each."""
    settings = settings_for_test.with_changes(
        ingest_write_partitions=WRITE_PARTITIONS, ingest_group_writers=1
    )
    channel = await start_ingest(start_services, settings, clock=FrozenClock(NOW))
    return ingest_client(channel, project, database_url)


async def device_per_partition(ingest: Ingest) -> list[str]:
    """One installation whose profile falls in each write partition (identity picks profile
    IDs at random: new installations until every partition has one)."""
    found: dict[int, str] = {}
    while len(found) < WRITE_PARTITIONS:
        device = new_id()
        reply = await ingest.track(custom_event(device))
        profile_id = uuid.UUID(reply.results[0].profile_id)
        found.setdefault(partition_of(profile_id, WRITE_PARTITIONS), device)
    return [found[number] for number in sorted(found)]


async def stored_event_ids(ingest: Ingest, device: str) -> set[str]:
    rows = await ingest.fetch("SELECT event_id FROM events WHERE installation_id = $1", device)
    return {r["event_id"] for r in rows}


async def test_a_batch_over_two_partitions_is_stored_by_both_and_answered_as_one(
    ingest: Ingest,
) -> None:
    first, second = await device_per_partition(ingest)
    batch = [custom_event(first if i % 2 else second, event_id=f"b-{i}") for i in range(10)]
    reply = await ingest.track(*batch)
    assert [r.outcome for r in reply.results] == [ACCEPTED] * 10
    assert [r.event_id for r in reply.results] == [e.event_id for e in batch]
    assert await stored_event_ids(ingest, first) >= {f"b-{i}" for i in range(1, 10, 2)}
    assert await stored_event_ids(ingest, second) >= {f"b-{i}" for i in range(0, 10, 2)}
    again = await ingest.track(*batch)
    assert [r.outcome for r in again.results] == [DUPLICATE] * 10


async def test_a_failed_partition_fails_the_batch_and_its_retry_stores_the_rest(
    ingest: Ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault no validation foresaw (injected in the events insert of the partition that
    carries the event "poison") fails that partition's transaction and so the batch; the other
    partition's events were committed by their own transaction."""
    first, second = await device_per_partition(ingest)
    original = IngestRepository.insert_installation_events
    poisoned = True

    async def insert(self: IngestRepository, conn: Any, *args: Any) -> Any:
        events: Sequence[ValidEvent] = args[-1]
        if poisoned and any(e.event_id == "poison" for e in events):
            raise RuntimeError("an unforeseen fault")
        return await original(self, conn, *args)

    monkeypatch.setattr(IngestRepository, "insert_installation_events", insert)
    healthy = [custom_event(first, event_id=f"h-{i}") for i in range(3)]
    doomed = [custom_event(second, event_id=f"d-{i}") for i in range(3)]
    poison = custom_event(second, event_id="poison")
    batch = [*healthy, *doomed, poison]
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await ingest.track(*batch)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert {"h-0", "h-1", "h-2"} <= await stored_event_ids(ingest, first)
    assert not {"d-0", "d-1", "d-2", "poison"} & await stored_event_ids(ingest, second)

    poisoned = False
    retry = await ingest.track(*batch)
    assert [r.outcome for r in retry.results] == [DUPLICATE] * 3 + [ACCEPTED] * 4
    assert {"d-0", "d-1", "d-2", "poison"} <= await stored_event_ids(ingest, second)
