"""Calls identity with the internal credential, on behalf of a project: ResolveProfiles for every
batch (and, looking up only, for the IDs of the events a batch refused before resolving them),
Identify and MergeProfiles for imported push tokens (ImportTokens)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol
from uuid import UUID

import grpc
import structlog
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.client import open_channel
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from services.ingest.errors import IdentityUnavailable
from shared.auth import PROJECT_HEADER

log = structlog.get_logger(__name__)

RESOLVE_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 10.0
# ResolveProfiles takes at most this many keys per call.
MAX_KEYS_PER_CALL = 1000


class OriginKey(NamedTuple):
    """An installation ID or, for server-side events, a custom ID. A tuple: hashed in C, and
    ingest hashes one several times per event."""

    custom: bool
    value: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """Identity's answer for one key: a profile, erased, or refused with a reason."""

    profile_id: UUID | None = None
    erased: bool = False
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Identified:
    """Identify's answer: the installation's profile now, or why identity refused."""

    profile_id: UUID | None = None
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Merged:
    """MergeProfiles' answer: the surviving profile, or why identity refused."""

    profile_id: UUID | None = None
    reason: str = ""


# Answers that are identity's decision about the request, not an outage: not worth a retry.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }
)


def _reason_of_error(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call (google.rpc.Status in the trailing metadata)."""
    status = rpc_status.from_call(exc)
    return "" if status is None else _reason_of(status)


def _violated_fields(exc: grpc.aio.AioRpcError) -> list[str]:
    """The field paths of a refused call's BadRequest (at most 5), as identity named them."""
    status = rpc_status.from_call(exc)
    fields: list[str] = []
    for detail in () if status is None else status.details:
        request = error_details_pb2.BadRequest()
        if detail.Unpack(request):
            fields.extend(v.field for v in request.field_violations)
    return fields[:5]


def _reason_of(status: object) -> str:
    for detail in getattr(status, "details", ()):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


class LookupRefused(Exception):
    """Identity refused a whole lookup (find_erased) as malformed: ingest sent what the contract
    forbids. Retrying would get the same answer, so the caller does without the answer."""


class Resolver(Protocol):
    """Identity, as ingest calls it (IdentityClient)."""

    async def resolve(
        self, project_id: UUID, keys: Sequence[OriginKey], *, fresh: bool = False
    ) -> list[Resolution]: ...

    async def find_erased(self, project_id: UUID, keys: Sequence[OriginKey]) -> set[OriginKey]: ...

    async def identify(
        self, project_id: UUID, installation_id: str, custom_id: str, request_id: str
    ) -> Identified: ...

    async def merge_profiles(
        self, project_id: UUID, source_id: UUID, target_id: UUID, request_id: str
    ) -> Merged: ...


class IdentityClient:
    """One channel to identity for every project: the project travels in a header per call."""

    def __init__(self, address: str, internal_token: str) -> None:
        self._channel = open_channel(address, internal_token)
        self._stub = identity_grpc.IdentityServiceStub(self._channel)

    async def resolve(
        self, project_id: UUID, keys: Sequence[OriginKey], *, fresh: bool = False
    ) -> list[Resolution]:
        """One Resolution per key, in order (`fresh`: read past identity's cache). Raises
        IdentityUnavailable if identity cannot answer (the caller then stores nothing)."""
        request = identity_pb.ResolveProfilesRequest(fresh=fresh)
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

    async def find_erased(self, project_id: UUID, keys: Sequence[OriginKey]) -> set[OriginKey]:
        """The keys identity answers `erased`: custom IDs in quarantine after an erasure, and
        installation IDs it does not know that equal one. Asked with `lookup_only` (nothing is
        created, the cache is read past), 1,000 keys per call; an invalid key is no erased one.
        Keys hold no U+0000 (identity refuses the whole call: STRING_UNSTORABLE). Raises
        IdentityUnavailable if identity cannot answer, LookupRefused (logged as an error) if it
        refuses the call as malformed."""
        erased: set[OriginKey] = set()
        for start in range(0, len(keys), MAX_KEYS_PER_CALL):
            chunk = keys[start : start + MAX_KEYS_PER_CALL]
            request = identity_pb.ResolveProfilesRequest(lookup_only=True, fresh=True)
            for key in chunk:
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
                if exc.code() in REFUSALS:
                    # Identity answers an invalid key per key; it refuses a whole call only
                    # when the request breaks the contract (a key holding U+0000, 0 or over
                    # 1,000 keys), which ingest never sends. An error of ours, not an outage:
                    # logged as one, with the field paths identity named, never the keys.
                    log.error(
                        "find_erased_refused",
                        code=exc.code().name,
                        reason=_reason_of_error(exc),
                        fields=_violated_fields(exc),
                        keys=len(chunk),
                    )
                    raise LookupRefused("identity refused to look the IDs up") from exc
                log.warning("find_erased_failed", code=exc.code().name, keys=len(chunk))
                raise IdentityUnavailable("identity could not look the IDs up") from exc
            if len(reply.results) != len(chunk):
                raise IdentityUnavailable("identity answered a different number of keys")
            erased.update(k for k, r in zip(chunk, reply.results, strict=True) if r.erased)
        return erased

    async def identify(
        self, project_id: UUID, installation_id: str, custom_id: str, request_id: str
    ) -> Identified:
        """Links an installation to the identified profile of `custom_id` (identity's Identify,
        with the internal credential on behalf of the project); idempotent per request_id.
        A refusal (junk or quarantined custom ID) comes back as a reason, not raised. Raises
        IdentityUnavailable when identity cannot answer."""
        request = identity_pb.IdentifyRequest(
            installation_id=installation_id, custom_id=custom_id, request_id=request_id
        )
        try:
            reply = await self._stub.Identify(
                request, metadata=((PROJECT_HEADER, str(project_id)),), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REFUSALS:
                return Identified(reason=_reason_of_error(exc), message=exc.details() or "")
            log.warning("identify_failed", code=exc.code().name)
            raise IdentityUnavailable("identity could not link the installation") from exc
        return Identified(profile_id=UUID(reply.profile_id))

    async def merge_profiles(
        self, project_id: UUID, source_id: UUID, target_id: UUID, request_id: str
    ) -> Merged:
        """Merges `source_id` into `target_id` with identity's rules (MergeProfiles, internal
        credential, the project's header); idempotent per request_id. A refusal (custom ID
        conflict, a profile gone) comes back as a reason. Raises IdentityUnavailable when
        identity cannot answer or lost a race (a later attempt may succeed)."""
        request = identity_pb.MergeProfilesRequest(
            source_profile_id=str(source_id),
            target_profile_id=str(target_id),
            request_id=request_id,
        )
        try:
            reply = await self._stub.MergeProfiles(
                request, metadata=((PROJECT_HEADER, str(project_id)),), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REFUSALS:
                return Merged(reason=_reason_of_error(exc))
            log.warning("merge_profiles_failed", code=exc.code().name)
            raise IdentityUnavailable("identity could not merge the profiles") from exc
        return Merged(profile_id=UUID(reply.target_profile_id))

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
