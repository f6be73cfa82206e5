"""One bootstrap for all four services: runtime, gRPC server, health, reflection, shutdown.

A service contributes a `build(runtime) -> ServiceDefinition`; everything else (auth, errors,
metrics, health, reflection, limits, graceful shutdown) is the same for every service.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg
import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from shared import diagnostics
from shared.auth import Authenticator
from shared.bus import Bus
from shared.clock import Clock, SystemClock
from shared.db import DEFAULT_BOUNDS, DatabaseBounds, create_pool, migrate
from shared.interceptors import ServerInterceptor, StreamGate
from shared.logging import configure_logging
from shared.metrics import start_metrics_server
from shared.outbox import OutboxRelay
from shared.redis_client import RedisClient
from shared.reflection import enable_reflection
from shared.settings import Settings
from shared.tenancy import TenancyRepository
from shared.topics import TOPICS

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# The collector's thresholds once a service is up. With the default (700, 10, 10), a young
# collection ran every 700 net allocations of container objects: a batch of 500 events makes
# thousands (messages, dicts, rows) that all live until the batch is stored, so each collection
# walked them again, and the older generations' collections walked every batch in flight. In
# bench.ingest that was 2,400 collections and 7% of ingest's CPU in a 15-second load; with a
# young generation of 20,000 it was 3 collections and 0.2%. Garbage in cycles still gets
# collected, only later (at most 20,000 objects' worth waiting).
GC_THRESHOLDS = (20_000, 20, 20)


class BackgroundWorker(Protocol):
    """A loop a service runs beside its server (bus consumers, the outbox relay, sweeps)."""

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(slots=True)
class Runtime:
    """What a service's build function gets: connections and shared components, built once."""

    service_name: str
    settings: Settings
    pool: asyncpg.Pool
    redis: RedisClient
    bus: Bus
    clock: Clock
    tenancy: TenancyRepository


@dataclass(slots=True)
class ServiceDefinition:
    """What a service contributes: its servicers and its background workers."""

    full_names: Sequence[str]
    register: Callable[[grpc.aio.Server], None]
    workers: list[BackgroundWorker] = field(default_factory=list)


Build = Callable[[Runtime], Awaitable[ServiceDefinition]]


class RelayWorker:
    """Runs the outbox relay beside the server; on stop, publishes what is committed."""

    def __init__(self, relay: OutboxRelay, flush_timeout: float) -> None:
        self._relay = relay
        self._flush_timeout = flush_timeout
        self._finished = asyncio.Event()

    async def run(self) -> None:
        try:
            await self._relay.run()
        finally:
            self._finished.set()

    async def stop(self) -> None:
        self._relay.stop()
        await self._finished.wait()
        await self._relay.flush(self._flush_timeout)


class PortInUse(RuntimeError):
    def __init__(self, service: str, address: str) -> None:
        super().__init__(f"{service}: cannot listen on {address}: the port is already in use")
        self.service = service
        self.address = address


def server_options() -> list[tuple[str, int]]:
    return [
        # 8 MiB so that ingest can read a 4 MiB+ request and refuse it with INVALID_ARGUMENT itself.
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Without this, Linux lets a second server bind a port that is in use and share it.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class RunningService:
    def __init__(
        self,
        name: str,
        server: grpc.aio.Server,
        health: HealthServicer,
        streams: StreamGate,
        runtime: Runtime,
        definition: ServiceDefinition,
        port: int,
    ) -> None:
        self.name = name
        self.port = port
        self.runtime = runtime
        self._server = server
        self._health = health
        self._streams = streams
        self._definition = definition
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_workers(self) -> None:
        for worker in self._definition.workers:
            task = asyncio.create_task(worker.run(), name=f"{self.name}:{type(worker).__name__}")
            task.add_done_callback(self._worker_done)
            self._tasks.append(task)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("worker_failed", worker=task.get_name(), exc_info=task.exception())

    async def stop(self, grace: float) -> None:
        """Drains: NOT_SERVING, end open streams with UNAVAILABLE, finish in-flight unary calls,
        stop the workers (the outbox relay flushes what is committed), close connections."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("service_stopping", service=self.name, grace_s=grace)
        await self._health.enter_graceful_shutdown()
        self._streams.draining.set()
        await self._server.stop(grace)
        for worker in self._definition.workers:
            try:
                async with asyncio.timeout(grace):
                    await worker.stop()
            except Exception:
                log.exception("worker_stop_failed", worker=type(worker).__name__)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runtime.redis.aclose()
        await self.runtime.pool.close()
        log.info("service_stopped", service=self.name)


async def start_service(
    name: str,
    settings: Settings,
    build: Build,
    *,
    port: int | None = None,
    clock: Clock | None = None,
    metrics: bool = True,
    bounds: DatabaseBounds = DEFAULT_BOUNDS,
) -> RunningService:
    """Migrates, connects, builds the service and starts serving; returns once it is SERVING.
    `bounds`: how long its calls wait on the database (shared/db.py)."""
    await migrate(settings.database_url)
    # One connection more than configured: the outbox relay holds one for LISTEN.
    pool = await create_pool(
        settings.database_url, max_size=settings.db_pool_size + 1, bounds=bounds
    )
    bus = Bus.from_url(
        settings.redis_url, settings.redis_prefix, retention_ms=settings.bus_retention_ms
    )
    redis = bus.redis
    tenancy = TenancyRepository(pool)
    runtime = Runtime(name, settings, pool, redis, bus, clock or SystemClock(), tenancy)
    try:
        definition = await build(runtime)
        # Every process relays the outbox; SKIP LOCKED lets replicas share the rows.
        relay = OutboxRelay(pool, bus, TOPICS)
        definition.workers.append(RelayWorker(relay, settings.shutdown_grace_seconds))
        streams = StreamGate(settings.max_streams)
        server = grpc.aio.server(
            interceptors=[
                ServerInterceptor(Authenticator(tenancy, settings.internal_token), streams, bounds)
            ],
            options=server_options(),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        definition.register(server)
        full_names = [*definition.full_names, diagnostics.register(server)]
        enable_reflection(
            [
                *full_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        wanted = settings.ports[name] if port is None else port
        address = f"{settings.bind_address}:{wanted}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise PortInUse(name, address) from exc
        if bound == 0:
            raise PortInUse(name, address)
        await server.start()
    except BaseException:
        await redis.aclose()
        await pool.close()
        raise
    if metrics:
        start_metrics_server(settings.metrics_ports[name], settings.bind_address)
    running = RunningService(name, server, health, streams, runtime, definition, bound)
    running.start_workers()
    for service in ("", *full_names):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("service_started", service=name, port=bound)
    return running


async def serve_forever(name: str, settings: Settings, build: Build) -> None:
    """Runs one service until SIGTERM or SIGINT, then shuts it down gracefully."""
    configure_logging(settings.log_level, service=name)
    service = await start_service(name, settings, build)
    # What is alive once the service is up (modules, descriptors, pools, caches) lives as long
    # as the process: moved out of the collector's generations, the full collections that the
    # per-call garbage triggers no longer walk it each time (a pause on every call in flight).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop(settings.shutdown_grace_seconds)
