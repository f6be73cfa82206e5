"""A session's platform is its device's (0056): SDKs send their platform with some requests only
(Countly's metrics come with begin_session, not with its events, heartbeats and crashes), and the
edge sends the others on PLATFORM_API. An API event never makes a device session an API one,
whatever the batch, the order or the times, nor does a merge with an API part; a session only
ever seen on API is an API one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from shared.clock import FrozenClock
from tests.support.identity import Identity
from tests.support.ingest import NOW, Ingest, custom_event
from tests.support.ingest_running import running_ingest, session_event

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.conftest import TestProject

MINUTE = timedelta(minutes=1)
START = NOW - 20 * MINUTE  # no session idle for 30 minutes: the sweeper leaves them
ANDROID, API = types_pb2.PLATFORM_ANDROID, types_pb2.PLATFORM_API


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
async def suite(
    start_services: Any,
    settings_for_test: Settings,
    project: TestProject,
    database_url: str,
    clock: FrozenClock,
) -> AsyncIterator[tuple[Ingest, Identity]]:
    """Identity, and ingest with its sweeper on a frozen clock (running_ingest)."""
    handles = await start_services("identity")
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    async with running_ingest(settings, clock) as channel:
        ingest = Ingest(
            pb_grpc.IngestServiceStub(channel),
            project.metadata("sdk"),
            project.metadata("admin"),
            database_url,
        )
        yield ingest, Identity(handles["identity"].channel, project)


def in_session(
    installation_id: str, session_id: str, event_id: str, time: datetime, platform: int = API
) -> pb.Event:
    """A custom event of the session, on `platform` (API: what the edge sends for a request
    without the SDK's metrics)."""
    event = custom_event(installation_id, event_id=event_id, time=time)
    event.session_id = session_id
    event.platform = platform  # type: ignore[assignment]
    return event


def start(installation_id: str, session_id: str, time: datetime = START) -> pb.Event:
    return session_event("start", installation_id, session_id, time, platform=ANDROID)


def heartbeat(installation_id: str, session_id: str, minute: int, platform: int = API) -> pb.Event:
    return session_event(
        "heartbeat",
        installation_id,
        session_id,
        START + minute * MINUTE,
        duration=minute * MINUTE,
        platform=platform,
    )


async def platforms(ingest: Ingest) -> dict[tuple[str, str], list[int]]:
    """Each session's platforms, one per profile's part."""
    rows = await ingest.fetch(
        "SELECT installation_id, session_id, platform FROM sessions"
        " ORDER BY installation_id, session_id, profile_id"
    )
    found: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        found.setdefault((r["installation_id"], r["session_id"]), []).append(r["platform"])
    return found


async def test_api_events_leave_a_device_session_on_its_device(
    suite: tuple[Ingest, Identity],
) -> None:
    ingest, _ = suite
    # Later batches only on API, after the start's.
    await ingest.track(start("phone", "later"))
    await ingest.track(in_session("phone", "later", "l1", START + 2 * MINUTE))
    await ingest.track(
        heartbeat("phone", "later", 3), in_session("phone", "later", "l2", START + 4 * MINUTE)
    )
    # One batch: API events before the start in the batch, one of them also earlier in time,
    # and the latest event on API.
    await ingest.track(
        in_session("phone", "same", "s1", START + 5 * MINUTE),
        in_session("phone", "same", "s0", START - MINUTE),
        start("phone", "same"),
        heartbeat("phone", "same", 2),
        in_session("phone", "same", "s2", START + 6 * MINUTE),
    )
    # Out of order: the API events are stored first, the start comes in a later batch, and
    # more API events after it.
    await ingest.track(
        heartbeat("phone", "early", 4), in_session("phone", "early", "e1", START + 5 * MINUTE)
    )
    await ingest.track(start("phone", "early"))
    await ingest.track(in_session("phone", "early", "e2", START + 7 * MINUTE))
    # Only API, ever: a back-end's session.
    await ingest.track(
        session_event("start", "server", "api", START, platform=API),
        in_session("server", "api", "a1", START + MINUTE),
    )
    await ingest.track(heartbeat("server", "api", 2))

    assert await platforms(ingest) == {
        ("phone", "later"): [ANDROID],
        ("phone", "same"): [ANDROID],
        ("phone", "early"): [ANDROID],
        ("server", "api"): [API],
    }


async def test_a_merge_keeps_the_device_platform_of_either_part(
    suite: tuple[Ingest, Identity],
) -> None:
    """Bob's Android part and the anonymous API part after his logout, with the later activity,
    fold into an Android session when he logs back in; so do Dave's API part, the later one,
    and the anonymous Android part after his logout."""
    ingest, identity = suite
    await ingest.track(start("phone", "s1"))
    bob = (await identity.identify("phone", "bob")).profile_id
    await identity.logout("phone")
    await ingest.track(in_session("phone", "s1", "a1", START + 5 * MINUTE))
    assert sorted((await platforms(ingest))[("phone", "s1")]) == [ANDROID, API]
    assert (await identity.identify("phone", "bob")).profile_id == bob

    await ingest.track(in_session("tablet", "s2", "d1", START + 10 * MINUTE))
    dave = (await identity.identify("tablet", "dave")).profile_id
    await identity.logout("tablet")
    await ingest.track(
        in_session("tablet", "s2", "a2", START + 2 * MINUTE, platform=ANDROID),
        in_session("tablet", "s2", "a3", START + 3 * MINUTE, platform=ANDROID),
    )
    assert sorted((await platforms(ingest))[("tablet", "s2")]) == [ANDROID, API]
    assert (await identity.identify("tablet", "dave")).profile_id == dave

    rows = await ingest.fetch("SELECT installation_id, profile_id::text, platform FROM sessions")
    assert sorted((r["installation_id"], r["profile_id"], r["platform"]) for r in rows) == [
        ("phone", bob, ANDROID),
        ("tablet", dave, ANDROID),
    ]
