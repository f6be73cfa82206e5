"""Identity under concurrent calls: the database settles every race, and the end state is one
the rules allow."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import asyncpg

from profiles.identity.v1 import identity_service_pb2 as pb
from tests.support.identity import Identity, count, new_id, profile_row

if TYPE_CHECKING:
    pass


async def test_fifty_installations_logging_in_with_one_new_custom_id_end_on_one_profile(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installations = [new_id() for _ in range(50)]
    anonymous = await identity.resolve(*(pb.ProfileKey(installation_id=i) for i in installations))
    replies = await asyncio.gather(*(identity.identify(i, "shared-login") for i in installations))
    outcomes = Counter(reply.outcome for reply in replies)
    assert outcomes == {pb.IDENTIFY_OUTCOME_IDENTIFIED: 1, pb.IDENTIFY_OUTCOME_MERGED: 49}
    (survivor,) = {reply.profile_id for reply in replies}
    assert await count(db, "SELECT count(*) FROM profiles WHERE custom_id IS NOT NULL") == 1
    links = await db.fetch("SELECT DISTINCT profile_id FROM installations")
    assert [r["profile_id"] for r in links] == [uuid.UUID(survivor)]
    tombstones = await db.fetch("SELECT merged_into FROM profiles WHERE merged_into IS NOT NULL")
    assert len(tombstones) == 49
    assert {r["merged_into"] for r in tombstones} == {uuid.UUID(survivor)}
    assert {r.profile_id for r in anonymous} - {survivor} == {
        str(r["profile_id"])
        for r in await db.fetch("SELECT profile_id FROM profiles WHERE merged_into IS NOT NULL")
    }
    assert await count(db, "SELECT count(*) FROM identity_changes WHERE kind = 'merge'") == 49


async def test_identify_racing_logout_ends_in_a_state_the_rules_allow(
    identity: Identity, db: asyncpg.Pool
) -> None:
    for round_number in range(8):
        installation = new_id()
        before = await identity.identify(installation, f"old-{round_number}")
        login, logout = await asyncio.gather(
            identity.identify(installation, f"new-{round_number}"), identity.logout(installation)
        )
        final = await identity.profile_of(installation)
        row = await profile_row(db, identity.project, final)
        assert row["merged_into"] is None
        if login.outcome == pb.IDENTIFY_OUTCOME_MOVED:
            # Identify first (to the new custom ID's profile), then Logout (a new profile).
            assert logout.previous_profile_id == login.profile_id
            assert final == logout.profile_id
            assert row["custom_id"] is None
        else:
            # Logout first (a new anonymous profile), then Identify gave it the custom ID.
            assert logout.previous_profile_id == before.profile_id
            assert login.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED
            assert final == login.profile_id == logout.profile_id
            assert row["custom_id"] == f"new-{round_number}"
        old = await profile_row(db, identity.project, before.profile_id)
        assert old["custom_id"] == f"old-{round_number}"


async def test_two_devices_logging_in_and_out_keep_every_period_apart_then_merge_it_back(
    identity: Identity, db: asyncpg.Pool
) -> None:
    devices = [new_id(), new_id()]
    person = (await identity.identify(devices[0], "pat")).profile_id
    # The second device's first profile (created for it, then merged) is the first tombstone.
    second = await identity.identify(devices[1], "pat")
    seen = {person, second.merged_profile_id}
    closed_periods = {second.merged_profile_id}
    for _ in range(6):
        outs = await asyncio.gather(*(identity.logout(d) for d in devices))
        for out in outs:
            assert out.outcome == pb.LOGOUT_OUTCOME_NEW_ANONYMOUS_PROFILE
            assert out.previous_profile_id == person
            assert out.profile_id not in seen  # brand-new, never an earlier one
            seen.add(out.profile_id)
        ins = await asyncio.gather(*(identity.identify(d, "pat") for d in devices))
        for out, back in zip(outs, ins, strict=True):
            assert back.outcome == pb.IDENTIFY_OUTCOME_MERGED
            assert back.profile_id == person
            assert back.merged_profile_id == out.profile_id
            closed_periods.add(out.profile_id)
    tombstones = await db.fetch(
        "SELECT profile_id, merged_into FROM profiles WHERE merged_into IS NOT NULL"
    )
    assert {str(r["profile_id"]) for r in tombstones} == closed_periods
    assert {r["merged_into"] for r in tombstones} == {uuid.UUID(person)}
    assert await count(db, "SELECT count(*) FROM profiles WHERE merged_into IS NULL") == 1


async def test_opposite_merges_at_once_leave_exactly_one_survivor(
    identity: Identity, db: asyncpg.Pool
) -> None:
    for _ in range(5):
        a = await identity.profile_of(new_id())
        b = await identity.profile_of(new_id())
        first, second = await asyncio.gather(identity.merge(a, b), identity.merge(b, a))
        assert sorted([first.already_merged, second.already_merged]) == [False, True]
        done = first if not first.already_merged else second
        assert second.target_profile_id == first.target_profile_id == done.target_profile_id
        live = await count(
            db,
            "SELECT count(*) FROM profiles WHERE profile_id = ANY($1::uuid[])"
            " AND merged_into IS NULL",
            [uuid.UUID(a), uuid.UUID(b)],
        )
        assert live == 1


async def test_resolving_while_identifying_never_sees_a_tombstone(
    identity: Identity, db: asyncpg.Pool
) -> None:
    await identity.profile_of_custom_id("quinn")
    installations = [new_id() for _ in range(20)]
    await identity.resolve(*(pb.ProfileKey(installation_id=i) for i in installations))
    keys = [pb.ProfileKey(installation_id=i) for i in installations]

    async def resolve_repeatedly() -> list[str]:
        answers = []
        for _ in range(10):
            answers.extend(r.profile_id for r in await identity.resolve(*keys))
        return answers

    resolved, *_ = await asyncio.gather(
        resolve_repeatedly(), *(identity.identify(i, "quinn") for i in installations)
    )
    live = {
        str(r["profile_id"])
        for r in await db.fetch("SELECT profile_id FROM profiles WHERE merged_into IS NULL")
    }
    tombstones = await db.fetch("SELECT profile_id FROM profiles WHERE merged_into IS NOT NULL")
    assert len(tombstones) == 20
    # Every answer was a live profile at that moment: the anonymous one before its merge or
    # the survivor after, never anything else.
    assert set(resolved) <= live | {str(r["profile_id"]) for r in tombstones}
    assert {r.profile_id for r in await identity.resolve(*keys)} == live
