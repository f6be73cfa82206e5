"""Bus handlers: decoded message in, service call, return. Also the proto → domain conversion of
ingested events, and the worker adapters that run consumers and the sweep beside the server."""

from __future__ import annotations

import abc
import asyncio
from datetime import UTC, timedelta
from uuid import UUID

import structlog
from google.protobuf.message import Message

from profiles.common.v1 import bus_pb2, types_pb2
from services.segments.definitions import DefinitionsService
from services.segments.model import (
    ChangeCause,
    ProfileActivity,
    SessionUpdate,
    fold_sessions,
)
from services.segments.service import SegmentsService
from shared.bus import dependency_unavailable, sleep_unless
from shared.clock import Clock

log = structlog.get_logger(__name__)

SESSION_KINDS = frozenset(
    {
        types_pb2.EVENT_KIND_SESSION_START,
        types_pb2.EVENT_KIND_SESSION_HEARTBEAT,
        types_pb2.EVENT_KIND_SESSION_END,
    }
)
TIME_ZONE_OPERATIONS = frozenset(
    {
        types_pb2.ATTRIBUTE_OPERATION_KIND_SET,
        types_pb2.ATTRIBUTE_OPERATION_KIND_SET_ONCE,
        types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET,
    }
)


def _uuid(value: str) -> UUID | None:
    try:
        return UUID(value)
    except ValueError:
        return None


def session_key(event: bus_pb2.IngestedEvent) -> str:
    """A session's identity: its source (installation or custom ID) and client session ID."""
    source = f"i:{event.installation_id}" if event.installation_id else f"c:{event.custom_id}"
    return f"{source}:{event.session_id}"


def session_update(event: bus_pb2.IngestedEvent) -> SessionUpdate | None:
    """What the event says about its session, if it names one. Any event of a session tells
    its platform (a derived session's start is published on its first event's platform, maybe
    API, and the SDK's later events bring the device's); only starts, heartbeats and ends count
    it and tell its times."""
    if not event.session_id:
        return None
    key, platform = session_key(event), event.platform
    event_time = event.event_time.ToDatetime(tzinfo=UTC)
    if event.kind not in SESSION_KINDS:
        return SessionUpdate(
            key,
            platform,
            event_time,
            False,
            timedelta(),
            platform_time=event_time,
            counted=False,
        )
    duration = max(event.session.duration.ToTimedelta(), timedelta())
    if event.kind == types_pb2.EVENT_KIND_SESSION_START:
        return SessionUpdate(key, platform, event_time, True, timedelta(), platform_time=event_time)
    ended = event.kind == types_pb2.EVENT_KIND_SESSION_END  # ingest's idle sweep sends one too
    return SessionUpdate(
        key, platform, event_time - duration, False, duration, ended, platform_time=event_time
    )


def activities_of(message: bus_pb2.EventsIngested) -> list[ProfileActivity]:
    """What the batch says about each profile, in first-seen order; events naming no valid
    profile ID are skipped (ingest never sends them)."""
    activities: dict[str, ProfileActivity] = {}
    sessions: dict[str, list[SessionUpdate]] = {}
    for event in message.events:
        profile_id = _uuid(event.profile_id)
        if profile_id is None:
            log.warning("segments_event_without_profile", event_id=event.event_id)
            continue
        key = str(profile_id)
        activity = activities.setdefault(key, ProfileActivity(key))
        activity.add_event_time(event.event_time.ToDatetime(tzinfo=UTC))
        update = session_update(event)
        if update is not None:
            sessions.setdefault(key, []).append(update)
    for key, updates in sessions.items():
        activities[key].sessions = fold_sessions(updates)
    return list(activities.values())


async def on_events_ingested(
    service: SegmentsService, project_id: str, message: Message, entry_id: str
) -> None:
    assert isinstance(message, bus_pb2.EventsIngested)
    project = _uuid(project_id)
    if project is None:
        return
    await service.record_activity(project, activities_of(message))


async def on_identity_change(
    service: SegmentsService, project_id: str, message: Message, entry_id: str
) -> None:
    project = _uuid(project_id)
    if project is None:
        return
    if isinstance(message, bus_pb2.ProfileMerged):
        target = _uuid(message.target_profile_id)
        sources = [
            s
            for s in map(_uuid, [message.source_profile_id, *message.redirected_profile_ids])
            if s is not None
        ]
        if target is not None and sources:
            await service.merge_profiles(project, sources, target)
    elif isinstance(message, bus_pb2.ProfileDeleted):
        ids = [
            p
            for p in map(_uuid, [message.profile_id, *message.tombstone_profile_ids])
            if p is not None
        ]
        if ids:
            await service.delete_profiles(project, ids)
    elif isinstance(message, bus_pb2.ProfileCreated):
        profile = _uuid(message.profile_id)
        if profile is not None:
            await service.register_profiles(project, [profile])
    elif isinstance(
        message, bus_pb2.ProfileSplit | bus_pb2.InstallationReintegrated | bus_pb2.PushTokenMoved
    ):
        # An installation (or its push token) moved between profiles: platform and push
        # conditions of both may change. (Sessions stay with the profile they were recorded for.)
        if isinstance(message, bus_pb2.ProfileSplit):
            named, cause = [message.old_profile_id, message.new_profile_id], ChangeCause.SPLIT
        elif isinstance(message, bus_pb2.PushTokenMoved):
            named = [message.profile_id, message.to_profile_id]
            cause = ChangeCause.EVENT
        else:
            named = [message.imported_profile_id, message.profile_id]
            cause = ChangeCause.EVENT
        await _evaluate(service, project, named, cause)
    elif isinstance(message, bus_pb2.InstallationsImported):
        await _evaluate(
            service,
            project,
            [i.profile_id for i in message.installations],
            ChangeCause.EVENT,
        )
    # Identifications change nothing segments' conditions read.


async def _evaluate(
    service: SegmentsService, project: UUID, named: list[str], cause: ChangeCause
) -> None:
    ids = [p for p in map(_uuid, named) if p is not None]
    if ids:
        await service.evaluate_custom_segments(project, ids, cause)


class PeriodicWorker(abc.ABC):
    """Runs `tick` every `interval_s` until stopped. A failing tick is logged and the next one
    runs as planned: a database outage or a bug must not stop the work for good."""

    failure_event = "segments_periodic_work_failed"

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._stop = asyncio.Event()

    @abc.abstractmethod
    async def tick(self) -> None:
        """One round of the work; each subclass says what it is."""

    async def run(self) -> None:
        self._stop.clear()
        while not self._stop.is_set():
            try:
                await self.tick()
            except Exception as exc:
                if dependency_unavailable(exc):
                    # An outage, not a fault: the next round retries it, and a traceback per
                    # round would bury the log (the services' other paths warn alike).
                    log.warning(self.failure_event, error=repr(exc))
                else:
                    log.exception(self.failure_event)
            await sleep_unless(self._stop, self._interval_s)

    async def stop(self) -> None:
        self._stop.set()


class SweepWorker(PeriodicWorker):
    """Runs the sweep every `interval_s` (time-only transitions reach the change stream at
    most that late), and until no due state is left each time."""

    failure_event = "segments_sweep_failed"

    def __init__(
        self, service: SegmentsService, clock: Clock, *, interval_s: float = 30.0, batch: int = 500
    ) -> None:
        super().__init__(interval_s)
        self._service = service
        self._clock = clock
        self._batch = batch

    async def sweep_once(self) -> int:
        total = 0
        while not self._stop.is_set():
            moved = await self._service.sweep(self._batch)
            total += moved
            if moved < self._batch:
                break
        if total:
            log.info("segments_swept", states=total)
        return total

    async def tick(self) -> None:
        await self.sweep_once()


class EvaluationWorker(PeriodicWorker):
    """Every `interval_s`, evaluates the custom segments that are due and announces who entered
    and who left (cause TIME). Events evaluate their own profile as they are handled, so this
    sweep carries what time alone changes ("within the last N days" windows, smart segment
    transitions): a segment whose filter depends on time is due 30 s after its last evaluation;
    one time cannot change only while it settles after creation, then every few minutes as a
    safety net for writes that reached the source tables without an event (model.sweep_due)."""

    failure_event = "custom_segment_evaluation_failed"

    def __init__(self, definitions: DefinitionsService, *, interval_s: float = 5.0) -> None:
        super().__init__(interval_s)
        self._definitions = definitions

    async def tick(self) -> None:
        announced = await self._definitions.evaluate_all(due_only=True)
        if announced:
            log.info("custom_segments_evaluated", changes=announced)


class ThresholdsWorker(PeriodicWorker):
    """Checks every `interval_s` whether a project's segment thresholds changed (the settings
    are written by `profiles settings`, with no message) and starts its recomputation: the
    stored states follow a change at most `interval_s` plus the recomputation's time later."""

    failure_event = "segment_thresholds_check_failed"

    def __init__(self, service: SegmentsService, *, interval_s: float = 10.0) -> None:
        super().__init__(interval_s)
        self._service = service

    async def tick(self) -> None:
        await self._service.apply_threshold_changes()


class RecomputeOwner:
    """Owns the RecomputeAll runs: on shutdown they are cancelled, so their followers end with
    UNAVAILABLE and the next call starts a new run."""

    def __init__(self, service: SegmentsService) -> None:
        self._service = service
        self._stop = asyncio.Event()

    async def run(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()
        await self._service.stop_recomputes()
