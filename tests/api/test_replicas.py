"""Two replicas of every service, as real `profiles serve` processes on one PostgreSQL and one
Redis, with traffic through both replicas of each; then one replica of each dies (SIGKILL)
mid-load. Nothing may be lost or counted twice: every event and session stored once, segments'
sessions once, segment changes on the stream never announced twice, the overview equal to a
count of the stored rows, and no bus entry left pending for good (the survivors claim what the
dead replicas held).

What a team running the suite on several machines behind a gRPC load balancer would see: the
client retries a batch a dead replica did not answer on the other one (batches are idempotent by
event id), ingest reaches identity through one target listing both replicas (round robin), and
the consumers of one service share one consumer group.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.settings import Settings
from shared.topics import EVENTS, IDENTITY, SEGMENT_CHANGES
from tests.conftest import eventually
from tests.support.identity import Identity
from tests.support.query import (
    Suite,
    attribute_event,
    custom_event,
    direct_overview,
    op,
    overview_figures,
    session_end,
    session_start,
)

if TYPE_CHECKING:
    from tests.conftest import TestProject

SERVICES = ("identity", "ingest", "segments", "query")
REPLICAS = 2
GROUPS = ("segments", "query")
# Short, so the survivors take over the dead replicas' entries within the test's seconds.
CLAIM_IDLE_SECONDS = 3.0
INSTALLATIONS = 24
TRACK = "/profiles.ingest.v1.IngestService/TrackEvents"
RESOLVE = "/profiles.identity.v1.IdentityService/ResolveProfiles"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(slots=True)
class Replica:
    service: str
    index: int
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    channel: grpc.aio.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    async def serving(self) -> bool:
        if self.process.poll() is not None:
            log = self.log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{log}")
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of a counter's samples with these labels, from the replica's /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        total = 0.0
        for line in text.splitlines():
            if line.startswith(f"{name}{{") and all(w in line for w in wanted):
                total += float(line.rsplit(" ", 1)[1])
        return total


@dataclass(slots=True)
class Cluster:
    """Both replicas of each service and what the test needs to reach them."""

    replicas: dict[str, list[Replica]]
    settings: Settings
    project: TestProject
    database_url: str

    def live(self, service: str) -> list[Replica]:
        return [r for r in self.replicas[service] if r.process.poll() is None]

    def kill(self, replica: Replica) -> None:
        replica.process.send_signal(signal.SIGKILL)
        replica.process.wait()


def start_replica(
    service: str, index: int, settings: Settings, log_dir: Path, identity_target: str
) -> Replica:
    port, metrics_port = free_port(), free_port()
    own = settings.with_changes(
        ports={**settings.ports, service: port},
        metrics_ports={**settings.metrics_ports, service: metrics_port},
        addresses={**settings.addresses, "identity": identity_target},
    )
    env = {
        **os.environ,
        **own.to_env(),
        # Two replicas on one machine share a host name: their consumer names must differ.
        "PROFILES_SEGMENTS_CONSUMER": f"segments-{index}",
        "PROFILES_QUERY_CONSUMER": f"query-{index}",
    }
    log_path = log_dir / f"{service}-{index}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "profiles.cli", "serve", service],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return Replica(service, index, port, metrics_port, process, log_path)


@pytest.fixture
async def cluster(
    settings_for_test: Settings, project: TestProject, database_url: str, tmp_path: Path
) -> AsyncIterator[Cluster]:
    settings = settings_for_test.with_changes(claim_idle_seconds=CLAIM_IDLE_SECONDS)
    # Identity first: ingest's target lists both of its replicas (gRPC round robin).
    identity = [start_replica("identity", i, settings, tmp_path, "") for i in range(REPLICAS)]
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in identity)
    replicas = {"identity": identity}
    for service in SERVICES[1:]:
        replicas[service] = [
            start_replica(service, i, settings, tmp_path, target) for i in range(REPLICAS)
        ]
    everyone = [r for group in replicas.values() for r in group]
    try:
        for replica in everyone:
            await eventually(replica.serving, within=90)
        yield Cluster(replicas, settings, project, database_url)
    finally:
        for replica in everyone:
            await replica.channel.close()
            if replica.process.poll() is None:
                replica.process.terminate()
        for replica in everyone:
            try:
                await asyncio.to_thread(replica.process.wait, 20)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()


@dataclass(slots=True)
class Load:
    """The traffic: sessions of several installations, some identified (a few merged), sent
    through whichever ingest replica is alive, each batch retried until it is stored."""

    cluster: Cluster
    start: datetime
    sent_events: set[str] = field(default_factory=set)
    sent_sessions: Counter[str] = field(default_factory=Counter)
    turn: int = 0

    def batches(self, rounds: range) -> list[list[ingest_pb.Event]]:
        """One batch per installation and round: a whole session with an event and an
        attribute change inside it."""
        batches = []
        for n in rounds:
            for i in range(INSTALLATIONS):
                inst = f"inst-{i}"
                begin = self.start + timedelta(hours=n, minutes=i)
                session = f"s-{i}-{n}"
                batch = [
                    session_start(inst, session, begin, country="FR"),
                    custom_event(inst, name="open", time=begin + timedelta(seconds=10)),
                    attribute_event(
                        inst, [op("set", "plan", f"p{n}")], time=begin + timedelta(seconds=20)
                    ),
                    session_end(inst, session, begin + timedelta(minutes=5), 300),
                ]
                for event in batch[1:3]:
                    event.session_id = session
                batches.append(batch)
        return batches

    async def send(self, batch: Sequence[ingest_pb.Event]) -> None:
        request = ingest_pb.TrackEventsRequest(events=batch)
        metadata = self.cluster.project.metadata("sdk")
        for _ in range(50):
            live = self.cluster.live("ingest")
            self.turn += 1
            stub = ingest_grpc.IngestServiceStub(live[self.turn % len(live)].channel)
            try:
                reply = await stub.TrackEvents(request, metadata=metadata, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(0.1)
                continue
            codes = [r.status.code for r in reply.results]
            if all(code == 0 for code in codes):
                self.sent_events.update(e.event_id for e in batch)
                self.sent_sessions.update({e.session_id for e in batch})
                return
            # An identity replica died under the batch: the SDK sends the batch again.
            assert set(codes) <= {0, grpc.StatusCode.UNAVAILABLE.value[0]}, reply
            await asyncio.sleep(0.1)
        pytest.fail("a batch was never stored")

    async def identify(self, installation_id: str, custom_id: str) -> None:
        """Identify through each identity replica in turn; retried with one request id."""
        request = identity_pb.IdentifyRequest(
            installation_id=installation_id, custom_id=custom_id, request_id=uuid.uuid4().hex
        )
        metadata = self.cluster.project.metadata("sdk")
        for _ in range(50):
            live = self.cluster.live("identity")
            self.turn += 1
            stub = identity_grpc.IdentityServiceStub(live[self.turn % len(live)].channel)
            try:
                await stub.Identify(request, metadata=metadata, timeout=5)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(0.1)
        pytest.fail("an Identify was never answered")


async def send_all(load: Load, batches: Sequence[list[ingest_pb.Event]], width: int = 4) -> None:
    queue = list(batches)

    async def worker() -> None:
        while queue:
            await load.send(queue.pop(0))

    async with asyncio.TaskGroup() as tasks:
        for _ in range(width):
            tasks.create_task(worker())


async def send_until(load: Load, stop: asyncio.Event, first_round: int) -> None:
    """Sends rounds of sessions from `first_round` on until `stop` is set: the load the kills
    happen in."""
    for n in itertools.count(first_round):
        if stop.is_set():
            return
        await send_all(load, load.batches(range(n, n + 1)), width=2)


async def freeze_while_holding_entries(bus: Bus, frozen: Sequence[Replica]) -> None:
    """Stops the replicas (SIGSTOP) at a moment each holds events entries it has not acked.

    A consumer frozen inside its blocking read is handed the next entries; one frozen after its
    read gave up holds nothing, so it is let go again (SIGCONT) and frozen anew."""

    async def holding() -> bool:
        for replica in frozen:
            held = await bus.redis.xpending_range(
                bus.stream_key(EVENTS.name), replica.service, "-", "+", 1,
                consumername=replica.name,
            )  # fmt: skip
            if not held:
                return False
        return True

    async with asyncio.timeout(60):
        while True:
            for replica in frozen:
                replica.process.send_signal(signal.SIGSTOP)
            with contextlib.suppress(TimeoutError):
                await eventually(holding, within=3)
                return
            for replica in frozen:
                replica.process.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.2)


async def settled(cluster: Cluster, bus: Bus, suite: Suite) -> bool:
    """Outbox empty; every group handled every entry of its streams and holds none pending."""
    if await suite.fetchval("SELECT count(*) FROM outbox"):
        return False
    for topic in (EVENTS, IDENTITY):
        key = bus.stream_key(topic.name)
        last = (await bus.redis.xinfo_stream(key))["last-generated-id"]
        groups = {_text(g["name"]): g for g in await bus.redis.xinfo_groups(key)}
        for name in GROUPS:
            group = groups.get(name)
            if group is None or int(group["pending"]) or group["last-delivered-id"] != last:
                return False
    return True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def handled(replica: Replica, topic: str) -> float:
    return await replica.metric(
        "profiles_bus_messages_handled_total", topic=topic, group=replica.service
    )


async def test_two_replicas_of_each_service_lose_nothing_and_count_nothing_twice_even_when_one_dies(
    cluster: Cluster,
) -> None:
    project = cluster.project
    suite = Suite(
        query=query_grpc.QueryServiceStub(cluster.replicas["query"][0].channel),
        ingest=ingest_grpc.IngestServiceStub(cluster.replicas["ingest"][0].channel),
        identity=Identity(cluster.replicas["identity"][0].channel, project),
        project=project,
        database_url=cluster.database_url,
        clock=FrozenClock(datetime.now(UTC)),
    )
    bus = Bus.from_url(cluster.settings.redis_url, cluster.settings.redis_prefix)
    load = Load(cluster, datetime.now(UTC).replace(microsecond=0) - timedelta(days=2))
    try:
        # 1. Every replica up: the first sessions of every installation, some identified (two
        # installations per person: the second Identify merges), through both of each.
        await send_all(load, load.batches(range(1)))
        for i in range(0, INSTALLATIONS // 2, 2):
            await load.identify(f"inst-{i}", f"person-{i}")
            await load.identify(f"inst-{i + 1}", f"person-{i}")
        await eventually(lambda: settled(cluster, bus, suite), within=60)
        for replica in cluster.replicas["ingest"]:
            assert await replica.metric("profiles_rpc_total", method=TRACK) > 0
        for replica in cluster.replicas["identity"]:
            # ingest's resolves are spread over both by its round-robin channel
            assert await replica.metric("profiles_rpc_total", method=RESOLVE) > 0
        for service in GROUPS:
            for replica in cluster.replicas[service]:
                assert await handled(replica, EVENTS.name) > 0, replica.name

        # 2. Mid-load, replica 0 of each service dies. Segments and query are first frozen
        # (SIGSTOP) while they hold entries they will never ack, as a machine that hangs and
        # then goes away does, so the survivors must claim them; ingest and identity die with
        # calls in flight, and the load goes on through the survivors.
        stop = asyncio.Event()
        sending = asyncio.create_task(send_until(load, stop, first_round=1))
        frozen = [cluster.replicas[service][0] for service in GROUPS]
        await freeze_while_holding_entries(bus, frozen)
        for service in ("ingest", "identity"):
            cluster.kill(cluster.replicas[service][0])
        for replica in frozen:
            cluster.kill(replica)
        after_kill = len(load.sent_sessions)

        async def served_by_survivors() -> bool:
            return len(load.sent_sessions) >= after_kill + INSTALLATIONS

        await eventually(served_by_survivors, within=60)
        stop.set()
        await sending
        await eventually(lambda: settled(cluster, bus, suite), within=90)

        # 3. Nothing lost, nothing twice.
        stored = Counter(
            r["event_id"]
            for r in await suite.fetch(
                "SELECT event_id FROM events WHERE project_id = $1", project.project_id
            )
        )
        assert load.sent_events <= set(stored)
        assert all(stored[event_id] == 1 for event_id in load.sent_events)
        sessions = await suite.fetch(
            "SELECT session_id, event_count, ended FROM sessions WHERE project_id = $1",
            project.project_id,
        )
        assert sorted(r["session_id"] for r in sessions) == sorted(load.sent_sessions)
        assert all(r["ended"] and r["event_count"] == 4 for r in sessions), sessions
        segment_sessions = await suite.fetch(
            "SELECT session_key FROM segment_sessions WHERE project_id = $1", project.project_id
        )
        assert len(segment_sessions) == len(load.sent_sessions)
        assert len({r["session_key"] for r in segment_sessions}) == len(load.sent_sessions)
        await check_segment_changes(bus, suite)
        await check_no_dead_letters(bus)
        expected = await direct_overview(suite)
        for replica in cluster.live("query"):
            overview = await query_grpc.QueryServiceStub(replica.channel).GetOverview(
                query_pb.GetOverviewRequest(top_values=100),
                metadata=project.metadata("read"),
                timeout=30,
            )
            assert overview_figures(overview.overview) == expected
        # Segments' own view, through the surviving replica: every session counted once.
        (survivor,) = cluster.live("segments")
        stub = segments_grpc.SegmentsServiceStub(survivor.channel)
        live_profiles = await suite.fetch(
            "SELECT profile_id FROM profiles WHERE project_id = $1 AND merged_into IS NULL",
            project.project_id,
        )
        counted = 0
        for row in live_profiles:
            reply = await stub.GetSmartSegment(
                segments_pb.GetSmartSegmentRequest(profile_id=str(row["profile_id"])),
                metadata=project.metadata("read"),
                timeout=30,
            )
            counted += reply.session_count
        assert counted == len(load.sent_sessions)
    finally:
        await bus.aclose()


async def check_segment_changes(bus: Bus, suite: Suite) -> None:
    """Per profile and segment the stream alternates ENTERED and LEFT, starting with ENTERED
    (a change announced twice would repeat one), and what a live profile is in by the stream is
    what segments stored for it."""
    entries: Any = await bus.redis.xrange(bus.stream_key(SEGMENT_CHANGES.name))
    member: dict[tuple[str, str], bool] = {}
    for _, fields in entries:
        change = bus_pb2.SegmentMembershipChanged.FromString(fields[b"data"])
        if change.project_id != str(suite.project.project_id):
            continue
        which = change.WhichOneof("segment") or ""
        key = (change.profile_id, f"{which}:{getattr(change, which)}")
        entered = change.transition == types_pb2.MEMBERSHIP_CHANGE_ENTERED
        assert member.get(key, False) != entered, (key, entered)
        member[key] = entered
    assert member
    states = await suite.fetch(
        "SELECT s.profile_id, s.segment, s.flag FROM segment_states s JOIN profiles p"
        " ON p.project_id = s.project_id AND p.profile_id = s.profile_id"
        " WHERE s.project_id = $1 AND s.platform = 0 AND p.merged_into IS NULL",
        suite.project.project_id,
    )
    for row in states:
        profile = str(row["profile_id"])
        inside = {k[1] for k, v in member.items() if v and k[0] == profile}
        expected = {f"smart_segment:{row['segment']}"}
        if row["flag"]:
            expected.add(f"flag:{row['flag']}")
        assert {s for s in inside if not s.startswith("custom")} == expected, profile


async def check_no_dead_letters(bus: Bus) -> None:
    for topic in (EVENTS, IDENTITY, SEGMENT_CHANGES):
        assert not await bus.redis.exists(bus.dead_key(topic.name)), topic.name
