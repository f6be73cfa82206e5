"""IngestServicer: protobuf in, protobuf out; the service does the work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import UUID

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import status_pb2

from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from services.ingest import model
from services.ingest.errors import EventErased, EventInvalid
from services.ingest.service import BatchResult, EventResult, IngestService
from services.ingest.tokens import TokenResult
from shared.auth import current_caller
from shared.contract_rules import Refused
from shared.errors import FieldViolation, InvalidArgument
from shared.interceptors import OK_STATUS, status_of_error

OUTCOMES = {
    "accepted": pb.EVENT_OUTCOME_ACCEPTED,
    "duplicate": pb.EVENT_OUTCOME_DUPLICATE,
    "rejected": pb.EVENT_OUTCOME_REJECTED,
}


def result_to_proto(result: EventResult) -> pb.EventResult:
    message = pb.EventResult(event_id=result.event_id, outcome=OUTCOMES[result.outcome])
    rejection = result.rejection
    if rejection is None:
        message.status.CopyFrom(OK_STATUS)
        if result.profile_id is not None:
            message.profile_id = str(result.profile_id)
        return message
    path = f"events[{result.index}]" + (f".{rejection.field_path}" if rejection.field_path else "")
    error: EventErased | EventInvalid
    if rejection.reason == model.ERASED:
        error = EventErased(rejection.message)
    else:
        error = EventInvalid(
            rejection.message, [FieldViolation(path, rejection.message, rejection.reason)]
        )
        error.reason = rejection.reason
    message.status.CopyFrom(status_of_error(error))
    message.reason = rejection.reason
    message.field_path = rejection.field_path
    return message


TOKEN_OUTCOMES = {
    "imported": pb.TOKEN_OUTCOME_IMPORTED,
    "already_known": pb.TOKEN_OUTCOME_ALREADY_KNOWN,
    "rejected": pb.TOKEN_OUTCOME_REJECTED,
}


def token_result_to_proto(result: TokenResult) -> pb.TokenResult:
    message = pb.TokenResult(
        outcome=TOKEN_OUTCOMES[result.outcome], installation_id=result.installation_id
    )
    if result.profile_id is not None:
        message.profile_id = str(result.profile_id)
    rejection = result.rejection
    if rejection is None:
        message.status.CopyFrom(OK_STATUS)
        return message
    path = f"tokens[{result.index}].{rejection.field_path}"
    error: EventErased | EventInvalid
    if rejection.reason == model.ERASED:
        error = EventErased(rejection.message)
    else:
        error = EventInvalid(
            rejection.message, [FieldViolation(path, rejection.message, rejection.reason)]
        )
        error.reason = rejection.reason
    message.status.CopyFrom(status_of_error(error))
    message.reason = rejection.reason
    return message


# An answer without a rejection, but for its event and profile IDs, per outcome (what
# result_to_proto sets besides them).
_UNREJECTED = {
    outcome: pb.EventResult(outcome=number, status=OK_STATUS)
    for outcome, number in OUTCOMES.items()
}


def _fill(
    response: pb.TrackEventsResponse | pb.ImportEventsResponse | pb.StreamEventsResponse,
    batch: BatchResult,
) -> None:
    # What result_to_proto gives, with a batch's common case (no rejection) added in place as a
    # copy of its outcome's answer (_UNREJECTED: one copy in C instead of setting the outcome
    # and copying the status, about 0.3 us an answer) and each profile's ID spelled once.
    results = response.results
    add = results.add
    profile_texts: dict[UUID, str] = {}
    counts = dict.fromkeys(OUTCOMES, 0)
    for result in batch.results:
        counts[result.outcome] += 1
        if result.rejection is not None:
            results.append(result_to_proto(result))
            continue
        message = add()
        message.CopyFrom(_UNREJECTED[result.outcome])
        message.event_id = result.event_id
        profile_id = result.profile_id
        if profile_id is not None:
            text = profile_texts.get(profile_id)
            if text is None:
                text = profile_texts[profile_id] = str(profile_id)
            message.profile_id = text
    response.accepted_count = counts["accepted"]
    response.duplicate_count = counts["duplicate"]
    response.rejected_count = counts["rejected"]


def _send_time(
    request: pb.TrackEventsRequest | pb.ImportEventsRequest | pb.StreamEventsRequest,
) -> Timestamp | None:
    return request.send_time if request.HasField("send_time") else None


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(self, service: IngestService, *, read_ahead: int = 4) -> None:
        self._service = service
        self._read_ahead = read_ahead

    async def TrackEvents(
        self, request: pb.TrackEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrackEventsResponse:
        batch = await self._service.ingest(
            current_caller().project_id, request.events, _send_time(request), request.ByteSize()
        )
        response = pb.TrackEventsResponse()
        _fill(response, batch)
        return response

    async def ImportEvents(
        self, request: pb.ImportEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImportEventsResponse:
        batch = await self._service.ingest(
            current_caller().project_id,
            request.events,
            _send_time(request),
            request.ByteSize(),
            imported=True,
        )
        response = pb.ImportEventsResponse()
        _fill(response, batch)
        return response

    async def StreamEvents(
        self,
        request_iterator: AsyncIterator[pb.StreamEventsRequest | Refused],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamEventsResponse]:
        # One batch at a time, answered before the next is read: responses stay in order, and
        # HTTP/2 flow control holds back a client that sends faster than batches commit.
        project_id = current_caller().project_id
        async for request in request_iterator:
            if isinstance(request, Refused):
                # A batch the interceptor found broken (undecodable, a NUL outside its events):
                # answered as malformed like any other, and the stream goes on.
                sent = request.message
                yield pb.StreamEventsResponse(
                    batch_id=sent.batch_id[:64] if isinstance(sent, pb.StreamEventsRequest) else "",
                    status=status_of_error(request.error),
                )
                continue
            response = pb.StreamEventsResponse(batch_id=request.batch_id[:64])
            try:
                batch = await self._service.ingest(
                    project_id, request.events, _send_time(request), request.ByteSize()
                )
            except InvalidArgument as exc:
                response.status.CopyFrom(status_of_error(exc))
            else:
                response.status.CopyFrom(status_pb2.Status(code=0))
                _fill(response, batch)
            yield response

    async def ImportTokens(
        self, request: pb.ImportTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImportTokensResponse:
        results = await self._service.import_tokens(current_caller().project_id, request.tokens)
        response = pb.ImportTokensResponse(results=[token_result_to_proto(r) for r in results])
        response.imported_count = sum(1 for r in results if r.outcome == "imported")
        response.already_known_count = sum(1 for r in results if r.outcome == "already_known")
        response.rejected_count = sum(1 for r in results if r.outcome == "rejected")
        return response
