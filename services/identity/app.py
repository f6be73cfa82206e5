"""Builds the identity service for shared.server."""

from __future__ import annotations

import grpc

from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.identity.v1 import identity_service_pb2_grpc as pb_grpc
from services.identity.cache import CacheInvalidationWorker, ResolutionCache
from services.identity.link_listener import LinkListener
from services.identity.repository import IdentityRepository
from services.identity.service import IdentityService
from services.identity.servicer import IdentityServicer
from shared.notices import LiveNotices, NoticeWorker
from shared.server import Runtime, ServiceDefinition

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["IdentityService"].full_name


async def build(runtime: Runtime) -> ServiceDefinition:
    # Migrations are applied before build, so the tables a merge must move are all there now.
    repository = await IdentityRepository.connect(runtime.pool)
    notices = LiveNotices("identity")
    # Off until the worker listens to every replica's changes (cache.py).
    cache = ResolutionCache()
    service = IdentityService(
        repository, runtime.tenancy, runtime.clock, notices=notices, cache=cache
    )
    servicer = IdentityServicer(service)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_IdentityServiceServicer_to_server(servicer, server)

    return ServiceDefinition(
        full_names=[SERVICE_NAME],
        register=register,
        workers=[
            NoticeWorker(notices, runtime.bus),
            CacheInvalidationWorker(
                cache,
                lambda on_payload: LinkListener.open(runtime.settings.database_url, on_payload),
            ),
        ],
    )
