"""Calls identity's ResolveProfiles with the internal credential, on behalf of a project."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import grpc
import structlog
from google.rpc import error_details_pb2

from profiles.client import open_channel
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from services.ingest.errors import IdentityUnavailable
from shared.auth import PROJECT_HEADER

log = structlog.get_logger(__name__)

RESOLVE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class OriginKey:
    """An installation ID or, for server-side events, a custom ID."""

    custom: bool
    value: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """Identity's answer for one key: a profile, erased, or refused with a reason."""

    profile_id: UUID | None = None
    erased: bool = False
    reason: str = ""
    message: str = ""


def _reason_of(status: object) -> str:
    for detail in getattr(status, "details", ()):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


class IdentityClient:
    """One channel to identity for every project: the project travels in a header per call."""

    def __init__(self, address: str, internal_token: str) -> None:
        self._channel = open_channel(address, internal_token)
        self._stub = identity_grpc.IdentityServiceStub(self._channel)

    async def resolve(self, project_id: UUID, keys: Sequence[OriginKey]) -> list[Resolution]:
        """One Resolution per key, in order. Raises IdentityUnavailable if identity cannot
        answer (the caller then stores nothing)."""
        request = identity_pb.ResolveProfilesRequest()
        for key in keys:
            item = request.keys.add()
            if key.custom:
                item.custom_id = key.value
            else:
                item.installation_id = key.value
        try:
            reply = await self._stub.ResolveProfiles(
                request,
                metadata=((PROJECT_HEADER, str(project_id)),),
                timeout=RESOLVE_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("resolve_profiles_failed", code=exc.code().name, keys=len(keys))
            raise IdentityUnavailable("identity could not resolve the batch; retry it") from exc
        if len(reply.results) != len(keys):
            raise IdentityUnavailable("identity answered a different number of keys")
        resolutions = []
        for result in reply.results:
            if result.erased:
                resolutions.append(Resolution(erased=True))
            elif result.status.code != 0 or not result.profile_id:
                resolutions.append(
                    Resolution(reason=_reason_of(result.status), message=result.status.message)
                )
            else:
                resolutions.append(Resolution(profile_id=UUID(result.profile_id)))
        return resolutions

    async def close(self) -> None:
        await self._channel.close()


class IdentityChannelWorker:
    """Closes the identity channel when the service stops (a BackgroundWorker with no loop)."""

    def __init__(self, client: IdentityClient) -> None:
        self._client = client
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._stopped.set()
        await self._client.close()
