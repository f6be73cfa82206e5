"""The one place that turns PROFILES_REDIS_URL into a client: a single Redis or a Redis Cluster.

URL forms:

    redis://host:port/0, rediss://..., unix:///path/redis.sock    one server (redis-py's Redis)
    redis+cluster://host:port,host:port,...                        a Redis Cluster (RedisCluster)
    rediss+cluster://user:password@host:port,host:port             the same over TLS

A cluster URL lists seed nodes: one reachable node is enough, the client learns the others and
the slot map from it (CLUSTER SLOTS) and follows MOVED/ASK redirections on its own. User,
password and query options (e.g. `?socket_timeout=5`) apply to every node.

Both clients offer the commands the suite uses; what a cluster changes is settled elsewhere:
every key of one stream shares a hash tag (shared.bus), a MULTI only ever touches one stream's
keys, and live notices use plain PUBLISH, which a cluster forwards to every node (Redis 6.2 has
no sharded pub/sub), so a subscriber on any node hears every notice.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

RedisClient = Redis | RedisCluster
"""What the suite talks to: one server or a cluster; both speak the same commands."""

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL as (the URL of its first node in plain redis:// form, every seed node).

    Raises ValueError for a URL with no host or a port that is not a number.
    """
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"not a cluster URL (redis+cluster:// or rediss+cluster://): {url!r}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = []
    for seed in hosts.split(","):
        host, _, port = seed.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a cluster URL lists host:port pairs: {seed!r}")
        seeds.append((host.strip("[]"), int(port)))
    netloc = f"{credentials}@{hosts.split(',')[0]}" if credentials else hosts.split(",")[0]
    first = urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))
    return first, seeds


def connect(url: str, **options: Any) -> RedisClient:
    """A client for `url` (one server or, for a cluster URL, the cluster); `aclose()` it.

    `options` are connection options (socket_timeout, health_check_interval, ...) that apply to
    every connection, whichever kind. Nothing is dialled until the first command.
    """
    # Per server (per node of a cluster). Every open watch (WatchProfile's pub/sub,
    # WatchSegmentChanges' blocking reads) holds a connection beside the consumers' own:
    # redis-py's default of 100 (since 8.0 for a single server too) failed watches below
    # PROFILES_MAX_STREAMS with MaxConnectionsError (INTERNAL), so leave room for them and more.
    options.setdefault("max_connections", 1000)
    if not is_cluster_url(url):
        return Redis.from_url(url, **options)
    first, seeds = cluster_seeds(url)
    options.setdefault(
        # A failover or resharding answers with redirections and short CLUSTERDOWN periods:
        # a few quick retries ride them out; longer outages are the callers' business.
        "retry",
        Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
    )
    return RedisCluster.from_url(
        first, startup_nodes=[ClusterNode(host, port) for host, port in seeds], **options
    )


async def pubsub(client: RedisClient) -> PubSub:
    """A pub/sub connection of `client`; on a cluster it lives on the node of the first
    channel's slot and hears every node's PUBLISH. Raises what connecting raises."""
    if isinstance(client, RedisCluster):
        # A cluster pub/sub picks its node from the slot map, which the client only loads on
        # its first command: without this a watch opened first would find no map at all.
        await client.initialize()
    return client.pubsub()
