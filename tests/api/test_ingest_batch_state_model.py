"""Installation details and sessions as ingest's locked part writes them
(profiles_ingest_apply_batch_state, migrations 0030, 0054 and 0056), checked on random inputs
against two oracles: a Python model of the rules (plain functions below), and 0027's version of
the function, which 0030 rewrote for speed only, applied to the same batches in a second project
(with one profile a session: since 0054 each profile has its own row of a session, where
0027's row kept the first batch's profile and counted every profile's events; and on device
platforms only: 0040's and 0056's rules for API events postdate it).

Each round draws a few installations with a few sessions each, events whose times come from a
small set (so ties between events, within a batch and across batches, are common), random
kinds, NULL, empty or random installation changes; the events are shuffled, split into
batches, and each batch is one call (its own transaction). After every call both projects'
rows of the round's installations are compared, every column, with the model's and with each
other's."""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from shared.db import migration_paths
from tests.conftest import create_test_project

if TYPE_CHECKING:
    from tests.conftest import TestProject

START, HEARTBEAT, END, CUSTOM = 2, 3, 4, 1  # ingest_read_event_kind (checked by the test)
KIND_NAMES = {START: "session_start", HEARTBEAT: "session_heartbeat", END: "session_end"}
KIND_NAMES[CUSTOM] = "custom"
FIELDS = (
    "platform",
    "app_version",
    "os_version",
    "device_model",
    "push_token",
    "push_opt_in",
    "language",
    "timezone",
    "uninstalled",
)
BASE = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
# Few distinct times: most keys see ties, which is where "the later-arriving wins" matters.
TIMES = [BASE + timedelta(minutes=m) for m in (0, 1, 1, 2, 5, 5, 9)]
ORACLE_FUNCTION = "profiles_ingest_apply_batch_state_0027"

APPLY = """
    SELECT what, installation_id, session_id, country, imported_installation_id
    FROM {function}(
        $1,
        '{{}}'::uuid[], '{{}}'::boolean[], '{{}}'::text[], '{{}}'::timestamptz[], '{{}}'::text[],
        '{{}}'::text[], '{{}}'::smallint[], '{{}}'::text[], '{{}}'::jsonb[],
        '{{}}'::bigint[],
        '{{}}'::uuid[], '{{}}'::text[], '{{}}'::text[], '{{}}'::boolean[], '{{}}'::timestamptz[],
        '{{}}'::text[], '{{}}'::text[],
        $2::text[], $3::timestamptz[], $4::smallint[], $5::jsonb[], '{{}}'::text[],
        $6::text[], $7::text[], $8::uuid[], $9::smallint[], $10::smallint[],
        $11::timestamptz[], $12::interval[], $13::text[])"""
INSTALLATION_ROWS = """
    SELECT * FROM installation_details
    WHERE project_id = $1 AND installation_id LIKE $2 || '%' ORDER BY installation_id"""
SESSION_ROWS = """
    SELECT * FROM sessions
    WHERE project_id = $1 AND installation_id LIKE $2 || '%'
    ORDER BY installation_id, session_id, profile_id"""


@dataclass(frozen=True, slots=True)
class Event:
    """One event of an installation: what the batch passes in the i_* arrays (every event) and,
    when it names a session, in the e_* arrays."""

    installation_id: str
    time: datetime
    platform: int
    changes: dict[str, Any] | None
    session_id: str | None = None
    profile_id: uuid.UUID | None = None
    kind: int = 0
    duration: timedelta | None = None
    country: str = ""


@dataclass(frozen=True, slots=True)
class Details:
    values: dict[str, Any]  # field -> value (None for a field set to null or never set)
    times: dict[str, datetime]  # field -> event time of its value (field_times)
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True, slots=True)
class Session:
    profile_id: uuid.UUID
    platform: int
    country: str | None
    start_time: datetime
    last_activity_time: datetime
    end_time: datetime | None
    duration: timedelta
    event_count: int
    started: bool
    ended: bool
    closed: bool
    # A batch's part: its heartbeats with a duration (what the country's answer looks at);
    # not a column.
    heartbeats: int = 0


# --- The model: plain functions, no SQL -------------------------------------------------------

API = 4  # PLATFORM_API


def platform_wins(
    new: int, new_time: datetime, stored: int | None, stored_time: datetime | None
) -> bool:
    """0040: a device platform (iOS, Android, Web) wins over API whatever the times; otherwise
    the later event wins, and the later-arriving one on a tie."""
    if stored is None or stored_time is None:
        return True
    if (new == API) != (stored == API):
        return new != API
    return new_time >= stored_time


def session_platform(ordered: Sequence[Event]) -> int:
    """0056: a batch's part of a session is on its latest device platform (its events ordered
    by time, then position), on API only when all its events are."""
    devices = [e.platform for e in ordered if e.platform != API]
    return devices[-1] if devices else API


def field_wins(
    name: str, value: Any, time: datetime, values: dict[str, Any], times: dict[str, datetime]
) -> bool:
    if name == "platform":
        return platform_wins(value, time, values.get(name), times.get(name))
    return name not in times or time >= times[name]


def details_of_batch(events: Sequence[Event]) -> dict[str, Details]:
    """Per installation of one batch: each field's value from its latest event by event time,
    the later in the batch on a tie; every event sets the platform (a device platform over
    API: platform_wins); NULL changes set nothing else; the span of all its events."""
    out: dict[str, Details] = {}
    for e in events:
        sets = {"platform": e.platform, **(e.changes or {})}
        d = out.get(e.installation_id)
        if d is None:
            d = Details({}, {}, e.time, e.time)
        values, times = dict(d.values), dict(d.times)
        for name, value in sets.items():
            # Events come in batch order: a tie in time goes to the later one.
            if field_wins(name, value, e.time, values, times):
                values[name], times[name] = value, e.time
        out[e.installation_id] = Details(
            values, times, min(d.first_seen, e.time), max(d.last_seen, e.time)
        )
    return out


def merge_details(stored: Details | None, batch: Details) -> Details:
    """A batch's details over the stored row: a field the batch set wins when its time is at
    least the stored time of that field (so a later batch wins a tie)."""
    if stored is None:
        return batch
    values, times = dict(stored.values), dict(stored.times)
    for name, time in batch.times.items():
        if field_wins(name, batch.values[name], time, stored.values, stored.times):
            values[name], times[name] = batch.values[name], time
    return Details(
        values,
        times,
        min(stored.first_seen, batch.first_seen),
        max(stored.last_seen, batch.last_seen),
    )


SessionKey = tuple[str, str, uuid.UUID]  # installation, session, profile


def sessions_of_batch(events: Sequence[Event]) -> dict[SessionKey, Session]:
    """Per (installation, session, profile) of one batch, its events ordered by (time,
    position): each profile's part of a session is its own row (0054)."""
    groups: dict[SessionKey, list[tuple[datetime, int, Event]]] = {}
    for position, e in enumerate(events):
        if e.session_id is not None:
            assert e.profile_id is not None
            key = (e.installation_id, e.session_id, e.profile_id)
            groups.setdefault(key, []).append((e.time, position, e))
    out: dict[SessionKey, Session] = {}
    for key, group in groups.items():
        ordered = [e for _, _, e in sorted(group, key=lambda g: (g[0], g[1]))]
        ends = [e for e in ordered if e.kind == END]
        heartbeats = [e.duration for e in ordered if e.kind == HEARTBEAT and e.duration is not None]
        countries = [e.country for e in ordered if e.kind == START and e.country]
        start, last = ordered[0].time, ordered[-1].time
        # Ended: the latest end's duration (none given: zero); else the longest seen.
        longest = max([last - start, *heartbeats])
        duration = (ends[-1].duration or timedelta(0)) if ends else longest
        out[key] = Session(
            profile_id=key[2],
            platform=session_platform(ordered),
            country=countries[0] if countries else None,
            start_time=start,
            last_activity_time=last,
            end_time=max(e.time for e in ends) if ends else None,
            duration=duration,
            event_count=len(ordered),
            started=any(e.kind == START for e in ordered),
            ended=bool(ends),
            closed=bool(ends),
            heartbeats=len(heartbeats),
        )
    return out


def merge_session(stored: Session | None, batch: Session) -> Session:
    """A batch's part of a session over the stored row of the same profile: the platform
    is the latest batch's (whatever the times), except that a batch only on API keeps a stored
    device platform (0056); the first known country stays; an end at least as late as the
    stored end (or the first end) sets end time and duration; an open session's duration is the
    longest seen."""
    if stored is None:
        return batch
    end_wins = batch.ended and (
        not stored.ended
        or (
            batch.end_time is not None
            and stored.end_time is not None
            and batch.end_time >= stored.end_time
        )
    )
    start = min(stored.start_time, batch.start_time)
    last = max(stored.last_activity_time, batch.last_activity_time)
    if end_wins:
        duration = batch.duration
    elif stored.ended:
        duration = stored.duration
    else:
        duration = max(stored.duration, batch.duration, last - start)
    return Session(
        profile_id=stored.profile_id,
        platform=stored.platform
        if batch.platform == API and stored.platform != API
        else batch.platform,
        country=stored.country if stored.country is not None else batch.country,
        start_time=start,
        last_activity_time=last,
        end_time=batch.end_time if end_wins else stored.end_time,
        duration=duration,
        event_count=stored.event_count + batch.event_count,
        started=stored.started or batch.started,
        ended=stored.ended or batch.ended,
        closed=stored.closed or batch.ended,
    )


def answered_country(
    key: SessionKey, part: Session, batch: Session, before: dict[SessionKey, Session]
) -> str | None:
    """The country a batch answers for a part it touched: the part's; for a part that never
    saw the start and has none, when the batch brings it a heartbeat or an end (`batch`, the
    batch's own part), that of the session's earliest part (by start, then profile) stored
    before the batch that has one."""
    brings_heartbeat_or_end = batch.ended or batch.heartbeats
    if part.country is not None or part.started or not brings_heartbeat_or_end:
        return part.country
    others = sorted(
        (s.start_time, str(k[2]), s.country)
        for k, s in before.items()
        if k[:2] == key[:2] and s.country is not None
    )
    return others[0][2] if others else None


# --- Random inputs -----------------------------------------------------------------------------


def random_changes(rng: random.Random) -> dict[str, Any] | None:
    roll = rng.random()
    if roll < 0.45:
        return None  # an event that carries only its platform
    if roll < 0.5:
        return {}  # an installation update with no field present
    if roll < 0.65:
        return {"uninstalled": False}  # what a session start sets
    values: dict[str, list[Any]] = {
        "app_version": ["4.1.0", "4.2.0", "5.0.0"],
        "os_version": ["17.1", "18.0"],
        "device_model": ["Pixel 8", "iPhone15,2"],
        "push_token": ["tok-a", "tok-b", None],  # None: an empty token clears it
        "push_opt_in": [True, False],
        "language": ["en", "fr"],
        "timezone": ["Europe/Paris", "UTC"],
        "uninstalled": [True, False],
    }
    names = rng.sample(sorted(values), rng.randint(1, 4))
    return {name: rng.choice(values[name]) for name in names}


def random_round(
    rng: random.Random, prefix: str, top_platform: int = 3, mixed: bool = True
) -> list[Event]:
    """A round's events, on platforms 1 to `top_platform` (4 brings in API); with `mixed`,
    each event of a session on one of two profiles, else each session on one profile."""
    events: list[Event] = []
    for i in range(rng.randint(3, 6)):
        installation = f"{prefix}i{i}"
        profiles = [uuid.uuid4() for _ in range(2)]
        sessions = [f"s{j}" for j in range(rng.randint(2, 3))]
        owners = {session: rng.choice(profiles) for session in sessions}
        for _ in range(rng.randint(4, 14)):
            time, platform = rng.choice(TIMES), rng.randint(1, top_platform)
            roll = rng.random()
            if roll < 0.2:  # an installation update (no session)
                events.append(Event(installation, time, platform, random_changes(rng)))
                continue
            kind = rng.choice([START, START, HEARTBEAT, END, END, CUSTOM])
            session_id = rng.choice(sessions)
            duration = None
            if kind in (HEARTBEAT, END) and rng.random() < 0.9:
                duration = timedelta(seconds=rng.choice([0, 30, 90, 240, 600]))
            events.append(
                Event(
                    installation,
                    time,
                    platform,
                    random_changes(rng),
                    session_id=session_id,
                    profile_id=rng.choice(profiles) if mixed else owners[session_id],
                    kind=kind,
                    duration=duration,
                    country=rng.choice(["", "FR", "DE"]) if kind == START else "",
                )
            )
    rng.shuffle(events)
    return events


def split(rng: random.Random, events: list[Event]) -> list[list[Event]]:
    cuts = sorted(rng.sample(range(1, len(events)), min(len(events) - 1, rng.randint(1, 5))))
    bounds = [0, *cuts, len(events)]
    batches = [events[a:b] for a, b in itertools.pairwise(bounds)]
    rng.shuffle(batches)
    return batches


# --- The database side -------------------------------------------------------------------------


def function_of_0027() -> str:
    """0027's profiles_ingest_apply_batch_state, renamed, as a CREATE FUNCTION statement."""
    (path,) = [p for p in migration_paths() if p.name == "0027_batch_state_under_profile_locks.sql"]
    text = path.read_text()
    start = text.index("CREATE FUNCTION profiles_ingest_apply_batch_state(")
    end = text.index("END $$;", start) + len("END $$;")
    return text[start:end].replace("profiles_ingest_apply_batch_state(", f"{ORACLE_FUNCTION}(", 1)


async def apply(
    db: asyncpg.Pool, function: str, project_id: uuid.UUID, batch: Sequence[Event]
) -> list[tuple[str, str, str | None]]:
    """One call (its own transaction); answers the 'session' rows (installation, session,
    country)."""
    sessions = [e for e in batch if e.session_id is not None]
    rows = await db.fetch(
        APPLY.format(function=function),
        project_id,
        [e.installation_id for e in batch],
        [e.time for e in batch],
        [e.platform for e in batch],
        [None if e.changes is None else json.dumps(e.changes) for e in batch],
        [e.installation_id for e in sessions],
        [e.session_id for e in sessions],
        [e.profile_id for e in sessions],
        [e.platform for e in sessions],
        [e.kind for e in sessions],
        [e.time for e in sessions],
        [e.duration for e in sessions],
        [e.country for e in sessions],
    )
    assert {r["what"] for r in rows} <= {"session"}
    return by_key((r["installation_id"], r["session_id"], r["country"]) for r in rows)


def by_key(
    answers: Iterable[tuple[str, str, str | None]],
) -> list[tuple[str, str, str | None]]:
    """Answers in a stable order: two profiles' parts of a session answer the same key, one
    of them maybe with no country."""
    return sorted(answers, key=lambda a: (a[0], a[1], a[2] or ""))


async def stored_rows(
    db: asyncpg.Pool, project_id: uuid.UUID, prefix: str
) -> tuple[dict[str, dict[str, Any]], dict[SessionKey, dict[str, Any]]]:
    details = {
        r["installation_id"]: {k: v for k, v in r.items() if k != "project_id"}
        for r in await db.fetch(INSTALLATION_ROWS, project_id, prefix)
    }
    sessions = {
        (r["installation_id"], r["session_id"], r["profile_id"]): {
            k: v for k, v in r.items() if k != "project_id"
        }
        for r in await db.fetch(SESSION_ROWS, project_id, prefix)
    }
    return details, sessions


def expected_details_row(installation_id: str, d: Details) -> dict[str, Any]:
    row: dict[str, Any] = {"installation_id": installation_id}
    for name in FIELDS:
        row[name] = d.values.get(name)
    row["uninstalled"] = bool(d.values.get("uninstalled", False))
    row["field_times"] = dict(d.times)
    row |= {
        "first_seen": d.first_seen,
        "last_seen": d.last_seen,
        "imported": False,
        "reintegrated_into": None,
        "reintegrate_time": None,
    }
    return row


def expected_session_row(key: SessionKey, s: Session) -> dict[str, Any]:
    return {
        "installation_id": key[0],
        "session_id": key[1],
        "profile_id": s.profile_id,
        "platform": s.platform,
        "country": s.country,
        "start_time": s.start_time,
        "last_activity_time": s.last_activity_time,
        "end_time": s.end_time,
        "duration": s.duration,
        "event_count": s.event_count,
        "started": s.started,
        "ended": s.ended,
        "closed": s.closed,
        "derived": False,
        "activity_bucket": activity_bucket(s.last_activity_time),
    }


def activity_bucket(last_activity_time: datetime) -> datetime:
    """0032's generated column: the 10-minute bin of the last activity, from 2000-01-01 UTC."""
    origin = datetime(2000, 1, 1, tzinfo=UTC)
    width = timedelta(minutes=10)
    return origin + (last_activity_time - origin) // width * width


def with_parsed_times(row: dict[str, Any]) -> dict[str, Any]:
    times = json.loads(row["field_times"])
    return row | {"field_times": {k: datetime.fromisoformat(v) for k, v in times.items()}}


@pytest.fixture
async def oracle(db: asyncpg.Pool, database_url: str) -> TestProject:
    """A second project, for the same batches through 0027's function."""
    await db.execute(function_of_0027())
    return await create_test_project(database_url)


@dataclass(slots=True)
class Exercised:
    """What the random inputs met, so that a test can say its inputs did their job."""

    ties: int = 0
    ended_twice: int = 0
    shared: int = 0  # a session that two profiles have parts of
    api_after_device: int = 0  # a device platform kept over a later API event
    # A session's part whose batch has a device event and ends (by time, then position) on an
    # API event, and one whose batch is only on API over a stored device platform: both keep
    # the device platform (0056).
    session_api_last: int = 0
    session_api_over_device: int = 0


async def check_rounds(
    db: asyncpg.Pool,
    project: TestProject,
    oracle: TestProject | None,
    seed: int,
    top_platform: int = 3,
    mixed: bool = True,
) -> Exercised:
    """Six rounds of random batches through the function, each stored row checked against the
    model after every batch (and against 0027's function in `oracle`'s project, if given)."""
    rng = random.Random(seed)
    seen = Exercised()
    for round_ in range(6):
        prefix = f"r{round_}-"
        details: dict[str, Details] = {}
        sessions: dict[SessionKey, Session] = {}
        for batch in split(rng, random_round(rng, prefix, top_platform, mixed)):
            for installation_id, d in details_of_batch(batch).items():
                stored = details.get(installation_id)
                details[installation_id] = merge_details(stored, d)
                kept = details[installation_id]
                seen.api_after_device += kept.values["platform"] != API and any(
                    e.installation_id == installation_id
                    and e.platform == API
                    and e.time > kept.times["platform"]
                    for e in batch
                )
            touched = sessions_of_batch(batch)
            before = dict(sessions)
            for key, s in touched.items():
                seen.ended_twice += s.ended and key in sessions and sessions[key].ended
                latest = max(
                    (e.time, position, e.platform)
                    for position, e in enumerate(batch)
                    if (e.installation_id, e.session_id, e.profile_id) == key
                )[2]
                seen.session_api_last += latest == API and s.platform != API
                seen.session_api_over_device += (
                    s.platform == API and key in sessions and sessions[key].platform != API
                )
                sessions[key] = merge_session(sessions.get(key), s)
            seen.ties += len(batch) - len({(e.installation_id, e.time) for e in batch})

            answered = await apply(
                db, "profiles_ingest_apply_batch_state", project.project_id, batch
            )
            assert answered == by_key(
                (*key[:2], answered_country(key, sessions[key], touched[key], before))
                for key in touched
            )
            stored_details, stored_sessions = await stored_rows(db, project.project_id, prefix)
            assert {k: with_parsed_times(v) for k, v in stored_details.items()} == {
                k: expected_details_row(k, d) for k, d in details.items()
            }, f"seed {seed}, round {round_}"
            assert stored_sessions == {
                k: expected_session_row(k, s) for k, s in sessions.items()
            }, f"seed {seed}, round {round_}"
            if oracle is None:
                continue
            answered_0027 = await apply(db, ORACLE_FUNCTION, oracle.project_id, batch)
            assert answered_0027 == answered
            # 0027's rows, field_times as stored text included: the rewrite changed no result.
            assert await stored_rows(db, oracle.project_id, prefix) == (
                stored_details,
                stored_sessions,
            ), f"seed {seed}, round {round_}"
        parts = {key[:2] for key in sessions}
        seen.shared += len(sessions) - len(parts)
    return seen


@pytest.mark.parametrize("seed", [20261203, 1, 2, 3, 4])
async def test_installation_details_and_sessions_follow_the_model_and_0027(
    db: asyncpg.Pool, project: TestProject, oracle: TestProject, seed: int
) -> None:
    kinds = await db.fetch(
        "SELECT n, ingest_read_event_kind(n) AS kind FROM unnest($1::text[]) AS n",
        list(KIND_NAMES.values()),
    )
    assert {r["n"]: r["kind"] for r in kinds} == {v: k for k, v in KIND_NAMES.items()}
    seen = await check_rounds(db, project, oracle, seed, mixed=False)
    # The inputs exercised what they are for: ties in a batch, ends over earlier ends.
    assert seen.ties > 0
    assert seen.ended_twice > 0
    assert seen.shared == 0


@pytest.mark.parametrize("seed", [20261207, 8, 9])
async def test_each_profile_has_its_own_part_of_a_session(
    db: asyncpg.Pool, project: TestProject, seed: int
) -> None:
    """0054: events of one session on two profiles (a logout and a login within it) make two
    rows, each counting only its profile's events (0027 predates it)."""
    seen = await check_rounds(db, project, None, seed)
    assert seen.shared > 0
    assert seen.ended_twice > 0


@pytest.mark.parametrize("seed", [20261206, 5, 6, 7])
async def test_a_device_platform_wins_over_api_whatever_the_times(
    db: asyncpg.Pool, project: TestProject, seed: int
) -> None:
    """0040's rule for installations and 0056's for sessions on random inputs with API events
    among the devices' (0027 predates both)."""
    seen = await check_rounds(db, project, None, seed, top_platform=API)
    assert seen.api_after_device > 0
    assert seen.session_api_last > 0
    assert seen.session_api_over_device > 0
