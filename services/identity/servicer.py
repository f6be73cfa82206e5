"""IdentityServicer: protobuf in, protobuf out; the use cases live in service.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from grpc.aio import ServicerContext

from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.identity.v1 import identity_service_pb2_grpc as pb_grpc
from services.identity.model import (
    ChangeCause,
    DeleteResult,
    ExportChunk,
    ExportSection,
    IdentifyOutcome,
    IdentifyResult,
    LogoutOutcome,
    LogoutResult,
    MergeResult,
    ProfileKey,
    Resolution,
)
from services.identity.service import IdentityService
from services.identity.validation import delete_request_id, merge_request_ids
from shared.auth import current_caller
from shared.auth_policy import INTERNAL
from shared.convert import profile_id_of, timestamp_of
from shared.errors import InvalidArgument
from shared.interceptors import status_of_error

IDENTIFY_OUTCOMES: dict[IdentifyOutcome, pb.IdentifyOutcome.ValueType] = {
    IdentifyOutcome.IDENTIFIED: pb.IDENTIFY_OUTCOME_IDENTIFIED,
    IdentifyOutcome.MERGED: pb.IDENTIFY_OUTCOME_MERGED,
    IdentifyOutcome.ALREADY_IDENTIFIED: pb.IDENTIFY_OUTCOME_ALREADY_IDENTIFIED,
    IdentifyOutcome.MOVED: pb.IDENTIFY_OUTCOME_MOVED,
}
LOGOUT_OUTCOMES: dict[LogoutOutcome, pb.LogoutOutcome.ValueType] = {
    LogoutOutcome.NEW_ANONYMOUS_PROFILE: pb.LOGOUT_OUTCOME_NEW_ANONYMOUS_PROFILE,
    LogoutOutcome.UNCHANGED: pb.LOGOUT_OUTCOME_UNCHANGED,
}


def keys_from_proto(keys: Iterable[pb.ProfileKey]) -> list[ProfileKey]:
    """A batch's keys, decoded in one pass (one WhichOneof per key, no call per key)."""
    return [
        ProfileKey(key.installation_id, None)
        if (which := key.WhichOneof("key")) == "installation_id"
        else ProfileKey(None, key.custom_id if which == "custom_id" else None)
        for key in keys
    ]


def merge_cause(role: str) -> ChangeCause:
    """What a MergeProfiles call is recorded as (identity_changes.cause, ProfileMerged.cause).

    The request carries no cause; the caller's role decides. Only two roles may call
    MergeProfiles (shared/auth_policy.py): an admin key is an operator's explicit merge
    (OPERATOR_MERGE), and the internal credential is only used by ingest, which calls it for
    one thing: folding an installation imported by ImportTokens into the real installation
    that later sent a session with the same push token (TOKEN_REINTEGRATION). A new internal
    caller of MergeProfiles for another purpose must first give the request a cause field."""
    return ChangeCause.TOKEN_REINTEGRATION if role == INTERNAL else ChangeCause.OPERATOR_MERGE


def _text(value: object | None) -> str:
    return "" if value is None else str(value)


def resolutions_to_proto(
    results: Iterable[Resolution | InvalidArgument],
) -> pb.ResolveProfilesResponse:
    """The answer of ResolveProfiles, one item per result, built in place.

    A resolved item carries no `status`: an unset google.rpc.Status reads as code 0 (OK) with no
    message and no details, which is what the proto's `status` field says a resolved key gets,
    and ingest reads `status.code`; so does a key `lookup_only` found nobody holding (no
    profile). Copying an OK Status into each of up to 1,000 items, and building each item apart
    before copying it into the response, took over a third of the call's py-spy samples.
    Default values (False, 0) are not passed either."""
    response = pb.ResolveProfilesResponse()
    add = response.results.add
    for result in results:
        if not isinstance(result, Resolution):
            add(status=status_of_error(result))
        elif result.created or result.erased or result.profile_id is None:
            add(
                profile_id=_text(result.profile_id),
                created=result.created,
                erased=result.erased,
                identified=result.identified,
                link_version=result.link_version,
            )
        else:
            add(
                profile_id=str(result.profile_id),
                identified=result.identified,
                link_version=result.link_version,
            )
    return response


def identify_to_proto(result: IdentifyResult) -> pb.IdentifyResponse:
    return pb.IdentifyResponse(
        outcome=IDENTIFY_OUTCOMES[result.outcome],
        profile_id=str(result.profile_id),
        merged_profile_id=_text(result.merged_profile_id),
        previous_profile_id=_text(result.previous_profile_id),
        profile_created=result.profile_created,
        change_id=_text(result.change_id),
    )


def logout_to_proto(result: LogoutResult) -> pb.LogoutResponse:
    return pb.LogoutResponse(
        outcome=LOGOUT_OUTCOMES[result.outcome],
        profile_id=str(result.profile_id),
        previous_profile_id=_text(result.previous_profile_id),
        change_id=_text(result.change_id),
    )


def merge_to_proto(result: MergeResult) -> pb.MergeProfilesResponse:
    response = pb.MergeProfilesResponse(
        target_profile_id=str(result.target_profile_id),
        source_profile_id=str(result.source_profile_id),
        already_merged=result.already_merged,
        alias_custom_id=result.alias_custom_id or "",
        change_id=_text(result.change_id),
    )
    if result.merge_time is not None:
        response.merge_time.CopyFrom(timestamp_of(result.merge_time))
    return response


def delete_to_proto(result: DeleteResult) -> pb.DeleteProfileResponse:
    response = pb.DeleteProfileResponse(
        profile_id=str(result.profile_id),
        custom_id_quarantined=result.custom_id_quarantined,
        deleted_event_count=result.deleted_event_count,
        unlinked_installation_count=result.unlinked_installation_count,
        delete_time=timestamp_of(result.delete_time),
    )
    if result.quarantine_expire_time is not None:
        response.quarantine_expire_time.CopyFrom(timestamp_of(result.quarantine_expire_time))
    return response


EXPORT_SECTIONS: dict[ExportSection, pb.ExportSection.ValueType] = {
    ExportSection.PROFILE: pb.EXPORT_SECTION_PROFILE,
    ExportSection.ATTRIBUTES: pb.EXPORT_SECTION_ATTRIBUTES,
    ExportSection.SUBSCRIPTIONS: pb.EXPORT_SECTION_SUBSCRIPTIONS,
    ExportSection.INSTALLATIONS: pb.EXPORT_SECTION_INSTALLATIONS,
    ExportSection.IDENTITY_HISTORY: pb.EXPORT_SECTION_IDENTITY_HISTORY,
    ExportSection.SESSIONS: pb.EXPORT_SECTION_SESSIONS,
    ExportSection.EVENTS: pb.EXPORT_SECTION_EVENTS,
    ExportSection.REJECTED_EVENTS: pb.EXPORT_SECTION_REJECTED_EVENTS,
    ExportSection.SEGMENTS: pb.EXPORT_SECTION_SEGMENTS,
    ExportSection.ENGAGEMENT: pb.EXPORT_SECTION_ENGAGEMENT,
    ExportSection.FUNNEL_PROGRESS: pb.EXPORT_SECTION_FUNNEL_PROGRESS,
}


def export_chunk_to_proto(index: int, chunk: ExportChunk) -> pb.ExportProfileResponse:
    return pb.ExportProfileResponse(
        chunk_index=index,
        section=EXPORT_SECTIONS[chunk.section],
        section_chunk_index=chunk.section_chunk_index,
        json=chunk.json,
        record_count=chunk.record_count,
        section_end=chunk.section_end,
    )


class IdentityServicer(pb_grpc.IdentityServiceServicer):
    """Translates the RPCs to IdentityService calls."""

    def __init__(self, service: IdentityService) -> None:
        self._service = service

    async def ResolveProfiles(
        self, request: pb.ResolveProfilesRequest, context: ServicerContext
    ) -> pb.ResolveProfilesResponse:
        project_id = current_caller().project_id
        if request.lookup_only:
            keys = keys_from_proto(request.keys)
            return resolutions_to_proto(await self._service.look_up(project_id, keys))
        # The usual batch names installations only: every key's installation_id is then
        # non-empty (a custom ID key or an empty key reads as ""), and one attribute read per
        # key replaces the general decoding.
        installation_ids = [key.installation_id for key in request.keys]
        fresh = request.fresh
        if all(installation_ids):
            results = await self._service.resolve_installations(
                project_id, installation_ids, fresh=fresh
            )
        else:
            keys = keys_from_proto(request.keys)
            results = await self._service.resolve(project_id, keys, fresh=fresh)
        return resolutions_to_proto(results)

    async def Identify(
        self, request: pb.IdentifyRequest, context: ServicerContext
    ) -> pb.IdentifyResponse:
        result = await self._service.identify(
            current_caller().project_id,
            request.installation_id,
            request.custom_id,
            request.request_id,
        )
        return identify_to_proto(result)

    async def Logout(
        self, request: pb.LogoutRequest, context: ServicerContext
    ) -> pb.LogoutResponse:
        result = await self._service.logout(
            current_caller().project_id,
            request.installation_id,
            request.request_id,
            request.unless_custom_id,
        )
        return logout_to_proto(result)

    async def MergeProfiles(
        self, request: pb.MergeProfilesRequest, context: ServicerContext
    ) -> pb.MergeProfilesResponse:
        source, target = merge_request_ids(
            request.source_profile_id, request.target_profile_id, request.request_id
        )
        caller = current_caller()
        result = await self._service.merge_profiles(
            caller.project_id,
            source,
            target,
            request.allow_custom_id_conflict,
            request.request_id,
            cause=merge_cause(caller.role),
            exact=request.exact,
        )
        return merge_to_proto(result)

    async def DeleteProfile(
        self, request: pb.DeleteProfileRequest, context: ServicerContext
    ) -> pb.DeleteProfileResponse:
        profile_id = delete_request_id(request.profile_id, request.request_id)
        result = await self._service.delete_profile(
            current_caller().project_id, profile_id, request.request_id, exact=request.exact
        )
        return delete_to_proto(result)

    async def ExportProfile(
        self, request: pb.ExportProfileRequest, context: ServicerContext
    ) -> AsyncIterator[pb.ExportProfileResponse]:
        profile_id = profile_id_of(request.profile_id, "profile_id")
        chunks = self._service.export_profile(current_caller().project_id, profile_id)
        index = 0
        async for chunk in chunks:
            yield export_chunk_to_proto(index, chunk)
            index += 1
