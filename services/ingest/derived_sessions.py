"""Sessions ingest derives for events sent without a session ID (Event.session_rule). Pure rules,
no I/O: the service reads the installation's nearby sessions under a lock, asks `assign`, and
stores the events with the session IDs it answers.

INACTIVITY ("a new session after 30 minutes without events"): an event joins the installation's
derived session it is less than 30 minutes from, else starts one. Processed in event-time order
per batch, which makes the result exact (sessions = maximal runs of the installation's events
with gaps under 30 minutes) whenever the installation's events arrive in event-time order. A
late event that falls less than 30 minutes from two sessions joins the earlier one: sessions are
never merged (their IDs are already stored and published), so such a pair stays two sessions
closer than 30 minutes apart; every session is still a run of consecutive events with gaps
under 30 minutes, and sessions never overlap.

OPEN_SESSION (Countly): the event joins the installation's session open at its time; a
heartbeat or end with none starts one, other events stay without session.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import IntEnum

INACTIVITY_TIMEOUT = timedelta(minutes=30)
MAX_SESSION_DURATION = timedelta(hours=24)


class Rule(IntEnum):
    """profiles.ingest.v1.SessionRule, same numbers."""

    NONE = 0
    INACTIVITY = 1
    OPEN_SESSION = 2


class Kind(IntEnum):
    """What the event is to its session."""

    OTHER = 0
    START = 1
    HEARTBEAT = 2
    END = 3


@dataclass(frozen=True, slots=True)
class Span:
    """A session of the installation as far as the rules need it: stored, or made by the batch."""

    session_id: str
    start_time: datetime
    last_activity_time: datetime
    end_time: datetime | None = None  # when an explicit end closed it
    derived: bool = False  # made by the INACTIVITY rule
    # The duration known so far: at least the span, more when a heartbeat said so (a session
    # that a heartbeat started began before its first event).
    duration: timedelta = timedelta()

    def widened(
        self, moment: datetime, *, ends: bool = False, duration: timedelta | None = None
    ) -> Span:
        start = min(self.start_time, moment)
        last = max(self.last_activity_time, moment)
        return replace(
            self,
            start_time=start,
            last_activity_time=last,
            end_time=moment if ends else self.end_time,
            duration=max(self.duration, last - start, duration or timedelta()),
        )

    def duration_at(self, moment: datetime) -> timedelta:
        """The session's duration at `moment`, an event of it: the time since its start, plus
        what it had before its first event (a session a heartbeat started), at most 24 hours."""
        since_last = max(moment - self.last_activity_time, timedelta())
        return min(max(moment - self.start_time, self.duration + since_last), MAX_SESSION_DURATION)

    def open_at(self, moment: datetime) -> bool:
        """Started at or before `moment`, not ended before it, active under 30 min before it."""
        return (
            self.start_time <= moment
            and (self.end_time is None or moment <= self.end_time)
            and moment - self.last_activity_time < INACTIVITY_TIMEOUT
        )

    def gap_to(self, moment: datetime) -> timedelta:
        """How far `moment` is from the session's events (zero inside its span)."""
        if moment < self.start_time:
            return self.start_time - moment
        if moment > self.last_activity_time:
            return moment - self.last_activity_time
        return timedelta()


@dataclass(frozen=True, slots=True)
class Touch:
    """An event of the batch that names its session explicitly: it shapes the spans the rules
    see (a Countly start in the same batch as its heartbeats)."""

    session_id: str
    event_time: datetime
    kind: Kind
    duration: timedelta | None = None  # heartbeat and end


@dataclass(frozen=True, slots=True)
class Asking:
    """An event of the batch without session ID, with a rule."""

    index: int
    event_id: str
    event_time: datetime
    rule: Rule
    kind: Kind = Kind.OTHER
    duration: timedelta | None = None  # heartbeat and end: as sent


@dataclass(frozen=True, slots=True)
class Assignment:
    """The session an asking event gets; `duration` replaces a heartbeat's or end's when set;
    `new` when the event starts the session."""

    session_id: str | None
    duration: timedelta | None = None
    new: bool = False


def derived_session_id(installation_id: str, event_id: str) -> str:
    """The ID of a session started by an event: the same for a retried event (44 characters,
    within the contract's 64)."""
    digest = hashlib.sha256(f"{installation_id}\x1f{event_id}".encode()).hexdigest()[:40]
    return f"dss:{digest}"


def assign(
    installation_id: str,
    stored: Iterable[Span],
    touches: Sequence[Touch],
    asking: Sequence[Asking],
) -> tuple[dict[int, Assignment], list[Span]]:
    """The session of each asking event of one installation (by index), and the spans as they
    are after the batch (the new derived ones among them). `stored` must hold every session of
    the installation that may be within 30 minutes of an asking event. Asking events are taken
    in event-time order (ties: batch order); the batch's explicit events are folded in first."""
    spans: dict[str, Span] = {s.session_id: s for s in stored}
    for touch in sorted(touches, key=lambda t: t.event_time):
        seen = spans.get(touch.session_id)
        if seen is None:
            seen = Span(touch.session_id, touch.event_time, touch.event_time)
        spans[touch.session_id] = seen.widened(
            touch.event_time, ends=touch.kind == Kind.END, duration=touch.duration
        )
    answers: dict[int, Assignment] = {}
    for event in sorted(asking, key=lambda a: (a.event_time, a.index)):
        span: Span | None
        if event.rule == Rule.INACTIVITY:
            answer, span = _inactivity(installation_id, spans.values(), event)
        else:
            answer, span = _open_session(installation_id, spans.values(), event)
        answers[event.index] = answer
        if span is not None:
            spans[span.session_id] = span
    return answers, list(spans.values())


def _inactivity(
    installation_id: str, spans: Iterable[Span], event: Asking
) -> tuple[Assignment, Span]:
    moment = event.event_time
    derived = [s for s in spans if s.derived]
    # Spans never overlap, so only the one holding the event, else its neighbours, can be
    # joined: the session just before (a late event closing a gap extends the earlier
    # session), else the one just after (extended backwards).
    inside = [s for s in derived if s.start_time <= moment <= s.last_activity_time]
    before = [s for s in derived if s.last_activity_time < moment]
    after = [s for s in derived if s.start_time > moment]
    neighbours = [
        *inside[:1],
        *([max(before, key=lambda s: s.last_activity_time)] if before else []),
        *([min(after, key=lambda s: s.start_time)] if after else []),
    ]
    for chosen in neighbours:
        if chosen.gap_to(moment) < INACTIVITY_TIMEOUT:
            return Assignment(chosen.session_id), chosen.widened(moment)
    session_id = derived_session_id(installation_id, event.event_id)
    return Assignment(session_id, new=True), Span(session_id, moment, moment, derived=True)


def _open_session(
    installation_id: str, spans: Iterable[Span], event: Asking
) -> tuple[Assignment, Span | None]:
    moment = event.event_time
    ends = event.kind == Kind.END
    open_ = [s for s in spans if s.open_at(moment)]
    if open_:
        chosen = max(open_, key=lambda s: (s.start_time, s.session_id))
        duration = None
        if event.kind in (Kind.HEARTBEAT, Kind.END):
            duration = chosen.duration_at(moment)
        span = chosen.widened(moment, ends=ends, duration=duration)
        return Assignment(chosen.session_id, duration), span
    if event.kind not in (Kind.HEARTBEAT, Kind.END):
        return Assignment(None), None
    session_id = derived_session_id(installation_id, event.event_id)
    duration = min(max(event.duration or timedelta(), timedelta()), MAX_SESSION_DURATION)
    span = Span(session_id, moment, moment, moment if ends else None, duration=duration)
    return Assignment(session_id, event.duration, new=True), span
