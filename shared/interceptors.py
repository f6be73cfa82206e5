"""The one server interceptor: authentication, authorization, the rules every request follows
(shared/contract_rules.py), error mapping, logs and metrics.

It wraps each handler's behaviour rather than chaining several interceptors, so every call pays
for one wrapper. Domain errors become gRPC statuses here and nowhere else, with a
`google.rpc.ErrorInfo` (stable reason) and, for invalid arguments, one `BadRequest` field
violation per field path. Anything unexpected is INTERNAL with a generic message; its traceback
is logged once with the request id. CancelledError is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import grpc
import structlog
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from profiles.client import REQUEST_ID_HEADER, outgoing_request_id
from shared import errors
from shared.auth import Authenticator, authorize, reset_current_caller, set_current_caller
from shared.auth_policy import is_public
from shared.bus import redis_unavailable
from shared.contract_rules import STREAMS_ANSWERED_PER_MESSAGE, check_request, tolerant
from shared.db import DEFAULT_BOUNDS, DatabaseBounds, bound_statements, connection_lost
from shared.metrics import RPC_SECONDS, RPC_TOTAL

log = structlog.get_logger(__name__)

ERROR_DOMAIN = "profiles.dev"
# Longer ids sent by a client are cut: the id is logged with every line of the call and echoed.
MAX_REQUEST_ID_LENGTH = 128
MAX_FIELD_VIOLATIONS = 20
# The status travels in trailing metadata (grpc-message, and again in grpc-status-details-bin),
# which clients cap: 8 KiB by default, 16 KiB at most, beyond which they see RESOURCE_EXHAUSTED
# ("metadata size exceeds hard limit") instead of the error. So an error's message and each
# violation's texts are cut; a request with a thousand bad items names every one of them in
# its message otherwise.
MAX_STATUS_MESSAGE_CHARS = 1024
MAX_VIOLATION_TEXT_CHARS = 256

STATUS_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


class TooManyStreams(errors.ResourceExhausted):
    reason = "TOO_MANY_STREAMS"


class ShuttingDown(errors.Unavailable):
    reason = "SHUTTING_DOWN"


class DatabaseUnavailable(errors.Unavailable):
    reason = "DATABASE_UNAVAILABLE"


class BusUnavailable(errors.Unavailable):
    reason = "BUS_UNAVAILABLE"


def status_code_of(error: errors.DomainError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        code = STATUS_CODES.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


def rich_status(error: errors.DomainError, *, request_id: str = "") -> status_pb2.Status:
    """The google.rpc.Status of a domain error, with ErrorInfo (its metadata holding the call's
    `request_id` when given) and field violations."""
    code = status_code_of(error)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    if request_id:
        info.metadata["request_id"] = request_id
    details = [info]
    if isinstance(error, errors.InvalidArgument) and error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=_cut(v.field, MAX_VIOLATION_TEXT_CHARS),
                        description=_cut(v.description, MAX_VIOLATION_TEXT_CHARS),
                        reason=v.reason,
                    )
                    # The first few paths (see MAX_STATUS_MESSAGE_CHARS).
                    for v in error.violations[:MAX_FIELD_VIOLATIONS]
                ]
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(
        code=code.value[0], message=_cut(error.message, MAX_STATUS_MESSAGE_CHARS), details=packed
    )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_of_error(error: errors.DomainError) -> status_pb2.Status:
    """Same as rich_status; the name used where a per-item status is embedded in a response."""
    return rich_status(error)


OK_STATUS = status_pb2.Status(code=code_pb2.OK)

# Request ids for calls that bring none: a random per-process prefix and a counter, because
# uuid4() costs a system call per call on the hot path (measured with bench/echo.py).
_REQUEST_ID_PREFIX = secrets.token_hex(6)
_request_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}-{next(_request_counter):x}"


class _CallMetrics:
    """Labelled Prometheus children cached per method and code: `.labels()` on every call was
    a measurable share of the interceptor's cost."""

    def __init__(self) -> None:
        self._latency: dict[str, Any] = {}
        self._total: dict[tuple[str, grpc.StatusCode], Any] = {}

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        total = self._total.get((method, code))
        if total is None:
            total = self._total[(method, code)] = RPC_TOTAL.labels(method, code.name)
        latency = self._latency.get(method)
        if latency is None:
            latency = self._latency[method] = RPC_SECONDS.labels(method)
        total.inc()
        latency.observe(seconds)


class StreamGate:
    """Caps long-lived streams apart from unary calls, and ends them at once on shutdown."""

    def __init__(self, max_streams: int) -> None:
        self._slots = asyncio.BoundedSemaphore(max_streams)
        self.draining = asyncio.Event()

    def try_enter(self) -> bool:
        if self._slots.locked():
            return False
        # acquire() on an unlocked semaphore completes without suspending.
        self._slots._value -= 1
        return True

    def leave(self) -> None:
        self._slots.release()


async def _until_drained(items: AsyncIterator[Any], draining: asyncio.Event) -> AsyncIterator[Any]:
    """Yields from `items` until they end or the server starts draining."""
    drained = asyncio.ensure_future(draining.wait())
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending, drained}, return_when=asyncio.FIRST_COMPLETED)
            if pending not in done:
                raise ShuttingDown("the server is shutting down; reconnect to another replica")
            item_future, pending = pending, None
            try:
                item = item_future.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        drained.cancel()
        if pending is not None:
            # Draining, or the client went away while the servicer was producing: the generator
            # must see its cancellation before aclose(), which refuses a running generator.
            # wait() never raises, so a cancellation of our own is not swallowed here.
            pending.cancel()
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved, so asyncio does not log it as lost
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


# How a handler's requests are held to the rules every request follows (shared/contract_rules):
# one request, each message of a client stream, or left to the servicer (it answers each message).
Requests = Literal["one", "each", "servicer"]
ONE: Requests = "one"
EACH: Requests = "each"
SERVICER: Requests = "servicer"


def _held_to_rules(request: Any, requests: Requests) -> Any:
    """The request (or stream of requests) the servicer gets; raises for a broken one."""
    if requests == ONE:
        check_request(request)
        return request
    if requests == EACH:
        return _checked(request)
    return request


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The messages of a client stream, each held to the rules every request follows: a broken
    one ends the call with INVALID_ARGUMENT."""
    async for request in requests:
        check_request(request)
        yield request


def _is_read(method: str) -> bool:
    """True if the contract marks `method` (`/package.Service/Method`) free of side effects."""
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(
            method.lstrip("/").replace("/", ".")
        )
    except KeyError:  # not in the contract (a test's servicer under another name)
        return False
    return bool(
        descriptor.GetOptions().idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    )


def statement_bound(default_s: float, context: grpc.aio.ServicerContext) -> float:
    """The bound on each statement serving a call: the server's default for the method, or the
    time left before the client's deadline when that is later. An earlier client deadline ends
    the call itself (gRPC cancels it, and asyncpg cancels its statement), so the bound never
    needs to be shorter, and a task the call started for work it shares with other calls (a
    group commit) inherits no one caller's short deadline."""
    remaining = context.time_remaining()
    return default_s if remaining is None else max(default_s, remaining)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        streams: StreamGate,
        bounds: DatabaseBounds = DEFAULT_BOUNDS,
    ) -> None:
        self._auth = authenticator
        self._streams = streams
        self._bounds = bounds
        self._metrics = _CallMetrics()
        # Wrapped handlers per method, built once: the registered handler of a method never
        # changes while the server runs.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or is_public(method):
            return handler
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        bound_s = (
            self._bounds.read_statement_s if _is_read(method) else self._bounds.write_statement_s
        )
        # Undecodable bytes reach the wrapper as an Undecodable, so they are refused after
        # authentication, counted and logged like any other refusal (gRPC would answer UNKNOWN).
        deserializer = tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, bound_s, handler.unary_unary, ONE),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, bound_s, handler.stream_unary, EACH),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, bound_s, handler.unary_stream, ONE),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            # A stream answering each message with its own status answers a broken one itself.
            self._wrap_stream(
                method,
                bound_s,
                handler.stream_stream,
                SERVICER if method in STREAMS_ANSWERED_PER_MESSAGE else EACH,
            ),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _enter(
        self, method: str, bound_s: float, context: grpc.aio.ServicerContext
    ) -> object:
        # Every statement of the call, authentication's first; the call runs in a task of its
        # own, so the bound ends with it (as outgoing_request_id does).
        bound_statements(statement_bound(bound_s, context))
        metadata = context.invocation_metadata() or ()
        sent = next((v for k, v in metadata if k == REQUEST_ID_HEADER and isinstance(v, str)), "")
        request_id = sent[:MAX_REQUEST_ID_LENGTH] or new_request_id()
        structlog.contextvars.bind_contextvars(rpc=method, request_id=request_id)
        # Echoed to the caller (an abort adds it to its own trailing metadata, see _fail), and
        # sent on by the client helper with every call this one makes to another service. Each
        # call runs in a task of its own, so the variable ends with the call.
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        outgoing_request_id.set(request_id)
        caller = await self._auth.authenticate(metadata)
        structlog.contextvars.bind_contextvars(project_id=str(caller.project_id))
        authorize(caller, method)
        return set_current_caller(caller)

    def _wrap_unary(
        self, method: str, bound_s: float, behavior: Callable[..., Any], requests: Requests
    ) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            token = None
            try:
                token = await self._enter(method, bound_s, context)
                request = _held_to_rules(request, requests)
                return await behavior(request, context)
            except BaseException as exc:
                code = await self._fail(exc, context)
                raise
            finally:
                self._finish(method, code, started, token, context)

        return wrapper

    def _wrap_stream(
        self, method: str, bound_s: float, behavior: Callable[..., Any], requests: Requests
    ) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            token = None
            entered = False
            try:
                token = await self._enter(method, bound_s, context)
                request = _held_to_rules(request, requests)
                if not self._streams.try_enter():
                    raise TooManyStreams("too many open streams on this server; retry later")
                entered = True
                async for item in _until_drained(
                    behavior(request, context), self._streams.draining
                ):
                    yield item
            except BaseException as exc:
                code = await self._fail(exc, context)
                raise
            finally:
                if entered:
                    self._streams.leave()
                self._finish(method, code, started, token, context)

        return wrapper

    async def _fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        """Turns `exc` into the call's status (by aborting) and returns the code for metrics."""
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        if isinstance(exc, grpc.aio.AbortError):  # a status already set is left alone
            return context.code() or grpc.StatusCode.UNKNOWN
        if not isinstance(exc, errors.DomainError) and connection_lost(exc):
            # Transient: the client helper retries safe RPCs on UNAVAILABLE. Also a statement
            # cut at the call's bound (shared/db.py): a hung server, or one too busy to answer
            # in time; asyncpg cancelled it and its transaction rolls back (a cut COMMIT leaves
            # the outcome unknown, as a connection lost during COMMIT does).
            log.warning("database_unavailable", error=type(exc).__name__)
            exc = DatabaseUnavailable("the database is unreachable for now; retry the call")
        elif not isinstance(exc, errors.DomainError) and redis_unavailable(exc):
            # Redis (the bus, the change streams, the live notices): as transient.
            log.warning("bus_unavailable", error=type(exc).__name__)
            exc = BusUnavailable("the message bus is unreachable for now; retry the call")
        request_id = outgoing_request_id.get() or ""
        echoed = ((REQUEST_ID_HEADER, request_id),) if request_id else ()
        if isinstance(exc, errors.DomainError):
            status = rpc_status.to_status(rich_status(exc, request_id=request_id))
            log.info("rpc_refused", reason=exc.reason, code=status.code.name)
            await context.abort(status.code, status.details, (*status.trailing_metadata, *echoed))
        if isinstance(exc, GeneratorExit):
            return grpc.StatusCode.CANCELLED
        if isinstance(exc, NotImplementedError):  # the generated base servicer's answer
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "this RPC is not implemented yet", echoed
            )
        log.error("rpc_internal_error", exc_info=exc)
        # Like every error, with its ErrorInfo (reason INTERNAL, the request ID to quote), and
        # nothing of the exception: its text may hold what the caller must not see.
        fault = errors.Internal("internal error; the server log has the request id")
        status = rpc_status.to_status(rich_status(fault, request_id=request_id))
        await context.abort(status.code, status.details, (*status.trailing_metadata, *echoed))
        return grpc.StatusCode.INTERNAL  # not reached: abort raises

    def _finish(
        self,
        method: str,
        code: grpc.StatusCode,
        started: float,
        token: object | None,
        context: grpc.aio.ServicerContext,
    ) -> None:
        elapsed = time.perf_counter() - started
        if code is grpc.StatusCode.OK:
            code = context.code() or grpc.StatusCode.OK
        self._metrics.observe(method, code, elapsed)
        log.info("rpc_finished", code=code.name, latency_ms=round(elapsed * 1000, 3))
        if token is not None:
            # A streaming call the client cancelled may be closed by gRPC from another context
            # than the one its caller was set in (its generator finalized elsewhere): nothing to
            # restore there, and the error would only be logged as a task's, never retrieved.
            with contextlib.suppress(ValueError):
                reset_current_caller(token)
        structlog.contextvars.unbind_contextvars("rpc", "request_id", "project_id")
