"""Builds the segments service for shared.server."""

from __future__ import annotations

import grpc

from profiles.segments.v1 import segments_service_pb2 as pb
from profiles.segments.v1 import segments_service_pb2_grpc as pb_grpc
from shared.server import Runtime, ServiceDefinition

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentsService"].full_name


async def build(runtime: Runtime) -> ServiceDefinition:
    # The behaviour of this service lands with its own issue; until then the generated base
    # servicer answers every RPC with UNIMPLEMENTED, behind the real auth and error handling.
    servicer = pb_grpc.SegmentsServiceServicer()  # type: ignore[abstract]

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_SegmentsServiceServicer_to_server(servicer, server)

    return ServiceDefinition(full_names=[SERVICE_NAME], register=register)
