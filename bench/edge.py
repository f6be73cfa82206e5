"""Edge benchmark: Segment `/v1/batch` through the edge against direct gRPC TrackEvents of the
same events, in the same run, alternating rounds.

    python -m bench.edge [--quick | --smoke] [--clients C] [--duration S] [--rounds N]

Starts identity, ingest and the edge as subprocesses (`profiles serve`) on embedded PostgreSQL
and Redis, creates a project with an sdk key, then alternates two closed loops of C concurrent
clients (default 8) for S seconds per round:
- edge: each client holds one HTTP/1.1 keep-alive connection and posts Segment batches of 100
  realistic `track` messages (analytics.js context: library, page, user agent, locale, IP;
  4 to 6 properties; fresh message IDs every batch) to /v1/batch, each client for its own share
  of 5,000 anonymous IDs (an installation's events come from one sender at a time);
- grpc: each client holds one channel and calls TrackEvents with the custom events the edge
  sends for the same messages (translated once per template, before timing; fresh event IDs
  every batch).
A batch is 100 SDK messages on both sides; events/s counts them. The edge also sends what a
translation adds (the installation's details per anonymous ID and batch, stored once and
answered DUPLICATE afterwards): that is the edge's real cost. Both sides' events ask ingest to
derive their sessions (SESSION_RULE_INACTIVITY), so both pay for that alike.

Headline JSON lines: `edge_events_per_s` (baseline `grpc_trackevents_events_per_s`, aim ratio
>= 0.8), `edge_batch_p99_ms` (baseline the gRPC batch p99, aim ratio <= 1.5) and
`edge_cpu_us_per_event` (baseline ingest's CPU per event on the gRPC side). Everything shares
this machine's cores (clients, three services, PostgreSQL, Redis): the ratios are the figures.
--smoke runs one short round per side (a check that the benchmark works, no figures to keep).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from bench.common import (
    BenchError,
    ChildProcess,
    Figure,
    LatencySummary,
    LoadPlan,
    LoadResult,
    add_backend_arguments,
    alternate,
    create_project,
    free_port,
    make_work_dir,
    print_figures,
    run_main,
    start_backends,
    start_service_process,
    suite_settings,
    wait_http,
    wait_serving,
)
from profiles.client import open_channel
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from services.edge.dialects import segment
from services.edge.steps import Track
from shared.logging import configure_logging

BENCH = "edge"
BATCH_SIZE = 100
INSTALLATIONS = 5_000
TEMPLATES = 20
EVENT_NAMES = (
    "Product Viewed",
    "Product Added",
    "Cart Viewed",
    "Checkout Started",
    "Order Completed",
    "Search Performed",
    "Video Played",
    "Signup Clicked",
)


@dataclass(frozen=True, slots=True)
class Sizes:
    clients: int
    duration_s: float
    rounds: int
    warmup_s: float
    templates: int = TEMPLATES  # distinct batches per client, translated before timing


FULL = Sizes(clients=8, duration_s=20.0, rounds=5, warmup_s=5.0)
QUICK = Sizes(clients=8, duration_s=6.0, rounds=3, warmup_s=2.0)
# Only checks that the bench runs end to end (the tests run it): a few batches per side.
SMOKE = Sizes(clients=2, duration_s=0.3, rounds=1, warmup_s=0.1, templates=2)


def message(rng: random.Random, now: datetime, users: range) -> dict[str, object]:
    """One realistic analytics.js `track` message from one of `users`."""
    anonymous_id = f"anon-{rng.choice(users):05d}"
    properties: dict[str, object] = {
        "product_id": f"sku-{rng.randrange(10_000)}",
        "price": round(rng.uniform(1, 300), 2),
        "currency": "EUR",
        "category": rng.choice(("shoes", "shirts", "bags", "hats")),
    }
    if rng.random() < 0.5:
        properties["coupon"] = rng.choice(("SPRING", "WELCOME10", "VIP"))
    if rng.random() < 0.5:
        properties["quantity"] = rng.randrange(1, 5)
    return {
        "type": "track",
        "messageId": "",
        "anonymousId": anonymous_id,
        "event": rng.choice(EVENT_NAMES),
        "properties": properties,
        "timestamp": now.isoformat(),
        "context": {
            "library": {"name": "analytics.js", "version": "2.11.1"},
            "page": {"path": "/shop", "url": "https://shop.example/shop", "title": "Shop"},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0",
            "locale": "fr-FR",
            "ip": f"203.0.113.{rng.randrange(1, 255)}",
        },
    }


@dataclass(slots=True)
class Template:
    """A batch of messages and the custom events the edge translates them to."""

    messages: list[dict[str, object]]
    events: list[pb.Event]


def make_templates(
    client: int, clients: int, count: int = TEMPLATES, seed: int = 7
) -> list[Template]:
    """The batches of one client: each client sends for its own share of the installations, as
    a device, or a backend serving its own users, does (an installation's events come from one
    sender, not from several at once)."""
    rng = random.Random(seed + client)
    share = INSTALLATIONS // clients
    users = range(client * share, (client + 1) * share)
    now = datetime.now(UTC)
    templates = []
    for _ in range(count):
        messages = [message(rng, now, users) for _ in range(BATCH_SIZE)]
        for one in messages:
            one["messageId"] = str(uuid.uuid4())
        steps = segment.translate_batch({"batch": messages}, now).steps
        events = [
            e for s in steps if isinstance(s, Track) for e in s.events if e.HasField("custom")
        ]
        if len(events) != BATCH_SIZE:
            raise BenchError(f"a template translated to {len(events)} custom events")
        templates.append(Template(messages, events))
    return templates


class HttpStatusError(grpc.aio.AioRpcError):
    """A non-200 answer of the edge, counted by `drive` as errors are (by its status)."""

    def __init__(self, status: int) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE if status == 503 else grpc.StatusCode.UNKNOWN,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=f"HTTP {status}",
        )


# --- the HTTP side: a minimal HTTP/1.1 keep-alive client (the stdlib has no async one) -------


class Connection:
    """One keep-alive HTTP/1.1 connection posting JSON."""

    def __init__(self, host: str, port: int, auth: str) -> None:
        self._host = host
        self._port = port
        self._auth = auth
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\nAuthorization: Basic {self._auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        status_line = await self._reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self._reader.readexactly(length)
        return status

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


def edge_call(
    port: int,
    api_key: str,
    templates: list[list[Template]],
    pool: asyncio.Queue[tuple[int, Connection]],
) -> Callable[[], Awaitable[object]]:
    import base64

    auth = base64.b64encode(f"{api_key}:".encode()).decode()
    for client in range(pool.maxsize):
        pool.put_nowait((client, Connection("127.0.0.1", port, auth)))
    counter = iter(range(10**12))

    async def call() -> None:
        n = next(counter)
        client, connection = await pool.get()
        try:
            template = templates[client][n % len(templates[client])]
            batch = [{**m, "messageId": f"e{n}-{i}"} for i, m in enumerate(template.messages)]
            body = json.dumps({"batch": batch, "sentAt": datetime.now(UTC).isoformat()}).encode()
            status = await connection.post("/v1/batch", body)
        finally:
            pool.put_nowait((client, connection))
        if status != 200:
            # Counted like a gRPC error by `drive` (by status), not timed.
            raise HttpStatusError(status)

    return call


def grpc_call(
    pool: asyncio.Queue[tuple[int, pb_grpc.IngestServiceStub]], templates: list[list[Template]]
) -> Callable[[], Awaitable[object]]:
    counter = iter(range(10**12))

    async def call() -> None:
        n = next(counter)
        client, stub = await pool.get()
        try:
            await send(n, stub, templates[client][n % len(templates[client])])
        finally:
            pool.put_nowait((client, stub))

    async def send(n: int, stub: pb_grpc.IngestServiceStub, template: Template) -> None:
        events = []
        for i, event in enumerate(template.events):
            copy = pb.Event()
            copy.CopyFrom(event)
            copy.event_id = f"g{n}-{i}"
            events.append(copy)
        request = pb.TrackEventsRequest(events=events)
        request.send_time.FromDatetime(datetime.now(UTC))
        reply = await stub.TrackEvents(request)
        if reply.rejected_count:
            raise BenchError(f"ingest rejected {reply.rejected_count} events")

    return call


@dataclass(slots=True)
class Outcome:
    edge: LoadResult
    grpc: LoadResult
    ingest_cpu_grpc_s: float


async def measure(
    sizes: Sizes,
    edge_port: int,
    ingest_address: str,
    api_key: str,
    edge: ChildProcess,
    ingest: ChildProcess,
) -> Outcome:
    templates = [make_templates(c, sizes.clients, sizes.templates) for c in range(sizes.clients)]
    pool: asyncio.Queue[tuple[int, Connection]] = asyncio.Queue(maxsize=sizes.clients)
    channels = [open_channel(ingest_address, api_key) for _ in range(sizes.clients)]
    stubs: asyncio.Queue[tuple[int, pb_grpc.IngestServiceStub]] = asyncio.Queue()
    for client, channel in enumerate(channels):
        stubs.put_nowait((client, pb_grpc.IngestServiceStub(channel)))
    calls = {
        "edge": edge_call(edge_port, api_key, templates, pool),
        "grpc": grpc_call(stubs, templates),
    }
    plan = LoadPlan(rate=None, concurrency=sizes.clients, duration_s=sizes.duration_s)
    warmup = LoadPlan(rate=None, concurrency=sizes.clients, duration_s=sizes.warmup_s)
    # The gRPC side's CPU is ingest's; the edge side's is the edge's own (ingest's is the same
    # work in both): measured per round by `alternate` from the named process.
    ingest_cpu = 0.0
    try:
        results = await alternate(
            calls, plan, sizes.rounds, warmup=warmup, processes={"edge": edge, "grpc": ingest}
        )
        ingest_cpu = sum(r.server_cpu_s or 0.0 for r in results["grpc"])
    finally:
        while not pool.empty():
            await pool.get_nowait()[1].close()
        for channel in channels:
            await channel.close()
    return Outcome(
        LoadResult.merged(results["edge"]), LoadResult.merged(results["grpc"]), ingest_cpu
    )


def figures_of(outcome: Outcome) -> list[Figure]:
    edge, grpc = outcome.edge, outcome.grpc
    edge_rate = edge.achieved_rate * BATCH_SIZE
    grpc_rate = grpc.achieved_rate * BATCH_SIZE
    edge_p99 = LatencySummary.of(edge.latencies_s).p99_ms
    grpc_p99 = LatencySummary.of(grpc.latencies_s).p99_ms
    edge_cpu = edge.server_cpu_us_per_call / BATCH_SIZE
    ingest_cpu = grpc.server_cpu_us_per_call / BATCH_SIZE
    return [
        Figure(
            "edge_events_per_s", edge_rate, "events/s", "grpc_trackevents_events_per_s", grpc_rate
        ),
        Figure("edge_batch_p99_ms", edge_p99, "ms", "grpc_trackevents_batch_p99_ms", grpc_p99),
        Figure("edge_cpu_us_per_event", edge_cpu, "us", "ingest_cpu_us_per_event", ingest_cpu),
    ]


def print_report(outcome: Outcome, sizes: Sizes) -> None:
    print(
        f"{sizes.clients} concurrent clients, batches of {BATCH_SIZE} messages,"
        f" {sizes.rounds} alternating rounds of {sizes.duration_s:.0f} s per side"
    )
    for label, result in (("edge /v1/batch", outcome.edge), ("grpc TrackEvents", outcome.grpc)):
        latency = LatencySummary.of(result.latencies_s)
        print(
            f"  {label:<17} {result.achieved_rate * BATCH_SIZE:>9,.0f} events/s"
            f"  batch p50 {latency.p50_ms:.1f} ms  p99 {latency.p99_ms:.1f} ms"
            f"  ({latency.count} batches)"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.edge", description=__doc__.split("\n\n")[0]
    )
    add_backend_arguments(parser)
    parser.add_argument("--clients", type=int, help="concurrent clients per side (default 8)")
    parser.add_argument("--duration", type=float, help="seconds per round (quick 6, full 20)")
    parser.add_argument("--rounds", type=int, help="rounds per side (quick 3, full 5)")
    parser.add_argument("--log-level", default="warning", help="services' log level")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = SMOKE if args.smoke else QUICK if args.quick else FULL
    sizes = Sizes(
        clients=args.clients or base.clients,
        duration_s=args.duration or base.duration_s,
        rounds=args.rounds or base.rounds,
        warmup_s=base.warmup_s,
        templates=base.templates,
    )
    quick = args.quick or args.smoke
    configure_logging("warning")
    with contextlib.ExitStack() as stack:
        work_dir = make_work_dir(stack)
        backends = start_backends(stack, work_dir, args.database_url, args.redis_url)
        project = asyncio.run(create_project(backends.database_url, roles=("sdk",)))
        key = project.keys["sdk"]
        settings = suite_settings(
            backends, ("identity", "ingest"), work_dir, log_level=args.log_level
        )
        settings = settings.with_changes(
            edge_port=free_port(), edge_metrics_port=free_port(), edge_rate_limit=0.0
        )
        # All three start at once: the edge's /healthz answers 200 once ingest and identity do.
        identity = start_service_process(stack, "identity", settings, work_dir)
        ingest = start_service_process(stack, "ingest", settings, work_dir)
        edge = start_service_process(stack, "edge", settings, work_dir)
        asyncio.run(wait_serving(settings.addresses["identity"], identity))
        asyncio.run(wait_serving(settings.addresses["ingest"], ingest))
        wait_http(f"http://127.0.0.1:{settings.edge_port}/healthz", edge, limit_s=30.0)
        print(f"started identity ({identity.pid}), ingest ({ingest.pid}), edge ({edge.pid})")
        outcome = asyncio.run(
            measure(sizes, settings.edge_port, settings.addresses["ingest"], key, edge, ingest)
        )
        edge_log = edge.log_tail(30)
    print_report(outcome, sizes)
    problems = [
        f"{label}: errors {dict(r.errors)}"
        for label, r in (("edge", outcome.edge), ("grpc", outcome.grpc))
        if r.error_count
    ]
    for problem in problems:
        print(f"INVALID: {problem}")
    if outcome.edge.error_count:
        print("end of the edge's log:\n" + edge_log)
    print_figures(BENCH, figures_of(outcome), quick=quick)
    return 1 if problems else 0


if __name__ == "__main__":
    run_main(main)
