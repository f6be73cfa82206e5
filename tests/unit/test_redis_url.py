"""PROFILES_REDIS_URL forms: one server, or a Redis Cluster's seed nodes."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis, RedisCluster

from shared.redis_client import cluster_seeds, connect, is_cluster_url


def test_a_plain_url_gives_a_single_server_client() -> None:
    assert not is_cluster_url("redis://localhost:6379/0")
    assert not is_cluster_url("unix:///tmp/redis.sock")
    assert type(connect("redis://localhost:6379/0")) is Redis


def test_a_cluster_url_lists_seed_nodes_and_keeps_credentials_and_options() -> None:
    first, seeds = cluster_seeds("rediss+cluster://u:pw@a:1,[::1]:2/0?socket_timeout=3")

    assert first == "rediss://u:pw@a:1/0?socket_timeout=3"
    assert seeds == [("a", 1), ("::1", 2)]
    assert isinstance(connect("redis+cluster://127.0.0.1:1,127.0.0.1:2"), RedisCluster)


@pytest.mark.parametrize(
    "url", ["redis+cluster://a:1,b", "redis+cluster://a:x", "redis+cluster://"]
)
def test_a_cluster_url_without_host_and_port_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        connect(url)
