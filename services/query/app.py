"""Builds the query service for shared.server: servicer, the bus consumers that keep its
projection (the overview's rollups) up to date, and the erasure sweep that purges what a lost
ProfileDeleted left in it."""

from __future__ import annotations

import functools
import os
import socket

import grpc

from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as pb_grpc
from services.query.consumers import on_message
from services.query.erasure_sweep import ErasureSweepWorker
from services.query.live import ProfileWatch
from services.query.repository import QueryRepository
from services.query.service import MARKER_MARGIN_HOURS, QueryService, RollupService
from services.query.servicer import QueryServicer
from shared.bus import Consumer, ConsumerWorker
from shared.server import Runtime, ServiceDefinition
from shared.topics import EVENTS, IDENTITY

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QueryService"].full_name
# One consumer group: replicas share the streams' entries.
CONSUMER_GROUP = "query"
HANDLER_TIMEOUT_S = 30.0


def consumer_name() -> str:
    """Stable across restarts of one replica (so it re-reads its own pending entries at once),
    distinct between replicas; PROFILES_QUERY_CONSUMER overrides it."""
    return os.environ.get("PROFILES_QUERY_CONSUMER") or f"query-{socket.gethostname()}"


async def build(runtime: Runtime) -> ServiceDefinition:
    repository = QueryRepository(runtime.pool)
    service = QueryService(repository, runtime.clock)
    rollups = RollupService(
        repository,
        runtime.clock,
        batch_marker_hours=runtime.settings.bus_retention_hours + MARKER_MARGIN_HOURS,
    )
    watch = ProfileWatch(runtime.bus, repository, runtime.clock)
    servicer = QueryServicer(service, watch)
    name = consumer_name()
    consumers = [
        Consumer(
            runtime.bus,
            topic,
            CONSUMER_GROUP,
            name,
            functools.partial(on_message, rollups),
            # Handlers are short transactions: an entry idle this long belongs to a replica
            # that died (PROFILES_CLAIM_IDLE_SECONDS).
            claim_idle_ms=int(runtime.settings.claim_idle_seconds * 1000),
            block_ms=max(1, round(runtime.settings.bus_wait_seconds * 1000)),
            handler_timeout_s=HANDLER_TIMEOUT_S,
        )
        for topic in (EVENTS, IDENTITY)
    ]

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_QueryServiceServicer_to_server(servicer, server)

    return ServiceDefinition(
        full_names=[SERVICE_NAME],
        register=register,
        workers=[
            *(ConsumerWorker(c) for c in consumers),
            # What a lost ProfileDeleted left behind, purged from identity's record of erasures.
            ErasureSweepWorker(
                repository,
                rollups,
                interval_s=runtime.settings.erasure_sweep_minutes * 60.0,
            ),
        ],
    )
