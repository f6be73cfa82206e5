"""The edge's client layer (services/edge/backend.py) against stand-in stubs of ingest and
identity, on a clock of the test's: the skew correction of a request's events must be the one at
the edge's arrival, not after the logins the edge ran first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from services.edge.backend import Backend
from services.edge.dialects import posthog

LOGIN_SECONDS = 0.2
SENT = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)


class ManualClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class SlowIdentity:
    """A login that takes LOGIN_SECONDS on the clock."""

    def __init__(self, clock: ManualClock) -> None:
        self._clock = clock

    async def Identify(self, request: Any, **_: Any) -> identity_pb.IdentifyResponse:
        self._clock.now += LOGIN_SECONDS
        return identity_pb.IdentifyResponse()


class RecordingIngest:
    def __init__(self) -> None:
        self.calls: list[ingest_pb.TrackEventsRequest] = []

    async def TrackEvents(self, request: Any, **_: Any) -> ingest_pb.TrackEventsResponse:
        self.calls.append(request)
        return ingest_pb.TrackEventsResponse(accepted_count=len(request.events))


async def test_a_login_s_latency_is_not_added_to_the_request_s_events() -> None:
    clock = ManualClock()
    backend = Backend("127.0.0.1:1", "127.0.0.1:1", monotonic=clock)
    ingest = RecordingIngest()
    backend._ingest = ingest  # type: ignore[assignment]
    backend._identity = SlowIdentity(clock)  # type: ignore[assignment]
    login = {
        "event": "$identify",
        "distinct_id": "user-1",
        "uuid": "0190a5f7-2c4b-7000-8000-0000000000aa",
        "timestamp": SENT.isoformat(),
        "properties": {"$anon_distinct_id": "dev-1", "$set": {"plan": "free"}},
    }
    unsent = {"api_key": "k", "batch": [login, {**login, "uuid": "other", "event": "x"}]}
    no_send_time = posthog.translate(unsent, SENT)
    translation = posthog.translate({**unsent, "sent_at": SENT.isoformat()}, SENT)
    try:
        await backend.execute(translation, "k", "posthog", clock())
        await backend.execute(no_send_time, "k", "posthog")
    finally:
        await backend.close()
    with_send_time, without = ingest.calls
    # Ingest's receive time is later than the edge's by the logins' time (two, one after the
    # other: the device's, then the custom ID's own installation's): the send time moved as
    # much, so that the correction (receive - send) is the one at the edge.
    for one in with_send_time.events:
        moved = one.send_time.ToDatetime(tzinfo=UTC) - SENT
        assert moved == timedelta(seconds=2 * LOGIN_SECONDS)
    # An event sent without send time gets no correction, then or now.
    assert not [one for one in without.events if one.HasField("send_time")]


class RefusingIdentity:
    async def Identify(self, request: Any, **_: Any) -> identity_pb.IdentifyResponse:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "junk"
        )


async def test_a_refused_custom_id_becomes_no_installation() -> None:
    backend = Backend("127.0.0.1:1", "127.0.0.1:1")
    ingest = RecordingIngest()
    backend._ingest = ingest  # type: ignore[assignment]
    backend._identity = RefusingIdentity()  # type: ignore[assignment]
    # posthog-python's alias() to a junk ID, which identity refuses.
    alias = {"event": "$create_alias", "distinct_id": "dev-1", "properties": {"alias": "null"}}
    try:
        await backend.execute(posthog.translate({"api_key": "k", "batch": [alias]}, SENT), "k", "x")
    finally:
        await backend.close()
    sent = [one for call in ingest.calls for one in call.events]
    # Both logins listed as refused; nothing of the installation "null" (its platform update).
    assert [one.untranslated.reason for one in sent] == ["LOGIN_REFUSED", "LOGIN_REFUSED"]
