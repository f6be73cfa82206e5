"""ListEventNames' counts are query's rollup (0067), kept from the events stream by its consumer:
a page reads one row per name, whatever their events; a batch counts once however often it is
delivered or published; an erasure takes the person's events out (a tombstone's too, also when
query missed the ProfileDeleted), and a name's last seen time goes back to the events left;
retention leaves the counts as they were; 0067's backfill counts what was stored before it, and
the messages it counted are not counted again. And a model: random batches of random names with
retries, redeliveries, re-published entries and an erasure, read back through the RPC."""

from __future__ import annotations

import json
import random
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from services.query.list_reads import SELECT_EVENT_NAMES
from services.query.paging import MAX_TEXT
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.topics import EVENTS, IDENTITY, TOPICS
from tests.conftest import create_test_project, eventually
from tests.support.identity import Identity, new_id
from tests.support.query import (
    NOW,
    Suite,
    custom_event,
    pages,
    session_start,
    start_suite,
)
from tests.support.retention import RETENTION_MODES, apply_retention, make_months, stored_events

MIGRATION = Path(__file__).resolve().parents[2] / "services/query/schema/0067_event_name_counts.sql"
ROLLUP_TABLES = (
    "query_event_names",
    "query_profile_event_names",
    "query_event_name_batches",
    "query_event_names_backfilled",
)

Counts = dict[str, tuple[int, datetime]]


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def minutes_ago(n: int) -> datetime:
    return NOW - timedelta(minutes=n)


async def listed(suite: Suite, page_size: int = 2, prefix: str = "") -> Counts:
    """Every name over every page, with its count and last seen time."""
    names = await pages(
        suite,
        "ListEventNames",
        pb.ListEventNamesRequest(page_size=page_size, name_prefix=prefix),
        "event_names",
    )
    found = [n.name for n in names]
    assert found == sorted(found, key=lambda n: n.encode()), "code point order, each once"
    assert len(set(found)) == len(found)
    return {n.name: (n.event_count, n.last_seen_time.ToDatetime(NOW.tzinfo)) for n in names}


async def stored_counts(suite: Suite) -> tuple[Counts, Counts]:
    """The project's rows of query_event_names, and its per-profile rows summed by name."""
    names = await suite.fetch(
        "SELECT name, event_count, last_seen_time FROM query_event_names WHERE project_id = $1",
        suite.project.project_id,
    )
    per_profile = await suite.fetch(
        "SELECT name, sum(event_count)::bigint AS event_count, max(last_seen_time)"
        " AS last_seen_time FROM query_profile_event_names WHERE project_id = $1 GROUP BY name",
        suite.project.project_id,
    )
    return tuple(  # type: ignore[return-value]
        {r["name"]: (r["event_count"], r["last_seen_time"]) for r in rows}
        for rows in (names, per_profile)
    )


async def republish(suite: Suite, share: float = 1.0, rng: random.Random | None = None) -> int:
    """Adds a copy of (a share of) the events stream's entries to it, as an outbox relay that
    published its rows and stopped before deleting them publishes them again."""
    bus = Bus.from_url(suite.redis_url, suite.redis_prefix)
    try:
        key = bus.stream_key(EVENTS.name)
        entries: Any = await bus.redis.xrange(key)
        copied = 0
        for _, fields in entries:
            if rng is None or rng.random() < share:
                await bus.redis.xadd(key, fields)
                copied += 1
        return copied
    finally:
        await bus.aclose()


# -- cost ------------------------------------------------------------------------------------


async def test_a_page_reads_one_row_per_name_whatever_their_events(suite: Suite) -> None:
    """A page's statement reads the rows of the names it lists, not their events: 2,000
    events of one name cost what one does."""
    inst = new_id()
    for batch in range(2):
        reply = await suite.track(
            *(
                custom_event(inst, name="common", time=minutes_ago(batch * 1000 + i + 1))
                for i in range(1000)
            )
        )
        assert {r.outcome for r in reply.results} == {ingest_pb.EVENT_OUTCOME_ACCEPTED}
    await suite.track(*(custom_event(inst, name=n) for n in ("alpha", "beta", "omega", "zeta")))
    await suite.settle()
    assert await listed(suite) == {
        "alpha": (1, NOW),
        "beta": (1, NOW),
        "common": (2000, minutes_ago(1)),
        "omega": (1, NOW),
        "zeta": (1, NOW),
    }

    plan = json.loads(
        await suite.fetchval(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {SELECT_EVENT_NAMES}",
            suite.project.project_id,
            "",
            "",
            MAX_TEXT,
            3,
        )
    )[0]["Plan"]

    def rows_read(node: dict[str, Any]) -> int:
        own = node["Actual Rows"] * node["Actual Loops"] if "Scan" in node["Node Type"] else 0
        return own + sum(rows_read(child) for child in node.get("Plans", ()))

    # alpha, beta, common: three rows, not common's 2,000 events.
    assert rows_read(plan) == 3


# -- exactly once ----------------------------------------------------------------------------


async def test_a_batch_counts_once_however_often_it_is_delivered_or_published(
    suite: Suite,
) -> None:
    inst, other = new_id(), new_id()
    first = [
        custom_event(inst, name="purchase", time=minutes_ago(30)),
        custom_event(inst, name="purchase", time=minutes_ago(5)),
        custom_event(other, name="signup", time=minutes_ago(20)),
    ]
    await suite.track(*first)
    await suite.track(custom_event(other, name="purchase", time=minutes_ago(50)))
    retried = await suite.track(*first)  # a retry stores nothing twice, and publishes nothing
    assert {r.outcome for r in retried.results} == {ingest_pb.EVENT_OUTCOME_DUPLICATE}
    await suite.settle()
    expected = {"purchase": (3, minutes_ago(5)), "signup": (1, minutes_ago(20))}
    assert await listed(suite) == expected

    # Every entry delivered again (a consumer that lost its acks), then every events entry
    # published a second time (a relay that stopped before deleting its outbox rows).
    await suite.replay_rollups()
    assert await republish(suite) >= 2
    await suite.settle()
    assert await listed(suite) == expected
    assert await stored_counts(suite) == (expected, expected)


# -- erasure ---------------------------------------------------------------------------------


async def alice_and_bob(suite: Suite) -> tuple[str, str, str, Counts]:
    """Alice on a phone and a tablet (the tablet's anonymous profile merged into hers: a
    tombstone the tablet's first events were stored for), holding the latest purchase; Bob on
    his phone. Returns Alice's profile, the tablet's former one, Bob's, and the counts."""
    phone, tablet, bob_phone = new_id(), new_id(), new_id()
    await suite.track(
        custom_event(phone, name="purchase", time=minutes_ago(5)),
        custom_event(phone, name="alice_only", time=minutes_ago(6)),
    )
    await suite.track(custom_event(tablet, name="purchase", time=minutes_ago(3)))
    await suite.track(
        custom_event(bob_phone, name="purchase", time=minutes_ago(30)),
        custom_event(bob_phone, name="signup", time=minutes_ago(20)),
    )
    tablet_profile = await suite.identity.profile_of(tablet)
    alice_id = f"alice-{uuid.uuid4().hex[:8]}"
    await suite.identity.identify(phone, alice_id)
    await suite.identity.identify(tablet, alice_id)
    alice = await suite.identity.profile_of(phone)
    assert await suite.identity.profile_of(tablet) == alice != tablet_profile
    await suite.track(custom_event(tablet, name="signup", time=minutes_ago(1)))
    await suite.settle()
    counts = await listed(suite)
    assert counts == {
        "alice_only": (1, minutes_ago(6)),
        "purchase": (3, minutes_ago(3)),
        "signup": (2, minutes_ago(1)),
    }
    return alice, tablet_profile, await suite.identity.profile_of(bob_phone), counts


BOB_ALONE = {"purchase": (1, minutes_ago(30)), "signup": (1, minutes_ago(20))}


async def profile_rows(suite: Suite, profile_ids: list[str]) -> int:
    return int(
        await suite.fetchval(
            "SELECT count(*) FROM query_profile_event_names"
            " WHERE project_id = $1 AND profile_id = ANY($2::uuid[])",
            suite.project.project_id,
            [uuid.UUID(p) for p in profile_ids],
        )
    )


async def test_an_erasure_takes_the_persons_events_out_and_last_seen_goes_back(
    suite: Suite,
) -> None:
    alice, tablet_profile, bob, _ = await alice_and_bob(suite)
    assert await profile_rows(suite, [alice, tablet_profile]) == 4
    await suite.identity.delete(alice)
    await suite.settle()
    # Her names and events are gone; the latest purchase and signup are Bob's again.
    assert await listed(suite) == BOB_ALONE
    assert await profile_rows(suite, [alice, tablet_profile]) == 0
    # Her batches delivered again (after her erasure) add nothing.
    await suite.replay_rollups()
    assert await listed(suite) == BOB_ALONE
    assert await stored_counts(suite) == (BOB_ALONE, BOB_ALONE)
    assert await profile_rows(suite, [bob]) == 2


@pytest.fixture
async def stack(
    start_services: Any, settings_for_test: Any, project: Any, database_url: str
) -> dict[str, Any]:
    """Identity, ingest and query on one clock and one bus, query's handles kept."""
    clock = FrozenClock(NOW)
    identity = await start_services("identity", settings=settings_for_test)
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": identity["identity"].address}
    )
    ingest = await start_services("ingest", settings=settings, clock=clock)
    query = await start_services("query", settings=settings, clock=clock)
    suite = Suite(
        query=query_grpc.QueryServiceStub(query["query"].channel),
        ingest=ingest_grpc.IngestServiceStub(ingest["ingest"].channel),
        identity=Identity(identity["identity"].channel, project),
        project=project,
        database_url=database_url,
        clock=clock,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
    )
    return {"suite": suite, "settings": settings, "query": query}


async def test_a_batch_handled_after_the_erasure_skips_the_erased_person(
    stack: dict[str, Any], start_services: Any
) -> None:
    """Query is stopped while Alice's events are stored and she is erased: when it comes back,
    her batches (handled after her erasure, in whatever order beside her ProfileDeleted) never
    count."""
    suite: Suite = stack["suite"]
    phone, bob_phone = new_id(), new_id()
    await suite.track(custom_event(bob_phone, name="purchase", time=minutes_ago(30)))
    await suite.settle()
    await stack["query"]["query"].running.stop(grace=1.0)
    await suite.track(custom_event(phone, name="purchase", time=minutes_ago(1)))
    await suite.track(custom_event(phone, name="alice_only", time=minutes_ago(2)))
    alice = await suite.identity.profile_of(phone)
    await suite.identity.delete(alice)

    back = await start_services("query", settings=stack["settings"], clock=suite.clock)
    suite.query = query_grpc.QueryServiceStub(back["query"].channel)
    await suite.settle()
    assert await listed(suite) == {"purchase": (1, minutes_ago(30))}
    assert await profile_rows(suite, [alice]) == 0
    # The batches were handled (their markers are there), and folded nothing.
    batches = await suite.fetchval(
        "SELECT count(*) FROM query_event_name_batches WHERE project_id = $1",
        suite.project.project_id,
    )
    assert batches == 3


async def test_the_erasure_sweep_takes_out_what_a_missed_profile_deleted_left(
    stack: dict[str, Any], start_services: Any, db: asyncpg.Pool
) -> None:
    """Query stopped while Alice was erased, and the bus retention trimmed her ProfileDeleted
    before it came back: its erasure sweep takes her events out, the tombstone's too."""
    suite: Suite = stack["suite"]
    alice, tablet_profile, _, _ = await alice_and_bob(suite)
    await stack["query"]["query"].running.stop(grace=1.0)
    await suite.identity.delete(alice)
    await eventually(lambda: _outbox_empty(db))
    bus = Bus.from_url(suite.redis_url, suite.redis_prefix, retention_ms=1)
    try:
        await bus.trim_expired(TOPICS.values())
        for topic in (EVENTS, IDENTITY):
            assert await bus.redis.xlen(bus.stream_key(topic.name)) == 0
    finally:
        await bus.aclose()
    assert await profile_rows(suite, [alice, tablet_profile]) == 4

    back = await start_services("query", settings=stack["settings"], clock=suite.clock)
    suite.query = query_grpc.QueryServiceStub(back["query"].channel)

    async def purged() -> bool:
        return await profile_rows(suite, [alice, tablet_profile]) == 0

    await eventually(purged)
    assert await listed(suite) == BOB_ALONE


async def _outbox_empty(db: asyncpg.Pool) -> bool:
    return await db.fetchval("SELECT count(*) FROM outbox") == 0


# -- retention -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RETENTION_MODES)
async def test_the_counts_stay_when_retention_removes_the_events(suite: Suite, mode: str) -> None:
    """Counts are of the events stored since the project began, as a profile's totals are:
    retention removing old months leaves them, and their last seen times."""
    old_inst, recent_inst = new_id(), new_id()
    old = NOW - timedelta(days=200)
    await make_months(suite.database_url, old)
    imported = await suite.ingest.ImportEvents(
        ingest_pb.ImportEventsRequest(
            events=[
                custom_event(old_inst, name="legacy", time=old),
                custom_event(old_inst, name="purchase", time=old),
            ]
        ),
        metadata=suite.project.metadata("admin"),
        timeout=20,
    )
    assert {r.outcome for r in imported.results} == {ingest_pb.EVENT_OUTCOME_ACCEPTED}
    await suite.track(custom_event(recent_inst, name="purchase", time=minutes_ago(60)))
    await suite.settle()
    before = await listed(suite)
    assert before == {"legacy": (1, old), "purchase": (2, minutes_ago(60))}

    await apply_retention(suite.database_url, suite.project.project_id, mode, NOW)
    assert await stored_events(suite.database_url, suite.project.project_id) == 1
    await suite.replay_rollups()
    assert await listed(suite) == before


async def test_an_erasure_after_retention_takes_last_seen_from_the_counts_kept(
    suite: Suite,
) -> None:
    """Retention removed a name's old events, then the person who sent its only stored one is
    erased: the name keeps its old events' count and their last seen time, which only the
    counts kept per profile still know."""
    old_inst, phone = new_id(), new_id()
    old = NOW - timedelta(days=200)
    await make_months(suite.database_url, old)
    imported = await suite.ingest.ImportEvents(
        ingest_pb.ImportEventsRequest(
            events=[
                custom_event(old_inst, name="legacy", time=old),
                custom_event(old_inst, name="legacy", time=old + timedelta(hours=1)),
            ]
        ),
        metadata=suite.project.metadata("admin"),
        timeout=20,
    )
    assert {r.outcome for r in imported.results} == {ingest_pb.EVENT_OUTCOME_ACCEPTED}
    await suite.track(custom_event(phone, name="legacy", time=minutes_ago(10)))
    await suite.settle()
    assert await listed(suite) == {"legacy": (3, minutes_ago(10))}
    await apply_retention(suite.database_url, suite.project.project_id, "project", NOW)
    await suite.identity.delete(await suite.identity.profile_of(phone))
    await suite.settle()
    assert await listed(suite) == {"legacy": (2, old + timedelta(hours=1))}


# -- the backfill ----------------------------------------------------------------------------


def backfill_statement() -> str:
    """0067's backfill: its last statement."""
    text = MIGRATION.read_text()
    return text[text.index("WITH counted AS") :]


async def test_the_backfill_counts_what_was_stored_and_its_messages_count_once(
    suite: Suite,
) -> None:
    """0067 met as an upgrade meets it: events stored, nothing counted yet, and query's group
    still owing their messages. The backfill counts them; the owed messages then add
    nothing; later batches add theirs."""
    inst, other = new_id(), new_id()
    await suite.track(
        custom_event(inst, name="purchase", time=minutes_ago(30)),
        custom_event(inst, name="purchase", time=minutes_ago(5)),
        custom_event(other, name="signup", time=minutes_ago(20)),
        session_start(inst, "s1", minutes_ago(31)),
    )
    await suite.track(custom_event(other, name="purchase", time=minutes_ago(50)))
    elsewhere = await create_test_project(suite.database_url)
    await suite.ingest.TrackEvents(
        ingest_pb.TrackEventsRequest(events=[custom_event(new_id(), name="secret_event")]),
        metadata=elsewhere.metadata("sdk"),
        timeout=20,
    )
    await suite.settle()
    expected = await listed(suite)
    assert expected == {"purchase": (3, minutes_ago(5)), "signup": (1, minutes_ago(20))}

    conn = await asyncpg.connect(suite.database_url)
    try:
        await conn.execute(f"TRUNCATE {', '.join(ROLLUP_TABLES)}")
        await conn.execute(backfill_statement())
        keys = await conn.fetchval(
            "SELECT count(*) FROM query_event_names_backfilled WHERE project_id = $1",
            suite.project.project_id,
        )
    finally:
        await conn.close()
    assert keys == 4
    assert await listed(suite) == expected
    await suite.replay_rollups()
    assert await listed(suite) == expected
    assert await stored_counts(suite) == (expected, expected)

    await suite.track(custom_event(inst, name="signup", time=minutes_ago(2)))
    await suite.settle()
    assert await listed(suite) == {**expected, "signup": (2, minutes_ago(2))}


# -- the model -------------------------------------------------------------------------------

# Names whose code point order is not a locale's ("_" after the digits, before the letters).
NAMES = ("a", "a_b", "a1", "ab", "b", "level_2", "levelup", "purchase", "signup", "z9")


@pytest.mark.parametrize("seed", range(4))
async def test_counts_match_a_model_of_random_batches(suite: Suite, seed: int) -> None:
    """Random batches of random names (repeats within and across batches, session events
    beside them, retried events), some entries published twice, an erasure at a random point
    (before or after its batches were handled), every entry delivered again at the end: the
    names listed, page by page, with or without a prefix, are the model's, which counts each
    accepted custom event once, less the erased person's."""
    rng = random.Random(seed)
    installations = [new_id() for _ in range(4)]
    events: dict[str, list[tuple[str, datetime]]] = {i: [] for i in installations}
    sent: list[ingest_pb.Event] = []
    rounds = rng.randint(6, 9)
    erase_at = rng.randrange(2, rounds)
    for round_ in range(rounds):
        if round_ == erase_at:
            erased = rng.choice(installations)
            if rng.random() < 0.5:
                await suite.settle()
            await suite.identity.delete(await suite.identity.profile_of(erased))
            installations.remove(erased)
            events.pop(erased)
            sent = [e for e in sent if e.installation_id != erased]
        batch: list[ingest_pb.Event] = []
        accepted: list[tuple[str, str, datetime]] = []
        for _ in range(rng.randint(1, 12)):
            if sent and rng.random() < 0.15:
                batch.append(rng.choice(sent))  # a retry: DUPLICATE, counted once
                continue
            inst = rng.choice(installations)
            time = minutes_ago(rng.randint(0, 5000))
            if rng.random() < 0.15:
                batch.append(session_start(inst, f"s{rng.randint(1, 3)}", time))
                continue
            event = custom_event(inst, name=rng.choice(NAMES), time=time)
            batch.append(event)
            accepted.append((inst, event.custom.name, time))
        reply = await suite.track(*batch)
        outcomes = [r.outcome for r in reply.results]
        assert ingest_pb.EVENT_OUTCOME_REJECTED not in outcomes
        for inst, name, time in accepted:
            events[inst].append((name, time))
        sent.extend(e for e in batch if e.WhichOneof("payload") == "custom")
        if rng.random() < 0.3:
            await suite.settle()
            await republish(suite, 0.3, rng)
    await suite.settle()
    await republish(suite, 0.3, rng)
    await suite.replay_rollups()

    model: dict[str, list[datetime]] = {}
    for per_installation in events.values():
        for name, time in per_installation:
            model.setdefault(name, []).append(time)
    expected = {name: (len(times), max(times)) for name, times in model.items()}
    assert await listed(suite, page_size=rng.randint(1, 4)) == expected
    prefix = rng.choice(["a", "A_", "level", "z", "q"])
    assert await listed(suite, page_size=rng.randint(1, 3), prefix=prefix) == {
        n: c for n, c in expected.items() if n.startswith(prefix.lower())
    }
    assert await stored_counts(suite) == (expected, expected)
