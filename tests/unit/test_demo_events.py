"""The demo's users (`profiles demo`): nothing they do lies in the future, whichever the seed,
or a fresh demo shows users last seen minutes from now."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from profiles_cli.demo import EventFactory, make_users

NOW = datetime(2030, 6, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize("seed", range(20))
def test_no_demo_event_is_after_now(seed: int) -> None:
    rng = random.Random(seed)
    factory = EventFactory(rng, f"t{seed}", NOW)
    users = make_users(30, rng, f"t{seed}")
    live_events = 0
    for user in users:
        live = factory.live(user) if user.live else []
        events = factory.history(user) + live
        assert all(e.event_time.ToDatetime(UTC) <= NOW for e in events)
        if live:
            assert live[0].HasField("session_start"), "a live user has an open session"
            live_events += len(live)
    assert live_events
