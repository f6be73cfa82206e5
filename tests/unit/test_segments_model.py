"""Segments' rules without I/O: golden engagement scores, each smart segment and flag at both
sides of each threshold, transitions by time alone, and the changes between two states."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.segments.model import (
    NO_SEGMENT,
    PLATFORM_API,
    ChangeCause,
    Classification,
    History,
    MembershipChange,
    SegmentFlag,
    Session,
    SessionUpdate,
    SmartSegment,
    Step,
    StoredState,
    Thresholds,
    advance,
    changes_between,
    classify,
    engagement,
    fold_sessions,
    reclassify,
    session_platform,
)

NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)
TINY = timedelta(microseconds=1)
DEFAULTS = Thresholds()

NEW = SmartSegment.NEW
ONE_TIME = SmartSegment.ONE_TIME
ENGAGED = SmartSegment.ENGAGED
DORMANT = SmartSegment.DORMANT
PROMISING_NEW = SegmentFlag.PROMISING_NEW
PROMISING_DORMANT = SegmentFlag.PROMISING_DORMANT
RISKY = SegmentFlag.RISKY_ENGAGED


def at(day: int, hour: int = 12, minute: int = 0, month: int = 3) -> datetime:
    return datetime(2024, month, day, hour, minute, tzinfo=UTC)


def history(
    *starts: datetime,
    minutes: float = 1.0,
    time_zone: str = "UTC",
    platform: int = 1,
    total_active_days: int | None = None,
) -> History:
    """A history holding every session as recent (the rules must ignore what is too old)."""
    from services.segments.model import local_day, zone_of

    sessions = tuple(Session(s, timedelta(minutes=minutes), platform) for s in starts)
    days = {local_day(s, zone_of(time_zone)) for s in starts}
    return History(
        session_count=len(starts),
        first_session_time=min(starts) if starts else None,
        last_session_time=max(starts) if starts else None,
        total_active_days=len(days) if total_active_days is None else total_active_days,
        recent_sessions=sessions,
        time_zone=time_zone,
    )


def segment_at(h: History, moment: datetime, thresholds: Thresholds = DEFAULTS) -> Classification:
    return classify(h, moment, thresholds).classification


# --- engagement ---------------------------------------------------------------------------


def test_nine_sessions_of_one_and_a_half_minutes_on_four_days_score_54_points() -> None:
    hours_by_day = {14: (9, 10), 16: (9, 10, 11), 18: (9,), 19: (9, 10, 11)}
    starts = [at(day, hour) for day, hours in hours_by_day.items() for hour in hours]
    assert len(starts) == 9
    score = engagement(history(*starts, minutes=1.5), NOW)
    assert (score.score1, score.score2, score.score3) == (1.5, 9, 4)
    assert score.score == pytest.approx(54.0)
    assert score.percentage == 19.29
    assert score.session_count == 9
    assert score.average_session_duration == timedelta(seconds=90)
    assert score.window_start_time == NOW - timedelta(hours=168)
    assert score.window_end_time == NOW


def test_values_over_the_caps_score_280_points_that_is_100_percent() -> None:
    # 25 sessions of 5 minutes spread over 8 calendar days of the 168 h window.
    starts = [NOW - timedelta(hours=6.5 * i) for i in range(25)]
    score = engagement(history(*starts, minutes=5), NOW)
    assert (score.score1, score.score2, score.score3) == (2.0, 20, 7)
    assert score.session_count == 25
    assert score.score == 280
    assert score.percentage == 100.0


def test_no_sessions_score_zero() -> None:
    score = engagement(History.empty(), NOW)
    assert (score.score1, score.score2, score.score3, score.score) == (0.0, 0, 0, 0.0)
    assert score.percentage == 0.0
    assert score.average_session_duration == timedelta()


def test_sessions_under_a_minute_score_a_fraction_of_a_minute() -> None:
    score = engagement(history(at(19, 9), at(19, 10), at(19, 11), minutes=0.5), NOW)
    assert (score.score1, score.score2, score.score3) == (0.5, 3, 1)
    assert score.score == pytest.approx(1.5)
    assert score.percentage == 0.54


def test_open_sessions_count_but_only_ended_ones_make_the_average() -> None:
    ended = history(at(19, 9), at(19, 10), minutes=1.5).recent_sessions
    open_ = (Session(at(19, 11), timedelta(minutes=10), 1, ended=False),)
    score = engagement(replace(history(at(19, 9)), recent_sessions=ended + open_), NOW)
    assert (score.session_count, score.score2) == (3, 3)
    assert score.average_session_duration == timedelta(seconds=90)
    assert score.score1 == 1.5


def test_a_session_exactly_168_hours_ago_counts_and_one_a_moment_earlier_does_not() -> None:
    edge = NOW - timedelta(hours=168)
    assert engagement(history(edge), NOW).session_count == 1
    assert engagement(history(edge - TINY), NOW).session_count == 0
    assert engagement(history(edge + TINY), NOW).session_count == 1
    # A session reported for after now (clock skew) is not "before now".
    assert engagement(history(NOW + TINY), NOW).session_count == 0


def test_days_are_counted_in_the_profile_time_zone_far_from_utc() -> None:
    # 09:30 and 10:30 UTC are one UTC day but two days at UTC+14 (23:30 and 00:30 next day).
    starts = (at(19, 9, 30), at(19, 10, 30))
    assert engagement(history(*starts), NOW).score3 == 1
    kiribati = engagement(history(*starts, time_zone="Pacific/Kiritimati"), NOW)
    assert kiribati.score3 == 2
    assert kiribati.time_zone == "Pacific/Kiritimati"
    # At UTC-11 they are one day too, but 12:30 and 11:30 at Pago Pago split at midnight.
    pago = history(at(19, 10, 30), at(19, 11, 30), time_zone="Pacific/Pago_Pago")
    assert engagement(pago, NOW).score3 == 2


def test_an_unknown_time_zone_falls_back_to_utc() -> None:
    score = engagement(history(at(19), time_zone="Mars/Olympus"), NOW)
    assert score.time_zone == "UTC"


# --- smart segments at both sides of each threshold ----------------------------------------


def test_no_session_is_no_segment() -> None:
    facts = classify(History.empty(), NOW, DEFAULTS)
    assert facts.classification == NO_SEGMENT
    assert facts.next_transition_time is None


def test_new_lasts_until_exactly_new_days_after_the_first_session() -> None:
    h = history(NOW - timedelta(days=7) + TINY)
    assert segment_at(h, NOW) == Classification(NEW)
    h = history(NOW - timedelta(days=7))
    assert segment_at(h, NOW) == Classification(ONE_TIME)


def test_one_time_needs_exactly_one_session_ever() -> None:
    first = NOW - timedelta(days=8)
    assert segment_at(history(first), NOW) == Classification(ONE_TIME)
    # Two sessions on one day 8 days ago: one active day in the window, so Promising Dormant.
    two = history(first, first + timedelta(minutes=5))
    assert segment_at(two, NOW) == Classification(DORMANT, PROMISING_DORMANT)


def test_promising_new_needs_the_engaged_number_of_active_days() -> None:
    one_day = history(at(18, 9), at(18, 10))
    assert segment_at(one_day, NOW) == Classification(NEW)
    two_days = history(at(18, 9), at(19, 9))
    assert segment_at(two_days, NOW) == Classification(NEW, PROMISING_NEW)
    three = Thresholds(engaged_min_active_days=3)
    assert segment_at(two_days, NOW, three) == Classification(NEW)


def test_engaged_needs_two_active_days_within_the_last_14_calendar_days() -> None:
    # Today is March 20: March 7 is the oldest day of the window, March 6 is out.
    inside = history(at(1), at(7, 0, 0), at(19))
    assert segment_at(inside, NOW) == Classification(ENGAGED)
    outside = history(at(1), at(6, 23, 59), at(19))
    assert segment_at(outside, NOW) == Classification(DORMANT, PROMISING_DORMANT)


def test_risky_engaged_starts_exactly_risky_days_after_the_last_session() -> None:
    last = NOW - timedelta(days=7)
    assert segment_at(history(at(1), at(12), last), NOW) == Classification(ENGAGED, RISKY)
    last = NOW - timedelta(days=7) + TINY
    assert segment_at(history(at(1), at(12), last), NOW) == Classification(ENGAGED)


def test_dormant_without_flag_has_no_active_day_in_the_window() -> None:
    assert segment_at(history(at(1), at(2)), NOW) == Classification(DORMANT)


def test_thresholds_come_from_the_project_settings() -> None:
    thresholds = Thresholds.from_settings(
        {
            "segments.new_days": 3,
            "segments.active_window_days": 5,
            "segments.engaged_min_active_days": 3,
            "segments.risky_after_days": 1,
        }
    )
    h = history(at(16), at(18), at(19))
    assert segment_at(h, NOW, thresholds) == Classification(ENGAGED, RISKY)
    assert segment_at(h, at(21, 0), thresholds) == Classification(DORMANT, PROMISING_DORMANT)
    assert thresholds.lookback == timedelta(hours=168)


# --- transitions by time alone -------------------------------------------------------------


def test_an_engaged_profile_becomes_risky_then_promising_dormant_then_dormant() -> None:
    h = history(at(1), at(15), at(18))
    facts = classify(h, NOW, DEFAULTS)
    assert facts.classification == Classification(ENGAGED)
    assert facts.recent_active_days == 2
    assert facts.schedule == (
        Step(at(25), Classification(ENGAGED, RISKY)),
        Step(at(29, 0), Classification(DORMANT, PROMISING_DORMANT)),
        Step(at(1, 0, month=4), Classification(DORMANT)),
    )
    assert facts.next_transition_time == at(25)
    befores = (Classification(ENGAGED), *(s.classification for s in facts.schedule[:-1]))
    for step, before in zip(facts.schedule, befores, strict=True):
        assert segment_at(h, step.time - TINY) == before
        assert segment_at(h, step.time) == step.classification
    assert classify(h, at(1, 0, month=4), DEFAULTS).next_transition_time is None


def test_a_new_profile_with_one_session_becomes_one_time_for_good() -> None:
    facts = classify(history(at(18)), NOW, DEFAULTS)
    assert facts.classification == Classification(NEW)
    assert facts.schedule == (Step(at(25), Classification(ONE_TIME)),)
    assert classify(history(at(18)), at(25), DEFAULTS).schedule == ()


def test_a_promising_new_profile_becomes_engaged_when_new_ends() -> None:
    facts = classify(history(at(18), at(19)), NOW, DEFAULTS)
    assert facts.classification == Classification(NEW, PROMISING_NEW)
    assert facts.schedule[0] == Step(at(25), Classification(ENGAGED))
    assert facts.schedule[1] == Step(at(26), Classification(ENGAGED, RISKY))


def test_days_leave_the_window_at_local_midnight() -> None:
    # March 15 12:00 UTC is March 15 21:00 in Tokyo: it leaves at March 29 00:00 JST (15:00 UTC).
    h = history(at(1), at(15), at(18), time_zone="Asia/Tokyo")
    facts = classify(h, NOW, DEFAULTS)
    assert Step(at(28, 15), Classification(DORMANT, PROMISING_DORMANT)) in facts.schedule
    assert facts.time_zone == "Asia/Tokyo"


# --- changes -------------------------------------------------------------------------------


def change(
    entered: bool,
    segment: SmartSegment | None = None,
    flag: SegmentFlag | None = None,
    moment: datetime = NOW,
    cause: ChangeCause = ChangeCause.EVENT,
) -> MembershipChange:
    return MembershipChange(entered, moment, cause, segment=segment, flag=flag)


def test_changes_leave_the_old_flag_and_segment_before_entering_the_new_ones() -> None:
    old = Classification(ENGAGED, RISKY)
    new = Classification(DORMANT, PROMISING_DORMANT)
    assert changes_between(old, new, NOW, ChangeCause.EVENT) == [
        change(False, flag=RISKY),
        change(False, segment=ENGAGED),
        change(True, segment=DORMANT),
        change(True, flag=PROMISING_DORMANT),
    ]
    assert changes_between(Classification(ENGAGED), old, NOW, ChangeCause.EVENT) == [
        change(True, flag=RISKY)
    ]
    assert changes_between(NO_SEGMENT, Classification(NEW), NOW, ChangeCause.EVENT) == [
        change(True, segment=NEW)
    ]
    assert changes_between(old, old, NOW, ChangeCause.EVENT) == []


def test_advancing_a_stored_state_reports_each_step_at_its_own_time() -> None:
    stored = StoredState(
        Classification(ENGAGED),
        (
            Step(at(25), Classification(ENGAGED, RISKY)),
            Step(at(29, 0), Classification(DORMANT, PROMISING_DORMANT)),
            Step(at(1, 0, month=4), Classification(DORMANT)),
        ),
    )
    moved, changes = advance(stored, at(30))
    assert moved == StoredState(Classification(DORMANT, PROMISING_DORMANT), (stored.schedule[2],))
    time = ChangeCause.TIME
    assert changes == [
        change(True, flag=RISKY, moment=at(25), cause=time),
        change(False, flag=RISKY, moment=at(29, 0), cause=time),
        change(False, segment=ENGAGED, moment=at(29, 0), cause=time),
        change(True, segment=DORMANT, moment=at(29, 0), cause=time),
        change(True, flag=PROMISING_DORMANT, moment=at(29, 0), cause=time),
    ]
    assert advance(stored, at(25) - TINY) == (stored, [])


def test_an_event_after_a_missed_time_step_reports_both() -> None:
    stored = StoredState(Classification(ENGAGED), (Step(at(19), Classification(DORMANT)),))
    facts = classify(history(at(1), at(5), at(20, 11)), NOW, DEFAULTS)
    assert facts.classification == Classification(DORMANT, PROMISING_DORMANT)
    changes = reclassify(stored, facts, NOW, ChangeCause.EVENT, at(20, 11))
    assert changes == [
        change(False, segment=ENGAGED, moment=at(19), cause=ChangeCause.TIME),
        change(True, segment=DORMANT, moment=at(19), cause=ChangeCause.TIME),
        change(True, flag=PROMISING_DORMANT, moment=at(20, 11)),
    ]


def test_session_events_fold_into_one_update_whatever_their_order() -> None:
    start = SessionUpdate("i1:s1", 1, at(19, 9), True, timedelta(), platform_time=at(19, 9))
    heartbeat = SessionUpdate(
        "i1:s1", 1, at(19, 9, 1), False, timedelta(minutes=1), platform_time=at(19, 9, 2)
    )
    end = SessionUpdate(
        "i1:s1", 1, at(19, 9, 2), False, timedelta(minutes=3), ended=True, platform_time=at(19, 12)
    )
    expected = SessionUpdate(
        "i1:s1", 1, at(19, 9), True, timedelta(minutes=3), ended=True, platform_time=at(19, 12)
    )
    assert fold_sessions([start, heartbeat, end]) == [expected]
    assert fold_sessions([end, start, heartbeat, end]) == [expected]
    other = SessionUpdate("i1:s2", 1, at(19, 10), True, timedelta(), platform_time=at(19, 10))
    assert fold_sessions([end, other]) == [end, other]


# profiles.common.v1.Platform: the device platforms.
IOS, ANDROID, WEB = 1, 2, 3


def test_a_device_platform_wins_over_api_whatever_the_order() -> None:
    for device in (IOS, ANDROID, WEB):
        assert session_platform(device, PLATFORM_API) == device
        assert session_platform(PLATFORM_API, device) == device
    assert session_platform(PLATFORM_API, PLATFORM_API) == PLATFORM_API
    assert session_platform(IOS, ANDROID) == ANDROID  # between devices, the later


def plain_platform(events: list[tuple[datetime, int]]) -> int:
    """Ingest's rule for a batch, written plainly: the platform of the latest event on a device
    platform (by event time, the later in the batch on a tie), API when every event is on API."""
    device = [(t, i, p) for i, (t, p) in enumerate(events) if p != PLATFORM_API]
    return max(device)[2] if device else PLATFORM_API


def test_a_folded_session_takes_its_latest_device_event_s_platform_on_random_batches() -> None:
    for seed in range(300):
        rng = random.Random(seed)
        events = []
        for _ in range(rng.randint(1, 8)):
            moment = at(19, 9, rng.randint(0, 5))  # few times: ties between events
            # API events mixed into device sessions (Countly's heartbeats, a Segment track
            # without context), sometimes only API.
            platform = rng.choice((PLATFORM_API, PLATFORM_API, IOS, ANDROID, WEB))
            counted = rng.random() < 0.6
            duration = timedelta(minutes=rng.randint(0, 3)) if counted else timedelta()
            events.append(
                SessionUpdate(
                    "i1:s1",
                    platform,
                    moment - duration,
                    counted and rng.random() < 0.3,
                    duration,
                    counted and rng.random() < 0.2,
                    platform_time=moment,
                    counted=counted,
                )
            )
        (folded,) = fold_sessions(events)
        assert folded.platform == plain_platform([(e.platform_time, e.platform) for e in events]), (
            seed
        )
        # Other events of the session tell its platform, never its times, nor that it happened.
        counted_only = [e for e in events if e.counted]
        assert folded.counted == bool(counted_only), seed
        if counted_only:
            (times,) = fold_sessions(counted_only)
            assert (folded.start_time, folded.start_known, folded.duration, folded.ended) == (
                times.start_time,
                times.start_known,
                times.duration,
                times.ended,
            ), seed
