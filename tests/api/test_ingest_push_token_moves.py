"""A push token names one device: the installation that reported it last (by event time) holds
it, and the others lose it (PushTokenMoved). A phone's token stayed on the installation of the
person who logged out, keeping them reachable on the next person's phone."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2 as pb
from tests.conftest import eventually
from tests.support.identity import new_id
from tests.support.query import NOW, Suite, installation_update, start_suite

TOKEN = "f0" * 32
ANDROID = types_pb2.PLATFORM_ANDROID


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def token_event(installation: str, minutes_ago: int, token: str = TOKEN, **kw: Any) -> Any:
    return installation_update(
        installation, NOW - timedelta(minutes=minutes_ago), push_token=token, push_opt_in=True, **kw
    )


async def devices(suite: Suite, *installations: str) -> dict[str, Any]:
    found = {}
    for installation in installations:
        profile = (await suite.get(installation_id=installation)).profile
        (device,) = [i for i in profile.installations if i.installation_id == installation]
        found[installation] = device
    return found


async def holders(suite: Suite, *installations: str) -> dict[str, bool]:
    return {i: d.push_token_present for i, d in (await devices(suite, *installations)).items()}


async def reachable(suite: Suite) -> set[str]:
    reply = await suite.call(
        "ListProfiles", pb.ListProfilesRequest(reachable_channel=types_pb2.CHANNEL_PUSH)
    )
    return {r.profile_id for r in reply.profiles}


async def test_the_installation_that_reported_a_token_last_holds_it(suite: Suite) -> None:
    first, second, other_platform = new_id(), new_id(), new_id()
    await suite.track(token_event(first, 180))
    await suite.identity.identify(first, "token-ana")
    await suite.track(token_event(second, 60))  # the same phone after Ana's logout: Bo's
    await suite.identity.identify(second, "token-bo")
    # The same text as another platform's token is another device's.
    await suite.track(token_event(other_platform, 50, platform=ANDROID))
    assert await holders(suite, first, second, other_platform) == {
        first: False,
        second: True,
        other_platform: True,
    }
    # The installation that lost its token is no longer opted in either.
    assert not (await devices(suite, first))[first].push_opt_in
    bo = await suite.identity.profile_of(second)
    android = await suite.identity.profile_of(other_platform)

    async def only_the_holders_reachable() -> bool:
        return await reachable(suite) == {bo, android}

    await eventually(only_the_holders_reachable)

    # A report older than the holder's, arriving late, gives it back to no one.
    await suite.track(token_event(first, 120))
    assert await holders(suite, first, second) == {first: False, second: True}
    # A newer one takes it back.
    await suite.track(token_event(first, 30))
    assert await holders(suite, first, second) == {first: True, second: False}
    ana = await suite.identity.profile_of(first)

    async def ana_reachable_again() -> bool:
        return await reachable(suite) == {ana, android}

    await eventually(ana_reachable_again)


async def test_installations_of_one_batch_reporting_one_token_leave_it_to_the_latest(
    suite: Suite,
) -> None:
    a, b, c = new_id(), new_id(), new_id()
    await suite.track(token_event(a, 40), token_event(b, 10), token_event(c, 20))
    assert await holders(suite, a, b, c) == {a: False, b: True, c: False}


async def test_one_person_s_installations_keep_their_tokens(suite: Suite) -> None:
    # Countly and PostHog mobile: after login, both of a person's phones send under the user's
    # ID, one installation, beside each phone's own installation of before the login. The
    # person stays reachable on both phones.
    phone_1, phone_2, shared = (f"{tag}-{new_id()}" for tag in ("p1", "p2", "user"))
    for installation in (phone_1, phone_2, shared):
        await suite.identity.identify(installation, "two-phones")
    await suite.track(token_event(phone_1, 100, token="a1" * 32))
    await suite.track(token_event(shared, 90, token="a1" * 32))
    await suite.track(token_event(phone_2, 80, token="b2" * 32))
    await suite.track(token_event(shared, 70, token="b2" * 32))
    assert await holders(suite, phone_1, phone_2, shared) == {
        phone_1: True,
        phone_2: True,
        shared: True,
    }
    # Someone else's installation reporting phone 1's token later takes it from the person.
    stranger = new_id()
    await suite.track(token_event(stranger, 60, token="a1" * 32))
    assert await holders(suite, phone_1, phone_2, shared, stranger) == {
        phone_1: False,
        phone_2: True,
        shared: True,
        stranger: True,
    }


async def test_a_move_spares_a_newer_report_committed_while_it_waited(suite: Suite) -> None:
    # The move reads the holders, then waits for a holder's row lock; a report of the token
    # that holder committed meanwhile, newer than the keeper's, keeps it.
    old, new = new_id(), new_id()
    await suite.track(token_event(old, 180))
    await suite.identity.identify(old, "token-race-old")
    side = await asyncpg.connect(suite.database_url)
    try:
        transaction = side.transaction()
        await transaction.start()
        await side.execute(
            "SELECT 1 FROM installation_details WHERE installation_id = $1 FOR UPDATE", old
        )
        tracked = asyncio.ensure_future(suite.track(token_event(new, 60)))

        async def move_waits() -> bool:
            return bool(
                await side.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )

        await eventually(move_waits)
        newer = (NOW - timedelta(minutes=10)).isoformat()
        await side.execute(
            "UPDATE installation_details SET field_times = field_times"
            " || jsonb_build_object('push_token', $2::text) WHERE installation_id = $1",
            old,
            newer,
        )
        await transaction.commit()
        await tracked
    finally:
        await side.close()
    assert (await holders(suite, old))[old]
