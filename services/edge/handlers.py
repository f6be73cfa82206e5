"""The edge's HTTP handlers: read the body within its limits, find the key, translate (pure),
run the steps (backend), answer as the SDK's own service would. One function per dialect shape;
everything they share is in `Gateway`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import structlog
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.edge import json_text
from services.edge.backend import Backend, BackendError
from services.edge.dialects import posthog, segment
from services.edge.limits import (
    BodyTooLarge,
    BodyUnreadable,
    RateLimiter,
    decompress,
    read_limited,
    retry_after,
)
from services.edge.steps import RequestInvalid, Translation

log = structlog.get_logger("edge")

REQUESTS = Counter(
    "profiles_edge_requests_total", "HTTP requests, by dialect and outcome", ["dialect", "outcome"]
)
EVENTS = Counter(
    "profiles_edge_events_total",
    "Contract events sent to ingest, by dialect and ingest's outcome",
    ["dialect", "outcome"],
)
MESSAGES = Counter("profiles_edge_messages_total", "SDK messages read, by dialect", ["dialect"])
UNTRANSLATED = Counter(
    "profiles_edge_translation_failures_total",
    "SDK messages a translator failed on (a bug: each is rejected and listed), by dialect",
    ["dialect"],
)
IGNORED = Counter(
    "profiles_edge_messages_ignored_total",
    "SDK messages dropped on purpose as the SDK's own, recording no user action"
    " (docs/edge.md), by dialect",
    ["dialect"],
)
LATENCY = Histogram(
    "profiles_edge_request_seconds",
    "HTTP request latency in seconds, by dialect",
    ["dialect"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Segment's and PostHog's SDKs put at most a few short parameters in the query string
# (`compression`, `ver`, `_`): a longer one is refused before it is parsed.
MAX_QUERY_BYTES = 4096

# Seconds an SDK is told to wait when the suite cannot take its data now.
UNAVAILABLE_RETRY_AFTER = "2"

# BackendError kinds that refuse the request itself (logged at info); the others ("unavailable")
# are the suite's failures.
CLIENT_FAULTS = frozenset({"unauthenticated", "forbidden", "rate_limited", "invalid"})

Translate = Callable[[datetime, str], Translation]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a dialect answers for each outcome: (status, JSON body)."""

    ok: tuple[int, Any]
    invalid: Callable[[str], tuple[int, Any]]
    unauthenticated: tuple[int, Any]
    # A valid key whose role may not send (a read or admin key): 403 in the dialect's shape.
    forbidden: tuple[int, Any]
    # No key at all, where the dialect words it apart from an unknown one.
    missing_key: tuple[int, Any] | None = None
    # Rate-limited (the edge's limit, or ingest's): a status the dialect's SDKs retry, with
    # Retry-After. 429 for Segment's and Countly's; PostHog's drop a 429 (posthog-js retries
    # only 5xx), so theirs is 503.
    rate_limited: tuple[int, Any] = (429, {"message": "Too many requests"})
    # Ingest or identity unavailable: a 503 (with Retry-After), which every SDK retries.
    unavailable: tuple[int, Any] = (503, {"message": "Try again later"})


# What a key of another role is told, in every dialect.
FORBIDDEN_MESSAGE = "This key may not send events: use the project's SDK key"


def _segment_error(status: int, code: str, message: str) -> tuple[int, Any]:
    """Segment's error body: segment-analytics-python reads `code` and `message` (and logs
    "Unknown error" for a body without them); `success` is what the other SDKs see."""
    return status, {"success": False, "code": code, "message": message}


SEGMENT = Answer(
    ok=(200, {"success": True}),
    invalid=lambda message: _segment_error(400, "invalid_request", message),
    unauthenticated=_segment_error(401, "invalid_write_key", "Invalid write key"),
    forbidden=_segment_error(403, "forbidden", FORBIDDEN_MESSAGE),
    rate_limited=_segment_error(429, "rate_limited", "Too many requests"),
    unavailable=_segment_error(503, "unavailable", "Try again later"),
)


def _posthog_error(status: int, kind: str, code: str, detail: str) -> tuple[int, Any]:
    """PostHog's error body: {"type", "code", "detail"}."""
    return status, {"type": kind, "code": code, "detail": detail}


POSTHOG = Answer(
    ok=(200, {"status": 1}),
    invalid=lambda message: _posthog_error(400, "validation_error", "invalid_payload", message),
    unauthenticated=_posthog_error(
        401, "authentication_error", "invalid_api_key", "Project API key invalid."
    ),
    forbidden=_posthog_error(403, "authentication_error", "permission_denied", FORBIDDEN_MESSAGE),
    missing_key=_posthog_error(
        401,
        "authentication_error",
        "missing_api_key",
        "No project API key: send it as api_key, or as properties.token.",
    ),
    rate_limited=_posthog_error(503, "throttled_error", "rate_limited", "Too many requests"),
    unavailable=_posthog_error(503, "server_error", "unavailable", "Try again later"),
)


# A body this large once decoded is translated on a worker thread. Translation is pure Python at
# tens of microseconds a message: on the event loop, a 5 MB PostHog batch of 150,000 small events
# held every other request of the edge, health checks included, for 7 s (and for 43 s with a
# good key, its steps built as well). Smaller bodies stay on the loop, where the thread's hop
# would cost more than their translation.
OFF_LOOP_BODY_BYTES = 64 * 1024


class Gateway:
    """What every handler shares: the backend, the rate limiter, the metrics."""

    def __init__(self, backend: Backend, limiter: RateLimiter) -> None:
        self.backend = backend
        self.limiter = limiter

    async def body(self, request: Request, limit: int, encoding: str = "") -> bytes:
        """The body, refused over `limit` bytes as received, decoded by its Content-Encoding (or
        `encoding`) within MAX_DECOMPRESSED_BYTES: how every route reads a body."""
        raw = await read_limited(request.stream(), request.headers.get("content-length"), limit)
        data = decompress(raw, encoding or request.headers.get("content-encoding", ""))
        request.state.decoded_bytes = len(data)  # for run's choice of where to translate
        return data

    async def run(
        self,
        request: Request,
        dialect: str,
        answer: Answer,
        read: Callable[[], Any],
    ) -> Response:
        """Reads (await read() -> (key, translate)), limits, translates, executes, answers;
        one metric per request, one log line for every refusal (path only: never the query
        string, a key or an IP)."""
        started = time.perf_counter()
        # When the request arrived, for the skew correction of its events (Backend.execute).
        received = time.monotonic()
        outcome = "ok"
        try:
            try:
                key, translate = await read()
            except UNREADABLE as exc:
                outcome, status, body = read_refusal(dialect, answer, exc)
                return self.refuse(request, dialect, outcome, status, body)
            if not key:
                outcome = "unauthenticated"
                refusal = answer.missing_key or answer.unauthenticated
                return self.refuse(request, dialect, outcome, *refusal)
            wait = self.limiter.acquire(key, time.monotonic())
            if wait:
                outcome = "rate_limited"
                return self.refuse(
                    request,
                    dialect,
                    outcome,
                    *answer.rate_limited,
                    {"Retry-After": retry_after(wait)},
                )
            client_ip = request.client.host if request.client else ""
            now = datetime.now(UTC)
            large = getattr(request.state, "decoded_bytes", 0) >= OFF_LOOP_BODY_BYTES
            try:
                if large:
                    # Judged first, unless it sent lately: an unknown key must not buy seconds
                    # of translation (a random key per request passes the rate limiter).
                    await self.backend.judge_key(key)
                    translation = await asyncio.to_thread(translate, now, client_ip)
                else:
                    translation = translate(now, client_ip)
            except BackendError as exc:
                outcome, response = self._backend_refusal(request, dialect, answer, exc)
                return response
            except RequestInvalid as exc:  # the body as a whole, found while translating
                outcome = "invalid"
                return self.refuse(request, dialect, outcome, *answer.invalid(exc.message))
            MESSAGES.labels(dialect).inc(translation.message_count)
            IGNORED.labels(dialect).inc(translation.ignored)
            if translation.failures:
                _log_failures(request, dialect, translation.failures)
            try:
                result = await self.backend.execute(translation, key, dialect, received)
            except BackendError as exc:
                outcome, response = self._backend_refusal(request, dialect, answer, exc)
                return response
            EVENTS.labels(dialect, "accepted").inc(result.accepted)
            EVENTS.labels(dialect, "duplicate").inc(result.duplicate)
            EVENTS.labels(dialect, "rejected").inc(result.rejected)
            status, body = answer.ok
            return JSONResponse(body, status)
        finally:
            REQUESTS.labels(dialect, outcome).inc()
            LATENCY.labels(dialect).observe(time.perf_counter() - started)

    def _backend_refusal(
        self, request: Request, dialect: str, answer: Answer, exc: BackendError
    ) -> tuple[str, Response]:
        """The outcome and answer for a call that failed as a whole."""
        # A refusal of the request (its key, its rate, its content) is the client's business;
        # anything else is the suite failing the SDK (an outage of ingest or identity): what an
        # operator must see, a warning.
        report = log.info if exc.kind in CLIENT_FAULTS else log.warning
        report("edge_backend_failed", dialect=dialect, kind=exc.kind, code=exc.detail)
        outcome = exc.kind
        if exc.kind == "unauthenticated":
            return outcome, self.refuse(request, dialect, outcome, *answer.unauthenticated)
        if exc.kind == "forbidden":
            return outcome, self.refuse(request, dialect, outcome, *answer.forbidden)
        if exc.kind == "rate_limited":
            headers = {"Retry-After": "1"}
            return outcome, self.refuse(request, dialect, outcome, *answer.rate_limited, headers)
        if exc.kind == "invalid":
            return outcome, self.refuse(request, dialect, outcome, *answer.invalid(exc.detail))
        headers = {"Retry-After": UNAVAILABLE_RETRY_AFTER}
        unavailable = self.refuse(request, dialect, "unavailable", *answer.unavailable, headers)
        return "unavailable", unavailable

    @staticmethod
    def refuse(
        request: Request,
        dialect: str,
        outcome: str,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
    ) -> Response:
        log.info(
            "edge_request_refused",
            dialect=dialect,
            path=request.url.path,
            status=status,
            outcome=outcome,
        )
        return JSONResponse(body, status, headers=headers)


def _short_query(request: Request) -> None:
    """Refuses a query string over MAX_QUERY_BYTES (Segment and PostHog; Countly's GET carries
    its whole request there and has its own limit)."""
    if len(request.scope.get("query_string", b"")) > MAX_QUERY_BYTES:
        raise RequestInvalid("The query string is too long")


# What reading a request raises when the request is at fault: over a size limit, an unreadable
# body (UnicodeDecodeError and json's JSONDecodeError are ValueErrors), not what the dialect
# takes.
UNREADABLE = (BodyTooLarge, BodyUnreadable, RequestInvalid, ValueError)


def read_refusal(dialect: str, answer: Answer, exc: Exception) -> tuple[str, int, Any]:
    """The outcome, status and body of a request refused while it was read (`exc`, one of
    UNREADABLE): over a size limit, 413 for PostHog (as its capture answers) and the dialect's
    400 for the others; otherwise the dialect's 400 with `unreadable_message`."""
    if isinstance(exc, BodyTooLarge):
        status, body = answer.invalid(f"Request too large: {exc}")
        return "too_large", 413 if dialect == posthog.DIALECT else status, body
    return "invalid", *answer.invalid(unreadable_message(exc))


def unreadable_message(exc: Exception) -> str:
    """What is wrong with an unreadable request, in the edge's own words and the client's
    terms: never Python's text ("'utf-8' codec can't decode byte 0xff..."), which says how the
    edge is written and changes with the Python version."""
    if isinstance(exc, RequestInvalid):
        return exc.message
    if isinstance(exc, BodyUnreadable | json_text.TooDeep):
        return str(exc)  # the edge's own words
    if isinstance(exc, UnicodeDecodeError):
        return f"The body is not valid UTF-8 (byte {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"The body is not valid JSON (line {exc.lineno}, column {exc.colno})"
    return "The body is unreadable"


def _log_failures(request: Request, dialect: str, failures: Sequence[Exception]) -> None:
    """Counts the messages a translator failed on and logs the first failure's traceback (the
    others are of the same request, and a hostile batch could hold thousands)."""
    UNTRANSLATED.labels(dialect).inc(len(failures))
    first = failures[0]
    log.error(
        "edge_message_untranslated",
        dialect=dialect,
        path=request.url.path,
        count=len(failures),
        error=type(first).__name__,
        exc_info=first,
    )


def _json_object(data: bytes) -> Any:
    return json_text.loads(data)


# --- Segment ---------------------------------------------------------------------------------


def _basic_user(header: str) -> str:
    """The user name of an HTTP Basic Authorization header (Segment's write key), or ""."""
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "basic" or not credentials:
        return ""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0]


def segment_handler(gateway: Gateway, single_type: str) -> Callable[[Request], Any]:
    """The handler of /v1/batch (`single_type` "") or of a single-message endpoint."""
    limit = segment.MAX_BATCH_BYTES if not single_type else segment.MAX_MESSAGE_BYTES

    async def handle(request: Request) -> Response:
        async def read() -> tuple[str, Translate]:
            _short_query(request)
            data = await gateway.body(request, limit)
            body = _json_object(data)
            if not isinstance(body, dict):
                raise RequestInvalid("The body is not a JSON object")
            if not single_type:
                segment.batch_of(body)  # a body with no batch list is refused before the key
            key = _basic_user(request.headers.get("authorization", ""))
            if not key and isinstance(body.get("writeKey"), str):
                key = body["writeKey"]

            def translate(now: datetime, ip: str) -> Translation:
                return segment.translate_batch(body, now, ip, single_type, len(data))

            return key, translate

        return await gateway.run(request, segment.DIALECT, SEGMENT, read)

    return handle


# --- PostHog ---------------------------------------------------------------------------------


def _posthog_body(data: bytes, content_type: str) -> Any:
    """posthog-js posts JSON, or a form whose `data` field holds base64 JSON; others JSON."""
    if content_type.startswith("application/x-www-form-urlencoded") or data.startswith(b"data="):
        form = data.decode()
        try:
            fields = parse_qs(form, keep_blank_values=True, max_num_fields=20)
        except ValueError as exc:  # over max_num_fields
            raise RequestInvalid("The form has too many fields") from exc
        value = (fields.get("data") or [""])[0]
        try:
            data = base64.b64decode(value + "=" * (-len(value) % 4))
        except ValueError as exc:  # binascii.Error, or a character that is not ASCII
            raise RequestInvalid("The data field is not base64") from exc
    return json_text.loads(data)


def posthog_handler(gateway: Gateway) -> Callable[[Request], Any]:
    """The handler of /batch/, /capture/, /e/ and /i/v0/e/."""

    async def handle(request: Request) -> Response:
        async def read() -> tuple[str, Translate]:
            _short_query(request)
            compression = request.query_params.get("compression", "")
            encoding = request.headers.get("content-encoding", "")
            if not encoding and compression in ("gzip", "gzip-js"):
                encoding = "gzip"
            data = await gateway.body(request, posthog.MAX_REQUEST_BYTES, encoding)
            body = _posthog_body(data, request.headers.get("content-type", ""))
            if not isinstance(body, dict | list):
                raise RequestInvalid("The body is not a JSON object or array")
            posthog.messages_of(body)  # a body holding no events is refused before the key
            key = posthog.api_key_of(body)

            sent = posthog.query_send_time(request.query_params.get("_", ""))

            def translate(now: datetime, ip: str) -> Translation:
                return posthog.translate(body, now, ip, sent)

            return key, translate

        return await gateway.run(request, posthog.DIALECT, POSTHOG, read)

    return handle


def posthog_push_handler(gateway: Gateway) -> Callable[[Request], Any]:
    """The handler of /api/push_subscriptions/: POST registers a device token, DELETE
    unregisters it (PostHog's mobile SDKs; see posthog.translate_push_subscription)."""

    async def handle(request: Request) -> Response:
        async def read() -> tuple[str, Translate]:
            _short_query(request)
            data = await gateway.body(request, posthog.MAX_REQUEST_BYTES)
            body = json_text.loads(data)
            subscription = posthog.push_subscription_of(body)
            key = posthog.top_level_key(body)
            register = request.method == "POST"

            def translate(now: datetime, ip: str) -> Translation:
                return posthog.translate_push_subscription(subscription, now, register=register)

            return key, translate

        return await gateway.run(request, posthog.DIALECT, POSTHOG, read)

    return handle
