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
    ConsumerWorker,
    SweepWorker,
    on_events_ingested,
    on_identity_change,
)
from services.segments.repository import SegmentsRepository
from services.segments.service import SegmentsService
from services.segments.servicer import SegmentsServicer
from shared.bus import Consumer
from shared.server import Runtime, ServiceDefinition
from shared.topics import EVENTS, IDENTITY

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentsService"].full_name
# One consumer group: replicas share the streams' entries.
CONSUMER_GROUP = "segments"
# A handler is a few short transactions; an entry idle this long belongs to a dead consumer.
CLAIM_IDLE_MS = 30_000
HANDLER_TIMEOUT_S = 60.0
SWEEP_INTERVAL_S = 30.0


def consumer_name() -> str:
    """Stable across restarts of one replica (so it re-reads its own pending entries at once),
    distinct between replicas; PROFILES_SEGMENTS_CONSUMER overrides it."""
    return os.environ.get("PROFILES_SEGMENTS_CONSUMER") or f"segments-{socket.gethostname()}"


async def build(runtime: Runtime) -> ServiceDefinition:
    repository = SegmentsRepository(runtime.pool)
    service = SegmentsService(repository, runtime.tenancy, runtime.clock, ChangeStream(runtime.bus))
    # The RPCs not implemented yet fall through to the generated base: UNIMPLEMENTED.
    servicer = SegmentsServicer(service)  # type: ignore[abstract]
    name = consumer_name()
    consumers = [
        Consumer(
            runtime.bus,
            topic,
            CONSUMER_GROUP,
            name,
            functools.partial(handler, service),
            claim_idle_ms=CLAIM_IDLE_MS,
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
            SweepWorker(service, runtime.clock, interval_s=SWEEP_INTERVAL_S),
        ],
    )
