"""Opens a channel to a Profiles service, for internal backends and the services themselves.

    async with open_channel("127.0.0.1:50054", api_key) as channel:
        stub = query_service_pb2_grpc.QueryServiceStub(channel)
        reply = await stub.GetProfile(request)

Every call carries the key (and, inside a service, the `x-request-id` of the call it serves);
unary calls get a deadline (10 s unless the call sets its own),
streaming calls none (they are long-lived); and the channel's
service config retries idempotent calls (those marked NO_SIDE_EFFECTS or IDEMPOTENT in the
contract) on UNAVAILABLE with exponential backoff, so a restarting replica costs a retry, not an
error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
from google.protobuf import descriptor_pb2

from profiles.diagnostics.v1 import diagnostics_service_pb2
from profiles.identity.v1 import identity_service_pb2
from profiles.ingest.v1 import ingest_service_pb2
from profiles.query.v1 import query_service_pb2
from profiles.segments.v1 import segments_service_pb2

DEFAULT_TIMEOUT_SECONDS = 10.0
PROJECT_HEADER = "x-profiles-project"
REQUEST_ID_HEADER = "x-request-id"

# The request id every call made in this context sends, unless the call brings its own: a
# service's server interceptor sets it to the id of the call it serves, so one id follows a call
# through every service it reaches (TrackEvents through ingest and identity) in the logs.
outgoing_request_id: ContextVar[str | None] = ContextVar("profiles_request_id", default=None)

_FILES = (
    ingest_service_pb2,
    identity_service_pb2,
    segments_service_pb2,
    query_service_pb2,
    diagnostics_service_pb2,
)
_RETRIABLE = {
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
}


def idempotent_methods() -> list[tuple[str, str]]:
    """(service full name, method) of every RPC the contract marks safe to retry."""
    found = []
    for module in _FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                level = method.GetOptions().idempotency_level
                if level in _RETRIABLE:
                    found.append((service.full_name, method.name))
    return found


def service_config(methods: Iterable[tuple[str, str]] | None = None) -> str:
    names = [{"service": s, "method": m} for s, m in (methods or idempotent_methods())]
    return json.dumps(
        {
            # Every address the target resolves to gets calls in turn (a DNS name with one
            # record per replica, or `ipv4:host:port,host:port`), and a replica that went
            # away is skipped until it answers again; one address behaves as before.
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": names,
                    "retryPolicy": {
                        "maxAttempts": 4,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


class _Defaults:
    """Adds the credential (and the request id being served, if any) to every call, and a
    deadline to unary calls that set none."""

    def __init__(self, metadata: Sequence[tuple[str, str]], timeout: float) -> None:
        self._metadata = tuple(metadata)
        self._timeout = timeout

    def details(self, details: grpc.aio.ClientCallDetails, unary: bool) -> Any:
        metadata = grpc.aio.Metadata(*self._metadata)
        for key, value in details.metadata or ():
            metadata.add(key, value)
        request_id = outgoing_request_id.get()
        if request_id is not None and REQUEST_ID_HEADER not in metadata:
            metadata.add(REQUEST_ID_HEADER, request_id)
        timeout = details.timeout
        if timeout is None and unary:
            timeout = self._timeout
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor object under the first call type it implements only, so an
# object implementing all four would serve unary calls alone: one object per call type.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, defaults: _Defaults) -> None:
        self._defaults = defaults

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._defaults.details(details, True), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, defaults: _Defaults) -> None:
        self._defaults = defaults

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._defaults.details(details, True), requests)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    """Streams are long-lived (watches, exports): they carry the key but no default deadline."""

    def __init__(self, defaults: _Defaults) -> None:
        self._defaults = defaults

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._defaults.details(details, False), request)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    """Streams are long-lived (StreamEvents): they carry the key but no default deadline."""

    def __init__(self, defaults: _Defaults) -> None:
        self._defaults = defaults

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._defaults.details(details, False), requests)


# The longest key sent on: the suite's keys are 64 characters (`prf_`, a 16-digit key ID, `_`, a
# 43-character secret). A longer one is no key it issued; sent on, a key of about 8 KB passes
# gRPC's metadata limit and comes back RESOURCE_EXHAUSTED, which a client reads as "slow down".
MAX_SENDABLE_KEY_LENGTH = 256


def sendable_key(api_key: str) -> bool:
    """Whether a gRPC header can carry the key: printable ASCII only (the metadata value rule),
    at most MAX_SENDABLE_KEY_LENGTH characters. No key the suite issues is anything else, so a
    key that is is unknown; a call with it would fail before reaching a server's key check,
    with no status saying so."""
    return len(api_key) <= MAX_SENDABLE_KEY_LENGTH and api_key.isascii() and api_key.isprintable()


def open_channel(
    address: str,
    api_key: str,
    *,
    project_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    secure: bool = False,
) -> grpc.aio.Channel:
    """A channel to `address` whose calls carry `api_key` (an API key, or the internal service
    credential together with `project_id`) and a default deadline of `timeout` seconds."""
    metadata = [("authorization", f"Bearer {api_key}")]
    if project_id is not None:
        metadata.append((PROJECT_HEADER, project_id))
    options = [
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ]
    defaults = _Defaults(metadata, timeout)
    interceptors: list[grpc.aio.ClientInterceptor] = [
        _UnaryUnary(defaults),
        _StreamUnary(defaults),
        _UnaryStream(defaults),
        _StreamStream(defaults),
    ]
    if secure:
        return grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


__all__ = ["idempotent_methods", "open_channel", "outgoing_request_id", "service_config"]
