"""The edge's client layer: runs a Translation's steps against ingest and identity.

One channel per backend, shared by every request; each call carries the caller's SDK key as its
credential (a channel per key would open a connection per key). The channel's service config
(profiles.client.service_config) retries idempotent calls (TrackEvents) on UNAVAILABLE with
backoff; what still fails is raised as a BackendError that the handlers answer with the status
the SDK retries on. Nothing is acknowledged before ingest acknowledged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from profiles.client import sendable_key, service_config
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.edge.steps import Identify, Logout, Reject, Step, Track, Translation

MAX_EVENTS_PER_CALL = 1000
MAX_BYTES_PER_CALL = 3 * 1024 * 1024  # under ingest's 4 MiB, with room for the envelope
CALL_TIMEOUT_SECONDS = 10.0
HEALTH_TIMEOUT_SECONDS = 2.0


LOGIN_CONCURRENCY = 16


def _shares_key(login: Identify, logins: Sequence[Identify]) -> bool:
    return any(
        login.installation_id == other.installation_id or login.custom_id == other.custom_id
        for other in logins
    )


class BackendError(Exception):
    """A call failed as a whole. `kind` says what the SDK should be told: "unauthenticated"
    (401), "forbidden" (403), "rate_limited" (429), "unavailable" (503 + Retry-After), or
    "invalid" (400)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


_KINDS = {
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "forbidden",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limited",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "unavailable",
    grpc.StatusCode.ABORTED: "unavailable",
    grpc.StatusCode.CANCELLED: "unavailable",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
}


def _refused_field(exc: grpc.aio.AioRpcError) -> str:
    """The field a refusal names (its ErrorInfo's `field`), "" when it names none."""
    status = rpc_status.from_call(exc)
    for detail in () if status is None else status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.metadata.get("field", "")
    return ""


def _error(exc: grpc.aio.AioRpcError) -> BackendError:
    # Anything unexpected (INTERNAL, UNKNOWN) is worth a retry too: 503 keeps the SDK's data.
    return BackendError(_KINDS.get(exc.code(), "unavailable"), exc.code().name)


@dataclass(slots=True)
class Outcome:
    """What the steps of one request did, for metrics and tests."""

    api_key: str = field(default="", repr=False)
    # When the edge received the request (time.monotonic()).
    received: float = field(default=0.0, repr=False)
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    logins: int = 0
    # Calls made to ingest and identity for this request.
    calls: int = 0


def _channel(address: str) -> grpc.aio.Channel:
    options = [
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", 8 * 1024 * 1024),
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    return grpc.aio.insecure_channel(address, options=options)


# How deep a rejected message is kept as structure. Each JSON level is three levels of a
# Struct, and protobuf refuses a message nested past 100 levels (ingest would refuse the whole
# call, the good events with it): deeper parts are kept as their JSON text, cut.
KEPT_MESSAGE_DEPTH = 12
KEPT_TEXT_CHARS = 1_000


def _bounded(value: Any, depth: int) -> Any:
    """`value` with every object or list below `depth` levels replaced by its JSON text (cut to
    KEPT_TEXT_CHARS), and NaN or an infinity (which no JSON store holds) by its name."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
        return str(value)  # a Struct number is a double: the digits stay exact as text
    if not isinstance(value, dict | list):
        return value
    if depth <= 0:
        try:
            text = json.dumps(value, separators=(",", ":"), default=str)
        except (ValueError, RecursionError):
            text = "(unreadable)"
        return text[:KEPT_TEXT_CHARS]
    if isinstance(value, dict):
        return {str(key): _bounded(item, depth - 1) for key, item in value.items()}
    return [_bounded(item, depth - 1) for item in value]


def untranslated_event(reject: Reject, dialect: str) -> ingest_pb.Event:
    """The event that carries an untranslatable message to ingest's rejected events."""
    event = ingest_pb.Event(event_id=reject.event_id[:64])
    if reject.installation_id:
        event.installation_id = reject.installation_id[:128]
    elif reject.custom_id:
        event.custom_id = reject.custom_id[:512]
    event.untranslated.reason = reject.reason
    event.untranslated.explanation = reject.explanation[:300]
    event.untranslated.dialect = dialect
    message = struct_pb2.Struct()
    try:
        message.update(_bounded(dict(reject.message), KEPT_MESSAGE_DEPTH))
    except (ValueError, TypeError):
        message.update({"unreadable": True})
    if message.ByteSize() > 24 * 1024:
        # The whole message would make the event too large to keep: its top-level scalars stay.
        message = struct_pb2.Struct()
        message.update(
            {k: v for k, v in reject.message.items() if isinstance(v, str | int | float | bool)}
        )
    event.untranslated.message.CopyFrom(message)
    return event


def _advance_send_times(events: Sequence[ingest_pb.Event], elapsed: float) -> None:
    """Advances the SDK's send time of each event by the seconds `elapsed` since the edge
    received the request. Ingest corrects clock skew with its own arrival time (its receive
    time - send time): the time the edge spent before this call (an Identify, an earlier
    batch) would otherwise be added to every event, and shift a login's events after those
    the SDK sent a moment later. An event without send time (Countly's) is left alone. Each
    event is sent once per request, so each is advanced once."""
    nanos = max(0, round(elapsed * 1e9))
    if not nanos:
        return
    for event in events:
        if event.HasField("send_time"):
            advanced = event.send_time.ToNanoseconds() + nanos
            # A send time at the end of Timestamp's range stays as sent (ingest judges it).
            with contextlib.suppress(ValueError):
                event.send_time.FromNanoseconds(advanced)


def _batches(events: Sequence[ingest_pb.Event]) -> list[list[ingest_pb.Event]]:
    """Events in calls of at most 1,000 events and about 3 MiB, in order."""
    batches: list[list[ingest_pb.Event]] = []
    current: list[ingest_pb.Event] = []
    size = 0
    for event in events:
        event_size = event.ByteSize() + 8
        if current and (
            len(current) >= MAX_EVENTS_PER_CALL or size + event_size > MAX_BYTES_PER_CALL
        ):
            batches.append(current)
            current, size = [], 0
        current.append(event)
        size += event_size
    if current:
        batches.append(current)
    return batches


# Event IDs the edge derives for what it adds to a request (services/edge/build.py).
_SKIPPABLE_PREFIXES = ("session:", "details:")
_ACKNOWLEDGED = (ingest_pb.EVENT_OUTCOME_ACCEPTED, ingest_pb.EVENT_OUTCOME_DUPLICATE)


class AcknowledgedEvents:
    """The edge-added events (PostHog session starts, installation details) ingest recently
    acknowledged, by key, installation and event ID, so that they are not sent again with every
    request of the same session: a batch of 100 messages would otherwise carry up to 200 events
    more, each answered DUPLICATE. Only a shortcut: a forgotten entry (restart, eviction,
    another replica) costs one resend, which ingest answers DUPLICATE; at most `capacity`
    entries, least recently used forgotten first."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    def needed(self, api_key: str, events: Sequence[ingest_pb.Event]) -> list[ingest_pb.Event]:
        kept = []
        for event in events:
            if event.event_id.startswith(_SKIPPABLE_PREFIXES):
                entry = (api_key, event.installation_id, event.event_id)
                if entry in self._seen:
                    self._seen.move_to_end(entry)
                    continue
            kept.append(event)
        return kept

    def record(
        self,
        api_key: str,
        events: Sequence[ingest_pb.Event],
        results: Sequence[ingest_pb.EventResult],
    ) -> None:
        for event, result in zip(events, results, strict=False):
            if result.outcome in _ACKNOWLEDGED and event.event_id.startswith(_SKIPPABLE_PREFIXES):
                self._seen[(api_key, event.installation_id, event.event_id)] = None
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)


# How long a key that sent (or was judged good) is taken as good by judge_key, and how many such
# keys are remembered (the least recently noted forgotten first).
SENT_LATELY_S = 60.0
SENT_LATELY_KEYS = 10_000


class KeysSentLately:
    """The keys that sent through this edge lately, by a SHA-256 of each (no key is kept)."""

    def __init__(self) -> None:
        self._until: OrderedDict[bytes, float] = OrderedDict()

    def note(self, api_key: str, now: float) -> None:
        digest = hashlib.sha256(api_key.encode()).digest()
        self._until[digest] = now + SENT_LATELY_S
        self._until.move_to_end(digest)
        while len(self._until) > SENT_LATELY_KEYS:
            self._until.popitem(last=False)

    def holds(self, api_key: str, now: float) -> bool:
        until = self._until.get(hashlib.sha256(api_key.encode()).digest())
        return until is not None and until > now


class Backend:
    """Ingest and identity, as the edge calls them."""

    def __init__(
        self,
        ingest_address: str,
        identity_address: str,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # The clock of `received` and of the send times' advance (a test's own clock).
        self._monotonic = monotonic
        self.acknowledged = AcknowledgedEvents()
        self._sent_lately = KeysSentLately()
        self._ingest_channel = _channel(ingest_address)
        self._identity_channel = _channel(identity_address)
        self._ingest = ingest_grpc.IngestServiceStub(self._ingest_channel)
        self._identity = identity_grpc.IdentityServiceStub(self._identity_channel)

    async def close(self) -> None:
        await self._ingest_channel.close()
        await self._identity_channel.close()

    async def ready(self) -> bool:
        """True when both ingest and identity answer their health check SERVING."""

        async def serving(channel: grpc.aio.Channel) -> bool:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                # wait_for_ready: a channel backing off after an outage reconnects within the
                # timeout instead of failing at once.
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(),
                    timeout=HEALTH_TIMEOUT_SECONDS,
                    wait_for_ready=True,
                )
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        results = await asyncio.gather(
            serving(self._ingest_channel), serving(self._identity_channel)
        )
        return all(results)

    async def execute(
        self,
        translation: Translation,
        api_key: str,
        dialect: str,
        received: float | None = None,
    ) -> Outcome:
        """Runs the steps in order; consecutive Track and Reject steps go in one TrackEvents
        call. `received` is when the edge received the request (time.monotonic(); now when
        None): see _track. Raises BackendError when a call failed as a whole (some earlier
        steps may have been applied: the SDK's retry repeats them harmlessly, by event and
        request IDs)."""
        if not sendable_key(api_key):
            raise BackendError("unauthenticated", "the key is no key the suite issues")
        metadata = (("authorization", f"Bearer {api_key}"),)
        outcome = Outcome(
            api_key=api_key, received=self._monotonic() if received is None else received
        )
        pending: list[ingest_pb.Event] = []
        logins: list[Identify] = []
        for step in translation.steps:
            if isinstance(step, Identify):
                if logins and _shares_key(step, logins):
                    pending.extend(await self._logins(logins, metadata, outcome, dialect))
                    logins = []
                if not logins:
                    # The events before a group of logins are stored before any of them.
                    await self._track(pending, metadata, outcome)
                    pending = []
                logins.append(step)
                continue
            if logins:
                pending.extend(await self._logins(logins, metadata, outcome, dialect))
                logins = []
            if isinstance(step, Track):
                pending.extend(step.events)
            elif isinstance(step, Reject):
                pending.append(untranslated_event(step, dialect))
            else:
                await self._track(pending, metadata, outcome)
                pending = []
                await self._identity_step(step, metadata, outcome, dialect)
        pending.extend(await self._logins(logins, metadata, outcome, dialect))
        await self._track(pending, metadata, outcome)
        if not outcome.calls:
            await self._check_key(metadata)
        self._sent_lately.note(api_key, self._monotonic())
        return outcome

    async def judge_key(self, api_key: str) -> None:
        """Raises BackendError unless the key may send, asking ingest (_check_key) unless it
        sent through this edge within SENT_LATELY_S: a request whose translation is costly is
        judged before it (Gateway.run), so that an unknown key buys no more than one call. A
        key revoked since it sent is still refused, by the request's own calls."""
        if not sendable_key(api_key):
            raise BackendError("unauthenticated", "the key is no key the suite issues")
        now = self._monotonic()
        if self._sent_lately.holds(api_key, now):
            return
        await self._check_key((("authorization", f"Bearer {api_key}"),))
        self._sent_lately.note(api_key, now)

    async def _check_key(self, metadata: tuple[tuple[str, str], ...]) -> None:
        """For a request with nothing to store (an empty batch, Countly's health check): its key
        is judged as it would be with events, so a wrong key is told so (401, "App does not
        exist") instead of 200. The contract has no call that only checks a key; the cheapest
        that does is TrackEvents with no events: ingest authenticates and authorizes the caller
        before it reads the request (UNAUTHENTICATED, PERMISSION_DENIED), then refuses the
        empty request as a whole (INVALID_ARGUMENT, reason EVENTS_MISSING), storing nothing.
        That refusal means the key may send. Raises BackendError otherwise."""
        try:
            await self._ingest.TrackEvents(
                ingest_pb.TrackEventsRequest(), metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return
            raise _error(exc) from exc

    async def _logins(
        self,
        logins: Sequence[Identify],
        metadata: tuple[tuple[str, str], ...],
        outcome: Outcome,
        dialect: str,
    ) -> list[ingest_pb.Event]:
        """Consecutive logins that share no installation and no custom ID, run concurrently
        (at most LOGIN_CONCURRENCY at a time): their order cannot change the outcome. Returns
        the events to send once they are done: those of the logins identity accepted
        (Identify.then)."""
        then: list[ingest_pb.Event] = []
        for start in range(0, len(logins), LOGIN_CONCURRENCY):
            group = logins[start : start + LOGIN_CONCURRENCY]
            results = await asyncio.gather(
                *(self._identity_step(login, metadata, outcome, dialect) for login in group),
                return_exceptions=True,
            )
            # Every login of the group has ended; the first failure answers the request.
            for login, result in zip(group, results, strict=True):
                if isinstance(result, BaseException):
                    raise result
                if result:
                    then.extend(login.then)
        return then

    async def _track(
        self,
        events: Sequence[ingest_pb.Event],
        metadata: tuple[tuple[str, str], ...],
        outcome: Outcome,
    ) -> None:
        for batch in _batches(self.acknowledged.needed(outcome.api_key, events)):
            _advance_send_times(batch, self._monotonic() - outcome.received)
            outcome.calls += 1
            try:
                reply = await self._ingest.TrackEvents(
                    ingest_pb.TrackEventsRequest(events=batch),
                    metadata=metadata,
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            except grpc.aio.AioRpcError as exc:
                raise _error(exc) from exc
            self.acknowledged.record(outcome.api_key, batch, reply.results)
            outcome.accepted += reply.accepted_count
            outcome.duplicate += reply.duplicate_count
            outcome.rejected += reply.rejected_count

    async def _identity_step(
        self,
        step: Step,
        metadata: tuple[tuple[str, str], ...],
        outcome: Outcome,
        dialect: str,
    ) -> bool:
        """Runs a login or logout; True when identity accepted it, False when it refused it
        for good (kept as a rejected event)."""
        outcome.calls += 1
        try:
            if isinstance(step, Identify):
                await self._identity.Identify(
                    identity_pb.IdentifyRequest(
                        installation_id=step.installation_id,
                        custom_id=step.custom_id,
                        request_id=step.request_id,
                    ),
                    metadata=metadata,
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            elif isinstance(step, Logout):
                await self._identity.Logout(
                    identity_pb.LogoutRequest(
                        installation_id=step.installation_id,
                        request_id=step.request_id,
                        unless_custom_id=step.unless_custom_id,
                    ),
                    metadata=metadata,
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            outcome.logins += 1
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if isinstance(step, Logout) and code in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                # An installation never seen is already logged out; one whose ID identity
                # refuses (a NUL, over 128 characters) never had a profile: its events are
                # refused one by one by ingest, and the rest of the request goes on.
                return True
            if isinstance(step, Identify) and code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                # A junk or erased custom ID can never succeed: kept as rejected, not retried.
                reason = "LOGIN_REFUSED"
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    reason = "CUSTOM_ID_ERASED"
                    if step.installation_id == step.custom_id or (
                        _refused_field(exc) == "installation_id"
                    ):
                        # The installation ID is the erased custom ID itself (Countly's device
                        # ID after a login): kept as ingest keeps an event naming an erased ID,
                        # a bare ERASED marker without the installation ID or the message.
                        reason = "ERASED"
                refused = Reject(
                    reason=reason,
                    explanation=f"identity refused the login: {code.name}",
                    message={"type": "login", "installationId": step.installation_id},
                    installation_id=step.installation_id,
                )
                await self._track([untranslated_event(refused, dialect)], metadata, outcome)
                return False
            raise _error(exc) from exc
        return True
