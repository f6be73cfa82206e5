"""A profile's attributes and consent are the replay of every operation in replay order, through
the public API: the seven cases of issue 22 with the replay's answer, then a property test that
compares GetProfile with a plain-Python replay of random histories sent in random arrival
orders, through TrackEvents and ImportEvents, split over two installations and a custom ID with
Identify at random points.

The rule, as the replay below writes it: per profile and attribute, apply every operation in
the order (event time, event ID, origin, position in the event), where origin is "c:" + the
custom ID or "i:" + the installation ID and strings compare by code point. A set gives the
value; an unset removes it; a set-once gives the value only when the attribute is absent at
its point; increment adds to the number (0 when absent or not a number); append and remove act
on the list as it stands (a string is a one-item list, absent or any other type an empty one;
a list keeps its latest 25 items). update_time is the event time of the last operation applied
(a set-once that finds a value applies nothing). Consent: the latest change in the same order.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from tests.support.query import NOW, Suite, attribute_event, op, stamp, start_suite

T = [NOW - timedelta(hours=10 - i) for i in range(10)]

Scalar = float | str | list[str]


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def new_id() -> str:
    return uuid.uuid4().hex


async def custom_attributes(suite: Suite, **lookup: str) -> dict[str, tuple[Any, datetime]]:
    """GetProfile's custom attributes: name -> (value, update_time)."""
    reply = await suite.get(**lookup)
    return {
        a.name: (_python(a.value), a.update_time.ToDatetime())
        for a in reply.profile.custom_attributes
    }


def _python(value: types_pb2.AttributeValue) -> Any:
    which = value.WhichOneof("value")
    if which == "string_list_value":
        return list(value.string_list_value.values)
    return getattr(value, which) if which else None


def naive(moment: datetime) -> datetime:
    return moment.replace(tzinfo=None)


# --- the seven cases of the issue (t1 < t2 < t3; operations listed in arrival order) -------


async def test_a_late_set_older_than_a_set_once_gives_its_value_and_its_time(suite: Suite) -> None:
    inst = new_id()
    await suite.track(attribute_event(inst, [op("set_once", "plan", "trial")], time=T[2]))
    await suite.track(attribute_event(inst, [op("set", "plan", "pro")], time=T[1]))
    # The earliest of two set-onces wins, with its own time, whichever arrives first.
    await suite.track(attribute_event(inst, [op("set_once", "source", "ad")], time=T[3]))
    await suite.track(attribute_event(inst, [op("set_once", "source", "seo")], time=T[2]))
    state = await custom_attributes(suite, installation_id=inst)
    assert state["plan"] == ("pro", naive(T[1]))
    assert state["source"] == ("seo", naive(T[2]))
    # The same after a merge: the set and the set-once came from two installations.
    a, b = new_id(), new_id()
    await suite.track(attribute_event(a, [op("set_once", "plan", "trial")], time=T[2]))
    await suite.track(attribute_event(b, [op("set", "plan", "pro")], time=T[1]))
    await suite.identity.identify(a, "case-1")
    await suite.identity.identify(b, "case-1")
    state = await custom_attributes(suite, custom_id="case-1")
    assert state["plan"] == ("pro", naive(T[1]))


async def test_a_set_once_after_a_late_unset_applies_again(suite: Suite) -> None:
    inst = new_id()
    await suite.track(attribute_event(inst, [op("set_once", "x", "c")], time=T[3]))
    await suite.track(attribute_event(inst, [op("unset", "x")], time=T[2]))
    await suite.track(attribute_event(inst, [op("set_once", "x", "d")], time=T[1]))
    # Replay: d (t1), removed (t2), c (t3).
    assert (await custom_attributes(suite, installation_id=inst))["x"] == ("c", naive(T[3]))


async def test_a_late_older_set_does_not_undo_an_unset_and_set_once_after_it(
    suite: Suite,
) -> None:
    inst = new_id()
    await suite.track(attribute_event(inst, [op("unset", "x")], time=T[2]))
    await suite.track(attribute_event(inst, [op("set_once", "x", "c")], time=T[3]))
    await suite.track(attribute_event(inst, [op("set", "x", "z")], time=T[1]))
    # Replay: z (t1), removed (t2), c (t3).
    assert (await custom_attributes(suite, installation_id=inst))["x"] == ("c", naive(T[3]))


async def test_an_increment_counts_on_a_late_older_set_once(suite: Suite) -> None:
    inst = new_id()
    await suite.track(attribute_event(inst, [op("increment", "n", 2)], time=T[2]))
    await suite.track(attribute_event(inst, [op("set_once", "n", 10)], time=T[1]))
    assert (await custom_attributes(suite, installation_id=inst))["n"] == (12, naive(T[2]))


async def test_a_late_operation_older_than_a_long_history_still_counts(suite: Suite) -> None:
    inst = new_id()
    step = timedelta(seconds=1)
    await suite.track(
        *[attribute_event(inst, [op("increment", "n", 1)], time=T[5] + step * i) for i in range(60)]
    )
    await suite.track(attribute_event(inst, [op("increment", "n", 1)], time=T[1]))
    pairs = [
        attribute_event(
            inst, [op("append", "lst", f"v{i}"), op("remove", "lst", f"v{i}")], time=T[5] + step * i
        )
        for i in range(30)
    ]
    await suite.track(*pairs)
    await suite.track(attribute_event(inst, [op("append", "lst", "early")], time=T[1]))
    state = await custom_attributes(suite, installation_id=inst)
    assert state["n"] == (61, naive(T[5] + step * 59))
    assert state["lst"] == (["early"], naive(T[5] + step * 29))


@pytest.mark.parametrize(
    ("start", "increment"),
    [
        (1.789999999999996e308, 1e293),  # applies: 1.789999999999997e308
        (-1.789999999999996e308, 1e293),  # applies, toward 0
        (1.7899999999999998e308, 0.0),  # applies: the value stays, its time moves
        (1.7900000000000004e308, -1e292),  # refused: 1.7900000000000002e308 is still past
    ],
)
async def test_an_increment_near_the_bound_is_judged_on_the_stored_value_as_stored(
    suite: Suite, start: float, increment: float
) -> None:
    # 0041 read the stored number through float8 into numeric (15 digits): 1.789999999999996e308
    # read as 1.79e308 and refused every increment; 1.7900000000000004e308 let one apply.
    inst = new_id()
    await suite.track(
        attribute_event(inst, [op("set", "n", start)], time=T[0]),
        attribute_event(inst, [op("increment", "n", increment)], time=T[1]),
    )
    (n,) = (await suite.get(installation_id=inst)).profile.custom_attributes
    applies = abs(start + increment) < 1.79e308
    expected = (start + increment, T[1]) if applies else (start, T[0])
    assert (n.value.number_value, n.update_time.ToDatetime(tzinfo=UTC)) == expected


async def test_an_event_keeps_the_order_of_its_own_operations(suite: Suite) -> None:
    inst = new_id()
    empty = op("set", "lst")
    empty.value.string_list_value.SetInParent()
    await suite.track(
        attribute_event(inst, [op("append", "lst", "a1"), empty], time=T[1]),
        attribute_event(inst, [op("increment", "n", 5), op("set", "n", 1)], time=T[1]),
    )
    state = await custom_attributes(suite, installation_id=inst)
    assert state["lst"] == ([], naive(T[1]))
    assert state["n"] == (1, naive(T[1]))


@pytest.mark.parametrize("unset_last", [False, True])
async def test_the_same_events_give_one_answer_in_any_arrival_order_across_a_merge(
    suite: Suite, unset_last: bool
) -> None:
    a, b = new_id(), new_id()
    user = new_id()
    set_x = attribute_event(a, [op("set", "x", "x")], time=T[1])
    unset = attribute_event(b, [op("unset", "x")], time=T[2])
    set_once_y = attribute_event(a, [op("set_once", "x", "y")], time=T[3])
    await suite.track(set_x)
    await suite.identity.identify(a, user)
    for event in [set_once_y, unset] if unset_last else [unset, set_once_y]:
        await suite.track(event)
    await suite.identity.identify(b, user)  # b's profile, with the unset, merges into a's
    # Replay: x (t1), removed (t2), y (t3).
    assert (await custom_attributes(suite, custom_id=user))["x"] == ("y", naive(T[3]))


# --- the property: GetProfile equals the replay, whatever the arrival --------------------

INSTALLATION, OTHER_INSTALLATION, CUSTOM_ID = "i0", "i1", "c"
ORIGINS = (INSTALLATION, OTHER_INSTALLATION, CUSTOM_ID)
# Few distinct times and event IDs, so ties are frequent; "B" < "a" < "z" < "é" by code point
# (not by most locales' collations).
TIMES = T[1:5]
EVENT_IDS = ("a", "B", "z", "é")


@dataclass(frozen=True)
class Operation:
    kind: str
    native: bool
    name: str
    value: Scalar | None


@dataclass(frozen=True)
class HistoryEvent:
    origin: str  # one of ORIGINS
    event_id: str
    time: datetime
    operations: tuple[Operation, ...]  # empty for a consent change
    subscribed: bool | None  # the consent change (email, marketing), or None


VALUES: st.SearchStrategy[Scalar] = st.sampled_from([1.0, 2.0, "x", "y", ["x"], ["x", "y"]])
LIST_OPERANDS: st.SearchStrategy[Scalar] = st.sampled_from(["x", "y", ["x"], ["y", "x"]])
CUSTOM_OPERATIONS = st.one_of(
    st.builds(
        Operation,
        st.sampled_from(["set", "set_once"]),
        st.just(False),
        st.sampled_from(["p", "q"]),
        VALUES,
    ),
    st.builds(Operation, st.just("unset"), st.just(False), st.sampled_from(["p", "q"]), st.none()),
    st.builds(
        Operation,
        st.just("increment"),
        st.just(False),
        st.sampled_from(["p", "q"]),
        # Huge ones too: two of 1e308 leave the double's range (0041).
        st.sampled_from([1.0, 3.0, -1.0, 1e308, -1e308]),
    ),
    st.builds(
        Operation,
        st.sampled_from(["append", "remove"]),
        st.just(False),
        st.sampled_from(["p", "q"]),
        LIST_OPERANDS,
    ),
)
NATIVE_OPERATIONS = st.one_of(
    st.builds(
        Operation,
        st.sampled_from(["set", "set_once"]),
        st.just(True),
        st.just("first_name"),
        st.sampled_from(["Ann", "Bob"]),
    ),
    st.builds(Operation, st.just("unset"), st.just(True), st.just("first_name"), st.none()),
)
ATTRIBUTE_EVENTS = st.builds(
    HistoryEvent,
    st.sampled_from(ORIGINS),
    st.sampled_from(EVENT_IDS),
    st.sampled_from(TIMES),
    st.lists(st.one_of(CUSTOM_OPERATIONS, NATIVE_OPERATIONS), min_size=1, max_size=3).map(tuple),
    st.none(),
)
CONSENT_EVENTS = st.builds(
    HistoryEvent,
    st.sampled_from(ORIGINS),
    st.sampled_from(EVENT_IDS),
    st.sampled_from(TIMES),
    st.just(()),
    st.booleans(),
)
# About one event in four changes consent.
EVENTS = st.one_of(ATTRIBUTE_EVENTS, ATTRIBUTE_EVENTS, ATTRIBUTE_EVENTS, CONSENT_EVENTS)


@dataclass(frozen=True)
class Arrival:
    """One history's arrival: its events in batches, each through TrackEvents or ImportEvents,
    and after how many batches each installation is identified with the custom ID."""

    batches: tuple[tuple[HistoryEvent, ...], ...]
    imported: tuple[bool, ...]
    identify_after: tuple[int, int]


@st.composite
def arrivals(draw: st.DrawFn) -> Arrival:
    events = draw(
        st.lists(EVENTS, min_size=2, max_size=10, unique_by=lambda e: (e.origin, e.event_id))
    )
    order = draw(st.permutations(events))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=3)))
    bounds = [0, *[c for c in cuts if c < len(order)], len(order)]
    batches = tuple(tuple(order[x:y]) for x, y in itertools.pairwise(bounds) if x < y)
    imported = tuple(draw(st.booleans()) for _ in batches)
    identify_after = (draw(st.integers(0, len(batches))), draw(st.integers(0, len(batches))))
    return Arrival(batches, imported, identify_after)


@dataclass(frozen=True)
class Expected:
    custom: dict[str, tuple[Scalar, datetime]]
    first_name: str
    consent: tuple[bool, datetime] | None


def origin_key(origin: str, names: dict[str, str]) -> str:
    return ("c:" if origin == CUSTOM_ID else "i:") + names[origin]


def as_list(value: Scalar | None) -> list[str]:
    if isinstance(value, list):
        return list(value)
    return [value] if isinstance(value, str) else []


def replay(events: Sequence[HistoryEvent], names: dict[str, str]) -> Expected:
    """The rule of the module docstring, applied in replay order."""
    ordered = sorted(
        (
            (e.time, e.event_id, origin_key(e.origin, names), position, operation)
            for e in events
            for position, operation in enumerate(e.operations)
        ),
        key=lambda o: o[:4],
    )
    state: dict[tuple[bool, str], tuple[Scalar, datetime]] = {}
    for time, _, _, _, operation in ordered:
        key = (operation.native, operation.name)
        held = state.get(key)
        current = None if held is None else held[0]
        if operation.kind == "set":
            assert operation.value is not None
            state[key] = (operation.value, time)
        elif operation.kind == "unset":
            state.pop(key, None)
        elif operation.kind == "set_once":
            if held is None:
                assert operation.value is not None
                state[key] = (operation.value, time)
        elif operation.kind == "increment":
            assert isinstance(operation.value, float)
            base = current if isinstance(current, float) else 0.0
            # 0041: an increment to the edge of the double's range or past it changes nothing.
            if abs(base + operation.value) < 1.79e308:
                state[key] = (base + operation.value, time)
        elif operation.kind == "append":
            state[key] = ((as_list(current) + as_list(operation.value))[-25:], time)
        else:
            removed = as_list(operation.value)
            state[key] = ([i for i in as_list(current) if i not in removed], time)
    changes = sorted(
        ((e.time, e.event_id, origin_key(e.origin, names)), e.subscribed)
        for e in events
        if e.subscribed is not None
    )
    native = state.get((True, "first_name"))
    return Expected(
        custom={name: value for (is_native, name), value in state.items() if not is_native},
        first_name="" if native is None else str(native[0]),
        consent=None if not changes else (changes[-1][1], changes[-1][0][0]),
    )


def to_proto(event: HistoryEvent, names: dict[str, str]) -> ingest_pb.Event:
    message = ingest_pb.Event(event_id=event.event_id, event_time=stamp(event.time))
    if event.origin == CUSTOM_ID:
        message.custom_id = names[CUSTOM_ID]
        message.platform = types_pb2.PLATFORM_API
    else:
        message.installation_id = names[event.origin]
        message.platform = types_pb2.PLATFORM_ANDROID
    if event.subscribed is not None:
        message.subscription_change.channel = types_pb2.CHANNEL_EMAIL
        message.subscription_change.kind = types_pb2.SUBSCRIPTION_KIND_MARKETING
        message.subscription_change.subscribed = event.subscribed
        return message
    for operation in event.operations:
        one = op(operation.kind, operation.name.upper() if operation.native else operation.name)
        if isinstance(operation.value, list):
            one.value.string_list_value.values.extend(operation.value)
        elif isinstance(operation.value, str):
            one.value.string_value = operation.value
        elif isinstance(operation.value, float):
            one.value.number_value = operation.value
        message.attribute_operations.operations.append(one)
    return message


async def observed(suite: Suite, custom_id: str) -> Expected:
    reply = await suite.get(custom_id=custom_id)
    profile = reply.profile
    consent = [
        s
        for s in profile.subscriptions
        if s.channel == types_pb2.CHANNEL_EMAIL and s.kind == types_pb2.SUBSCRIPTION_KIND_MARKETING
    ]
    (email,) = consent
    return Expected(
        custom={
            a.name: (_python(a.value), a.update_time.ToDatetime())
            for a in profile.custom_attributes
        },
        first_name=profile.native_attributes.first_name,
        consent=(
            (email.subscribed, email.last_change_time.ToDatetime())
            if email.HasField("last_change_time")
            else None
        ),
    )


async def send(suite: Suite, arrival: Arrival) -> tuple[Expected, Expected]:
    """Sends one history as `arrival` says, on fresh IDs; returns (replay, GetProfile)."""
    # Fresh IDs per example, with one prefix: the origins compare the same way every run.
    run = new_id()
    names = {INSTALLATION: f"{run}-0", OTHER_INSTALLATION: f"{run}-1", CUSTOM_ID: f"{run}-c"}
    installations = (names[INSTALLATION], names[OTHER_INSTALLATION])
    for position in range(len(arrival.batches) + 1):
        for installation, after in zip(installations, arrival.identify_after, strict=True):
            if after == position:
                await suite.identity.identify(installation, names[CUSTOM_ID])
        if position == len(arrival.batches):
            break
        events = [to_proto(e, names) for e in arrival.batches[position]]
        if arrival.imported[position]:
            reply: Any = await suite.ingest.ImportEvents(
                ingest_pb.ImportEventsRequest(events=events),
                metadata=suite.project.metadata("admin"),
                timeout=20,
            )
        else:
            reply = await suite.track(*events)
        assert [r.outcome for r in reply.results] == [ingest_pb.EVENT_OUTCOME_ACCEPTED] * len(
            events
        )
    history = [e for batch in arrival.batches for e in batch]
    expected = replay(history, names)
    expected = Expected(
        {k: (v, naive(t)) for k, (v, t) in expected.custom.items()},
        expected.first_name,
        None if expected.consent is None else (expected.consent[0], naive(expected.consent[1])),
    )
    return expected, await observed(suite, names[CUSTOM_ID])


async def test_get_profile_equals_the_replay_of_any_history_in_any_arrival_order(
    suite: Suite,
) -> None:
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=100,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(arrivals())
    def check(arrival: Arrival) -> None:
        expected, seen = asyncio.run_coroutine_threadsafe(send(suite, arrival), loop).result(60)
        assert seen == expected

    await asyncio.to_thread(check)
