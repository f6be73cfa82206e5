"""QueryServicer: protobuf in, protobuf out; the service does the work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as pb_grpc
from services.query import convert
from services.query.live import ProfileWatch
from services.query.service import QueryService
from shared.auth import current_caller


class QueryServicer(pb_grpc.QueryServiceServicer):
    def __init__(self, service: QueryService, watch: ProfileWatch) -> None:
        self._service = service
        self._watch = watch

    async def GetProfile(
        self, request: pb.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetProfileResponse:
        lookup = convert.lookup_from_proto(request)
        view, resolved = await self._service.get_profile(current_caller().project_id, lookup)
        response = pb.GetProfileResponse(profile=convert.profile_to_proto(view))
        if resolved.resolved_from is not None:
            response.resolved_from_profile_id = str(resolved.resolved_from)
        return response

    async def ListProfiles(
        self, request: pb.ListProfilesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListProfilesResponse:
        query = convert.profiles_query_from_proto(request)
        page, total = await self._service.list_profiles(current_caller().project_id, query)
        response = pb.ListProfilesResponse(
            profiles=[convert.profile_row_to_proto(r) for r in page.items],
            next_page_token=page.next_page_token,
        )
        if total is not None:
            response.total_size = total.count
            response.total_size_is_lower_bound = total.at_least
        return response

    async def GetProfileRows(
        self, request: pb.GetProfileRowsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetProfileRowsResponse:
        profile_ids = convert.profile_row_ids_from_proto(request)
        rows, missing = await self._service.profile_rows(current_caller().project_id, profile_ids)
        return pb.GetProfileRowsResponse(
            profiles=[convert.profile_row_to_proto(r) for r in rows],
            missing_profile_ids=[str(i) for i in missing],
        )

    async def ListEvents(
        self, request: pb.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEventsResponse:
        query = convert.events_query_from_proto(request)
        profile_id, page = await self._service.list_events(current_caller().project_id, query)
        return pb.ListEventsResponse(
            events=[convert.timeline_item_to_proto(i) for i in page.items],
            next_page_token=page.next_page_token,
            profile_id=str(profile_id),
        )

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        query = convert.sessions_query_from_proto(request)
        profile_id, page = await self._service.list_sessions(current_caller().project_id, query)
        return pb.ListSessionsResponse(
            sessions=[convert.session_to_proto(s) for s in page.items],
            next_page_token=page.next_page_token,
            profile_id=str(profile_id),
        )

    async def GetActivity(
        self, request: pb.GetActivityRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetActivityResponse:
        profile_id, first, last, time_zone = convert.activity_from_proto(request)
        activity = await self._service.get_activity(
            current_caller().project_id, profile_id, first, last, time_zone
        )
        return pb.GetActivityResponse(
            profile_id=str(activity.profile_id),
            time_zone=activity.time_zone,
            days=[convert.day_to_proto(d) for d in activity.days],
        )

    async def GetOverview(
        self, request: pb.GetOverviewRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetOverviewResponse:
        top = convert.top_values_of(request)  # also checks trend_days
        view = await self._service.overview(
            current_caller().project_id, request.platform, top, request.trend_days
        )
        return pb.GetOverviewResponse(overview=convert.overview_to_proto(view))

    async def ListRejectedEvents(
        self, request: pb.ListRejectedEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRejectedEventsResponse:
        query = convert.rejected_query_from_proto(request)
        page, counts = await self._service.list_rejected(
            current_caller().project_id,
            query,
            size_of=convert.rejected_reply_bytes,
            byte_budget=convert.REJECTED_PAGE_BYTES,
        )
        reply = pb.ListRejectedEventsResponse(
            rejected_events=[convert.rejected_to_proto(r) for r in page.items],
            next_page_token=page.next_page_token,
        )
        if counts is not None:
            reply.reason_counts.extend(
                pb.RejectedReasonCount(reason=reason, count=count)
                for reason, count in counts.counts
            )
            reply.reason_counts_are_lower_bounds = counts.at_least
        return reply

    async def ListEventNames(
        self, request: pb.ListEventNamesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEventNamesResponse:
        query = convert.event_names_query_from_proto(request)
        page = await self._service.list_event_names(current_caller().project_id, query)
        return pb.ListEventNamesResponse(
            event_names=[convert.event_name_to_proto(n) for n in page.items],
            next_page_token=page.next_page_token,
        )

    async def WatchProfile(
        self, request: pb.WatchProfileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchProfileResponse]:
        profile_id = convert.profile_id_of(request.profile_id)
        # The call's end (a client gone away) also reaches the watch through this event, so it
        # unsubscribes even when nobody is left to close this generator.
        closed = asyncio.Event()
        context.add_done_callback(lambda _: closed.set())
        async for item in self._watch.watch(current_caller().project_id, profile_id, closed):
            yield item

    async def GetCaller(
        self, request: pb.GetCallerRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCallerResponse:
        return convert.caller_to_proto(current_caller())
