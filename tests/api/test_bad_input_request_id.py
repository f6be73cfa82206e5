"""The `x-request-id` value comes back with every answer (trailing metadata, and the ErrorInfo
metadata `request_id` of every error), and follows a call from one service to the next."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.diagnostics.v1 import diagnostics_service_pb2 as diagnostics_pb
from profiles.diagnostics.v1 import diagnostics_service_pb2_grpc as diagnostics_grpc
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from shared.clock import FrozenClock
from tests.conftest import TestProject
from tests.support.ingest import NOW, custom_event, start_ingest


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    return info


async def test_an_answer_echoes_the_request_id_sent(
    start_services: Any, project: TestProject
) -> None:
    channel = (await start_services("identity"))["identity"].channel
    sent = (*project.metadata("admin"), ("x-request-id", "rid-ok"))
    call = diagnostics_grpc.DiagnosticsServiceStub(channel).Echo(
        diagnostics_pb.EchoRequest(payload=b"x"), metadata=sent, timeout=10
    )
    await call
    assert ("x-request-id", "rid-ok") in tuple(await call.trailing_metadata())


@pytest.mark.parametrize("sent", ["rid-bad", None])
async def test_an_error_carries_the_request_id_in_trailers_and_error_info(
    start_services: Any, project: TestProject, sent: str | None
) -> None:
    channel = (await start_services("identity"))["identity"].channel
    metadata = project.metadata("sdk")
    if sent is not None:
        metadata = (*metadata, ("x-request-id", sent))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity_grpc.IdentityServiceStub(channel).Logout(
            identity_pb.LogoutRequest(installation_id="a\x00b"), metadata=metadata, timeout=10
        )
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    echoed = dict(raised.value.trailing_metadata() or ())["x-request-id"]
    assert echoed
    if sent is not None:
        assert echoed == sent
    assert _error_info(raised.value).metadata["request_id"] == echoed


async def test_an_unauthenticated_call_gets_its_request_id_back_too(start_services: Any) -> None:
    channel = (await start_services("identity"))["identity"].channel
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity_grpc.IdentityServiceStub(channel).Logout(
            identity_pb.LogoutRequest(installation_id="i"),
            metadata=(("x-request-id", "rid-anon"),),
            timeout=10,
        )
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert dict(raised.value.trailing_metadata() or ())["x-request-id"] == "rid-anon"
    assert _error_info(raised.value).metadata["request_id"] == "rid-anon"


async def test_track_events_passes_its_request_id_on_to_identity(
    start_services: Any,
    settings_for_test: Any,
    project: TestProject,
    capsys: pytest.CaptureFixture[str],
) -> None:
    channel = await start_ingest(start_services, settings_for_test, clock=FrozenClock(NOW))
    capsys.readouterr()
    reply = await ingest_grpc.IngestServiceStub(channel).TrackEvents(
        ingest_pb.TrackEventsRequest(events=[custom_event("inst-rid")]),
        metadata=(*project.metadata("sdk"), ("x-request-id", "trace-42")),
        timeout=20,
    )
    assert reply.accepted_count == 1
    logged = capsys.readouterr()
    lines = (logged.out + logged.err).splitlines()
    resolved = [line for line in lines if "ResolveProfiles" in line and "rpc_finished" in line]
    assert resolved != []
    assert all("trace-42" in line for line in resolved)
