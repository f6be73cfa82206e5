"""Ingest CPU micro-benchmark: the pure Python work ingest does per batch, as a ratio to parsing
the batch's request bytes.

    python -m bench.ingest_cpu [--quick | --smoke] [--rounds N]

No server, database or Redis: it times, with `time.process_time`, the per-batch work of
`IngestService.ingest` that does not wait on anything, on the batches of `bench.ingest`
(its `Traffic`, same seed and payload mix, 500 events each), repeated over many rounds:
- `validate`: validation of the batch (`validation.validate_events`);
- `outbox`: the EventsIngested outbox message with one IngestedEvent per accepted event, and its
  serialization (`messages.events_ingested`, as `IngestService._enqueue` does);
- `notices`: one ProfileChanged per touched profile (`messages.serialized_profile_changes`), queued
  (`LiveNotices`) and published by `NoticeWorker` through `Bus.notify_many`, on a stand-in
  Redis client that packs the command with redis-py's own encoder and sends nothing;
- `columns`: the asyncpg argument columns of the events insert (`repository._event_columns`),
  with the payloads encoded by the pool's codec (`shared.db.encode_json`) as one json array;
- `respond`: the TrackEventsResponse built from the results and serialized (servicer.py).
Every event is accepted, each installation on its own profile. The baseline, in the same run,
is `TrackEventsRequest.FromString` of the same batches (`parse`): each figure is a number of
"parses" of CPU. Stages alternate within each round; a stage's figure is the least of its
rounds, since other work on this shared machine only ever adds to a round.

Output: a report, then JSON lines `ingest_cpu_<stage>_us_per_event` (and `_total_`) with
baseline `parse_us_per_event`. `--database-url` and `--redis-url` are accepted for the bench
runner's sake and unused.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio.connection import Connection

from bench.common import (
    Figure,
    add_backend_arguments,
    labelled_quick,
    print_figures,
    run_main,
    size_choice,
)
from bench.ingest import BATCH_SIZE, Traffic
from profiles.common.v1 import bus_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest.messages import events_ingested, serialized_profile_changes
from services.ingest.repository import _event_columns
from services.ingest.service import BatchResult, EventResult
from services.ingest.servicer import _fill
from services.ingest.validation import ValidEvent, validate_events
from shared.bus import Bus
from shared.convert import timestamp_of
from shared.db import encode_json
from shared.notices import LiveNotices, NoticeWorker

BENCH = "ingest_cpu"
PROJECT_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
STAGES = ("validate", "outbox", "notices", "columns", "respond")


@dataclass(frozen=True, slots=True)
class Sizes:
    batches: int  # distinct batches of 500 events
    rounds: int  # times each stage runs over all of them


FULL = Sizes(batches=20, rounds=40)
QUICK = Sizes(batches=20, rounds=10)
SMOKE = Sizes(batches=2, rounds=1)


class _Redis:
    """Stands in for the bus's Redis client: packs each command as redis-py would send it (its
    Connection.pack_commands), sends nothing, and answers 0 receivers per notice. (What this
    leaves out is reading the reply.)"""

    def __init__(self) -> None:
        self.packed = 0

    async def execute_command(self, *args: Any) -> bytes:
        self.packed += sum(len(chunk) for chunk in _PACKER.pack_commands([args]))
        return b" ".join([b"0"] * (len(args[3].split()) // 2))  # EVAL script 0 sizes pieces


_PACKER = Connection()


def _finish(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Runs a coroutine that never suspends (nothing here waits on I/O) without a loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine suspended")


@dataclass(slots=True)
class Batch:
    """One batch and what each stage needs from the stages before it (computed once)."""

    data: bytes
    request: pb.TrackEventsRequest
    valid: list[ValidEvent]
    accepted: dict[int, uuid.UUID]
    ingested: list[bus_pb2.IngestedEvent]
    results: BatchResult


def prepare(sizes: Sizes, now: datetime) -> list[Batch]:
    traffic = Traffic(seed=1)
    # Each installation on its own profile, as after bench.ingest's warm-up.
    profiles: dict[str, uuid.UUID] = {}
    batches = []
    for _ in range(sizes.batches):
        request = pb.TrackEventsRequest(events=traffic.batch())
        valid, rejected = validate_events(request.events, None, now)
        if rejected:
            raise RuntimeError(f"bench.ingest's traffic has rejected events: {rejected[0]}")
        accepted = {
            e.index: profiles.setdefault(e.installation_id or "", uuid.uuid4()) for e in valid
        }
        _, ingested = events_ingested(
            PROJECT_ID, "b", valid, accepted, now, now, imported=False, session_countries={}
        )
        results = BatchResult(
            [EventResult(e.index, e.event_id, "accepted", accepted[e.index]) for e in valid]
        )
        batches.append(
            Batch(request.SerializeToString(), request, valid, accepted, ingested, results)
        )
    return batches


def stages(now: datetime) -> dict[str, Callable[[Batch], object]]:
    change_time = timestamp_of(now)
    notices = LiveNotices("bench")
    worker = NoticeWorker(notices, Bus(_Redis(), "bench"))  # type: ignore[arg-type]

    def parse(batch: Batch) -> object:
        return pb.TrackEventsRequest.FromString(batch.data)

    def validate(batch: Batch) -> object:
        return validate_events(batch.request.events, None, now)

    def outbox(batch: Batch) -> object:
        message, _ = events_ingested(
            PROJECT_ID,
            "batch",
            batch.valid,
            batch.accepted,
            now,
            now,
            imported=False,
            session_countries={},
        )
        return message.SerializeToString()

    def publish(batch: Batch) -> object:
        versions = dict.fromkeys(batch.accepted.values(), 7)
        notices.offer(serialized_profile_changes(PROJECT_ID, batch.ingested, versions, change_time))
        queued = [notices.queue.get_nowait() for _ in range(notices.queue.qsize())]
        return _finish(worker._publish(queued))

    def columns(batch: Batch) -> object:
        built = _event_columns(batch.valid)
        # The pool's json codec, called once on the payloads' list (the json argument).
        return encode_json(built[-1])

    def respond(batch: Batch) -> object:
        response = pb.TrackEventsResponse()
        _fill(response, batch.results)
        return response.SerializeToString()

    return {
        "parse": parse,
        "validate": validate,
        "outbox": outbox,
        "notices": publish,
        "columns": columns,
        "respond": respond,
    }


def measure(
    work: dict[str, Callable[[Batch], object]], batches: Sequence[Batch], rounds: int
) -> dict[str, float]:
    """CPU microseconds per event of each stage: the least of its rounds (other work on the
    machine only ever adds to a round)."""
    samples: dict[str, list[float]] = {name: [] for name in work}
    events = sum(len(b.valid) for b in batches)
    for _ in range(rounds):
        for name, stage in work.items():
            started = time.process_time()
            for batch in batches:
                stage(batch)
            samples[name].append((time.process_time() - started) * 1e6 / events)
    return {name: min(values) for name, values in samples.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_cpu", description=__doc__)
    add_backend_arguments(parser)
    parser.add_argument("--rounds", type=int, help="rounds over the batches (quick 10, full 40)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = size_choice(args, SMOKE, QUICK, FULL)
    rounds = args.rounds or sizes.rounds
    now = datetime.now(UTC)
    batches = prepare(sizes, now)
    work = stages(now)
    for stage in work.values():  # warm-up: caches, first allocations
        stage(batches[0])
    per_event = measure(work, batches, rounds)
    parse = per_event.pop("parse")
    total = sum(per_event.values())
    print(
        f"{sizes.batches} batches of {BATCH_SIZE} events x {rounds} rounds, CPU per event"
        f" (least of the rounds); payload mix: {Traffic.mix_text()}"
    )
    print(f"  {'parse (baseline)':<18} {parse:7.2f} us")
    for name, value in [*per_event.items(), ("total", total)]:
        print(f"  {name:<18} {value:7.2f} us = {value / parse:5.2f} parses")
    print_figures(
        BENCH,
        [
            Figure(f"ingest_cpu_{name}_us_per_event", value, "us", "parse_us_per_event", parse)
            for name, value in [*per_event.items(), ("total", total)]
        ],
        quick=labelled_quick(args),
    )
    return 0


if __name__ == "__main__":
    run_main(main)
