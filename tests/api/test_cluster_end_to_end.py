"""The suite on a real three-master Redis Cluster: the end-to-end story of test_end_to_end.py
(ingest -> identity -> segments -> query, over the events, identity and segment-changes streams),
segments' resumable change stream and a watched profile's live feed (pub/sub), run again with
every service's PROFILES_REDIS_URL a `redis+cluster://` URL."""

from __future__ import annotations

from typing import Any

import pytest

from shared.bus import Bus
from tests.api import test_query_watch
from tests.api.test_end_to_end import suite as suite
from tests.api.test_end_to_end import (
    test_a_user_on_ios_and_web_is_shown_exactly_as_they_behaved as story,
)
from tests.api.test_query_watch import bus as bus
from tests.api.test_segments import segments as segments

# Collected again here, on the cluster: segments' durable change stream (XREAD from a cursor).
from tests.api.test_segments import (
    test_a_watcher_reconnecting_with_its_cursor_misses_nothing as test_a_watcher_reconnecting_with_its_cursor_misses_nothing,  # noqa: E501
)
from tests.support.query import start_suite


@pytest.fixture
def redis_url(redis_cluster_url: str) -> str:
    """Every service, helper and fixture of this module talks to the cluster."""
    return redis_cluster_url


@pytest.fixture
def redis_prefix(cluster_prefix: str) -> str:
    return cluster_prefix


async def test_a_user_on_ios_and_web_is_shown_exactly_as_they_behaved_on_a_cluster(
    suite: Any,
) -> None:
    await story(suite)


async def test_a_watched_profile_feed_follows_events_and_a_merge_on_a_cluster(
    start_services: Any, settings_for_test: Any, project: Any, database_url: str, bus: Bus
) -> None:
    assert settings_for_test.redis_url.startswith("redis+cluster://")
    watched = await start_suite(start_services, settings_for_test, project, database_url)
    await test_query_watch.test_the_feed_shows_new_events_and_attribute_changes_and_follows_a_merge(
        watched, bus
    )
