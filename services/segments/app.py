"""Builds the segments service for shared.server: servicer, bus consumers and the sweep."""

from __future__ import annotations

import functools
import os
import socket

import grpc

from profiles.segments.v1 import segments_service_pb2 as pb
from profiles.segments.v1 import segments_service_pb2_grpc as pb_grpc
from services.segments.change_stream import ChangeStream
from services.segments.consumers import (
    EvaluationWorker,
    RecomputeOwner,
    SweepWorker,
    ThresholdsWorker,
    on_events_ingested,
    on_identity_change,
)
from services.segments.definitions import DefinitionsService
from services.segments.definitions_repository import DefinitionsRepository
from services.segments.erasure_sweep import ErasureSweepWorker
from services.segments.repository import SegmentsRepository
from services.segments.service import SegmentsService
from services.segments.servicer import SegmentsServicer
from shared.bus import Consumer, ConsumerWorker
from shared.server import Build, Runtime, ServiceDefinition
from shared.topics import EVENTS, IDENTITY

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentsService"].full_name
# One consumer group: replicas share the streams' entries.
CONSUMER_GROUP = "segments"
HANDLER_TIMEOUT_S = 60.0
SWEEP_INTERVAL_S = 30.0
# Custom segments are re-evaluated this often; their changes reach the stream at most this late.
EVALUATION_INTERVAL_S = 5.0
# Projects' segment thresholds are compared with those their states were computed with this
# often; a change starts the project's recomputation.
THRESHOLDS_INTERVAL_S = 10.0


def consumer_name() -> str:
    """Stable across restarts of one replica (so it re-reads its own pending entries at once),
    distinct between replicas; PROFILES_SEGMENTS_CONSUMER overrides it."""
    return os.environ.get("PROFILES_SEGMENTS_CONSUMER") or f"segments-{socket.gethostname()}"


def make_build(
    *,
    sweep_interval_s: float = SWEEP_INTERVAL_S,
    evaluation_interval_s: float = EVALUATION_INTERVAL_S,
    thresholds_interval_s: float = THRESHOLDS_INTERVAL_S,
) -> Build:
    """The build function, with the background intervals tests may change."""

    async def build(runtime: Runtime) -> ServiceDefinition:
        return await _build(runtime, sweep_interval_s, evaluation_interval_s, thresholds_interval_s)

    return build


async def _build(
    runtime: Runtime,
    sweep_interval_s: float,
    evaluation_interval_s: float,
    thresholds_interval_s: float,
) -> ServiceDefinition:
    repository = SegmentsRepository(runtime.pool)
    definitions_repository = DefinitionsRepository(runtime.pool)
    definitions = DefinitionsService(definitions_repository, runtime.clock)
    service = SegmentsService(
        repository,
        runtime.tenancy,
        runtime.clock,
        ChangeStream(runtime.bus),
        definitions,
        definitions_repository,
    )
    servicer = SegmentsServicer(service, definitions)
    name = consumer_name()
    consumers = [
        Consumer(
            runtime.bus,
            topic,
            CONSUMER_GROUP,
            name,
            functools.partial(handler, service),
            # Handlers are short transactions: an entry idle this long belongs to a replica
            # that died (PROFILES_CLAIM_IDLE_SECONDS).
            claim_idle_ms=int(runtime.settings.claim_idle_seconds * 1000),
            block_ms=max(1, round(runtime.settings.bus_wait_seconds * 1000)),
            handler_timeout_s=HANDLER_TIMEOUT_S,
        )
        for topic, handler in ((EVENTS, on_events_ingested), (IDENTITY, on_identity_change))
    ]

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_SegmentsServiceServicer_to_server(servicer, server)

    return ServiceDefinition(
        full_names=[SERVICE_NAME],
        register=register,
        workers=[
            *(ConsumerWorker(c) for c in consumers),
            SweepWorker(service, runtime.clock, interval_s=sweep_interval_s),
            EvaluationWorker(definitions, interval_s=evaluation_interval_s),
            ThresholdsWorker(service, interval_s=thresholds_interval_s),
            # What a lost ProfileDeleted left behind, purged from identity's record of erasures.
            ErasureSweepWorker(
                repository,
                service,
                interval_s=runtime.settings.erasure_sweep_minutes * 60.0,
            ),
            RecomputeOwner(service),
        ],
    )


build = make_build()
