"""Ingest's session rule (model.session_deltas): what one batch says about each session."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.ingest.model import SessionEvent, session_deltas

T0 = datetime(2030, 1, 1, 12, tzinfo=UTC)
MIN = timedelta(minutes=1)


def event(kind: str, minutes: int, **fields: object) -> SessionEvent:
    return SessionEvent(
        installation_id=str(fields.pop("installation_id", "i1")),
        session_id=str(fields.pop("session_id", "s1")),
        profile_id="p1",
        platform=1,
        kind=kind,  # type: ignore[arg-type]
        time=T0 + minutes * MIN,
        **fields,  # type: ignore[arg-type]
    )


def test_an_ended_session_takes_the_duration_of_its_latest_end() -> None:
    (delta,) = session_deltas(
        [
            event("end", 9, duration=9 * MIN),
            event("start", 0, country="FR"),
            event("heartbeat", 5, duration=5 * MIN),
            event("end", 8, duration=8 * MIN),
        ]
    )
    assert (delta.start_time, delta.last_activity_time) == (T0, T0 + 9 * MIN)
    assert (delta.end_time, delta.duration, delta.ended, delta.started) == (
        T0 + 9 * MIN,
        9 * MIN,
        True,
        True,
    )
    assert (delta.country, delta.event_count) == ("FR", 4)


def test_an_open_session_lasts_the_longest_it_was_seen() -> None:
    (by_heartbeat,) = session_deltas([event("start", 0), event("heartbeat", 2, duration=6 * MIN)])
    assert (by_heartbeat.duration, by_heartbeat.end_time) == (6 * MIN, None)
    (by_activity,) = session_deltas([event("start", 0), event("other", 4)])
    assert by_activity.duration == 4 * MIN


def test_sessions_are_keyed_by_installation_and_listed_in_lock_order() -> None:
    deltas = session_deltas(
        [
            event("start", 0, installation_id="i2"),
            event("start", 0, installation_id="i1", session_id="s2"),
            event("start", 0, installation_id="i1"),
        ]
    )
    assert [(d.installation_id, d.session_id) for d in deltas] == [
        ("i1", "s1"),
        ("i1", "s2"),
        ("i2", "s1"),
    ]
