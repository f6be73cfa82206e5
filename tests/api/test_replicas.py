"""Two replicas of every service, the edge and the console included, as real `profiles serve`
processes on one PostgreSQL and one Redis, with traffic through both replicas of each; then one
replica of each dies (SIGKILL) mid-load. Nothing may be lost or counted twice: every event and
session stored once, segments' sessions once, segment changes on the stream never announced
twice, the overview equal to a count of the stored rows, and no bus entry left pending for good
(the survivors claim what the dead replicas held). Segment SDK traffic through the edge lands
exactly once, and a console session signed in on one console replica is served by the other,
also after the first one died.

What a team running the suite on several machines behind a gRPC load balancer would see: the
client retries a batch a dead replica did not answer on the other one (batches are idempotent by
event id), ingest reaches identity through one target listing both replicas (round robin), as
the edge and the console reach the services they call, and the consumers of one service share
one consumer group. In front of the edge and the console an HTTP load balancer without health
checks hands requests to both replicas in turn: an SDK retries what failed (message IDs make
that safe), and a browser's session cookie is good on either (sessions live in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from profiles.query.v1 import timeline_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from services.console.sessions import COOKIE, SIGNIN_CSRF_COOKIE
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.ports import free_port
from shared.settings import Settings
from shared.topics import EVENTS, IDENTITY, SEGMENT_CHANGES
from tests.conftest import create_test_project, eventually
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
# HTTP processes, clients of the services above (through targets listing both replicas of each).
HTTP_SERVICES = ("edge", "console")
REPLICAS = 2
GROUPS = ("segments", "query")
# Short, so the survivors take over the dead replicas' entries within the test's seconds.
CLAIM_IDLE_SECONDS = 3.0
INSTALLATIONS = 24
TRACK = "/profiles.ingest.v1.IngestService/TrackEvents"
RESOLVE = "/profiles.identity.v1.IdentityService/ResolveProfiles"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# Installations sending through the edge, with a Segment batch each per round; the even ones
# are signed in (userId), so the edge also calls identity.
EDGE_INSTALLATIONS = 8
# Timeline items identity records (not events an SDK sent, not in the event counters).
IDENTITY_KINDS = (timeline_pb2.TIMELINE_EVENT_KIND_MERGE, timeline_pb2.TIMELINE_EVENT_KIND_SPLIT)


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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serving(self) -> bool:
        if self.process.poll() is not None:
            log = self.log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{log}")
        if self.service in HTTP_SERVICES:
            # The edge's /healthz answers 200 only once ingest and identity answer it.
            return await asyncio.to_thread(_answers_200, f"{self.url}/healthz")
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


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass(slots=True)
class Cluster:
    """Both replicas of each service and what the test needs to reach them. The edge's traffic
    goes to a project of its own (`edge_project`), so that the gRPC load's session and segment
    counts stay exact."""

    replicas: dict[str, list[Replica]]
    settings: Settings
    project: TestProject
    edge_project: TestProject
    database_url: str

    def live(self, service: str) -> list[Replica]:
        return [r for r in self.replicas[service] if r.process.poll() is None]

    def kill(self, replica: Replica) -> None:
        replica.process.send_signal(signal.SIGKILL)
        replica.process.wait()


def start_replica(
    service: str, index: int, settings: Settings, log_dir: Path, targets: Mapping[str, str]
) -> Replica:
    """`profiles serve <service>` on free ports, calling the services at `targets`."""
    port, metrics_port = free_port(), free_port()
    own = settings.with_changes(addresses={**settings.addresses, **targets})
    if service == "edge":
        own = own.with_changes(edge_port=port, edge_metrics_port=metrics_port)
    elif service == "console":
        own = own.with_changes(console_port=port, console_metrics_port=metrics_port)
    else:
        own = own.with_changes(
            ports={**settings.ports, service: port},
            metrics_ports={**settings.metrics_ports, service: metrics_port},
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
            [sys.executable, "-m", "profiles_cli.cli", "serve", service],
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
    edge_project = await create_test_project(database_url)
    # Identity first: ingest's target lists both of its replicas (gRPC round robin).
    identity = [start_replica("identity", i, settings, tmp_path, {}) for i in range(REPLICAS)]
    replicas = {"identity": identity}
    for service in SERVICES[1:]:
        replicas[service] = [
            start_replica(service, i, settings, tmp_path, {"identity": _target(identity)})
            for i in range(REPLICAS)
        ]
    # The edge and the console call every replica of the services they use, in turn.
    targets = {service: _target(replicas[service]) for service in SERVICES}
    for service in HTTP_SERVICES:
        replicas[service] = [
            start_replica(service, i, settings, tmp_path, targets) for i in range(REPLICAS)
        ]
    everyone = [r for group in replicas.values() for r in group]
    try:
        for replica in everyone:
            await eventually(replica.serving, within=90)
        yield Cluster(replicas, settings, project, edge_project, database_url)
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


def _target(replicas: Sequence[Replica]) -> str:
    """One gRPC target naming every replica (the channels' round robin spreads calls)."""
    return "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)


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


@dataclass(slots=True)
class EdgeLoad:
    """Segment SDK traffic (`/v1/batch`) through the edge replicas, as behind an HTTP load
    balancer without health checks: each attempt goes to the next replica, dead or alive, and
    what fails (no answer, 5xx, 429) is sent again, as the SDK would, to the next one."""

    cluster: Cluster
    start: datetime
    # Per installation: the message IDs of every batch the edge acknowledged, and the rounds
    # acknowledged: an hour apart, each its own session (ingest derives one per 30 minutes of
    # activity).
    sent: dict[str, Counter[str]] = field(default_factory=dict)
    rounds: dict[str, set[int]] = field(default_factory=dict)
    acknowledged: int = 0
    failed_attempts: int = 0
    # Requests sent to each edge replica and not answered yet, by replica name.
    in_flight: Counter[str] = field(default_factory=Counter)
    turn: int = 0

    def batch(self, installation: int, n: int) -> tuple[str, list[dict[str, Any]]]:
        """Round `n` of one installation: two tracks 10 s apart, an hour after the round before
        (so a session of their own)."""
        inst = f"edge-{installation}"
        begin = self.start + timedelta(hours=n, minutes=installation)
        messages: list[dict[str, Any]] = [
            {
                "type": "track",
                "messageId": f"edge-{installation}-{n}-{k}",
                "anonymousId": inst,
                "event": name,
                "timestamp": (begin + timedelta(seconds=10 * k)).isoformat(),
                "properties": {"round": n},
            }
            for k, name in enumerate(("Viewed", "Bought"))
        ]
        if installation % 2 == 0:
            for message in messages:
                message["userId"] = f"edge-person-{installation}"
        return inst, messages

    async def send(self, installation: int, n: int) -> None:
        inst, messages = self.batch(installation, n)
        body = json.dumps(
            {"writeKey": self.cluster.edge_project.keys["sdk"], "batch": messages}
        ).encode()
        edges = self.cluster.replicas["edge"]
        for _ in range(100):
            edge = edges[self.turn % len(edges)]
            self.turn += 1
            self.in_flight[edge.name] += 1
            try:
                reply = await asyncio.to_thread(_post, f"{edge.url}/v1/batch", body)
            except requests.RequestException:
                reply = None
            finally:
                self.in_flight[edge.name] -= 1
            if reply is not None and reply.status_code == 200:
                self.sent.setdefault(inst, Counter()).update(m["messageId"] for m in messages)
                self.rounds.setdefault(inst, set()).add(n)
                self.acknowledged += 1
                return
            if reply is not None and reply.status_code != 429 and reply.status_code < 500:
                pytest.fail(f"the edge refused a batch: {reply.status_code} {reply.text}")
            self.failed_attempts += 1
            await asyncio.sleep(0.1)  # the SDK's backoff, shortened
        pytest.fail("a Segment batch was never acknowledged")

    async def send_rounds(self, rounds: range, width: int = 4) -> None:
        queue = [(i, n) for n in rounds for i in range(EDGE_INSTALLATIONS)]

        async def worker() -> None:
            while queue:
                await self.send(*queue.pop(0))

        async with asyncio.TaskGroup() as tasks:
            for _ in range(width):
                tasks.create_task(worker())

    async def send_until(self, stop: asyncio.Event, first_round: int) -> None:
        for n in itertools.count(first_round):
            if stop.is_set():
                return
            await self.send_rounds(range(n, n + 1), width=2)


def _post(url: str, body: bytes) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=15)


async def check_edge_events(cluster: Cluster, load: EdgeLoad) -> list[str]:
    """Through query: each installation's profile holds every message it sent once, one session
    per round, and totals equal to its timeline. Returns the profiles' IDs."""
    (query,) = cluster.live("query")
    stub = query_grpc.QueryServiceStub(query.channel)
    metadata = cluster.edge_project.metadata("read")
    profile_ids = []
    assert len(load.sent) == EDGE_INSTALLATIONS
    for inst, sent in load.sent.items():
        reply = await stub.GetProfile(
            query_pb.GetProfileRequest(installation_id=inst), metadata=metadata, timeout=30
        )
        profile = reply.profile
        profile_id = profile.summary.profile_id
        profile_ids.append(profile_id)
        index = int(inst.rsplit("-", 1)[1])
        assert profile.summary.custom_id == (f"edge-person-{index}" if index % 2 == 0 else "")
        timeline: list[Any] = []
        page_token = ""
        while True:
            page = await stub.ListEvents(
                query_pb.ListEventsRequest(
                    profile_id=profile_id, page_size=500, page_token=page_token
                ),
                metadata=metadata,
                timeout=30,
            )
            timeline.extend(e for e in page.events if e.kind not in IDENTITY_KINDS)
            page_token = page.next_page_token
            if not page_token:
                break
        stored = Counter(e.event_id for e in timeline)
        assert all(count == 1 for count in stored.values()), (inst, stored)
        assert all(count == 1 for count in sent.values()), (inst, sent)
        assert Counter(e.event_id for e in timeline if e.HasField("custom")) == sent, inst
        # Derived sessions store no session start event (ingest publishes one on the bus).
        assert not [e for e in timeline if e.HasField("session")], inst
        assert profile.counters.event_count == len(timeline), inst
        assert profile.counters.session_count == len(load.rounds[inst]), inst
    return profile_ids


def _get(url: str, cookies: Mapping[str, str]) -> requests.Response:
    return requests.get(url, cookies=dict(cookies), allow_redirects=False, timeout=15)


async def sign_in(console: Replica, key: str) -> str:
    """Signs in on one console replica with the form a browser posts (its CSRF token from the
    form page and cookie); returns the session cookie."""
    form = await asyncio.to_thread(_get, f"{console.url}/signin", {})
    assert form.status_code == 200, form.text
    match = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert match, form.text
    reply = await asyncio.to_thread(
        lambda: requests.post(
            f"{console.url}/signin",
            data={"key": key, "csrf_token": match.group(1), "next": "/users"},
            cookies={SIGNIN_CSRF_COOKIE: form.cookies[SIGNIN_CSRF_COOKIE]},
            allow_redirects=False,
            timeout=15,
        )
    )
    assert reply.status_code == 303, reply.text
    assert reply.headers["location"] == "/users"
    return str(reply.cookies[COOKIE])


async def users_page(console: Replica, session: str) -> requests.Response:
    return await asyncio.to_thread(_get, f"{console.url}/users", {COOKIE: session})


def profiles_listed(page: requests.Response) -> set[str]:
    return set(re.findall(r'href="/profiles/([0-9a-f-]{36})"', page.text))


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
    # On the hour: each round of an installation falls in one 30-minute window of the edge.
    edge_load = EdgeLoad(
        cluster, datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
    )
    consoles = cluster.replicas["console"]
    try:
        # 1. Every replica up: the first sessions of every installation, some identified (two
        # installations per person: the second Identify merges), through both of each; Segment
        # batches through both edges; a console session signed in on one console replica is
        # good on the other (and without it the other sends the browser to sign in).
        await send_all(load, load.batches(range(1)))
        for i in range(0, INSTALLATIONS // 2, 2):
            await load.identify(f"inst-{i}", f"person-{i}")
            await load.identify(f"inst-{i + 1}", f"person-{i}")
        await edge_load.send_rounds(range(1))
        session = await sign_in(consoles[0], cluster.edge_project.keys["read"])
        assert (await users_page(consoles[1], session)).status_code == 200
        assert (await users_page(consoles[1], "")).status_code == 303
        await eventually(lambda: settled(cluster, bus, suite), within=60)
        for replica in cluster.replicas["ingest"]:
            assert await replica.metric("profiles_rpc_total", method=TRACK) > 0
        for replica in cluster.replicas["identity"]:
            # ingest's resolves are spread over both by its round-robin channel
            assert await replica.metric("profiles_rpc_total", method=RESOLVE) > 0
        for service in GROUPS:
            for replica in cluster.replicas[service]:
                assert await handled(replica, EVENTS.name) > 0, replica.name
        for replica in cluster.replicas["edge"]:
            assert await replica.metric("profiles_edge_requests_total", outcome="ok") > 0

        # 2. Mid-load, replica 0 of each service dies. Segments and query are first frozen
        # (SIGSTOP) while they hold entries they will never ack, as a machine that hangs and
        # then goes away does, so the survivors must claim them; ingest, identity, the edge and
        # the console die with calls in flight, and the load goes on through the survivors (the
        # SDK's batches the dead edge did not answer are sent again to the other).
        stop = asyncio.Event()
        sending = asyncio.create_task(send_until(load, stop, first_round=1))
        edge_sending = asyncio.create_task(edge_load.send_until(stop, first_round=1))
        dying_edge = cluster.replicas["edge"][0]

        async def edge_busy() -> bool:
            return edge_load.acknowledged > EDGE_INSTALLATIONS

        async def edge_holds_requests() -> bool:
            return edge_load.in_flight[dying_edge.name] > 0

        # The dying edge hangs first, so that SDK requests are in flight on it when it dies.
        await eventually(edge_busy, within=30)
        dying_edge.process.send_signal(signal.SIGSTOP)
        frozen = [cluster.replicas[service][0] for service in GROUPS]
        await freeze_while_holding_entries(bus, frozen)
        await eventually(edge_holds_requests, within=30)
        for service in ("ingest", "identity", "edge", "console"):
            cluster.kill(cluster.replicas[service][0])
        for replica in frozen:
            cluster.kill(replica)
        after_kill = len(load.sent_sessions), edge_load.acknowledged

        async def served_by_survivors() -> bool:
            return (
                len(load.sent_sessions) >= after_kill[0] + INSTALLATIONS
                and edge_load.acknowledged >= after_kill[1] + EDGE_INSTALLATIONS
            )

        await eventually(served_by_survivors, within=60)
        stop.set()
        await sending
        await edge_sending
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

        # The edge's traffic: every message once, although the SDK's requests in flight on
        # the dead edge failed and were sent again to the other.
        assert edge_load.failed_attempts > 0
        edge_profiles = await check_edge_events(cluster, edge_load)
        # The console session signed in on the dead replica: the survivor still serves the
        # signed-in pages, over the surviving replicas of the services, with every profile.
        (console,) = cluster.live("console")
        assert console is consoles[1]
        page = await users_page(console, session)
        assert page.status_code == 200, page.text
        assert profiles_listed(page) == set(edge_profiles)
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
