"""The session rules ingest applies to events sent without a session ID
(services/ingest/derived_sessions.py), without a database: unit cases, and a property test
against a plain model of "a new session after 30 minutes without events"."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.derived_sessions import (
    INACTIVITY_TIMEOUT,
    Asking,
    Kind,
    Rule,
    Span,
    Touch,
    assign,
    derived_session_id,
)

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


class Store:
    """What ingest keeps between batches for one installation: the spans, and which session each
    stored event got. A retried event (already stored) is left out, as the store does."""

    def __init__(self) -> None:
        self.spans: dict[str, Span] = {}
        self.session_of: dict[str, str | None] = {}

    def send(self, batch: Sequence[tuple[str, float]], rule: Rule = Rule.INACTIVITY) -> None:
        fresh = [(i, e) for i, e in enumerate(batch) if e[0] not in self.session_of]
        firsts = {}
        for index, (event_id, minutes) in fresh:
            firsts.setdefault(event_id, (index, minutes))  # in-batch repeats: the first
        asking = [Asking(i, eid, at(m), rule) for eid, (i, m) in firsts.items()]
        answers, after = assign("inst", self.spans.values(), [], asking)
        self.spans = {s.session_id: s for s in after}
        for event_id, (index, _) in firsts.items():
            self.session_of[event_id] = answers[index].session_id


def runs(minutes: Sequence[float]) -> list[list[float]]:
    """The model: an installation's event times cut where two consecutive ones are 30 minutes
    or more apart."""
    out: list[list[float]] = []
    for m in sorted(minutes):
        if out and m - out[-1][-1] < INACTIVITY_TIMEOUT.total_seconds() / 60:
            out[-1].append(m)
        else:
            out.append([m])
    return out


def partition(store: Store, times: dict[str, float]) -> list[list[float]]:
    groups: dict[str | None, list[float]] = {}
    for event_id, session_id in store.session_of.items():
        groups.setdefault(session_id, []).append(times[event_id])
    return sorted(sorted(g) for g in groups.values())


def test_events_less_than_thirty_minutes_apart_share_a_session() -> None:
    store = Store()
    store.send([("a", 0), ("b", 29.9)])
    store.send([("c", 59.8)])
    assert len({store.session_of[e] for e in "abc"}) == 1
    (span,) = store.spans.values()
    assert span.start_time == at(0)
    assert span.last_activity_time == at(59.8)
    assert span.duration == timedelta(minutes=59.8)


def test_thirty_minutes_without_events_start_a_new_session_named_by_its_first_event() -> None:
    store = Store()
    store.send([("a", 0), ("b", 30)])
    assert store.session_of["a"] == derived_session_id("inst", "a")
    assert store.session_of["b"] == derived_session_id("inst", "b")


def test_a_late_event_extends_its_session_backwards() -> None:
    store = Store()
    store.send([("b", 40)])
    store.send([("a", 15)])
    assert store.session_of["a"] == store.session_of["b"]
    assert store.spans[store.session_of["b"] or ""].start_time == at(15)


def test_a_late_event_between_two_sessions_joins_the_earlier_and_merges_nothing() -> None:
    store = Store()
    store.send([("a", 0), ("c", 50)])
    store.send([("b", 25)])  # 25 minutes after a, 25 before c
    assert store.session_of["b"] == store.session_of["a"] != store.session_of["c"]


def test_a_retried_event_changes_no_session() -> None:
    store = Store()
    store.send([("a", 0)])
    before = dict(store.spans)
    store.send([("a", 0), ("a", 0)])
    assert store.spans == before


def test_explicit_sessions_do_not_count_as_activity_for_derived_ones() -> None:
    explicit = Span("posthog-1", at(0), at(10))
    answers, _ = assign("inst", [explicit], [], [Asking(0, "a", at(5), Rule.INACTIVITY)])
    assert answers[0].session_id == derived_session_id("inst", "a")
    assert answers[0].new


def test_open_session_heartbeats_and_end_get_durations_since_the_start() -> None:
    touches = [Touch("countly-1", at(0), Kind.START)]
    asking = [
        Asking(1, "h", at(1), Rule.OPEN_SESSION, Kind.HEARTBEAT, timedelta(seconds=60)),
        Asking(2, "e", at(3), Rule.OPEN_SESSION, Kind.END, timedelta(seconds=120)),
        Asking(3, "x", at(4), Rule.OPEN_SESSION, Kind.OTHER),
    ]
    answers, after = assign("inst", [], touches, asking)
    assert answers[1].session_id == answers[2].session_id == "countly-1"
    assert answers[1].duration == timedelta(minutes=1)
    assert answers[2].duration == timedelta(minutes=3)
    assert answers[3].session_id is None  # after the end: no open session, no new one
    assert after[0].end_time == at(3)


def test_a_heartbeat_with_no_open_session_starts_one_that_began_before_it() -> None:
    heartbeat = Asking(0, "h1", at(10), Rule.OPEN_SESSION, Kind.HEARTBEAT, timedelta(seconds=60))
    answers, after = assign("inst", [Span("old", at(-40), at(-31))], [], [heartbeat])
    assert answers[0].new
    assert answers[0].duration == timedelta(seconds=60)
    later = Asking(1, "h2", at(11), Rule.OPEN_SESSION, Kind.HEARTBEAT, timedelta(seconds=60))
    answers, _ = assign("inst", after, [], [later])
    assert answers[1].session_id == derived_session_id("inst", "h1")
    assert answers[1].duration == timedelta(seconds=120)


def test_an_event_after_thirty_idle_minutes_finds_no_open_session() -> None:
    asking = [Asking(0, "x", at(30), Rule.OPEN_SESSION, Kind.OTHER)]
    answers, _ = assign("inst", [Span("s", at(0), at(0))], [], asking)
    assert answers[0].session_id is None


EVENT_TIMES = st.lists(
    st.integers(min_value=0, max_value=600), min_size=1, max_size=30
)  # minutes within ten hours: gaps around 30 minutes are common


def batches(draw: st.DrawFn, ids: list[str]) -> list[list[str]]:
    """The IDs cut into consecutive batches, with some batches sent twice (retries)."""
    out: list[list[str]] = []
    position = 0
    while position < len(ids):
        size = draw(st.integers(min_value=1, max_value=5))
        out.append(ids[position : position + size])
        if draw(st.booleans()) and draw(st.booleans()):
            out.append(out[-1])
        position += size
    return out


@settings(max_examples=300, deadline=None)
@given(times=EVENT_TIMES, data=st.data())
def test_in_order_arrival_gives_exactly_the_runs_without_a_30_minute_gap(
    times: list[int], data: st.DataObject
) -> None:
    by_id = {f"e{n}": float(m) for n, m in enumerate(times)}
    ordered = sorted(by_id, key=lambda e: (by_id[e], e))
    store = Store()
    for batch in batches(data.draw, ordered):
        # Within a batch any order: the rule sorts a batch by event time.
        shuffled = data.draw(st.permutations(batch))
        store.send([(e, by_id[e]) for e in shuffled])
    assert partition(store, by_id) == runs(list(by_id.values()))


@settings(max_examples=300, deadline=None)
@given(times=EVENT_TIMES, data=st.data())
def test_any_arrival_order_gives_runs_cut_into_consecutive_pieces(
    times: list[int], data: st.DataObject
) -> None:
    """Late events may leave two sessions closer than 30 minutes (never merged), but every
    session is a run of consecutive events with gaps under 30 minutes, inside one model run."""
    by_id = {f"e{n}": float(m) for n, m in enumerate(times)}
    arrival = data.draw(st.permutations(list(by_id)))
    store = Store()
    for batch in batches(data.draw, arrival):
        store.send([(e, by_id[e]) for e in batch])
    pieces = partition(store, by_id)
    model = runs(list(by_id.values()))
    assert sorted(m for piece in pieces for m in piece) == sorted(by_id.values())
    limit = INACTIVITY_TIMEOUT.total_seconds() / 60
    for piece in pieces:
        assert all(b - a < limit for a, b in itertools.pairwise(piece))
        assert any(piece[0] >= run[0] and piece[-1] <= run[-1] for run in model)
    # Consecutive: no event of another session between a session's first and last event.
    spans = sorted((p[0], p[-1]) for p in pieces)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end < start
