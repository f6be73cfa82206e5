"""Segments' smart segment rules without I/O: the engagement score, smart segments and flags,
when a profile's classification next changes by time alone, and the membership changes between
two states. Custom segments' filter tree lives in filters.py, funnels in funnels.py.

Every rule takes `now` as an argument, so "dormant for 14 days" is a unit test. Enum values equal
the proto numbers (profiles.common.v1.SmartSegment / SmartSegmentFlag) and the stored smallints.

Rules (each threshold a per-project setting, defaults in brackets):

- An active day is a calendar day, in the profile's time zone (else UTC), with a session start.
  "Active days in the last N days" counts the active days among today and the N - 1 calendar days
  before it, so a day leaves the window at local midnight N days after it.
- New: first session less than `new_days` [7] x 24 h ago. Flag Promising New: at least
  `engaged_min_active_days` [2] active days so far.
- One-time: not New, and exactly one session ever.
- Engaged: not New nor One-time, and at least `engaged_min_active_days` [2] active days in the
  last `active_window_days` [14]. Flag Risky Engaged: last session start `risky_after_days` [7]
  x 24 h ago or more.
- Dormant: not New nor One-time, and fewer active days than that. Flag Promising Dormant: at
  least one active day in the window and exactly one short of Engaged.
- Engagement (Countly): over sessions started in the rolling 168 h up to now, score1 = average
  duration in minutes of the ended ones (an open session's length is not known yet) capped at
  2, score2 = count capped at 20, score3 = distinct calendar days capped at 7; score = score1 x
  score2 x score3 out of 280.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Self
from uuid import UUID
from zoneinfo import ZoneInfo

from shared.time_zones import is_time_zone

ALL_PLATFORMS = 0
# profiles.common.v1.Platform's API: a server's or the edge's event, no device's. The others
# (iOS 1, Android 2, Web 3) are device platforms.
PLATFORM_API = 4
ENGAGEMENT_WINDOW = timedelta(hours=168)
MAX_SCORE1 = 2.0
MAX_SCORE2 = 20
MAX_SCORE3 = 7
MAX_SCORE = MAX_SCORE1 * MAX_SCORE2 * MAX_SCORE3  # 280
DEFAULT_TIME_ZONE = "UTC"
# More transitions than a profile can go through without a new session (New, Promising New,
# Engaged, Risky Engaged, Promising Dormant, Dormant...); a guard, never reached by the rules.
MAX_SCHEDULE_STEPS = 16


class SmartSegment(enum.IntEnum):
    NONE = 0
    NEW = 1
    ONE_TIME = 2
    ENGAGED = 3
    DORMANT = 4


class SegmentFlag(enum.IntEnum):
    NONE = 0
    PROMISING_NEW = 1
    PROMISING_DORMANT = 2
    RISKY_ENGAGED = 3


class ChangeCause(enum.IntEnum):
    """Why a membership changed; values equal bus MembershipChangeCause."""

    EVENT = 1
    TIME = 2
    MERGE = 3
    SPLIT = 4
    DELETION = 5
    RECOMPUTE = 6
    DEFINITION = 7  # a custom segment's filter changed (UpdateSegment)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The project's segment settings (shared/project_settings.py `segments.*`)."""

    new_days: int = 7
    active_window_days: int = 14
    engaged_min_active_days: int = 2
    risky_after_days: int = 7

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Self:
        return cls(
            new_days=int(settings["segments.new_days"]),
            active_window_days=int(settings["segments.active_window_days"]),
            engaged_min_active_days=int(settings["segments.engaged_min_active_days"]),
            risky_after_days=int(settings["segments.risky_after_days"]),
        )

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any] | None) -> Self:
        """Thresholds stored as settings (names to values); a missing name has its default."""
        return cls.from_settings({**cls().to_settings(), **(stored or {})})

    def to_settings(self) -> dict[str, int]:
        return {
            "segments.new_days": self.new_days,
            "segments.active_window_days": self.active_window_days,
            "segments.engaged_min_active_days": self.engaged_min_active_days,
            "segments.risky_after_days": self.risky_after_days,
        }

    @property
    def lookback(self) -> timedelta:
        """How far back sessions must be loaded for every rule: the active-day window (one day
        more, for time zones up to 26 h from UTC) and the 168 h engagement window."""
        return max(timedelta(days=self.active_window_days + 2), ENGAGEMENT_WINDOW)


@dataclass(frozen=True, slots=True)
class Session:
    start_time: datetime
    duration: timedelta
    platform: int
    # Whether its end was seen (the SDK's, or the idle sweep's): only ended sessions have a
    # known length, so only they make the engagement's average duration.
    ended: bool = True


@dataclass(frozen=True, slots=True)
class History:
    """One profile's sessions as the rules need them, on one platform or all.

    `recent_sessions` holds every session started at or after `now - Thresholds.lookback`; the
    other fields cover all sessions ever.
    """

    session_count: int
    first_session_time: datetime | None
    last_session_time: datetime | None
    total_active_days: int
    recent_sessions: tuple[Session, ...] = ()
    time_zone: str = DEFAULT_TIME_ZONE

    @classmethod
    def empty(cls, time_zone: str = DEFAULT_TIME_ZONE) -> Self:
        return cls(0, None, None, 0, (), time_zone)


def zone_of(name: str | None) -> ZoneInfo:
    """The zone of an IANA name; UTC for none or a name the suite does not accept."""
    return ZoneInfo(name if name and is_time_zone(name) else DEFAULT_TIME_ZONE)


def valid_time_zone(name: str) -> bool:
    return is_time_zone(name)


def local_day(moment: datetime, zone: ZoneInfo) -> date:
    return moment.astimezone(zone).date()


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    """The instant `day` starts in `zone`, in UTC."""
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


# --- engagement ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Engagement:
    window_start_time: datetime
    window_end_time: datetime
    session_count: int
    average_session_duration: timedelta
    score1: float
    score2: int
    score3: int
    time_zone: str

    @property
    def score(self) -> float:
        return self.score1 * self.score2 * self.score3

    @property
    def percentage(self) -> float:
        return round(self.score / MAX_SCORE * 100, 2)


def engagement(history: History, now: datetime) -> Engagement:
    """Countly's engagement score over the sessions started in [now - 168 h, now]; the
    average duration is over the ended ones among them. segments_read_engagement
    (services/segments/schema) is the same rule in SQL, equal to the last bit
    (tests/integration/test_segments_engagement.py)."""
    start = now - ENGAGEMENT_WINDOW
    zone = zone_of(history.time_zone)
    sessions = [s for s in history.recent_sessions if start <= s.start_time <= now]
    count = len(sessions)
    ended = [s.duration for s in sessions if s.ended]
    average = sum(ended, timedelta()) / len(ended) if ended else timedelta()
    days = {local_day(s.start_time, zone) for s in sessions}
    return Engagement(
        window_start_time=start,
        window_end_time=now,
        session_count=count,
        average_session_duration=average,
        score1=min(average.total_seconds() / 60, MAX_SCORE1),
        score2=min(count, MAX_SCORE2),
        score3=min(len(days), MAX_SCORE3),
        time_zone=zone.key,
    )


# --- smart segments -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Classification:
    segment: SmartSegment = SmartSegment.NONE
    flag: SegmentFlag = SegmentFlag.NONE


NO_SEGMENT = Classification()


@dataclass(frozen=True, slots=True)
class Step:
    """From `time` on (inclusive), the profile is classified `classification`."""

    time: datetime
    classification: Classification


@dataclass(frozen=True, slots=True)
class SmartSegmentFacts:
    """A profile's classification as of `as_of_time`, the facts behind it, and its future
    transitions if no session arrives (`schedule`, earliest first)."""

    classification: Classification
    as_of_time: datetime
    recent_active_days: int
    total_active_days: int
    session_count: int
    first_session_time: datetime | None
    last_session_time: datetime | None
    time_zone: str
    schedule: tuple[Step, ...] = field(default=())

    @property
    def next_transition_time(self) -> datetime | None:
        return self.schedule[0].time if self.schedule else None


def recent_active_days(
    days: Iterable[date], moment: datetime, zone: ZoneInfo, thresholds: Thresholds
) -> int:
    """Active days among today (at `moment`, in `zone`) and the window's previous days."""
    today = local_day(moment, zone)
    return sum(1 for day in days if (today - day).days < thresholds.active_window_days)


def classify_at(
    history: History, moment: datetime, thresholds: Thresholds
) -> tuple[Classification, int]:
    """The classification at `moment` and the active days in the window then."""
    if history.session_count == 0 or history.first_session_time is None:
        return NO_SEGMENT, 0
    zone = zone_of(history.time_zone)
    days = {local_day(s.start_time, zone) for s in history.recent_sessions}
    recent = recent_active_days(days, moment, zone, thresholds)
    minimum = thresholds.engaged_min_active_days
    if moment - history.first_session_time < timedelta(days=thresholds.new_days):
        promising = history.total_active_days >= minimum
        return Classification(
            SmartSegment.NEW, SegmentFlag.PROMISING_NEW if promising else SegmentFlag.NONE
        ), recent
    if history.session_count == 1:
        return Classification(SmartSegment.ONE_TIME), recent
    if recent >= minimum:
        last = history.last_session_time or history.first_session_time
        risky = moment - last >= timedelta(days=thresholds.risky_after_days)
        return Classification(
            SmartSegment.ENGAGED, SegmentFlag.RISKY_ENGAGED if risky else SegmentFlag.NONE
        ), recent
    promising = recent >= 1 and recent == minimum - 1
    return Classification(
        SmartSegment.DORMANT, SegmentFlag.PROMISING_DORMANT if promising else SegmentFlag.NONE
    ), recent


def _candidate_times(history: History, now: datetime, thresholds: Thresholds) -> list[datetime]:
    """Every instant after `now` at which time alone may change the classification: the end of
    New, the start of Risky, and each active day leaving the window."""
    if history.first_session_time is None:
        return []
    zone = zone_of(history.time_zone)
    times = {history.first_session_time + timedelta(days=thresholds.new_days)}
    if history.last_session_time is not None:
        times.add(history.last_session_time + timedelta(days=thresholds.risky_after_days))
    for session in history.recent_sessions:
        day = local_day(session.start_time, zone)
        times.add(local_midnight(day + timedelta(days=thresholds.active_window_days), zone))
    return sorted(t for t in times if t > now)


def classify(history: History, now: datetime, thresholds: Thresholds) -> SmartSegmentFacts:
    """The classification as of `now`, with every later change that time alone would cause."""
    current, recent = classify_at(history, now, thresholds)
    schedule: list[Step] = []
    previous = current
    for moment in _candidate_times(history, now, thresholds):
        then, _ = classify_at(history, moment, thresholds)
        if then != previous:
            schedule.append(Step(moment, then))
            previous = then
            if len(schedule) >= MAX_SCHEDULE_STEPS:
                break
    return SmartSegmentFacts(
        classification=current,
        as_of_time=now,
        recent_active_days=recent,
        total_active_days=history.total_active_days,
        session_count=history.session_count,
        first_session_time=history.first_session_time,
        last_session_time=history.last_session_time,
        time_zone=zone_of(history.time_zone).key,
        schedule=tuple(schedule),
    )


# --- stored state and membership changes --------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredState:
    """A profile's classification as stored, with its future steps (earliest first)."""

    classification: Classification
    schedule: tuple[Step, ...] = ()

    @property
    def next_transition_time(self) -> datetime | None:
        return self.schedule[0].time if self.schedule else None


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """A profile entering or leaving one smart segment, one flag or one custom segment (exactly
    one of the three is set)."""

    entered: bool
    change_time: datetime
    cause: ChangeCause
    segment: SmartSegment | None = None
    flag: SegmentFlag | None = None
    custom_segment_id: UUID | None = None


def changes_between(
    old: Classification, new: Classification, change_time: datetime, cause: ChangeCause
) -> list[MembershipChange]:
    """The changes from `old` to `new`, in the order a reader expects: the old flag left, the
    old segment left, the new segment entered, the new flag entered."""
    changes: list[MembershipChange] = []
    if old.flag != SegmentFlag.NONE and old.flag != new.flag:
        changes.append(MembershipChange(False, change_time, cause, flag=old.flag))
    if old.segment != new.segment:
        if old.segment != SmartSegment.NONE:
            changes.append(MembershipChange(False, change_time, cause, segment=old.segment))
        if new.segment != SmartSegment.NONE:
            changes.append(MembershipChange(True, change_time, cause, segment=new.segment))
    if new.flag != SegmentFlag.NONE and new.flag != old.flag:
        changes.append(MembershipChange(True, change_time, cause, flag=new.flag))
    return changes


def advance(state: StoredState, now: datetime) -> tuple[StoredState, list[MembershipChange]]:
    """The stored state moved to `now` along its schedule, with the changes time caused (each
    at the exact instant of its step, not at `now`)."""
    current = state.classification
    changes: list[MembershipChange] = []
    remaining: list[Step] = []
    for step in state.schedule:
        if step.time <= now:
            changes.extend(
                changes_between(current, step.classification, step.time, ChangeCause.TIME)
            )
            current = step.classification
        else:
            remaining.append(step)
    return StoredState(current, tuple(remaining)), changes


def reclassify(
    stored: StoredState | None,
    facts: SmartSegmentFacts,
    now: datetime,
    cause: ChangeCause,
    change_time: datetime,
) -> list[MembershipChange]:
    """The changes from a stored state to fresh facts: first what time did to the stored state
    up to `now` (cause TIME), then what `cause` did (at `change_time`)."""
    if stored is None:
        stored = StoredState(NO_SEGMENT)
    moved, changes = advance(stored, now)
    changes.extend(changes_between(moved.classification, facts.classification, change_time, cause))
    return changes


def reclassification(
    histories: Mapping[int, History],
    stored: Mapping[int, StoredState],
    thresholds: Thresholds,
    now: datetime,
    cause: ChangeCause,
    change_time: datetime,
) -> tuple[list[tuple[int, StoredState]], list[MembershipChange], bool]:
    """A profile's fresh states (per platform it has sessions on, and all: 0), the changes of its
    all-platform classification (see reclassify), and whether stored states must go first (a
    platform, or all of them, with no session left)."""
    states: list[tuple[int, StoredState]] = []
    changes: list[MembershipChange] = []
    for platform, history in histories.items():
        facts = classify(history, now, thresholds)
        if platform == ALL_PLATFORMS:
            changes = reclassify(stored.get(ALL_PLATFORMS), facts, now, cause, change_time)
        if history.session_count:
            states.append((platform, StoredState(facts.classification, facts.schedule)))
    kept = {platform for platform, _ in states}
    return states, changes, any(p not in kept for p in stored)


# --- session events -----------------------------------------------------------------------


def session_platform(earlier: int, later: int) -> int:
    """A session's platform from two of its platforms, `later` the one seen later: a device
    platform (iOS, Android, Web) over API whatever the order, else the later one; a session only
    ever seen on API is an API one. Ingest's rule for its sessions (0056): SDKs send their
    platform with some requests only (Countly's metrics come with begin_session, not with its
    heartbeats and events; a Segment track may have no context), and the edge sends the others
    on API, so the first event segments sees of a session may well be on API.

    SessionUpdate.combined applies it; repository.py's UPSERT_SESSIONS, UPDATE_SESSION_PLATFORMS
    and MOVE_SESSIONS mirror it in SQL."""
    if later == PLATFORM_API and earlier != PLATFORM_API:
        return earlier
    return later


@dataclass(frozen=True, slots=True)
class SessionUpdate:
    """What a batch of events says about one session: its start when a start event was seen
    (else a guess: the event time minus the duration), the longest duration reported, whether
    an end was seen, and its platform (session_platform) with the event time it was seen at."""

    session_key: str
    platform: int
    start_time: datetime
    start_known: bool
    duration: timedelta
    ended: bool = False
    # The event time of the event `platform` is from: combining two updates, the one seen later
    # by this time is session_platform's `later`, as ingest takes a batch's latest device
    # event's platform (by event time).
    platform_time: datetime = field(kw_only=True)
    # False when only other events of the session (custom events, user details...) were seen:
    # they tell its platform, not that it happened, so they change a session counted from its
    # start, heartbeats or end but never make one (their start and duration mean nothing).
    counted: bool = field(default=True, kw_only=True)

    def combined(self, other: SessionUpdate) -> SessionUpdate:
        """Both updates as one; `other` is the later in the batch. Order-free, so replays and
        reordering give the same result, but for two device platforms seen at the same event
        time: the later in the batch wins then, as in ingest."""
        if self.platform_time <= other.platform_time:
            earlier, later = self, other
        else:
            earlier, later = other, self
        platform = session_platform(earlier.platform, later.platform)
        seen = later if platform == later.platform else earlier
        if not (self.counted and other.counted):
            # At most one says when the session started and how long it lasted.
            times = self if self.counted else other
            return SessionUpdate(
                self.session_key,
                platform,
                times.start_time,
                times.start_known,
                times.duration,
                times.ended,
                platform_time=seen.platform_time,
                counted=times.counted,
            )
        if self.start_known != other.start_known:
            start = self.start_time if self.start_known else other.start_time
        else:
            start = min(self.start_time, other.start_time)
        known = self.start_known or other.start_known
        return SessionUpdate(
            self.session_key,
            platform,
            start,
            known,
            max(self.duration, other.duration),
            self.ended or other.ended,
            platform_time=seen.platform_time,
        )


def fold_sessions(updates: Sequence[SessionUpdate]) -> list[SessionUpdate]:
    """One update per session key, in first-seen order; `updates` in the batch's order."""
    folded: dict[str, SessionUpdate] = {}
    for update in updates:
        seen = folded.get(update.session_key)
        folded[update.session_key] = update if seen is None else seen.combined(update)
    return list(folded.values())


@dataclass(slots=True)
class ProfileActivity:
    """What one ingested batch says about one profile."""

    profile_id: str
    sessions: list[SessionUpdate] = field(default_factory=list)
    latest_event_time: datetime | None = None

    def add_event_time(self, moment: datetime) -> None:
        if self.latest_event_time is None or moment > self.latest_event_time:
            self.latest_event_time = moment


# --- distribution -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Distribution:
    """Profiles per (segment, flag) on one platform (or all), exact as of `as_of_time`."""

    platform: int
    as_of_time: datetime
    counts: Mapping[Classification, int]

    def segment_count(self, segment: SmartSegment) -> int:
        return sum(n for c, n in self.counts.items() if c.segment == segment)

    def flag_count(self, flag: SegmentFlag) -> int:
        return sum(n for c, n in self.counts.items() if c.flag == flag)


# --- recompute ----------------------------------------------------------------------------


class RecomputePhase(enum.IntEnum):
    """Values equal profiles.segments.v1.RecomputePhase."""

    AGGREGATES = 1
    SMART_SEGMENTS = 2
    CUSTOM_SEGMENTS = 3
    FUNNELS = 4
    DONE = 5


@dataclass(frozen=True, slots=True)
class RecomputeProgress:
    recompute_id: UUID
    phase: RecomputePhase
    profiles_done: int
    profiles_total: int
    changed_profile_count: int
    start_time: datetime
    update_time: datetime
