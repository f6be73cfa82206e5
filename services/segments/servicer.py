"""SegmentsServicer: protobuf in, protobuf out; the use cases live in service.py (engagement,
smart segments, change stream, RecomputeAll) and definitions.py (custom segments, funnels).
Definition conversions live in convert.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC
from typing import TypeVar
from uuid import UUID

from google.protobuf.duration_pb2 import Duration
from grpc.aio import ServicerContext

from profiles.common.v1 import types_pb2
from profiles.segments.v1 import funnels_pb2, segments_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from profiles.segments.v1 import segments_service_pb2_grpc as pb_grpc
from services.segments.change_stream import RecordedChange, parse_cursor
from services.segments.convert import (
    funnel_definition_from_proto,
    funnel_preview_to_proto,
    funnel_to_proto,
    funnel_update_from_proto,
    segment_definition_from_proto,
    segment_preview_to_proto,
    segment_to_proto,
    segment_update_from_proto,
)
from services.segments.definitions import (
    DEFAULT_PROFILES_PAGE_SIZE,
    MAX_PROFILES_PAGE_SIZE,
    DefinitionsService,
    FunnelProfilesPage,
    FunnelProfilesRequest,
    FunnelProgress,
    page_size,
)
from services.segments.errors import (
    CursorInvalid,
    FunnelIdInvalid,
    PlatformInvalid,
    SegmentFilterInvalid,
    SegmentIdInvalid,
    SelectionInvalid,
    StepInvalid,
)
from services.segments.funnels import (
    FunnelProfileSelection,
    FunnelProfilesQuery,
    decode_funnel_profiles_token,
)
from services.segments.model import RecomputeProgress, SegmentFlag, SmartSegment
from services.segments.service import SegmentsService, WatchFilter, WatchStart
from shared.auth import current_caller
from shared.convert import profile_id_of as profile_id_from_proto
from shared.convert import timestamp_of as timestamp
from shared.errors import FieldViolation, InvalidArgument

T = TypeVar("T")
PLATFORMS = frozenset(types_pb2.Platform.values())


def platform_from_proto(value: int, field: str = "platform") -> int:
    if value not in PLATFORMS:
        problem = "must be a known platform or PLATFORM_UNSPECIFIED"
        raise PlatformInvalid(
            f"{field} {problem}", [FieldViolation(field, problem, PlatformInvalid.reason)]
        )
    return value


def segment_id_from_proto(value: str, field: str = "segment_id") -> UUID:
    try:
        return UUID(value)
    except ValueError:
        problem = "must be a UUID"
        raise SegmentIdInvalid(
            f"{field} {problem}", [FieldViolation(field, problem, SegmentIdInvalid.reason)]
        ) from None


def funnel_id_from_proto(value: str, field: str = "funnel_id") -> UUID:
    try:
        return UUID(value)
    except ValueError:
        problem = "must be a UUID"
        raise FunnelIdInvalid(
            f"{field} {problem}", [FieldViolation(field, problem, FunnelIdInvalid.reason)]
        ) from None


def funnel_profiles_request_from_proto(
    request: pb.ListFunnelProfilesRequest,
) -> FunnelProfilesRequest:
    """The checked request; raises InvalidArgument naming every bad field (with the first
    one's reason), so a caller fixes them all at once."""
    refusals: list[InvalidArgument] = []

    def checked(parse: Callable[[], T]) -> T | None:
        try:
            return parse()
        except InvalidArgument as refused:
            refusals.append(refused)
            return None

    funnel_id = checked(lambda: funnel_id_from_proto(request.funnel_id))
    step_number = checked(lambda: step_number_from_proto(request.step_number))
    selection = checked(lambda: selection_from_proto(request.selection))
    size = checked(
        lambda: page_size(request.page_size, DEFAULT_PROFILES_PAGE_SIZE, MAX_PROFILES_PAGE_SIZE)
    )
    position = checked(lambda: decode_funnel_profiles_token(request.page_token))
    if refusals:
        first = refusals[0]
        violations = [v for refused in refusals for v in refused.violations]
        raise type(first)("; ".join(r.message for r in refusals), violations)
    # Each is set when nothing was refused.
    assert funnel_id is not None
    assert step_number is not None
    assert selection is not None
    assert size is not None
    return FunnelProfilesRequest(
        FunnelProfilesQuery(funnel_id, step_number, selection), size, position
    )


def step_number_from_proto(value: int) -> int:
    """A step number from 1; whether the funnel has it is the service's check."""
    if value < 1:
        why = "must be 1 or more: steps are numbered from 1"
        raise StepInvalid(
            f"step_number {why}", [FieldViolation("step_number", why, StepInvalid.reason)]
        )
    return value


def selection_from_proto(value: int) -> FunnelProfileSelection:
    if value not in FunnelProfileSelection._value2member_map_:
        why = "must be FUNNEL_PROFILE_SELECTION_REACHED or FUNNEL_PROFILE_SELECTION_DROPPED"
        raise SelectionInvalid(
            f"selection {why}", [FieldViolation("selection", why, SelectionInvalid.reason)]
        )
    return FunnelProfileSelection(value)


def funnel_profiles_to_proto(page: FunnelProfilesPage) -> pb.ListFunnelProfilesResponse:
    response = pb.ListFunnelProfilesResponse(
        next_page_token=page.next_page_token, as_of_time=timestamp(page.as_of)
    )
    for found in page.profiles:
        response.profiles.add(
            profile_id=str(found.profile_id),
            complete_time=timestamp(found.complete_time),
            attempt_deadline_time=timestamp(found.attempt_start_time + page.conversion_window),
        )
    return response


def watch_filter_from_proto(request: pb.WatchSegmentChangesRequest) -> WatchFilter:
    which = request.WhichOneof("segment")
    if which == "smart_segment":
        if request.smart_segment == types_pb2.SMART_SEGMENT_UNSPECIFIED or (
            request.smart_segment not in SmartSegment._value2member_map_
        ):
            problem = "must be a smart segment, not SMART_SEGMENT_UNSPECIFIED"
            raise SegmentFilterInvalid(
                f"smart_segment {problem}",
                [FieldViolation("smart_segment", problem, SegmentFilterInvalid.reason)],
            )
        return WatchFilter(segment=SmartSegment(request.smart_segment))
    if which == "flag":
        if request.flag == types_pb2.SMART_SEGMENT_FLAG_UNSPECIFIED or (
            request.flag not in SegmentFlag._value2member_map_
        ):
            problem = "must be a flag, not SMART_SEGMENT_FLAG_UNSPECIFIED"
            raise SegmentFilterInvalid(
                f"flag {problem}", [FieldViolation("flag", problem, SegmentFilterInvalid.reason)]
            )
        return WatchFilter(flag=SegmentFlag(request.flag))
    if which == "custom_segment_id":
        segment_id = segment_id_from_proto(request.custom_segment_id, "custom_segment_id")
        return WatchFilter(custom_segment_id=segment_id)
    return WatchFilter()


def watch_start_from_proto(request: pb.WatchSegmentChangesRequest) -> WatchStart:
    which = request.WhichOneof("start")
    if which == "start_after":
        if parse_cursor(request.start_after) is None:
            problem = "must be a cursor from an earlier SegmentChange"
            raise CursorInvalid(
                f"start_after {problem}",
                [FieldViolation("start_after", problem, CursorInvalid.reason)],
            )
        return WatchStart(after=request.start_after)
    if which == "start_time":
        moment = request.start_time.ToDatetime(tzinfo=UTC)
        return WatchStart(time_ms=int(moment.timestamp() * 1000))
    return WatchStart()


def change_to_proto(recorded: RecordedChange) -> segments_pb2.SegmentChange:
    change = recorded.change
    message = segments_pb2.SegmentChange(
        cursor=recorded.cursor,
        change_time=timestamp(change.change_time),
        profile_id=recorded.profile_id,
        transition=(
            segments_pb2.SEGMENT_TRANSITION_ENTERED
            if change.entered
            else segments_pb2.SEGMENT_TRANSITION_LEFT
        ),
        cause=int(change.cause),  # type: ignore[arg-type]  # same numbers by design
    )
    if change.segment is not None:
        message.smart_segment = int(change.segment)  # type: ignore[assignment]
    elif change.flag is not None:
        message.flag = int(change.flag)  # type: ignore[assignment]
    elif change.custom_segment_id is not None:
        message.custom_segment_id = str(change.custom_segment_id)
    return message


def funnel_progress_to_proto(progress: FunnelProgress) -> funnels_pb2.FunnelProgress:
    funnel, attempt = progress.funnel, progress.attempt
    completed = len(attempt.step_times)
    message = funnels_pb2.FunnelProgress(
        funnel_id=str(funnel.funnel_id),
        display_name=funnel.display_name,
        completed_step_count=completed,
        converted=attempt.converted,
    )
    for index, step in enumerate(funnel.steps):
        item = message.steps.add(step_number=index + 1, event_name=step.event_name)
        if index < completed:
            item.status = funnels_pb2.FUNNEL_STEP_STATUS_COMPLETED
            item.complete_time.CopyFrom(timestamp(attempt.step_times[index]))
        elif index == completed:
            item.status = funnels_pb2.FUNNEL_STEP_STATUS_NOT_COMPLETED
        else:
            item.status = funnels_pb2.FUNNEL_STEP_STATUS_NOT_REACHED
    if attempt.start_time is not None and attempt.deadline_time is not None:
        message.attempt_start_time.CopyFrom(timestamp(attempt.start_time))
        message.attempt_deadline_time.CopyFrom(timestamp(attempt.deadline_time))
    return message


def recompute_to_proto(progress: RecomputeProgress) -> pb.RecomputeAllResponse:
    return pb.RecomputeAllResponse(
        recompute_id=str(progress.recompute_id),
        phase=int(progress.phase),  # type: ignore[arg-type]  # same numbers by design
        profiles_done=progress.profiles_done,
        profiles_total=progress.profiles_total,
        changed_profile_count=progress.changed_profile_count,
        start_time=timestamp(progress.start_time),
        update_time=timestamp(progress.update_time),
    )


class SegmentsServicer(pb_grpc.SegmentsServiceServicer):
    def __init__(self, service: SegmentsService, definitions: DefinitionsService) -> None:
        self._service = service
        self._definitions = definitions

    async def GetEngagement(
        self, request: pb.GetEngagementRequest, context: ServicerContext
    ) -> pb.GetEngagementResponse:
        profile_id = profile_id_from_proto(request.profile_id)
        live_id, score = await self._service.get_engagement(current_caller().project_id, profile_id)
        average = Duration()
        average.FromTimedelta(score.average_session_duration)
        return pb.GetEngagementResponse(
            profile_id=str(live_id),
            score1=score.score1,
            score2=score.score2,
            score3=score.score3,
            score=score.score,
            percentage=score.percentage,
            window_start_time=timestamp(score.window_start_time),
            window_end_time=timestamp(score.window_end_time),
            session_count=score.session_count,
            average_session_duration=average,
            time_zone=score.time_zone,
        )

    async def GetSmartSegment(
        self, request: pb.GetSmartSegmentRequest, context: ServicerContext
    ) -> pb.GetSmartSegmentResponse:
        profile_id = profile_id_from_proto(request.profile_id)
        platform = platform_from_proto(request.platform)
        live_id, facts = await self._service.get_smart_segment(
            current_caller().project_id, profile_id, platform
        )
        response = pb.GetSmartSegmentResponse(
            profile_id=str(live_id),
            platform=platform,  # type: ignore[arg-type]
            segment=int(facts.classification.segment),  # type: ignore[arg-type]
            flag=int(facts.classification.flag),  # type: ignore[arg-type]
            recent_active_days=facts.recent_active_days,
            total_active_days=facts.total_active_days,
            session_count=facts.session_count,
            as_of_time=timestamp(facts.as_of_time),
            time_zone=facts.time_zone,
        )
        if facts.next_transition_time is not None:
            response.next_transition_time.CopyFrom(timestamp(facts.next_transition_time))
        if facts.first_session_time is not None:
            response.first_session_time.CopyFrom(timestamp(facts.first_session_time))
        if facts.last_session_time is not None:
            response.last_session_time.CopyFrom(timestamp(facts.last_session_time))
        return response

    async def WatchSegmentChanges(
        self, request: pb.WatchSegmentChangesRequest, context: ServicerContext
    ) -> AsyncIterator[pb.WatchSegmentChangesResponse]:
        wanted = watch_filter_from_proto(request)
        start = watch_start_from_proto(request)
        project_id = current_caller().project_id
        if wanted.custom_segment_id is not None:
            await self._definitions.require_segment(project_id, wanted.custom_segment_id)
        changes = self._service.watch_changes(project_id, wanted, start)
        try:
            async for batch in changes:
                yield pb.WatchSegmentChangesResponse(changes=[change_to_proto(c) for c in batch])
        finally:
            await changes.aclose()  # type: ignore[attr-defined]

    async def CreateSegment(
        self, request: pb.CreateSegmentRequest, context: ServicerContext
    ) -> pb.CreateSegmentResponse:
        definition = segment_definition_from_proto(request)
        project_id = current_caller().project_id
        if request.validate_only:
            preview = await self._definitions.preview_segment(project_id, definition)
            return pb.CreateSegmentResponse(segment=segment_preview_to_proto(preview))
        segment = await self._definitions.create_segment(project_id, definition)
        return pb.CreateSegmentResponse(segment=segment_to_proto(segment))

    async def GetSegment(
        self, request: pb.GetSegmentRequest, context: ServicerContext
    ) -> pb.GetSegmentResponse:
        segment_id = segment_id_from_proto(request.segment_id)
        segment = await self._definitions.get_segment(current_caller().project_id, segment_id)
        return pb.GetSegmentResponse(segment=segment_to_proto(segment))

    async def ListSegments(
        self, request: pb.ListSegmentsRequest, context: ServicerContext
    ) -> pb.ListSegmentsResponse:
        page = await self._definitions.list_segments(
            current_caller().project_id, request.page_size, request.page_token
        )
        return pb.ListSegmentsResponse(
            segments=[segment_to_proto(s) for s in page.items],
            next_page_token=page.next_page_token,
        )

    async def UpdateSegment(
        self, request: pb.UpdateSegmentRequest, context: ServicerContext
    ) -> pb.UpdateSegmentResponse:
        segment_id = segment_id_from_proto(request.segment.segment_id, "segment.segment_id")
        update = segment_update_from_proto(request, segment_id)
        project_id = current_caller().project_id
        if request.validate_only:
            result = await self._definitions.preview_segment_update(project_id, update)
        else:
            result = await self._definitions.update_segment(project_id, update)
        return pb.UpdateSegmentResponse(
            segment=segment_to_proto(result.segment),
            entered_profile_count=result.entered,
            left_profile_count=result.left,
        )

    async def DeleteSegment(
        self, request: pb.DeleteSegmentRequest, context: ServicerContext
    ) -> pb.DeleteSegmentResponse:
        segment_id = segment_id_from_proto(request.segment_id)
        await self._definitions.delete_segment(
            current_caller().project_id, segment_id, request.allow_missing
        )
        return pb.DeleteSegmentResponse()

    async def CreateFunnel(
        self, request: pb.CreateFunnelRequest, context: ServicerContext
    ) -> pb.CreateFunnelResponse:
        definition = funnel_definition_from_proto(request)
        project_id = current_caller().project_id
        if request.validate_only:
            preview = await self._definitions.preview_funnel(project_id, definition)
            return pb.CreateFunnelResponse(funnel=funnel_preview_to_proto(preview))
        funnel = await self._definitions.create_funnel(project_id, definition)
        return pb.CreateFunnelResponse(funnel=funnel_to_proto(funnel))

    async def ListFunnels(
        self, request: pb.ListFunnelsRequest, context: ServicerContext
    ) -> pb.ListFunnelsResponse:
        page = await self._definitions.list_funnels(
            current_caller().project_id, request.page_size, request.page_token
        )
        return pb.ListFunnelsResponse(
            funnels=[funnel_to_proto(f) for f in page.items], next_page_token=page.next_page_token
        )

    async def GetFunnel(
        self, request: pb.GetFunnelRequest, context: ServicerContext
    ) -> pb.GetFunnelResponse:
        funnel_id = funnel_id_from_proto(request.funnel_id)
        funnel = await self._definitions.get_funnel(current_caller().project_id, funnel_id)
        return pb.GetFunnelResponse(funnel=funnel_to_proto(funnel))

    async def UpdateFunnel(
        self, request: pb.UpdateFunnelRequest, context: ServicerContext
    ) -> pb.UpdateFunnelResponse:
        funnel_id = funnel_id_from_proto(request.funnel.funnel_id, "funnel.funnel_id")
        update = funnel_update_from_proto(request, funnel_id)
        project_id = current_caller().project_id
        if request.validate_only:
            funnel = await self._definitions.preview_funnel_update(project_id, update)
        else:
            funnel = await self._definitions.update_funnel(project_id, update)
        return pb.UpdateFunnelResponse(funnel=funnel_to_proto(funnel))

    async def DeleteFunnel(
        self, request: pb.DeleteFunnelRequest, context: ServicerContext
    ) -> pb.DeleteFunnelResponse:
        funnel_id = funnel_id_from_proto(request.funnel_id)
        await self._definitions.delete_funnel(
            current_caller().project_id, funnel_id, request.allow_missing
        )
        return pb.DeleteFunnelResponse()

    async def GetFunnelProgress(
        self, request: pb.GetFunnelProgressRequest, context: ServicerContext
    ) -> pb.GetFunnelProgressResponse:
        profile_id = profile_id_from_proto(request.profile_id)
        funnel_id = funnel_id_from_proto(request.funnel_id) if request.funnel_id else None
        live_id, progress = await self._definitions.funnel_progress(
            current_caller().project_id, profile_id, funnel_id
        )
        return pb.GetFunnelProgressResponse(
            profile_id=str(live_id), funnels=[funnel_progress_to_proto(p) for p in progress]
        )

    async def ListFunnelProfiles(
        self, request: pb.ListFunnelProfilesRequest, context: ServicerContext
    ) -> pb.ListFunnelProfilesResponse:
        checked = funnel_profiles_request_from_proto(request)
        page = await self._definitions.list_funnel_profiles(current_caller().project_id, checked)
        return funnel_profiles_to_proto(page)

    async def RecomputeAll(
        self, request: pb.RecomputeAllRequest, context: ServicerContext
    ) -> AsyncIterator[pb.RecomputeAllResponse]:
        progress = self._service.recompute_all(current_caller().project_id)
        try:
            async for item in progress:
                yield recompute_to_proto(item)
        finally:
            await progress.aclose()  # type: ignore[attr-defined]
