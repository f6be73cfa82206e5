"""DiagnosticsService, served by every service: the bare cost of one RPC through the real stack."""

from __future__ import annotations

import grpc

from profiles.diagnostics.v1 import diagnostics_service_pb2 as pb
from profiles.diagnostics.v1 import diagnostics_service_pb2_grpc as pb_grpc


class DiagnosticsServicer(pb_grpc.DiagnosticsServiceServicer):
    async def Echo(
        self, request: pb.EchoRequest, context: grpc.aio.ServicerContext
    ) -> pb.EchoResponse:
        return pb.EchoResponse(payload=request.payload)


def register(server: grpc.aio.Server) -> str:
    pb_grpc.add_DiagnosticsServiceServicer_to_server(DiagnosticsServicer(), server)
    return pb.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name
