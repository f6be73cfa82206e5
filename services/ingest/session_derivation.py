"""Applies the session rules (derived_sessions.py) to a batch inside its storing transaction:
locks the installations that ask for a session, reads their nearby sessions, gives each asking
event its session ID (and a heartbeat's or end's duration), and after the events are stored,
marks the new derived sessions and builds their session starts for the bus. Its SQL lives here
beside it, not in repository.py, until that module's split settles (then it moves there)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from uuid import UUID

import asyncpg

from profiles.common.v1 import bus_pb2, types_pb2
from services.ingest.derived_sessions import Asking, Kind, Rule, Span, Touch, assign
from services.ingest.repository import SELECT_EXISTING_INSTALLATION_EVENTS
from services.ingest.validation import ValidEvent
from shared.convert import timestamp_of

KINDS: dict[int, Kind] = {
    types_pb2.EVENT_KIND_SESSION_START: Kind.START,
    types_pb2.EVENT_KIND_SESSION_HEARTBEAT: Kind.HEARTBEAT,
    types_pb2.EVENT_KIND_SESSION_END: Kind.END,
}

# One advisory transaction lock per installation that asks for a session, taken in installation
# order (volatile functions run after ORDER BY), so two batches of overlapping installations
# queue instead of deadlocking, and the second reads what the first stored. The key is a hash:
# a collision only makes two installations wait for each other.
LOCK_INSTALLATIONS = """
    SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text || ':' || i, 0))
    FROM unnest($2::text[]) AS i
    ORDER BY i"""

# Per installation, the sessions that may be within 30 minutes of one of its asking events
# ($3..$4 the span of their event times): by sessions_by_installation_activity_bucket (a
# session active after a time has its activity bucket at or after that time's bucket). The
# rules judge the installation's session: once one part of it is near, all the parts each
# profile has of it (0054) as one, by the primary key's prefix.
SELECT_NEARBY_SESSIONS = """
    WITH near AS (
        SELECT DISTINCT s.installation_id, s.session_id
        FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[])
             AS b(installation_id, lo, hi)
        JOIN sessions s ON s.project_id = $1 AND s.installation_id = b.installation_id
            AND s.activity_bucket
                >= ingest_sessions_activity_bucket(b.lo - interval '30 minutes')
            AND s.last_activity_time > b.lo - interval '30 minutes'
            AND s.start_time < b.hi + interval '30 minutes'
    )
    SELECT p.installation_id, p.session_id, min(p.start_time) AS start_time,
           max(p.last_activity_time) AS last_activity_time,
           max(p.end_time) FILTER (WHERE p.ended) AS end_time, bool_or(p.derived) AS derived,
           max(p.duration) AS duration
    FROM near
    JOIN sessions p ON p.project_id = $1 AND p.installation_id = near.installation_id
        AND p.session_id = near.session_id
    GROUP BY p.installation_id, p.session_id"""

# The new derived sessions that got rows (their events were stored) become derived, with the
# country of their first event's client IP ("" when unknown).
MARK_DERIVED = """
    UPDATE sessions s SET derived = true, country = coalesce(s.country, nullif(d.country, ''))
    FROM unnest($2::text[], $3::text[], $4::text[]) AS d(installation_id, session_id, country)
    WHERE s.project_id = $1 AND s.installation_id = d.installation_id
        AND s.session_id = d.session_id"""


def start_event_id(session_id: str) -> str:
    """The event ID of the session start ingest publishes for a derived session: the same
    however often it is published, so consumers deduplicate it."""
    return "session_start:" + hashlib.sha256(session_id.encode()).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session the batch's rules started: by the event at `index`, starting at `span`."""

    installation_id: str
    index: int
    span: Span


@dataclass(slots=True)
class Derivation:
    """The batch's events with their derived sessions, and the sessions they start."""

    events: list[ValidEvent]
    new_sessions: list[NewSession] = field(default_factory=list)

    async def record(
        self, conn: asyncpg.Connection, project_id: UUID, accepted: dict[int, UUID]
    ) -> list[bus_pb2.IngestedEvent]:
        """Marks the new derived sessions whose starting event was stored; returns their
        session starts for the bus (the events' own messages follow them)."""
        by_index = {e.index: e for e in self.events}
        derived = [n for n in self.new_sessions if n.span.derived and n.index in accepted]
        if derived:
            await conn.execute(
                MARK_DERIVED,
                project_id,
                [n.installation_id for n in derived],
                [n.span.session_id for n in derived],
                [by_index[n.index].session_country for n in derived],
            )
        new_ids = {(n.installation_id, n.span.session_id) for n in derived}
        stored_of: dict[tuple[str, str], list[ValidEvent]] = defaultdict(list)
        for e in self.events:
            key = (e.installation_id or "", e.session_id or "")
            if key in new_ids and e.index in accepted:
                stored_of[key].append(e)
        starts = []
        for new in derived:
            event = by_index[new.index]
            stored = stored_of[(new.installation_id, new.span.session_id)]
            start = bus_pb2.IngestedEvent(
                event_id=start_event_id(new.span.session_id),
                installation_id=new.installation_id,
                profile_id=str(accepted[new.index]),
                platform=session_platform(stored),  # type: ignore[arg-type]
                kind=types_pb2.EVENT_KIND_SESSION_START,
                session_id=new.span.session_id,
                event_time=timestamp_of(new.span.start_time),
            )
            start.session.SetInParent()
            start.session.country = event.session_country
            starts.append(start)
        return starts


def session_platform(events: Sequence[ValidEvent]) -> int:
    """The platform of a session from its events, by the sessions table's rule (0056): the
    latest device platform (iOS, Android, Web) by event time, later in the batch on a tie; API
    only when every event is on API. An SDK sends its platform only with some requests (the
    edge sends the others on API), so the event that starts a derived session may well be an
    API one of a phone's session."""
    devices = [e for e in events if e.platform != types_pb2.PLATFORM_API]
    if not devices:
        return types_pb2.PLATFORM_API
    return max(devices, key=lambda e: (e.event_time, e.index)).platform


def _with_duration(event: ValidEvent, duration: timedelta) -> ValidEvent:
    """A heartbeat or end with the duration the open-session rule computed."""
    detail = bus_pb2.SessionDetail()
    detail.CopyFrom(event.detail)  # type: ignore[arg-type]
    detail.duration.FromTimedelta(duration)
    payload = {**event.payload, "duration": detail.duration.ToJsonString()}
    return replace(event, session_duration=duration, detail=detail, payload=payload)


async def derive_sessions(
    conn: asyncpg.Connection, project_id: UUID, events: Sequence[ValidEvent]
) -> Derivation:
    """The events with the sessions their rules give them (events that ask for none come back
    unchanged). Call it in the storing transaction, before the events are inserted: it locks
    the installations concerned until commit."""
    asking = [e for e in events if e.session_rule and e.installation_id]
    if not asking:
        return Derivation(list(events))
    # Locked before anything is read, so that a concurrent retry of the same events is seen
    # as stored here once the first commits, and shapes no session.
    await conn.execute(
        LOCK_INSTALLATIONS, project_id, sorted({e.installation_id or "" for e in asking})
    )
    # Stored already: their keys are held (the dedupe rule, event_keys), so the insert will not
    # store them again.
    rows = await conn.fetch(
        SELECT_EXISTING_INSTALLATION_EVENTS,
        project_id,
        [e.installation_id for e in asking],
        [e.event_id for e in asking],
    )
    stored = {(r["installation_id"], r["event_id"]) for r in rows}
    asking = [e for e in asking if (e.installation_id, e.event_id) not in stored]
    if not asking:
        return Derivation(list(events))
    by_installation: dict[str, list[ValidEvent]] = defaultdict(list)
    for event in asking:
        by_installation[event.installation_id or ""].append(event)
    installations = sorted(by_installation)
    rows = await conn.fetch(
        SELECT_NEARBY_SESSIONS,
        project_id,
        installations,
        [min(e.event_time for e in by_installation[i]) for i in installations],
        [max(e.event_time for e in by_installation[i]) for i in installations],
    )
    spans: dict[str, list[Span]] = defaultdict(list)
    for r in rows:
        spans[r["installation_id"]].append(
            Span(
                r["session_id"],
                r["start_time"],
                r["last_activity_time"],
                r["end_time"],
                r["derived"],
                r["duration"],
            )
        )
    touches: dict[str, list[Touch]] = defaultdict(list)
    for event in events:
        if event.installation_id in by_installation and event.session_id is not None:
            touches[event.installation_id].append(
                Touch(
                    event.session_id,
                    event.event_time,
                    KINDS.get(event.kind, Kind.OTHER),
                    event.session_duration,
                )
            )
    derivation = Derivation([])
    replaced: dict[int, ValidEvent] = {}
    for installation_id in installations:
        answers, after = assign(
            installation_id,
            spans[installation_id],
            touches[installation_id],
            [
                Asking(
                    e.index,
                    e.event_id,
                    e.event_time,
                    Rule(e.session_rule),
                    KINDS.get(e.kind, Kind.OTHER),
                    e.session_duration,
                )
                for e in by_installation[installation_id]
            ],
        )
        final = {s.session_id: s for s in after}
        for event in by_installation[installation_id]:
            answer = answers[event.index]
            if answer.session_id is None:
                continue
            one = replace(event, session_id=answer.session_id)
            if answer.duration is not None:
                one = _with_duration(one, answer.duration)
            replaced[event.index] = one
            if answer.new:
                derivation.new_sessions.append(
                    NewSession(installation_id, event.index, final[answer.session_id])
                )
    derivation.events = [replaced.get(e.index, e) for e in events]
    return derivation
