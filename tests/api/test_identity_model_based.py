"""A model-based test of identity with ingest (hypothesis stateful testing): random sequences of
tracks, server-side tracks, logins, logouts, operator merges, erasures and clock moves over a
few installations and custom IDs, checked after every step against a small in-memory model of
the rules. Each example runs in a project of its own on the same running services."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2 as ipb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from shared.clock import FrozenClock
from tests.conftest import create_test_project
from tests.support.identity import Identity, error_info, start_identity_and_ingest
from tests.support.ingest import NOW, Ingest, custom_event

T = TypeVar("T")

INSTALLATIONS = ("i0", "i1", "i2")
CUSTOM_IDS = ("user-a", "user-b")
QUARANTINE = timedelta(days=30)  # the project setting's default
EventKey = tuple[str | None, str | None, str]  # installation, custom ID, event ID


@dataclass
class ModelProfile:
    ordinal: int
    custom_id: str | None = None
    events: set[EventKey] = field(default_factory=set)


@dataclass(frozen=True)
class Environment:
    loop: asyncio.AbstractEventLoop
    identity_channel: grpc.aio.Channel
    ingest_channel: grpc.aio.Channel
    database_url: str
    db: asyncpg.Pool
    clock: FrozenClock


class IdentityMachine(RuleBasedStateMachine):
    env: Environment  # set on the class by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.profiles: dict[str, ModelProfile] = {}
        self.tombstones: dict[str, str] = {}  # tombstone -> survivor
        # Each tombstone's ordinal as a live profile: rules draw among tombstones in this order,
        # not by their random UUIDs, so that hypothesis replaying a failure names the same one.
        self.tombstone_ordinals: dict[str, int] = {}
        self.links: dict[str, str] = {}  # installation -> profile
        self.holders: dict[str, str] = {}  # custom ID (own or alias) -> profile
        self.quarantine: dict[str, datetime] = {}  # custom ID -> end
        self.erased_events = 0
        self.ordinals = itertools.count()
        self.event_ids = itertools.count()

    # -- plumbing --------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.env.loop).result(timeout=120)

    def call(self, coro: Awaitable[T]) -> T | grpc.aio.AioRpcError:
        async def wrapped() -> T | grpc.aio.AioRpcError:
            try:
                return await coro
            except grpc.aio.AioRpcError as error:
                return error

        return self.run(wrapped())

    @initialize()
    def new_project(self) -> None:
        self.project = self.run(create_test_project(self.env.database_url))
        self.prefix = uuid.uuid4().hex[:6]
        self.identity = Identity(self.env.identity_channel, self.project)
        self.ingest = Ingest(
            ipb_grpc.IngestServiceStub(self.env.ingest_channel),
            self.project.metadata("sdk"),
            self.project.metadata("admin"),
            self.env.database_url,
        )

    def installation(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def now(self) -> datetime:
        return self.env.clock.now()

    def quarantined(self, custom_id: str) -> bool:
        end = self.quarantine.get(custom_id)
        return end is not None and self.now() < end

    def created(self, profile_id: str, custom_id: str | None = None) -> None:
        assert profile_id not in self.profiles
        assert profile_id not in self.tombstones
        self.profiles[profile_id] = ModelProfile(next(self.ordinals), custom_id)
        if custom_id is not None:
            self.holders[custom_id] = profile_id

    def merged(self, source: str, target: str) -> None:
        self.tombstone_ordinals[source] = self.profiles[source].ordinal
        self.profiles[target].events |= self.profiles.pop(source).events
        for mapping in (self.links, self.tombstones, self.holders):
            for key, value in mapping.items():
                if value == source:
                    mapping[key] = target
        self.tombstones[source] = target

    def live_by_age(self) -> list[str]:
        return sorted(self.profiles, key=lambda p: self.profiles[p].ordinal)

    # -- rules -----------------------------------------------------------------------------

    @rule(name=st.sampled_from(INSTALLATIONS))
    def track(self, name: str) -> None:
        installation = self.installation(name)
        event_id = f"e{next(self.event_ids)}"
        event = custom_event(installation, event_id=event_id, time=self.now())
        reply = self.run(self.ingest.track(event))
        (result,) = reply.results
        assert result.outcome == ipb.EVENT_OUTCOME_ACCEPTED, result
        expected = self.links.get(installation)
        if expected is None:
            self.created(result.profile_id)
            self.links[installation] = expected = result.profile_id
        assert result.profile_id == expected
        self.profiles[expected].events.add((installation, None, event_id))

    @rule(custom_id=st.sampled_from(CUSTOM_IDS))
    def track_server_side(self, custom_id: str) -> None:
        event_id = f"e{next(self.event_ids)}"
        event = custom_event(None, custom_id=custom_id, event_id=event_id, time=self.now())
        (result,) = self.run(self.ingest.track(event)).results
        if self.quarantined(custom_id):
            assert result.outcome == ipb.EVENT_OUTCOME_REJECTED, result
            return
        assert result.outcome == ipb.EVENT_OUTCOME_ACCEPTED, result
        expected = self.holders.get(custom_id)
        if expected is None:
            self.created(result.profile_id, custom_id)
            expected = result.profile_id
        assert result.profile_id == expected
        self.profiles[expected].events.add((None, custom_id, event_id))

    @rule(name=st.sampled_from(INSTALLATIONS), custom_id=st.sampled_from(CUSTOM_IDS))
    def identify(self, name: str, custom_id: str) -> None:
        installation = self.installation(name)
        reply = self.call(self.identity.identify(installation, custom_id))
        if self.quarantined(custom_id):
            assert isinstance(reply, grpc.aio.AioRpcError), reply
            assert error_info(reply).reason == "CUSTOM_ID_ERASED"
            return
        assert not isinstance(reply, grpc.aio.AioRpcError), reply
        current = self.links.get(installation)
        if current is None:  # a never-seen installation first gets an anonymous profile
            current = (
                reply.merged_profile_id
                if reply.outcome == pb.IDENTIFY_OUTCOME_MERGED
                else reply.profile_id
            )
            self.created(current)
            self.links[installation] = current
        holder = self.holders.get(custom_id)
        if holder == current:
            assert reply.outcome == pb.IDENTIFY_OUTCOME_ALREADY_IDENTIFIED
        elif self.profiles[current].custom_id is None and holder is None:
            assert reply.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED
            self.profiles[current].custom_id = custom_id
            self.holders[custom_id] = current
        elif self.profiles[current].custom_id is None:
            assert holder is not None
            assert reply.outcome == pb.IDENTIFY_OUTCOME_MERGED
            assert reply.merged_profile_id == current
            self.merged(current, holder)
        else:
            assert reply.outcome == pb.IDENTIFY_OUTCOME_MOVED
            assert reply.previous_profile_id == current
            if holder is None:
                self.created(reply.profile_id, custom_id)
                holder = reply.profile_id
            self.links[installation] = holder
        assert reply.profile_id == self.links[installation]

    @rule(name=st.sampled_from(INSTALLATIONS))
    def logout(self, name: str) -> None:
        installation = self.installation(name)
        reply = self.call(self.identity.logout(installation))
        current = self.links.get(installation)
        if current is None:
            assert isinstance(reply, grpc.aio.AioRpcError), reply
            assert reply.code() is grpc.StatusCode.NOT_FOUND
            return
        assert not isinstance(reply, grpc.aio.AioRpcError), reply
        if self.profiles[current].custom_id is None:
            assert reply.outcome == pb.LOGOUT_OUTCOME_UNCHANGED
            assert reply.profile_id == current
        else:
            assert reply.outcome == pb.LOGOUT_OUTCOME_NEW_ANONYMOUS_PROFILE
            self.created(reply.profile_id)  # brand-new, never an earlier one
            self.links[installation] = reply.profile_id

    @rule(data=st.data())
    def operator_merge(self, data: st.DataObject) -> None:
        live = self.live_by_age()
        if len(live) < 2:
            return
        source, target = data.draw(st.permutations(live).map(lambda p: p[:2]))
        reply = self.call(self.identity.merge(source, target, allow_conflict=True))
        assert not isinstance(reply, grpc.aio.AioRpcError), reply
        source_custom_id = self.profiles[source].custom_id
        if source_custom_id is not None and self.profiles[target].custom_id is None:
            self.profiles[target].custom_id = source_custom_id
            assert reply.alias_custom_id == ""
        else:
            expected_alias = source_custom_id if source_custom_id is not None else ""
            assert reply.alias_custom_id == expected_alias
        self.merged(source, target)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        known = self.live_by_age() + sorted(self.tombstones, key=self.tombstone_ordinals.get)
        if not known:
            return
        named = data.draw(st.sampled_from(known))
        survivor = self.tombstones.get(named, named)
        reply = self.call(self.identity.delete(named))
        assert not isinstance(reply, grpc.aio.AioRpcError), reply
        erased = self.profiles.pop(survivor)
        custom_ids = [c for c, p in self.holders.items() if p == survivor]
        installations = [i for i, p in self.links.items() if p == survivor]
        assert reply.profile_id == survivor
        assert reply.deleted_event_count == len(erased.events)
        assert reply.unlinked_installation_count == len(installations)
        assert reply.custom_id_quarantined == bool(custom_ids)
        self.erased_events += len(erased.events)
        for installation in installations:
            del self.links[installation]
        for custom_id in custom_ids:
            del self.holders[custom_id]
            self.quarantine[custom_id] = self.now() + QUARANTINE
        self.tombstones = {t: s for t, s in self.tombstones.items() if s != survivor}

    @rule(days=st.sampled_from((0.05, 10, 31)))
    def clock_moves(self, days: float) -> None:
        self.env.clock.advance(timedelta(days=days))

    # -- the check after every step ----------------------------------------------------------

    @invariant()
    def the_database_matches_the_model(self) -> None:
        if not hasattr(self, "project"):
            return
        self.run(self._check())

    async def _check(self) -> None:
        db, project_id = self.env.db, self.project.project_id
        rows = await db.fetch(
            "SELECT profile_id::text, installation_id, custom_id, event_id FROM events"
            " WHERE project_id = $1",
            project_id,
        )
        stored: dict[str | None, set[EventKey]] = {}
        for r in rows:
            key = (r["installation_id"], r["custom_id"], r["event_id"])
            stored.setdefault(r["profile_id"], set()).add(key)
        markers = stored.pop(None, set())
        assert len(markers) == self.erased_events, "erased events stay as bare markers"
        expected = {p: m.events for p, m in self.profiles.items() if m.events}
        assert stored == expected, (
            "every event on its profile, none lost or duplicated: " + _difference(stored, expected)
        )
        assert sum(len(v) for v in stored.values()) + len(markers) == len(rows)
        profiles = await db.fetch(
            "SELECT profile_id::text, custom_id, merged_into::text FROM profiles"
            " WHERE project_id = $1",
            project_id,
        )
        live = {r["profile_id"]: r["custom_id"] for r in profiles if r["merged_into"] is None}
        assert live == {p: m.custom_id for p, m in self.profiles.items()}
        tombstones = {r["profile_id"]: r["merged_into"] for r in profiles if r["merged_into"]}
        assert tombstones == self.tombstones, "tombstones point at their survivor in one hop"
        links = await db.fetch(
            "SELECT installation_id, profile_id::text FROM installations WHERE project_id = $1",
            project_id,
        )
        assert {r["installation_id"]: r["profile_id"] for r in links} == self.links


def _difference(stored: dict[str | None, set[EventKey]], expected: dict[str, set[EventKey]]) -> str:
    """Where each event is and where the model has it, for the events that differ: a failure
    under load names the rows, not only the two sets."""
    where_stored = {e: p for p, events in stored.items() for e in events}
    where_expected = {e: p for p, events in expected.items() for e in events}
    wrong = {
        e: (where_stored.get(e), where_expected.get(e))
        for e in where_stored.keys() | where_expected.keys()
        if where_stored.get(e) != where_expected.get(e)
    }
    return "; ".join(
        f"{e}: stored on {got}, expected on {want}"
        for e, (got, want) in sorted(wrong.items(), key=str)
    )


@pytest.fixture
async def environment(
    start_services: Any, settings_for_test: Any, database_url: str
) -> Environment:
    clock = FrozenClock(NOW)
    identity_channel, ingest_channel = await start_identity_and_ingest(
        start_services, settings_for_test, clock
    )
    db = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert db is not None
    return Environment(
        asyncio.get_running_loop(), identity_channel, ingest_channel, database_url, db, clock
    )


async def test_identity_and_ingest_follow_the_model_under_random_sequences(
    environment: Environment,
) -> None:
    IdentityMachine.env = environment
    try:
        await asyncio.to_thread(
            run_state_machine_as_test,
            IdentityMachine,
            settings=settings(max_examples=40, stateful_step_count=20, deadline=None),
        )
    finally:
        await environment.db.close()
