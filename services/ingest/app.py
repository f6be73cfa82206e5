"""Builds the ingest service for shared.server."""

from __future__ import annotations

import grpc

from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from services.ingest.geoip import CountryResolver
from services.ingest.identity_client import IdentityChannelWorker, IdentityClient
from services.ingest.maintenance_repository import MaintenanceRepository
from services.ingest.repository import IngestRepository
from services.ingest.retention import (
    MAINTENANCE_INTERVAL_S,
    StorageMaintainer,
    StorageMaintenance,
)
from services.ingest.service import IngestService
from services.ingest.servicer import IngestServicer
from services.ingest.sweeper import SWEEP_INTERVAL_S, SessionSweeper
from shared.notices import LiveNotices, NoticeWorker
from shared.server import Build, Runtime, ServiceDefinition

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["IngestService"].full_name


def make_build(
    *,
    sweep_interval_s: float = SWEEP_INTERVAL_S,
    maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
) -> Build:
    """The build function, with how often idle sessions are looked for and storage maintained
    (partitions, retention: services/ingest/retention.py); tests shorten them."""

    async def build(runtime: Runtime) -> ServiceDefinition:
        settings = runtime.settings
        identity = IdentityClient(settings.addresses["identity"], settings.internal_token)
        notices = LiveNotices("ingest")
        repository = IngestRepository(runtime.pool)
        service = IngestService(
            repository,
            identity,
            runtime.clock,
            countries=CountryResolver(),
            notices=notices,
            group_writers=settings.ingest_group_writers,
            partitions=settings.ingest_write_partitions,
        )
        servicer = IngestServicer(service)
        maintenance = StorageMaintenance(
            MaintenanceRepository(runtime.pool),
            runtime.clock,
            retention_days=settings.events_retention_days,
        )

        def register(server: grpc.aio.Server) -> None:
            pb_grpc.add_IngestServiceServicer_to_server(servicer, server)

        return ServiceDefinition(
            full_names=[SERVICE_NAME],
            register=register,
            workers=[
                IdentityChannelWorker(identity),
                NoticeWorker(notices, runtime.bus),
                SessionSweeper(repository, runtime.clock, sweep_interval_s),
                StorageMaintainer(maintenance, maintenance_interval_s),
            ],
        )

    return build


build = make_build()
