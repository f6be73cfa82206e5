"""A push token names one device: the installation that reported it last (by event time) holds
it, and the others lose it (PushTokenMoved). A phone's token stayed on the installation of the
person who logged out, keeping them reachable on the next person's phone."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

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


async def holders(suite: Suite, *installations: str) -> dict[str, bool]:
    found = {}
    for installation in installations:
        profile = (await suite.get(installation_id=installation)).profile
        (device,) = [i for i in profile.installations if i.installation_id == installation]
        found[installation] = device.push_token_present
    return found


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
