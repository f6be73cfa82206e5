"""What the events insert's arguments cost to send: asyncpg's encoding in the client and their
decoding in the server, per form of the same columns.

    python -m bench.arguments [--quick | --smoke] [--rounds N] [--database-url URL]

The columns are the events insert's (`repository._event_columns` and the installation IDs) for
`bench.ingest`'s own batches of 500 (its `Traffic`, as `bench.ingest_cpu` prepares them). Each
form is a statement that takes the columns as the insert's FROM clause does and counts the rows,
its payloads parsed into jsonb, so each side does the decoding work the insert does and no more:

- `arrays`: one array argument per column, the payloads a jsonb[] (asyncpg encodes an array
  element by element: iterable checks and a codec call each);
- `json_payloads`: the same, but the payloads one json argument, which the pool's codec encodes
  in one call, zipped with the other columns by ROWS FROM (what the insert does since this
  bench was written);
- `packed`: `json_payloads` with the four text columns each sent as one text, joined by a
  separator (a NUL-free control character, and another for NULL) and split by
  `string_to_array`: a lead measured, not taken (a separator that a value holds would need
  another choice per batch; see docs/benchmarks.md);
- `bare`: `SELECT 1`, the call's own cost, for scale.

The client's CPU is this process's; the server's is its backend process's CPU clock (so the
server must run on this machine: otherwise only the client's is reported).
Forms alternate call by call within each round; each figure is the least of its rounds, per
event.
Figures: `arguments_<form>_<side>_us_per_event` against the `arrays` form's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from bench.common import (
    Figure,
    add_backend_arguments,
    labelled_quick,
    make_work_dir,
    print_figures,
    run_main,
    size_choice,
    start_backends,
)
from bench.ingest_cpu import Sizes as BatchSizes
from bench.ingest_cpu import prepare
from services.ingest.repository import _event_columns
from shared.db import create_pool

BENCH = "arguments"

ARRAYS = """
    SELECT count(e.payload) FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[],
        $5::timestamptz[], $6::text[], $7::smallint[], $8::jsonb[])
        WITH ORDINALITY AS e(installation_id, event_id, kind, name, event_time, session_id,
                             platform, payload, ord)"""
JSON_PAYLOADS = """
    SELECT count(e.payload::jsonb)
    FROM ROWS FROM (unnest($1::text[]), unnest($2::text[]), unnest($3::smallint[]),
                    unnest($4::text[]), unnest($5::timestamptz[]), unnest($6::text[]),
                    unnest($7::smallint[]), json_array_elements($8::json))
        WITH ORDINALITY AS e(installation_id, event_id, kind, name, event_time, session_id,
                             platform, payload, ord)"""
PACKED = """
    SELECT count(e.payload::jsonb)
    FROM ROWS FROM (unnest((string_to_array($9 || $1, $9, $10))[2:]),
                    unnest((string_to_array($9 || $2, $9, $10))[2:]), unnest($3::smallint[]),
                    unnest((string_to_array($9 || $4, $9, $10))[2:]), unnest($5::timestamptz[]),
                    unnest((string_to_array($9 || $6, $9, $10))[2:]),
                    unnest($7::smallint[]), json_array_elements($8::json))
        WITH ORDINALITY AS e(installation_id, event_id, kind, name, event_time, session_id,
                             platform, payload, ord)"""
BARE = "SELECT 1"
FORMS = {"arrays": ARRAYS, "json_payloads": JSON_PAYLOADS, "packed": PACKED, "bare": BARE}


@dataclass(frozen=True, slots=True)
class Sizes:
    batches: int  # distinct batches of 500 events
    rounds: int  # times each form is sent for every batch


FULL = Sizes(batches=20, rounds=40)
QUICK = Sizes(batches=20, rounds=15)
SMOKE = Sizes(batches=2, rounds=1)


@dataclass(frozen=True, slots=True)
class Cost:
    client_us: float
    server_us: float | None  # None when the server is not a process of this machine


def columns_of(sizes: Sizes) -> list[list[list[Any]]]:
    """Each batch's events insert columns: installation IDs, then `_event_columns`."""
    batches = prepare(BatchSizes(batches=sizes.batches, rounds=1), datetime.now(UTC))
    return [[[e.installation_id for e in b.valid], *_event_columns(b.valid)] for b in batches]


def backend_cpu(pid: int | None) -> Callable[[], float | None]:
    """The CPU seconds of a process of this machine, to the nanosecond: Linux's CPU clock of a
    process (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)), which any process may read; the
    operating system's usual counters (/proc, psutil) count in 10 ms ticks, too coarse for one
    call. None (nothing measured) when the pid is not a process here."""
    if pid is None:
        return lambda: None
    clock = ((~pid) << 3) | 2
    try:
        time.clock_gettime(clock)
    except OSError:
        return lambda: None
    return lambda: time.clock_gettime(clock)


async def measure(
    database_url: str, batches: Sequence[list[list[Any]]], rounds: int
) -> dict[str, Cost]:
    """Each form's CPU per event, least of the rounds. Within a round the forms alternate call
    by call (each batch sent in every form in turn), so a change of the machine's speed during
    the round (a shared host's) weighs on every form alike."""
    pool = await create_pool(database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            backend = backend_cpu(await conn.fetchval("SELECT pg_backend_pid()"))
            events = sum(len(b[0]) for b in batches)
            for query in FORMS.values():  # warm-up: plans cached, first allocations
                await conn.fetchval(query, *_arguments(query, batches[0]))
            client: dict[str, list[float]] = {form: [] for form in FORMS}
            server: dict[str, list[float]] = {form: [] for form in FORMS}
            for _ in range(rounds):
                spent = await _round(conn, batches, backend)
                for form, (client_s, server_s) in spent.items():
                    client[form].append(client_s * 1e6 / events)
                    if server_s is not None:
                        server[form].append(server_s * 1e6 / events)
            return {
                form: Cost(min(client[form]), min(server[form]) if server[form] else None)
                for form in FORMS
            }
    finally:
        await pool.close()


def _arguments(query: str, batch: list[list[Any]]) -> list[Any]:
    if query is BARE:
        return []
    if query is PACKED:  # bench.ingest's traffic holds neither character
        sep, null = "\x1f", "\x1e"
        texts = [sep.join(null if v is None else v for v in batch[i]) for i in (0, 1, 3, 5)]
        return [
            texts[0],
            texts[1],
            batch[2],
            texts[2],
            batch[4],
            texts[3],
            batch[6],
            batch[7],
            sep,
            null,
        ]
    return batch


async def _round(
    conn: asyncpg.Connection | PoolConnectionProxy,
    batches: Sequence[list[list[Any]]],
    backend: Callable[[], float | None],
) -> dict[str, tuple[float, float | None]]:
    """Client and server CPU seconds of each form over the batches. The server's is read
    around each call: the operating system counts it in ticks, so a call adds 0 or a tick,
    which over many calls adds up to the form's share."""
    client = dict.fromkeys(FORMS, 0.0)
    server: dict[str, float | None] = dict.fromkeys(FORMS, 0.0)
    for batch in batches:
        for form, query in FORMS.items():
            server_before = backend()
            started = time.process_time()
            await conn.fetchval(query, *_arguments(query, batch))
            client[form] += time.process_time() - started
            server_after = backend()
            if server_before is None or server_after is None:
                server[form] = None
            elif (so_far := server[form]) is not None:
                server[form] = so_far + server_after - server_before
    return {form: (client[form], server[form]) for form in FORMS}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.arguments", description=__doc__)
    add_backend_arguments(parser)
    parser.add_argument("--rounds", type=int, help="rounds over the batches (quick 15, full 40)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = size_choice(args, SMOKE, QUICK, FULL)
    rounds = args.rounds or sizes.rounds
    batches = columns_of(sizes)
    with contextlib.ExitStack() as stack:
        database_url = args.database_url
        if not database_url:
            database_url = start_backends(stack, make_work_dir(stack), None, "unused").database_url
        costs = asyncio.run(measure(database_url, batches, rounds))
    print(
        f"{sizes.batches} batches of 500 events x {rounds} rounds; CPU per event, least of the"
        " rounds (the server's: its backend process)"
    )
    print(f"  {'form':<15} {'client us':>10} {'server us':>10}")
    for form, cost in costs.items():
        server = "n/a" if cost.server_us is None else f"{cost.server_us:10.2f}"
        print(f"  {form:<15} {cost.client_us:10.2f} {server:>10}")
    base = costs["arrays"]
    figures = [
        Figure(
            f"arguments_{form}_client_us_per_event",
            cost.client_us,
            "us",
            "arguments_arrays_client_us_per_event",
            base.client_us,
        )
        for form, cost in costs.items()
        if form != "arrays"
    ]
    if base.server_us is not None:
        figures += [
            Figure(
                f"arguments_{form}_server_us_per_event",
                cost.server_us,
                "us",
                "arguments_arrays_server_us_per_event",
                base.server_us,
            )
            for form, cost in costs.items()
            if form != "arrays" and cost.server_us is not None
        ]
    print_figures(BENCH, figures, quick=labelled_quick(args))
    return 0


if __name__ == "__main__":
    run_main(main)
