"""0059 fills the installations people left before 0057 (profile_former_installations) with the
rows those departures would have left. Each history is made by the real services, so 0057's
live path writes its rows; deleting them stands for departures recorded before 0057, and the
migration's statement, run on the test's database, must write them back exactly."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from shared.clock import FrozenClock
from tests.support.identity import Identity, new_id
from tests.support.query import NOW, installation_update, session_start

BACKFILL = (
    Path(__file__).resolve().parents[2]
    / "services/ingest/schema/0059_former_installations_backfill.sql"
)
ANDROID, IOS, API = types_pb2.PLATFORM_ANDROID, types_pb2.PLATFORM_IOS, types_pb2.PLATFORM_API
ROWS = """
    SELECT * FROM profile_former_installations WHERE project_id = $1
    ORDER BY profile_id, installation_id"""
SPLIT_TIMES = """
    SELECT c.change_time, c.source_profile_id, i.installation_id
    FROM identity_read_identity_changes() c
    CROSS JOIN LATERAL unnest(c.installation_ids) AS i(installation_id)
    WHERE c.project_id = $1 AND c.kind = 'split'"""


@dataclass(slots=True)
class Suite:
    """Identity and ingest on one frozen clock, so that an event's receive time and a split's
    time are comparable (the suite in tests.support.query leaves identity on the system clock)."""

    ingest: ingest_grpc.IngestServiceStub
    identity: Identity
    project: Any
    database_url: str
    clock: FrozenClock

    def tick(self, seconds: float = 1.0) -> None:
        self.clock.advance(timedelta(seconds=seconds))

    async def track(self, *events: ingest_pb.Event) -> None:
        reply = await self.ingest.TrackEvents(
            ingest_pb.TrackEventsRequest(events=events),
            metadata=self.project.metadata("sdk"),
            timeout=20,
        )
        assert [r.status.code for r in reply.results] == [0] * len(events), reply
        self.tick()

    async def update(
        self, installation_id: str, minutes_ago: float = 0, platform: int = ANDROID, **fields: Any
    ) -> None:
        time = self.clock.now() - timedelta(minutes=minutes_ago)
        await self.track(installation_update(installation_id, time, platform, **fields))

    async def log_in(self, installation_id: str, custom_id: str) -> UUID:
        await self.identity.identify(installation_id, custom_id)
        self.tick()
        return UUID(await self.identity.profile_of_custom_id(custom_id))

    async def log_out(self, installation_id: str) -> None:
        await self.identity.logout(installation_id)
        self.tick()

    async def rows(self) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return [dict(r) for r in await conn.fetch(ROWS, self.project.project_id)]
        finally:
            await conn.close()

    async def execute(self, sql: str, *args: Any) -> str:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def forget(self, *pairs: tuple[Any, str]) -> None:
        """Deletes the rows of the given (profile, installation) pairs, or every row of the
        project when none is given: departures recorded before 0057."""
        if pairs:
            for profile_id, installation_id in pairs:
                await self.execute(
                    "DELETE FROM profile_former_installations"
                    " WHERE project_id = $1 AND profile_id = $2 AND installation_id = $3",
                    self.project.project_id,
                    profile_id,
                    installation_id,
                )
        else:
            await self.execute(
                "DELETE FROM profile_former_installations WHERE project_id = $1",
                self.project.project_id,
            )

    async def backfill(self) -> None:
        await self.execute(BACKFILL.read_text())

    async def split_times(self) -> dict[tuple[Any, str], list[Any]]:
        conn = await asyncpg.connect(self.database_url)
        try:
            found: dict[tuple[Any, str], list[Any]] = {}
            for r in await conn.fetch(SPLIT_TIMES, self.project.project_id):
                key = (r["source_profile_id"], r["installation_id"])
                found.setdefault(key, []).append(r["change_time"])
            return found
        finally:
            await conn.close()


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    clock = FrozenClock(NOW)
    handles = await start_services("identity", settings=settings_for_test, clock=clock)
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    ingest = await start_services("ingest", settings=settings, clock=clock)
    return Suite(
        ingest=ingest_grpc.IngestServiceStub(ingest["ingest"].channel),
        identity=Identity(handles["identity"].channel, project),
        project=project,
        database_url=database_url,
        clock=clock,
    )


async def refilled(suite: Suite, *pairs: tuple[Any, str]) -> list[dict[str, Any]]:
    """The rows after forgetting `pairs` (every row when none) and running the backfill; the
    backfill run once more changes nothing."""
    await suite.forget(*pairs)
    await suite.backfill()
    rows = await suite.rows()
    await suite.backfill()
    assert await suite.rows() == rows
    return rows


async def test_a_logout_before_0057_leaves_the_details_of_the_moment(suite: Suite) -> None:
    # The account exists (a laptop signed up); the phone reports its language while anonymous,
    # then logs in (its anonymous profile, language event and all, merges into the account).
    laptop, phone = new_id(), new_id()
    await suite.update(laptop, 60, IOS, device_model="XPS")
    customer = await suite.log_in(laptop, "ann")
    await suite.track(
        installation_update(
            phone,
            suite.clock.now() - timedelta(minutes=30),
            ANDROID,
            language="fr",
            timezone="Europe/Paris",
            device_model="Pixel 8",
        ),
        session_start(phone, new_id(), suite.clock.now() - timedelta(minutes=29), platform=API),
    )
    assert await suite.log_in(phone, "ann") == customer
    await suite.update(phone, 20, app_version="2.0")
    await suite.update(phone, 25, ANDROID, os_version="14")
    # A late update, older than the language it would change, and a later event on API: the
    # language stays French, the platform the device's.
    await suite.update(phone, 40, ANDROID, language="en")
    await suite.track(
        session_start(phone, new_id(), suite.clock.now() - timedelta(minutes=10), platform=API)
    )
    await suite.log_in(laptop, "someone-else")  # the laptop leaves the account (rule 4)
    await suite.log_out(phone)
    # After the logout, on the phone's new anonymous profile: a newer language, and a late
    # update older than every field the customer's copy holds. Neither is the customer's.
    await suite.update(phone, 0, IOS, language="it", timezone="Europe/Rome")
    await suite.update(phone, 60, API, app_version="0.9", device_model="Old")
    live = await suite.rows()
    phone_row = next(r for r in live if r["installation_id"] == phone)
    assert phone_row["profile_id"] == customer
    assert (phone_row["language"], phone_row["timezone"], phone_row["app_version"]) == (
        "fr",
        "Europe/Paris",
        "2.0",
    )
    assert (phone_row["device_model"], phone_row["os_version"], phone_row["platform"]) == (
        "Pixel 8",
        "14",
        ANDROID,
    )
    assert {r["installation_id"] for r in live} == {laptop, phone}

    assert await refilled(suite) == live
    splits = await suite.split_times()
    for row in live:
        assert [row["leave_time"]] == splits[(row["profile_id"], row["installation_id"])]


async def test_a_departed_profile_merged_since_has_its_row_on_the_survivor(suite: Suite) -> None:
    # The phone leaves bob, later carl, each time with another language; an operator then
    # merges bob into carl: the later departure's copy is the survivor's.
    phone, tablet = new_id(), new_id()
    await suite.update(phone, 5, language="de", device_model="Pixel")
    bob = await suite.log_in(phone, "bob")
    await suite.log_out(phone)
    await suite.update(phone, 1, language="es")
    carl = await suite.log_in(phone, "carl")
    await suite.log_out(phone)
    # The tablet left bob only: its row moves to carl as it is.
    await suite.update(tablet, 3, IOS, language="pt")
    await suite.log_in(tablet, "bob")
    await suite.log_out(tablet)
    await suite.identity.merge(str(bob), str(carl), allow_conflict=True)
    suite.tick()
    live = await suite.rows()
    assert {(r["profile_id"], r["installation_id"], r["language"]) for r in live} == {
        (carl, phone, "es"),
        (carl, tablet, "pt"),
    }

    assert await refilled(suite) == live


async def test_an_erased_profile_leaves_nothing(suite: Suite) -> None:
    # The tablet leaves dora-old, then dora, and dora-old is merged into dora; dora is erased,
    # tombstone and all.
    tablet = new_id()
    await suite.update(tablet, 2, language="nl")
    old = await suite.log_in(tablet, "dora-old")
    await suite.log_out(tablet)
    await suite.update(tablet, 1, language="pt")
    dora = await suite.log_in(tablet, "dora")
    await suite.log_out(tablet)
    await suite.identity.merge(str(old), str(dora), allow_conflict=True)
    suite.tick()
    assert [(r["profile_id"], r["language"]) for r in await suite.rows()] == [(dora, "pt")]
    await suite.identity.delete(str(dora))
    suite.tick()
    assert await suite.rows() == []

    assert await refilled(suite) == []


async def test_who_left_an_erased_installation_before_its_last_holder_keeps_it(
    suite: Suite,
) -> None:
    # The phone leaves eve, then quinn (on the profile it had moved to, identified since), and
    # its anonymous profile is erased with it: ingest holds no details of it any more, but eve's
    # events are still stored on her. quinn's departure is the one identity's erasure redacted
    # (a split whose other side is erased loses its installations): nothing says which device
    # quinn left, so it cannot be backfilled.
    phone = new_id()
    await suite.update(phone, 2, language="fr", device_model="Pixel")
    eve = await suite.log_in(phone, "eve")
    await suite.log_out(phone)
    await suite.update(phone, 1, IOS, language="de")
    quinn = await suite.log_in(phone, "quinn")
    await suite.log_out(phone)
    await suite.update(phone, 0, language="it")
    await suite.identity.delete(await suite.identity.profile_of(phone))
    suite.tick()
    live = await suite.rows()
    assert sorted((r["profile_id"], r["language"], r["platform"]) for r in live) == sorted(
        [(eve, "fr", ANDROID), (quinn, "de", IOS)]
    )

    assert await refilled(suite) == [r for r in live if r["profile_id"] == eve]


async def test_a_row_already_there_is_kept_as_it_is(suite: Suite) -> None:
    phone, tablet = new_id(), new_id()
    await suite.update(phone, 2, language="fr")
    await suite.update(tablet, 2, language="nl")
    fay = await suite.log_in(phone, "fay")
    await suite.log_in(tablet, "fay")
    await suite.log_out(phone)
    await suite.log_out(tablet)
    live = await suite.rows()
    assert len(live) == 2
    # Written by 0057 at a departure the backfill cannot see as such (say, a later one): it
    # stays, whatever the events say.
    await suite.execute(
        "UPDATE profile_former_installations SET language = 'xx'"
        " WHERE project_id = $1 AND installation_id = $2",
        suite.project.project_id,
        tablet,
    )
    kept = [r | {"language": "xx"} if r["installation_id"] == tablet else r for r in live]

    assert await refilled(suite, (fay, phone)) == kept


async def test_an_imported_installation_leaves_its_details_as_imported(suite: Suite) -> None:
    # ImportTokens puts an imported installation (no events: its details are the import's) on
    # the custom ID's profile; a logout of it leaves them as they are.
    reply = await suite.ingest.ImportTokens(
        ingest_pb.ImportTokensRequest(
            tokens=[ingest_pb.ImportedToken(platform=IOS, push_token="apns-1", custom_id="gil")]
        ),
        metadata=suite.project.metadata("admin"),
        timeout=20,
    )
    (imported,) = [r.installation_id for r in reply.results]
    suite.tick()
    gil = UUID(await suite.identity.profile_of_custom_id("gil"))
    await suite.log_out(imported)
    live = await suite.rows()
    assert [
        (r["profile_id"], r["installation_id"], r["imported"], r["platform"]) for r in live
    ] == [(gil, imported, True, IOS)]

    assert await refilled(suite) == live


# -- Random histories -----------------------------------------------------------------------

FIELDS = {
    "language": ["fr", "de", "it"],
    "timezone": ["Europe/Paris", "Europe/Berlin", "Asia/Tokyo"],
    "app_version": ["1.0", "1.1", "2.0"],
    "os_version": ["13", "14"],
    "device_model": ["Pixel", "Galaxy"],
}


async def random_history(suite: Suite, rng: random.Random, steps: int) -> None:
    """Installation updates (late ones among them, on device platforms and API), sessions,
    logins (merges, rule 4 switches), logouts and operator merges over three devices and three
    people."""
    devices = [new_id() for _ in range(3)]
    people = ["p0", "p1", "p2"]
    known: set[str] = set()
    seen: set[str] = set()
    for _ in range(steps):
        device = rng.choice(devices)
        action = rng.choice(
            ["update", "update", "update", "session", "login", "login", "logout", "logout", "merge"]
        )
        platform = rng.choice([ANDROID, IOS, API])
        if action in ("login", "logout") and device not in seen:
            action = "update"
        if action == "update" or (action == "merge" and len(known) < 2):
            fields = {
                name: rng.choice(values) for name, values in FIELDS.items() if rng.random() < 0.4
            }
            await suite.update(device, rng.choice([0, 0, 2, 30]), platform, **(fields or {}))
            seen.add(device)
        elif action == "session":
            time = suite.clock.now() - timedelta(minutes=rng.choice([0, 5, 45]))
            await suite.track(session_start(device, new_id(), time, platform=platform))
            seen.add(device)
        elif action == "login":
            person = rng.choice(people)
            await suite.log_in(device, person)
            known.add(person)
        elif action == "logout":
            await suite.log_out(device)
        else:
            source, target = rng.sample(sorted(known), 2)
            source_id = await suite.identity.profile_of_custom_id(source)
            target_id = await suite.identity.profile_of_custom_id(target)
            if source_id != target_id:
                await suite.identity.merge(source_id, target_id, allow_conflict=True)
                known.discard(source)
            suite.tick()


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_random_histories_backfill_as_the_live_path_wrote(suite: Suite, seed: int) -> None:
    rng = random.Random(seed)
    await random_history(suite, rng, 80)
    live = await suite.rows()
    assert live, "a history without departures tests nothing"
    forgotten = [(r["profile_id"], r["installation_id"]) for r in live if rng.random() < 0.7] or [
        (live[0]["profile_id"], live[0]["installation_id"])
    ]

    assert await refilled(suite, *forgotten) == live
    assert await refilled(suite) == live
