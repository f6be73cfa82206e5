"""`profiles import FILE.jsonl`: backfills historical events through ImportEvents.

The file holds one event per line, in the proto JSON form of `profiles.ingest.v1.Event` (what
grpcurl prints; docs/ingest.md, "Validation rules"). Lines are sent in batches of 500 with the
admin key; each batch is answered per event, so the summary counts accepted, duplicate and
rejected events (rejections by reason) plus lines that are not an Event at all. Re-running an
import is safe and resumes: event IDs make every event already stored a duplicate.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from google.protobuf import json_format

from profiles.client import open_channel
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc

BATCH_SIZE = 500
# Batches in flight at once: enough to overlap network and commit, few enough to stay polite.
CONCURRENCY = 4
CALL_TIMEOUT_S = 60.0


class Progress:
    """A one-line progress bar on a terminal stream (stderr); silent when it is not a tty,
    except for the final line."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None) -> None:
        self._total = max(total, 1)
        self._label = label
        self._stream = stream or sys.stderr
        self._done = 0
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._tty = self._stream.isatty()

    def advance(self, amount: int, note: str = "") -> None:
        self._done = min(self._total, self._done + amount)
        now = time.monotonic()
        if self._tty and (now - self._last_draw > 0.1 or self._done == self._total):
            self._last_draw = now
            self._draw(note)

    def _draw(self, note: str) -> None:
        width = 30
        filled = int(width * self._done / self._total)
        percent = 100 * self._done / self._total
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {percent:5.1f}% {note}".ljust(79))
        self._stream.flush()

    def close(self, note: str = "") -> None:
        elapsed = time.monotonic() - self._started
        if self._tty:
            self._draw(note)
            self._stream.write("\n")
        else:
            suffix = f", {note}" if note else ""
            self._stream.write(f"{self._label}: done in {elapsed:.1f} s{suffix}\n")
        self._stream.flush()


@dataclass(slots=True)
class ImportSummary:
    """What an import did, per outcome; `unreadable` lists line numbers that are not Events."""

    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    unreadable: list[int] = field(default_factory=list)

    def add(self, reply: pb.ImportEventsResponse) -> None:
        self.accepted += reply.accepted_count
        self.duplicate += reply.duplicate_count
        self.rejected += reply.rejected_count
        self.reasons.update(r.reason for r in reply.results if r.reason)

    def as_dict(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.reasons.items())),
            "unreadable_lines": len(self.unreadable),
        }

    def text(self) -> str:
        lines = [
            f"accepted:  {self.accepted}",
            f"duplicate: {self.duplicate}",
            f"rejected:  {self.rejected}",
        ]
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.reasons.items())]
        if self.unreadable:
            shown = ", ".join(map(str, self.unreadable[:10]))
            more = " ..." if len(self.unreadable) > 10 else ""
            lines.append(f"unreadable lines: {len(self.unreadable)} (line {shown}{more})")
        return "\n".join(lines)


def read_events(path: Path, summary: ImportSummary) -> Iterator[tuple[int, pb.Event]]:
    """(byte offset after the line, Event) for every readable line; blank lines are skipped,
    unreadable ones recorded in `summary`."""
    offset = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            offset += len(raw)
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                event = json_format.Parse(text, pb.Event())
            except (json_format.ParseError, ValueError, json.JSONDecodeError):
                summary.unreadable.append(number)
                continue
            yield offset, event


def batches(path: Path, summary: ImportSummary) -> Iterator[tuple[int, list[pb.Event]]]:
    batch: list[pb.Event] = []
    offset = 0
    for offset, event in read_events(path, summary):
        batch.append(event)
        if len(batch) == BATCH_SIZE:
            yield offset, batch
            batch = []
    if batch:
        yield offset, batch


async def import_file(
    path: Path,
    stub: pb_grpc.IngestServiceStub,
    *,
    progress: Progress | None = None,
    concurrency: int = CONCURRENCY,
) -> ImportSummary:
    """Sends the file's events through ImportEvents; returns the summary. Raises
    grpc.aio.AioRpcError when a batch fails as a whole (after the channel's retries): what was
    answered before is stored, and a re-run resumes."""
    summary = ImportSummary()
    slots = asyncio.BoundedSemaphore(concurrency)
    done_offset = 0

    async def send(offset: int, events: list[pb.Event]) -> None:
        nonlocal done_offset
        try:
            reply = await stub.ImportEvents(
                pb.ImportEventsRequest(events=events), timeout=CALL_TIMEOUT_S
            )
            summary.add(reply)
            if progress is not None:
                progress.advance(max(0, offset - done_offset), f"{summary.accepted} accepted")
                done_offset = max(done_offset, offset)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as group:
        for offset, events in batches(path, summary):
            await slots.acquire()
            group.create_task(send(offset, events))
    if progress is not None:
        progress.close(f"{summary.accepted} accepted")
    return summary


async def run_import(
    path: Path, address: str, api_key: str, *, size: int = 0, quiet: bool = False
) -> ImportSummary:
    """Imports `path` (of `size` bytes, for the progress bar) into the ingest service at
    `address` with an admin `api_key`."""
    progress = None if quiet else Progress(size, f"importing {path.name}")
    async with open_channel(address, api_key, timeout=CALL_TIMEOUT_S) as channel:
        return await import_file(path, pb_grpc.IngestServiceStub(channel), progress=progress)
