"""Request bodies that do not decode are refused like any other bad request: UNAUTHENTICATED
without a valid key, else INVALID_ARGUMENT (REQUEST_UNDECODABLE); one log line, no traceback;
counted in the RPC metrics. Every RPC of the contract, through the client helper too."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from profiles.client import open_channel
from tests.conftest import TestProject
from tests.support.bad_input import (
    Rpc,
    call,
    contract_rpcs,
    contract_suite,
    refused_in,
    still_serving,
    violations,
)

__all__ = ["contract_suite"]

TRACK_EVENTS = next(r for r in contract_rpcs() if r.method.name == "TrackEvents")
# The reproduction: an event whose custom attribute map entry is cut short.
UNDECODABLE = bytes.fromhex("0a0e0a04fffec3281204696e73743001")


def _length_delimited(number: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field (payload under 128 bytes... or more, as a varint)."""
    size, length = len(payload), bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return bytes([number << 3 | 2]) + bytes(length) + payload


def _rpc(name: str) -> Rpc:
    return next(r for r in contract_rpcs() if r.method.name == name)


def _refused_count(method: str, code: str) -> float:
    labels = {"method": method, "code": code}
    return REGISTRY.get_sample_value("profiles_rpc_total", labels) or 0.0


async def _channel(start_services: Any, name: str) -> grpc.aio.Channel:
    """One service alone: these bodies never get past its interceptor."""
    return (await start_services(name))[name].channel


async def test_an_undecodable_body_without_a_key_is_unauthenticated(start_services: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(await _channel(start_services, "ingest"), TRACK_EVENTS, UNDECODABLE, ())
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_an_undecodable_body_with_a_key_is_invalid_argument_logged_once_and_counted(
    start_services: Any, project: TestProject, capsys: pytest.CaptureFixture[str]
) -> None:
    channel = await _channel(start_services, "ingest")
    before = _refused_count(TRACK_EVENTS.path, "INVALID_ARGUMENT")
    capsys.readouterr()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(channel, TRACK_EVENTS, UNDECODABLE, project.metadata("sdk"))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value)[0] == "REQUEST_UNDECODABLE"
    assert _refused_count(TRACK_EVENTS.path, "INVALID_ARGUMENT") == before + 1
    logged = capsys.readouterr()
    output = logged.out + logged.err
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if "rpc_refused" in line] != []
    assert len([line for line in output.splitlines() if "REQUEST_UNDECODABLE" in line]) == 1


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(
    start_services: Any, project: TestProject
) -> None:
    logout = _rpc("Logout")
    number = logout.method.input_type.fields_by_name["installation_id"].number
    body = _length_delimited(number, b"\xff\xfe")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(
            await _channel(start_services, "identity"), logout, body, project.metadata("sdk")
        )
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value)[0] == "REQUEST_UNDECODABLE"


async def test_a_filter_nested_past_the_decoders_depth_is_invalid_argument(
    start_services: Any, project: TestProject
) -> None:
    create = _rpc("CreateSegment")
    # FilterNode.group (1) -> FilterGroup.children (2) -> FilterNode ... 60 groups deep.
    node = b""
    for _ in range(60):
        node = _length_delimited(1, _length_delimited(2, node))
    body = _length_delimited(1, b"deep") + _length_delimited(3, node)
    channel = await _channel(start_services, "segments")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(channel, create, body, project.metadata("admin"))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value)[0] == "REQUEST_UNDECODABLE"


async def test_every_rpc_refuses_an_undecodable_body_after_authenticating_it(
    contract_suite: dict[str, Any], project: TestProject
) -> None:
    """Through the client helper, so this also shows every call type carries the key: a call
    that arrived without it would be UNAUTHENTICATED instead."""
    wrong = []
    for rpc in contract_rpcs():
        address = contract_suite[rpc.host].address
        async with open_channel(address, project.keys["admin"]) as channel:
            for key, expected in ((True, "INVALID_ARGUMENT"), (False, "UNAUTHENTICATED")):
                target = channel if key else contract_suite[rpc.host].channel
                try:
                    replies = await call(target, rpc, b"\x0a\x05ab", (), seconds=None)
                except grpc.aio.AioRpcError as error:
                    answer = error.code()
                else:  # StreamEvents answers a malformed batch with a status and goes on
                    refused = refused_in(replies)
                    answer = grpc.StatusCode.OK if refused is None else refused[0]
                if answer.name != expected:
                    wrong.append(f"{rpc} key={key}: {answer.name}")
    assert wrong == []
    await still_serving(contract_suite)
