"""Builds the query service for shared.server."""

from __future__ import annotations

import grpc

from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as pb_grpc
from services.query.live import ProfileWatch
from services.query.repository import QueryRepository
from services.query.service import QueryService
from services.query.servicer import QueryServicer
from shared.server import Runtime, ServiceDefinition

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QueryService"].full_name


async def build(runtime: Runtime) -> ServiceDefinition:
    repository = QueryRepository(runtime.pool)
    service = QueryService(repository, runtime.clock)
    watch = ProfileWatch(runtime.bus, repository, runtime.clock)
    servicer = QueryServicer(service, watch)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_QueryServiceServicer_to_server(servicer, server)

    return ServiceDefinition(full_names=[SERVICE_NAME], register=register)
