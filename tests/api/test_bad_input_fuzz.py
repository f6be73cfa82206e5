"""A hostile client, generated from the descriptors: random and malformed requests (raw bodies
that do not decode included) to every RPC of every service, with and without valid keys. No
answer may be INTERNAL, UNKNOWN, UNAVAILABLE or DEADLINE_EXCEEDED; every server still serves
afterwards; the valid event slipped into each batch is stored."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from functools import cache
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from tests.conftest import TestProject
from tests.support.bad_input import (
    NOW,
    Rpc,
    call,
    contract_rpcs,
    contract_suite,
    refused_in,
    still_serving,
    violations,
)
from tests.support.ingest import custom_event, stamp

__all__ = ["contract_suite"]

# Enough to reach every RPC many times over with each kind of body and credential, within
# about a minute on a shared CI machine.
FUZZ_EXAMPLES = 600
# A stream that has sent nothing after this long is open and waiting (a watch): cancelled.
FIRST_ITEM_WAIT_S = 0.3
FORBIDDEN = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
BATCHES = {"TrackEvents", "ImportEvents", "StreamEvents"}
MAX_DEPTH = 5

_T = FieldDescriptor
_INT_RANGES = {
    _T.TYPE_INT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _T.TYPE_UINT32: (0, 2**32 - 1),
    _T.TYPE_FIXED32: (0, 2**32 - 1),
    _T.TYPE_INT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _T.TYPE_UINT64: (0, 2**64 - 1),
    _T.TYPE_FIXED64: (0, 2**64 - 1),
}


# Strings a hostile client tries first: what the database cannot store, the empty, the blank,
# the over-long, look-alikes of real values.
HOSTILE_TEXTS = ["a\x00b", "\x00", "", " ", "x" * 600, "null", "\U0001f600", "' OR 1=1 --"]


def _texts(known: list[str]) -> st.SearchStrategy[str]:
    """Hostile text, values a real client might send (ids the suite knows, UUIDs, names), and
    random text."""
    return st.one_of(
        st.sampled_from(HOSTILE_TEXTS),
        st.sampled_from([*known, "user-1", "purchase", "FR", "2030-06-01T12:00:00Z"]),
        st.uuids().map(str),
        st.text(max_size=24),
    )


def _scalar(field: FieldDescriptor, texts: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    if field.type == _T.TYPE_STRING:
        return texts
    if field.type == _T.TYPE_BYTES:
        return st.binary(max_size=32)
    if field.type == _T.TYPE_BOOL:
        return st.booleans()
    if field.type == _T.TYPE_DOUBLE:
        return st.floats()
    if field.type == _T.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == _T.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.sampled_from([*numbers, 999, -1])
    low, high = _INT_RANGES[field.type]
    return st.one_of(st.integers(-2, 60), st.integers(low, high)).filter(lambda n: low <= n <= high)


def messages(
    descriptor: Descriptor, texts: st.SearchStrategy[str], depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` with a random subset of fields set to random values."""
    fields = [f for f in descriptor.fields if depth < MAX_DEPTH or f.type != _T.TYPE_MESSAGE]

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Message:
        message = GetMessageClass(descriptor)()
        chosen = draw(st.sets(st.sampled_from(fields), max_size=6)) if fields else set()
        for field in sorted(chosen, key=lambda f: f.number):
            target = getattr(message, field.name)
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
                keys = draw(st.lists(_scalar(key_field, texts), max_size=3, unique=True))
                for key in keys:
                    if value_field.type == _T.TYPE_MESSAGE:
                        value = draw(messages(value_field.message_type, texts, depth + 1))
                        target[key].CopyFrom(value)
                    else:
                        target[key] = draw(_scalar(value_field, texts))
            elif field.type == _T.TYPE_MESSAGE:
                strategy = messages(field.message_type, texts, depth + 1)
                if field.is_repeated:
                    target.extend(draw(st.lists(strategy, max_size=3)))
                else:
                    target.CopyFrom(draw(strategy))
            elif field.is_repeated:
                target.extend(draw(st.lists(_scalar(field, texts), max_size=3)))
            else:
                setattr(message, field.name, draw(_scalar(field, texts)))
        return message

    return build()


def _mangled(serialized: bytes) -> st.SearchStrategy[bytes]:
    """The bytes of a message cut short or with one byte changed: often undecodable."""
    if not serialized:
        return st.binary(min_size=1, max_size=48)
    return st.one_of(
        st.integers(0, len(serialized) - 1).map(lambda cut: serialized[:cut]),
        st.tuples(st.integers(0, len(serialized) - 1), st.integers(0, 255)).map(
            lambda change: (
                serialized[: change[0]] + bytes([change[1]]) + serialized[change[0] + 1 :]
            )
        ),
    )


@cache
def _request_strategy(rpc: Rpc, known: tuple[str, ...]) -> st.SearchStrategy[Message | bytes]:
    generated = messages(rpc.method.input_type, _texts(list(known)))
    # Mostly messages, so most calls reach the servicers' own checks.
    return st.one_of(
        generated,
        generated,
        generated,
        generated,
        generated.flatmap(lambda m: _mangled(m.SerializeToString())),
        st.binary(max_size=64),
        st.just(bytes.fromhex("0a0e0a04fffec3281204696e73743001")),
    )


async def _first_item(
    channel: grpc.aio.Channel, rpc: Rpc, request: Message | bytes, metadata: Any
) -> list[Any]:
    """call(), but a stream that stays open without sending anything is fine (a watch)."""
    if not rpc.method.server_streaming:
        return await call(channel, rpc, request, metadata)
    try:
        return await asyncio.wait_for(call(channel, rpc, request, metadata), FIRST_ITEM_WAIT_S)
    except TimeoutError:
        return []


async def _seed(handles: dict[str, Any], project: TestProject) -> list[str]:
    """A few profiles, so random requests sometimes name real ones; returns ids worth sending."""
    rpc = next(r for r in contract_rpcs() if r.method.name == "TrackEvents")
    events = [custom_event(f"inst-{i}", event_id=f"seed-{i}") for i in range(3)]
    events.append(custom_event(None, custom_id="user-1", event_id="seed-user"))
    request = ingest_pb.TrackEventsRequest(events=events, send_time=stamp(NOW))
    (reply,) = await call(handles["ingest"].channel, rpc, request, project.metadata("sdk"))
    return [r.profile_id for r in reply.results if r.profile_id] + ["inst-0", "inst-1"]


async def test_random_and_malformed_requests_to_every_rpc_get_precise_answers(
    contract_suite: dict[str, Any], project: TestProject, db: Any
) -> None:
    loop = asyncio.get_running_loop()
    known = tuple(await _seed(contract_suite, project))
    rpcs = contract_rpcs()
    credentials = {
        "admin": project.metadata("admin"),
        "sdk": project.metadata("sdk"),
        "read": project.metadata("read"),
        "none": (),
        "bogus": (("authorization", "Bearer pk_nope.nope"),),
    }
    valid_ids = (f"valid-{n}" for n in itertools.count())
    accepted: list[str] = []
    problems: list[str] = []

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        st.sampled_from(rpcs).flatmap(
            lambda rpc: st.tuples(
                st.just(rpc),
                _request_strategy(rpc, known),
                st.sampled_from(["admin"] * 5 + ["sdk", "read", "none", "bogus"]),
            )
        )
    )
    def check(case: tuple[Rpc, Message | bytes, str]) -> None:
        rpc, request, credential = case
        valid_id = None
        if rpc.method.name in BATCHES and isinstance(request, Message):
            valid_id = next(valid_ids)
            event = custom_event("inst-valid", event_id=valid_id)
            event.send_time.CopyFrom(stamp(NOW))
            request.events.append(event)  # type: ignore[attr-defined]
        channel = contract_suite[rpc.host].channel
        try:
            replies = run(_first_item(channel, rpc, request, credentials[credential]))
        except grpc.aio.AioRpcError as error:
            if error.code() in FORBIDDEN:
                problems.append(f"{rpc} {credential}: {error.code().name} {error.details()}")
            # A batch is refused as a whole only for what is wrong with the request itself (its
            # send_time); never for one of its events.
            whole = (error.code(), *violations(error))
            if (
                valid_id is not None
                and rpc.method.name == "TrackEvents"
                and credential in ("admin", "sdk")
                and whole != (grpc.StatusCode.INVALID_ARGUMENT, "TIMESTAMP_INVALID", ["send_time"])
            ):
                problems.append(f"{rpc} {credential}: batch refused, {whole}")
            return
        refused = refused_in(replies)
        if refused is not None:  # a StreamEvents batch malformed as a whole: nothing stored
            if refused[0] in FORBIDDEN:
                problems.append(f"{rpc} {credential}: batch answered {refused}")
            return
        if valid_id is not None and replies:
            result = replies[0].results[-1]
            if result.event_id != valid_id or result.outcome != ingest_pb.EVENT_OUTCOME_ACCEPTED:
                problems.append(f"{rpc}: the valid event was {result.outcome} {result.reason}")
            else:
                accepted.append(valid_id)

    await asyncio.to_thread(check)
    assert problems == []
    await still_serving(contract_suite, project.metadata("admin"))
    stored = await db.fetch(
        "SELECT event_id FROM events WHERE project_id = $1 AND event_id = ANY($2::text[])",
        project.project_id,
        accepted,
    )
    assert accepted != []
    assert sorted(r["event_id"] for r in stored) == sorted(accepted)
