"""The console's only way to data: the suite's gRPC contract, called with the person's own key.

One channel per (service, key), kept in a small LRU so a busy console does not reconnect per
page, and every status code translated once into errors.py's words. The key lives in the channel
object only: it is never logged, and channels are keyed by its hash.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.client import open_channel, sendable_key
from profiles.identity.v1 import identity_service_pb2_grpc
from profiles.query.v1 import query_service_pb2_grpc
from profiles.segments.v1 import segments_service_pb2_grpc
from services.console.errors import BadInput, Forbidden, NotFound, ServiceDown, SignedOut

STUBS: dict[str, Any] = {
    "query": query_service_pb2_grpc.QueryServiceStub,
    "segments": segments_service_pb2_grpc.SegmentsServiceStub,
    "identity": identity_service_pb2_grpc.IdentityServiceStub,
}
MAX_CHANNELS = 128
DEFAULT_CALL_TIMEOUT_SECONDS = 5.0
# Creating or changing a segment or funnel (or previewing either) evaluates its filter over
# every live profile and stores and announces the members: seconds at a few hundred thousand
# profiles (bench.segments: 2 to 8 s for 33,000 to 66,000 members on 2 cores), where a page's
# read takes milliseconds. Cut at the pages' deadline, the console told a slow service while
# the service went on and created it (a retry then found the name taken).
DEFINITION_WRITE_TIMEOUT_SECONDS = 120.0
_DOWN = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def translate(service: str, error: grpc.aio.AioRpcError) -> Exception:
    """The console's error for a failed call (the one place that knows status codes)."""
    code = error.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SignedOut()
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Forbidden()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(error.details() or "not found")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServiceDown(service, timed_out=True)
    reason, metadata, violations = _error_details(error)
    # A project at its limit of segments or funnels is the person's to fix, not a service down.
    if code in _DOWN and reason != "DEFINITION_LIMIT_REACHED":
        return ServiceDown(service, timed_out=False, detail=code.name)
    fields = tuple(field for field, _ in violations)
    return BadInput(error.details() or code.name, reason, metadata, fields, violations)


def _error_details(
    error: grpc.aio.AioRpcError,
) -> tuple[str, dict[str, str], tuple[tuple[str, str], ...]]:
    """The ErrorInfo's reason and metadata, and the BadRequest's field paths with their
    descriptions, of a failed call."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return "", {}, ()
    if status is None:
        return "", {}, ()
    reason, metadata = "", {}
    fields: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [(v.field, v.description) for v in bad.field_violations]
    return reason, metadata, tuple(fields)


class Backend:
    """Calls the services at `addresses` on behalf of a key."""

    def __init__(
        self, addresses: Mapping[str, str], timeout: float = DEFAULT_CALL_TIMEOUT_SECONDS
    ) -> None:
        self._addresses = dict(addresses)
        self.timeout = timeout
        # (service, key hash) -> the channel and its stub. The stub is kept with its channel: a
        # stub built per call made one multicallable per method of the service every time.
        self._channels: OrderedDict[tuple[str, str], tuple[grpc.aio.Channel, Any]] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def stub(self, service: str, key: str) -> Any:
        """The service's stub calling with `key`; raises SignedOut for a key no header can
        carry (the suite issues none: it is an unknown key, told as such)."""
        if not sendable_key(key):
            raise SignedOut()
        slot = (service, key_hash(key))
        found = self._channels.get(slot)
        if found is None:
            # A long timeout here: the console sets its own, shorter one on every unary call.
            channel = open_channel(self._addresses[service], key, timeout=self.timeout)
            found = self._channels[slot] = (channel, STUBS[service](channel))
            while len(self._channels) > MAX_CHANNELS:
                _, (oldest, _) = self._channels.popitem(last=False)
                # A grace period, so a page still reading through it finishes its call.
                task = asyncio.get_running_loop().create_task(oldest.close(grace=self.timeout))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        else:
            self._channels.move_to_end(slot)
        return found[1]

    async def call(
        self, key: str, service: str, method: str, request: Any, deadline_s: float | None = None
    ) -> Any:
        """One unary call, with the console's deadline (or `deadline_s` seconds); raises
        errors.py's exceptions."""
        deadline = self.timeout if deadline_s is None else deadline_s
        try:
            return await getattr(self.stub(service, key), method)(request, timeout=deadline)
        except grpc.aio.AioRpcError as error:
            raise translate(service, error) from error

    async def stream(
        self, key: str, service: str, method: str, request: Any
    ) -> AsyncGenerator[Any, None]:
        """A server stream (watches, exports), without a deadline; raises errors.py's exceptions.
        The call is cancelled when the caller stops iterating."""
        call = getattr(self.stub(service, key), method)(request)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as error:
            raise translate(service, error) from error
        finally:
            call.cancel()

    async def close(self) -> None:
        channels = [channel for channel, _ in self._channels.values()]
        self._channels.clear()
        for channel in channels:
            await channel.close()
        for task in list(self._closing):
            await task
