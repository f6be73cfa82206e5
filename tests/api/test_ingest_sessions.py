"""Sessions kept by ingest: start, heartbeat and end events, idle sessions closed by the sweeper
after 30 minutes (injected clock), and countries resolved from client IPs that are never kept."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from services.ingest.messages import timeout_event_id
from shared.clock import FrozenClock
from tests.conftest import eventually
from tests.support.ingest import NOW, Ingest, custom_event
from tests.support.ingest_running import running_ingest, session_event, stream_events

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.conftest import TestProject

MINUTE = timedelta(minutes=1)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
async def ingest(
    start_services: Any,
    settings_for_test: Settings,
    project: TestProject,
    database_url: str,
    clock: FrozenClock,
) -> AsyncIterator[Ingest]:
    handles = await start_services("identity")
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    async with running_ingest(settings, clock) as channel:
        yield Ingest(
            pb_grpc.IngestServiceStub(channel),
            project.metadata("sdk"),
            project.metadata("admin"),
            database_url,
        )


async def sessions(ingest: Ingest) -> dict[str, dict[str, Any]]:
    rows = await ingest.fetch(
        "SELECT session_id, installation_id, platform, country, start_time, last_activity_time,"
        " end_time, duration, event_count, started, ended, closed FROM sessions"
    )
    return {r["session_id"]: dict(r) for r in rows}


async def test_a_session_is_kept_from_its_events_and_counted_once(ingest: Ingest) -> None:
    start = NOW - 20 * MINUTE
    batch = [
        session_event("start", "i1", "s1", start, country="fr"),
        custom_event("i1", event_id="c1", time=start + MINUTE),
        session_event("heartbeat", "i1", "s1", start + 5 * MINUTE, duration=5 * MINUTE),
        session_event("end", "i1", "s1", start + 7 * MINUTE, duration=7 * MINUTE),
    ]
    batch[1].session_id = "s1"
    first = await ingest.track(*batch)
    assert first.accepted_count == 4
    again = await ingest.track(*batch)  # a retried batch: duplicates change nothing
    assert again.duplicate_count == 4
    # A late heartbeat after the end widens nothing but the count.
    await ingest.track(
        session_event("heartbeat", "i1", "s1", start + 3 * MINUTE, duration=3 * MINUTE)
    )
    assert (await sessions(ingest))["s1"] == {
        "session_id": "s1",
        "installation_id": "i1",
        "platform": types_pb2.PLATFORM_IOS,
        "country": "FR",
        "start_time": start,
        "last_activity_time": start + 7 * MINUTE,
        "end_time": start + 7 * MINUTE,
        "duration": 7 * MINUTE,
        "event_count": 5,
        "started": True,
        "ended": True,
        "closed": True,
    }


async def test_one_unordered_batch_takes_the_latest_end_and_the_longest_open_duration(
    ingest: Ingest,
) -> None:
    start = NOW - 20 * MINUTE
    other = custom_event("i1", event_id="other", time=start + 4 * MINUTE)
    other.session_id = "s5"
    await ingest.track(
        session_event("end", "i1", "s3", start + 9 * MINUTE, duration=9 * MINUTE),
        session_event("start", "i1", "s3", start, country="FR"),
        session_event("heartbeat", "i1", "s3", start + 5 * MINUTE, duration=5 * MINUTE),
        session_event("end", "i1", "s3", start + 8 * MINUTE, duration=8 * MINUTE),
        session_event("start", "i1", "s4", start),
        session_event("heartbeat", "i1", "s4", start + 2 * MINUTE, duration=6 * MINUTE),
        session_event("start", "i2", "s5", start),
        other,
    )
    rows = await sessions(ingest)
    ended = rows["s3"]
    assert (ended["start_time"], ended["last_activity_time"], ended["end_time"]) == (
        start,
        start + 9 * MINUTE,
        start + 9 * MINUTE,
    )
    assert (ended["duration"], ended["country"], ended["event_count"]) == (9 * MINUTE, "FR", 4)
    assert (rows["s4"]["duration"], rows["s4"]["end_time"]) == (6 * MINUTE, None)
    # Sessions are keyed by installation: i1's event naming s5 is not i2's session s5.
    s5 = [
        dict(r)
        for r in await ingest.fetch(
            "SELECT installation_id, duration, event_count FROM sessions"
            " WHERE session_id = 's5' ORDER BY installation_id"
        )
    ]
    assert s5 == [
        {"installation_id": "i1", "duration": timedelta(0), "event_count": 1},
        {"installation_id": "i2", "duration": timedelta(0), "event_count": 1},
    ]


async def test_events_arriving_before_their_start_are_fine(ingest: Ingest) -> None:
    start = NOW - 50 * MINUTE
    await ingest.track(session_event("end", "i1", "s2", start + 4 * MINUTE, duration=4 * MINUTE))
    await ingest.track(session_event("start", "i1", "s2", start, country="DE"))
    row = (await sessions(ingest))["s2"]
    assert (row["start_time"], row["end_time"], row["duration"]) == (
        start,
        start + 4 * MINUTE,
        4 * MINUTE,
    )
    assert (row["country"], row["event_count"], row["closed"]) == ("DE", 2, True)


async def test_an_idle_session_is_closed_30_minutes_after_its_last_heartbeat(
    ingest: Ingest, clock: FrozenClock, redis_url: str, redis_prefix: str
) -> None:
    await ingest.track(
        session_event("start", "i1", "idle", NOW - 45 * MINUTE, country="US"),
        session_event("heartbeat", "i1", "idle", NOW - 40 * MINUTE, duration=5 * MINUTE),
        session_event("start", "i1", "live", NOW - 10 * MINUTE),
        session_event("heartbeat", "i1", "live", NOW - 8 * MINUTE, duration=2 * MINUTE),
    )

    async def closed(session_id: str) -> bool:
        return bool((await sessions(ingest))[session_id]["closed"])

    await eventually(lambda: closed("idle"))
    row = (await sessions(ingest))["idle"]
    assert (row["end_time"], row["duration"], row["ended"]) == (
        NOW - 40 * MINUTE,
        5 * MINUTE,
        False,
    )
    assert not await closed("live")
    clock.advance(23 * MINUTE)  # "live" idle for 31 minutes now
    await eventually(lambda: closed("live"))
    row = (await sessions(ingest))["live"]
    assert (row["end_time"], row["duration"]) == (NOW - 8 * MINUTE, 2 * MINUTE)

    # Each closing is published once as a session end, for segments.
    async def ends_published() -> list[Any]:
        events = await stream_events(redis_url, redis_prefix)
        return [e for e in events if e.kind == types_pb2.EVENT_KIND_SESSION_END]

    await eventually(lambda: _has_length(ends_published(), 2))
    ends = {e.session_id: e for e in await ends_published()}
    assert ends["idle"].event_id == timeout_event_id(
        "idle", uuid.UUID(ends["idle"].profile_id), NOW - 40 * MINUTE
    )
    assert ends["idle"].session.duration.ToTimedelta() == 5 * MINUTE
    assert ends["idle"].session.country == "US"
    assert ends["idle"].event_time.ToDatetime().replace(tzinfo=NOW.tzinfo) == NOW - 40 * MINUTE


async def _has_length(items: Any, length: int) -> bool:
    return len(await items) == length


# Public addresses whose country the bundled geoip2fast database knows (checked by hand).
IP_COUNTRIES = {
    "8.8.8.8": "US",
    "193.51.0.1": "FR",
    "200.160.2.3": "BR",
    "2a01:cb00::1": "FR",
}
PRIVATE_IP = "10.20.30.40"
BAD_IP = "300.1.2.3"


async def test_a_client_ip_gives_the_country_and_is_never_kept(
    ingest: Ingest, redis_url: str, redis_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [
        session_event("start", f"geo-{i}", f"s{i}", NOW - MINUTE, client_ip=ip)
        for i, ip in enumerate([*IP_COUNTRIES, PRIVATE_IP, BAD_IP])
    ]
    reply = await ingest.track(*events)
    outcomes = [r.outcome for r in reply.results]
    assert outcomes == [pb.EVENT_OUTCOME_ACCEPTED] * 5 + [pb.EVENT_OUTCOME_REJECTED]
    assert (reply.results[5].reason, reply.results[5].field_path) == (
        "VALUE_INVALID",
        "session_start.client_ip",
    )
    rows = await sessions(ingest)
    assert [rows[f"s{i}"]["country"] for i in range(5)] == [*IP_COUNTRIES.values(), None]
    # By installation (geo-0 to geo-4, the IPs' order): their profiles may fall in different
    # write partitions, whose transactions store and publish their events in either order.
    stored = await ingest.fetch(
        'SELECT event_id, payload FROM events ORDER BY installation_id COLLATE "C"'
    )
    assert [r["payload"] for r in stored] == [
        *({"country": c} for c in IP_COUNTRIES.values()),
        {},
    ]
    await eventually(lambda: _has_length(stream_events(redis_url, redis_prefix), 5))
    published = sorted(
        await stream_events(redis_url, redis_prefix), key=lambda e: e.installation_id
    )
    assert [e.session.country for e in published] == [*IP_COUNTRIES.values(), ""]

    ips = [*IP_COUNTRIES, PRIVATE_IP, BAD_IP]
    assert await _tables_mentioning(ingest.database_url, ips) == []
    assert not any(ip.encode() in str(e).encode() for e in published for ip in ips)
    logs = capsys.readouterr()
    assert not any(ip in logs.out or ip in logs.err for ip in ips)


async def _tables_mentioning(database_url: str, needles: list[str]) -> list[str]:
    """Every table.column (text, jsonb or bytea) of the schema that contains one of `needles`."""
    conn = await asyncpg.connect(database_url)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " JOIN information_schema.tables USING (table_schema, table_name)"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            " AND data_type IN ('text', 'jsonb', 'bytea', 'character varying')"
        )
        found = []
        for table, column, data_type in columns:
            as_text = (
                f"encode(\"{column}\", 'escape')" if data_type == "bytea" else f'"{column}"::text'
            )
            hits = await conn.fetchval(
                f'SELECT count(*) FROM "{table}" WHERE {as_text} LIKE ANY($1::text[])',
                [f"%{n}%" for n in needles],
            )
            if hits:
                found.append(f"{table}.{column}")
        return found
    finally:
        await conn.close()
