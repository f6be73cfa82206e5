"""A string the database cannot store (one holding U+0000) is invalid everywhere: every string
field of every request message, found from the descriptors, answers INVALID_ARGUMENT with its
path; in a batch answered per item, only the item holding it is rejected. So does a Timestamp or
Duration outside its range, in every time field of every request message."""

from __future__ import annotations

from typing import Any

import grpc

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from shared.contract_rules import ANSWERED_PER_ITEM
from tests.conftest import TestProject
from tests.support.bad_input import (
    NOW,
    Rpc,
    call,
    contract_rpcs,
    contract_suite,
    put_bad_time,
    put_nul,
    refused_in,
    still_serving,
    string_paths,
    time_paths,
    time_reason,
    violations,
)
from tests.support.ingest import custom_event, stamp

__all__ = ["contract_suite"]


def _whole_request_cases() -> list[tuple[Rpc, str, Any, str]]:
    """(RPC, field path, request, expected reason) for every string and time field outside the
    items answered one by one."""
    cases = []
    for rpc in contract_rpcs():
        per_item = ANSWERED_PER_ITEM.get(rpc.method.input_type.full_name)
        for steps in string_paths(rpc.method.input_type):
            if steps[0][0].name != per_item:
                request = rpc.request_class()
                cases.append((rpc, put_nul(request, steps), request, "STRING_UNSTORABLE"))
        for steps in time_paths(rpc.method.input_type):
            if steps[0][0].name != per_item:
                request = rpc.request_class()
                cases.append((rpc, put_bad_time(request, steps), request, time_reason(steps)))
    return cases


def test_every_rpc_has_string_fields_to_check() -> None:
    """The generator finds the fields the issue named, so a silent empty list cannot pass."""
    paths = {(str(rpc), path) for rpc, path, _, _ in _whole_request_cases()}
    assert ("/profiles.identity.v1.IdentityService/Logout", "installation_id") in paths
    assert ("/profiles.identity.v1.IdentityService/ResolveProfiles", "keys[0].custom_id") in paths
    assert ("/profiles.query.v1.QueryService/ListEvents", "session_id") in paths
    assert ("/profiles.query.v1.QueryService/ListRejectedEvents", "reasons[0]") in paths
    assert ("/profiles.ingest.v1.IngestService/StreamEvents", "batch_id") in paths
    assert ("/profiles.query.v1.QueryService/ListSessions", "start_time") in paths
    assert ("/profiles.ingest.v1.IngestService/TrackEvents", "send_time") in paths


async def test_a_nul_or_a_malformed_time_in_any_request_is_invalid_argument_with_its_path(
    contract_suite: dict[str, Any], project: TestProject
) -> None:
    wrong = []
    for rpc, path, request, expected in _whole_request_cases():
        channel = contract_suite[rpc.host].channel
        try:
            replies = await call(channel, rpc, request, project.metadata("admin"))
        except grpc.aio.AioRpcError as error:
            answer = (error.code(), *violations(error))
        else:
            answer = refused_in(replies) or (grpc.StatusCode.OK, "", [])
        if answer != (grpc.StatusCode.INVALID_ARGUMENT, expected, [path]):
            wrong.append(f"{rpc} {path}: {answer}")
    assert wrong == []
    await still_serving(contract_suite)


def _event_with_nul(steps: Any, installation_id: str) -> tuple[ingest_pb.Event, str]:
    event = custom_event(installation_id)
    path = put_nul(event, steps)
    return event, path


async def _batch_keeps_its_valid_events(
    handles: dict[str, Any], project: TestProject, db: Any, rpc_name: str
) -> None:
    rpc = next(r for r in contract_rpcs() if r.method.name == rpc_name)
    events = [custom_event("inst-ok", event_id=f"{rpc_name}-valid-1")]
    paths = []
    for steps in string_paths(ingest_pb.Event.DESCRIPTOR):
        # An installation per RPC: the same refused event sent again is one rejected row.
        event, path = _event_with_nul(steps, f"inst-nul-{rpc_name}")
        events.append(event)
        paths.append(path)
    events.append(custom_event("inst-ok", event_id=f"{rpc_name}-valid-2"))
    request = rpc.request_class(events=events, send_time=stamp(NOW))
    (response,) = await call(handles["ingest"].channel, rpc, request, project.metadata("admin"))
    outcomes = [r.outcome for r in response.results]
    assert outcomes[0] == outcomes[-1] == ingest_pb.EVENT_OUTCOME_ACCEPTED, rpc_name
    accepted = [
        p
        for p, o in zip(paths, outcomes[1:-1], strict=True)
        if o != ingest_pb.EVENT_OUTCOME_REJECTED
    ]
    assert accepted == [], rpc_name
    stored = await db.fetchval(
        "SELECT count(*) FROM events WHERE project_id = $1 AND event_id LIKE $2",
        project.project_id,
        f"{rpc_name}-valid-%",
    )
    assert stored == 2, rpc_name


async def test_a_nul_in_any_string_of_an_item_rejects_that_item_alone(
    contract_suite: dict[str, Any], project: TestProject, db: Any
) -> None:
    """Every string of an event (TrackEvents, ImportEvents, StreamEvents) and of an imported
    token: the item is rejected, the others of its batch are kept, and the rejection stored."""
    for rpc_name in ("TrackEvents", "ImportEvents", "StreamEvents"):
        await _batch_keeps_its_valid_events(contract_suite, project, db, rpc_name)
    rejected = await db.fetchval(
        "SELECT count(*) FROM rejected_events WHERE project_id = $1", project.project_id
    )
    assert rejected == 3 * len(string_paths(ingest_pb.Event.DESCRIPTOR))
    rpc = next(r for r in contract_rpcs() if r.method.name == "ImportTokens")
    tokens = [ingest_pb.ImportedToken(platform=types_pb2.PLATFORM_IOS, push_token="token-ok")]
    for steps in string_paths(ingest_pb.ImportedToken.DESCRIPTOR):
        token = ingest_pb.ImportedToken(platform=types_pb2.PLATFORM_IOS, push_token="token-2")
        put_nul(token, steps)
        tokens.append(token)
    (response,) = await call(
        contract_suite["ingest"].channel,
        rpc,
        ingest_pb.ImportTokensRequest(tokens=tokens),
        project.metadata("admin"),
    )
    outcomes = [r.outcome for r in response.results]
    assert outcomes[0] == ingest_pb.TOKEN_OUTCOME_IMPORTED
    assert set(outcomes[1:]) == {ingest_pb.TOKEN_OUTCOME_REJECTED}


async def test_a_thousand_bad_keys_are_refused_naming_the_first_twenty(
    start_services: Any, project: TestProject
) -> None:
    """The refusal fits in the trailing metadata a client accepts (8 KiB by default)."""
    rpc = next(r for r in contract_rpcs() if r.method.name == "ResolveProfiles")
    request = rpc.request_class()
    for i in range(1000):
        request.keys.add(installation_id=f"installation-{i:04d}-\x00")  # type: ignore[attr-defined]
    channel = (await start_services("identity"))["identity"].channel
    try:
        await call(channel, rpc, request, project.metadata("admin"))
    except grpc.aio.AioRpcError as error:
        answer = (error.code(), *violations(error))
    assert answer[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "STRING_UNSTORABLE")
    assert len(answer[2]) == 20


async def test_a_thousand_bad_items_of_one_list_are_refused_with_a_short_message(
    start_services: Any, project: TestProject
) -> None:
    """Each bad item of a list is a violation named in the error's message: a thousand made a
    status over the 16 KiB of trailing metadata a client takes at most, so it saw
    RESOURCE_EXHAUSTED ("metadata size exceeds hard limit"), no reason and no field."""
    rpcs = {r.method.name: r for r in contract_rpcs() if r.host == "query"}
    rejected = rpcs["ListRejectedEvents"].request_class()
    rejected.reasons.extend([""] * 1000)  # type: ignore[attr-defined]
    events = rpcs["ListEvents"].request_class()
    events.profile_id = "00000000-0000-0000-0000-000000000001"  # type: ignore[attr-defined]
    events.event_names.extend([""] * 1000)  # type: ignore[attr-defined]
    rows = rpcs["GetProfileRows"].request_class()
    rows.profile_ids.extend([f"nope-{i}" for i in range(500)])  # type: ignore[attr-defined]
    channel = (await start_services("query"))["query"].channel
    for name, request in (
        ("ListRejectedEvents", rejected),
        ("ListEvents", events),
        ("GetProfileRows", rows),
    ):
        answer: tuple[Any, ...] = ()
        try:
            await call(channel, rpcs[name], request, project.metadata("admin"))
        except grpc.aio.AioRpcError as error:
            answer = (error.code(), *violations(error), len(error.details() or ""))
        assert answer[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID"), name
        assert len(answer[2]) == 20, name
        assert answer[3] <= 1024, name
