"""Segments over real gRPC, PostgreSQL and Redis against a hostile client: tampered page tokens
of ListSegments and ListFunnels, malformed and future WatchSegmentChanges cursors, and a burst of
retries of one CreateFunnel. Each gets a precise status (INVALID_ARGUMENT with the field path;
FAILED_PRECONDITION CURSOR_EXPIRED for a cursor the stream does not hold), never INTERNAL, never
a hang, and the data already stored stays as it was."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from profiles.segments.v1 import filters_pb2, funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from profiles.segments.v1 import segments_service_pb2_grpc as pb_grpc
from services.segments.messages import change_to_bus
from services.segments.model import ChangeCause, MembershipChange, SmartSegment
from shared.bus import Bus
from shared.topics import SEGMENT_CHANGES
from tests.support.segments import publish
from tests.support.segments_custom import attribute, error_details

if TYPE_CHECKING:
    from tests.conftest import StartServices, TestProject

# Far above any answer on a slow machine: a call still waiting then is a hang, not slowness.
DEADLINE_S = 60.0
TOKEN_PROBLEM = "is not a page token of this RPC"


@dataclass
class Segments:
    stub: pb_grpc.SegmentsServiceStub
    bus: Bus
    project: TestProject
    database_url: str

    @property
    def read(self) -> Any:
        return self.project.metadata("read")

    @property
    def admin(self) -> Any:
        return self.project.metadata("admin")


@pytest.fixture
async def segments(
    start_services: StartServices, project: TestProject, database_url: str
) -> Segments:
    handle = (await start_services("segments"))["segments"]
    runtime = handle.running.runtime  # type: ignore[attr-defined]
    return Segments(pb_grpc.SegmentsServiceStub(handle.channel), runtime.bus, project, database_url)


def token(body: Any) -> str:
    """A page token as the service writes them, around any JSON body."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def raw_token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def tampered_tokens(kind: str) -> dict[str, str]:
    """Tokens a client could forge for the RPC whose tokens carry `kind`, by what is wrong."""
    return {
        "position above int64": token({"v": 1, "k": kind, "s": 2**63}),
        "position far above int64": token({"v": 1, "k": kind, "s": 2**200}),
        "position below int64": token({"v": 1, "k": kind, "s": -(2**63) - 1}),
        "negative position": token({"v": 1, "k": kind, "s": -1}),
        "boolean position": token({"v": 1, "k": kind, "s": True}),
        "null position": token({"v": 1, "k": kind, "s": None}),
        "text position": token({"v": 1, "k": kind, "s": "5"}),
        "float position": token({"v": 1, "k": kind, "s": 5.0}),
        "list position": token({"v": 1, "k": kind, "s": [5]}),
        "NaN position": raw_token(f'{{"v":1,"k":"{kind}","s":NaN}}'.encode()),
        "infinite position": raw_token(f'{{"v":1,"k":"{kind}","s":Infinity}}'.encode()),
        "4,400-digit position": raw_token(f'{{"v":1,"k":"{kind}","s":{"9" * 4400}}}'.encode()),
        "missing position": token({"v": 1, "k": kind}),
        "missing version": token({"k": kind, "s": 1}),
        "boolean version": token({"v": True, "k": kind, "s": 1}),
        "float version": token({"v": 1.0, "k": kind, "s": 1}),
        "missing kind": token({"v": 1, "s": 1}),
        "other RPC's kind": token({"v": 1, "k": "other", "s": 1}),
        "null body": token(None),
        "list body": token([1, kind, 1]),
        "number body": token(1),
        "deeply nested lists": raw_token(b"[" * 100_000 + b"]" * 100_000),
        "deeply nested objects": raw_token(b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        "not base64": "%%%%",
        "not JSON": raw_token(b"\xff\xfe\x00garbage"),
        "blank JSON": raw_token(b"   "),
        "huge token": token({"v": 1, "k": kind, "s": 1, "pad": "x" * 100_000}),
    }


async def page_token_problem(call: Awaitable[object]) -> str | None:
    """What is wrong with the answer to a tampered token; None if it is the expected refusal."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        answer = (error.code(), *error_details(error), TOKEN_PROBLEM in (error.details() or ""))
        expected = (grpc.StatusCode.INVALID_ARGUMENT, "PAGE_INVALID", ["page_token"], True)
        return None if answer == expected else f"{answer}: {error.details()}"
    return "accepted"


def checkout_funnel(name: str, request_id: str = "") -> pb.CreateFunnelRequest:
    window = Duration()
    window.FromSeconds(7200)
    paid = funnels_pb2.EventAttributeCondition(
        attribute_name="amount",
        operator=filters_pb2.OPERATOR_EXISTS,
    )
    return pb.CreateFunnelRequest(
        display_name=name,
        steps=[
            funnels_pb2.FunnelStep(event_name="view"),
            funnels_pb2.FunnelStep(event_name="cart"),
            funnels_pb2.FunnelStep(event_name="purchase", attribute_condition=paid),
        ],
        conversion_window=window,
        request_id=request_id,
    )


async def test_tampered_list_segments_tokens_are_invalid_arguments(segments: Segments) -> None:
    for i in range(3):
        await segments.stub.CreateSegment(
            pb.CreateSegmentRequest(
                display_name=f"seg {i}",
                filter=attribute("plan", filters_pb2.OPERATOR_EXISTS),
            ),
            metadata=segments.admin,
            timeout=DEADLINE_S,
        )
    await assert_tampered_tokens_refused(segments, "segments", ["seg 0", "seg 1", "seg 2"])


async def test_tampered_list_funnels_tokens_are_invalid_arguments(segments: Segments) -> None:
    for i in range(3):
        await segments.stub.CreateFunnel(
            checkout_funnel(f"funnel {i}"), metadata=segments.admin, timeout=DEADLINE_S
        )
    await assert_tampered_tokens_refused(segments, "funnels", ["funnel 0", "funnel 1", "funnel 2"])


async def assert_tampered_tokens_refused(
    segments: Segments, kind: str, names_in_order: list[str]
) -> None:
    """Every tampered token of ListSegments ("segments") or ListFunnels ("funnels") is refused
    on page_token, and the tokens the service hands out still walk every item, once each."""

    def listing(page_token: str) -> Any:
        if kind == "segments":
            request = pb.ListSegmentsRequest(page_size=1, page_token=page_token)
            return segments.stub.ListSegments(request, metadata=segments.read, timeout=DEADLINE_S)
        funnels = pb.ListFunnelsRequest(page_size=1, page_token=page_token)
        return segments.stub.ListFunnels(funnels, metadata=segments.read, timeout=DEADLINE_S)

    problems = {}
    for what, bad in tampered_tokens(kind).items():
        if (problem := await page_token_problem(listing(bad))) is not None:
            problems[what] = problem
    assert problems == {}

    names, page_token = [], ""
    while True:
        page = await listing(page_token)
        items = page.segments if kind == "segments" else page.funnels
        names.extend(item.display_name for item in items)
        page_token = page.next_page_token
        if not page_token:
            break
    assert names == names_in_order


async def watch_error(segments: Segments, request: pb.WatchSegmentChangesRequest) -> grpc.RpcError:
    """The error a watch ends with (a watch that goes on past the deadline fails the test)."""
    call = segments.stub.WatchSegmentChanges(request, metadata=segments.read, timeout=DEADLINE_S)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value


async def append_change(segments: Segments) -> str:
    """Appends a change of the project to the change stream, as the outbox relay does; returns
    its cursor (entry ID)."""
    change = MembershipChange(True, datetime.now(UTC), ChangeCause.EVENT, segment=SmartSegment.NEW)
    message = change_to_bus(segments.project.project_id, uuid.uuid4(), change)
    return await publish(segments.bus, SEGMENT_CHANGES, segments.project.project_id, message)


MALFORMED_CURSORS = [
    "18446744073709551616-0",  # milliseconds above unsigned 64 bits
    "0-18446744073709551616",  # sequence above unsigned 64 bits
    "99999999999999999999999-0",
    "1700000000000",  # Redis takes a bare millisecond time; SegmentChange.cursor never is one
    "1700000000000-",
    "-1",
    "-1-0",
    "1700000000000-0\n",
    " 1700000000000-0",
    "+1700000000000-0",
    "1700000000000-*",
    "$",
    "+",
    "-",
    ">",
    # Arabic-Indic digits: Python's int() reads them, Redis does not.
    "".join(chr(0x0660 + int(d)) for d in "1700000000000") + "-\u0660",
    "1700000000000-0-0",
    "",
]


async def test_malformed_watch_cursors_are_invalid_arguments(segments: Segments) -> None:
    await append_change(segments)
    for cursor in MALFORMED_CURSORS:
        request = pb.WatchSegmentChangesRequest(start_after=cursor)
        error = await watch_error(segments, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (cursor, error.details())
        assert error_details(error) == ("CURSOR_INVALID", ["start_after"]), cursor


async def test_a_watch_cursor_ahead_of_the_clock_is_invalid_and_one_ahead_of_the_stream_expired(
    segments: Segments,
) -> None:
    last = await append_change(segments)
    millis, sequence = (int(part) for part in last.split("-"))
    # Over 10 minutes ahead of Redis's clock, which entry IDs carry: no stream handed it out.
    for cursor in ("99999999999999-0", f"{2**64 - 1}-{2**64 - 1}"):
        error = await watch_error(segments, pb.WatchSegmentChangesRequest(start_after=cursor))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (cursor, error.details())
        assert error_details(error) == ("CURSOR_INVALID", ["start_after"]), cursor
    # Ahead of the newest entry only: what a client resuming after Redis lost its data holds,
    # so the answer says to resume from a time (as for an expired cursor), not to give up.
    for cursor in (f"{millis}-{sequence + 1}", f"{millis + 1}-0"):
        error = await watch_error(segments, pb.WatchSegmentChangesRequest(start_after=cursor))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (cursor, error.details())
        assert error_details(error) == ("CURSOR_EXPIRED", []), cursor

    # The newest entry's own ID is a cursor the stream handed out: the watch goes on after it.
    following = await append_change(segments)
    call = segments.stub.WatchSegmentChanges(
        pb.WatchSegmentChangesRequest(start_after=last), metadata=segments.read, timeout=DEADLINE_S
    )
    try:
        response = await call.read()
        assert isinstance(response, pb.WatchSegmentChangesResponse)
        assert [c.cursor for c in response.changes] == [following]
    finally:
        call.cancel()


async def test_a_burst_of_retries_of_one_create_funnel_answers_every_one_with_the_same_funnel(
    segments: Segments,
) -> None:
    request_id = str(uuid.uuid4())
    request = checkout_funnel("Checkout", request_id)
    # Far more concurrent retries than the service's database pool has connections (5 + 1 in
    # tests): each waits for the project's definition lock while holding a connection.
    replies = await asyncio.gather(
        *(
            segments.stub.CreateFunnel(request, metadata=segments.admin, timeout=DEADLINE_S)
            for _ in range(20)
        ),
        return_exceptions=True,
    )
    failures = [r for r in replies if isinstance(r, BaseException)]
    assert not failures, [f.code() for f in failures if isinstance(f, grpc.aio.AioRpcError)]
    funnel_ids = {r.funnel.funnel_id for r in replies if isinstance(r, pb.CreateFunnelResponse)}
    assert len(funnel_ids) == 1
    connection = await asyncpg.connect(segments.database_url)
    try:
        stored = await connection.fetch(
            "SELECT funnel_id FROM funnels WHERE project_id = $1 AND request_id = $2",
            segments.project.project_id,
            uuid.UUID(request_id),
        )
    finally:
        await connection.close()
    assert [str(r["funnel_id"]) for r in stored] == list(funnel_ids)


async def test_a_burst_of_retries_of_one_create_segment_answers_every_one_with_the_same_segment(
    segments: Segments,
) -> None:
    request_id = str(uuid.uuid4())
    request = pb.CreateSegmentRequest(
        display_name="Paying",
        filter=attribute("plan", filters_pb2.OPERATOR_EXISTS),
        request_id=request_id,
    )
    replies = await asyncio.gather(
        *(
            segments.stub.CreateSegment(request, metadata=segments.admin, timeout=DEADLINE_S)
            for _ in range(20)
        ),
        return_exceptions=True,
    )
    failures = [r for r in replies if isinstance(r, BaseException)]
    assert not failures, [f.code() for f in failures if isinstance(f, grpc.aio.AioRpcError)]
    segment_ids = {r.segment.segment_id for r in replies if isinstance(r, pb.CreateSegmentResponse)}
    assert len(segment_ids) == 1
