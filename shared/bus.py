"""The Redis bus: Streams with consumer groups for work that must not be lost, pub/sub for notices.

Key layout (every key starts with the configured prefix, `PROFILES_REDIS_PREFIX`):

    {prefix}:{<topic>}          stream of a topic, e.g. `profiles:{profile-merges}`
    {prefix}:{<topic>}:dead     its dead-letter stream (poison entries, too many deliveries)
    {prefix}:notice:<channel>   pub/sub channel of live notices (not a key; nothing is stored)

The topic name in braces is a Redis Cluster hash tag: a stream and its dead-letter stream live in
the same slot, so moving an entry to the dead stream and acking it is one MULTI. Different topics
spread over the cluster.

One stream entry is exactly one serialized protobuf message, with the fields
`kind` (the message's full name, e.g. `profiles.common.v1.ProfileMerged`), `data` (its bytes),
`project` (the project id) and `id` (the sender's message id, e.g. the outbox id; for tracing and
dedupe). A dead-letter entry keeps those fields and adds `reason`, `entry` (the original entry id),
`group` and `deliveries`.

Delivery is at least once: a consumer acks an entry only after its handler returned, entries of a
crashed consumer are claimed by another after `claim_idle_ms`, so handlers must be idempotent.
The catalogue of real topics is shared/topics.py; this module is only the mechanism.

Entries carry personal data (attribute values, custom and installation IDs), so streams are kept for
a bounded time: `trim_expired` (run every minute by every outbox relay) removes the entries of a
stream and of its dead-letter stream older than the retention (PROFILES_BUS_RETENTION_HOURS, 7 days)
by Redis's own clock, the clock entry IDs are made of, and those of every other dead-letter stream
under the prefix (found by SCAN: a topic renamed or removed since). `maxlen` stays a size cap on
every XADD. A consumer group stopped longer than the retention loses what was trimmed before it read
it: the trim logs `bus_unread_entries_expired` and counts it, and a consumer acks (and counts) a
pending entry it finds trimmed. docs/running.md says how to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import structlog
from google.protobuf.message import DecodeError, Message
from prometheus_client import Counter, Gauge
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterDownError, ResponseError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.db import connection_lost
from shared.errors import raised_from
from shared.redis_client import RedisClient, connect, pubsub

log = structlog.get_logger(__name__)

DEFAULT_MAXLEN = 1_000_000
# Our own services read within seconds; a week covers a consumer down over a long weekend, and
# the time to notice it, fix it and replay dead letters, and bounds how long an erased person's
# data stays on the streams (docs/identity.md). PROFILES_BUS_RETENTION_HOURS sets it.
DEFAULT_RETENTION_MS = 7 * 24 * 3_600_000
# Most entries one approximate trim call frees (whole stream nodes): the first trim of a stream
# that held a backlog frees it in steps that keep Redis responsive in between.
TRIM_STEP_LIMIT = 10_000
# Keys one SCAN call looks at, when trim_expired looks for dead-letter streams of topics it was
# not given: a round trip per this many keys of the database.
SCAN_COUNT = 1000
# Characters special in a Redis glob pattern (SCAN MATCH), escaped in a prefix with a backslash.
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\^])")
# Errors that mean "Redis is away for now": retried with backoff, never fatal. The built-in
# TimeoutError is what asyncio.timeout() raises around a read that hangs on a dead connection;
# the cluster ones are what a Redis Cluster answers while a failover moves slots to a replica.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)
# Without XINFO's `lag` (Redis < 7, or after deletions) the lag is counted with XRANGE, read
# no further than this so a metrics update stays cheap; the gauge then says "at least".
LAG_SCAN_LIMIT = 1000

# Publishes the (channel, message) pairs packed in ARGV in order; answers each PUBLISH's
# receiver count, separated by spaces. ARGV[1] holds the byte lengths of the pieces in ARGV[2],
# which alternate channel, message, channel, message...: two arguments and one string reply
# whatever the count (see notify_many).
PUBLISH_ALL = """
local counts = {}
local data = ARGV[2]
local at = 1
local channel = nil
for size in string.gmatch(ARGV[1], '%d+') do
    local piece = string.sub(data, at, at + size - 1)
    at = at + size
    if channel == nil then
        channel = piece
    else
        counts[#counts + 1] = redis.call('PUBLISH', channel, piece)
        channel = nil
    end
end
return table.concat(counts, ' ')"""

# Removes the entries of stream KEYS[1] older than ARGV[1] milliseconds by this server's clock
# (entry IDs are made of it: on a cluster, each node's own), and answers {removed, more, groups
# that had not read all the removed entries...}. Whole nodes first, at most ARGV[2] entries a
# call (more = 1: call again); once no whole node is older, an exact trim of the first node's
# older entries (at most one node's worth), so nothing older than the cut survives. Exact
# trimming only flags entries inside a node as deleted: their bytes stay in memory, in DUMP and
# in an RDB (or an RDB-preamble AOF) until the whole node goes; the embedded Redis writes its
# append-only file without an RDB preamble for that reason (shared/embedded.py).
TRIM_EXPIRED = """
local time = redis.call('TIME')
local cut = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) - tonumber(ARGV[1])
if cut <= 0 or redis.call('EXISTS', KEYS[1]) == 0 then
    return {0, 0}
end
local reply = {0, 0}
local last_removed = string.format('%d', cut - 1)
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, last
    for i = 1, #group, 2 do
        if group[i] == 'name' then name = group[i + 1] end
        if group[i] == 'last-delivered-id' then last = group[i + 1] end
    end
    if #redis.call('XRANGE', KEYS[1], '(' .. last, last_removed, 'COUNT', 1) > 0 then
        reply[#reply + 1] = name
    end
end
local minid = string.format('%d', cut)
local removed = redis.call('XTRIM', KEYS[1], 'MINID', '~', minid, 'LIMIT', ARGV[2])
if removed > 0 then
    reply[1] = removed
    reply[2] = 1
    return reply
end
reply[1] = redis.call('XTRIM', KEYS[1], 'MINID', minid)
return reply"""

_TOPIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

PUBLISHED = Counter(
    "profiles_bus_messages_published_total", "Stream entries added by the bus.", ["topic"]
)
HANDLED = Counter(
    "profiles_bus_messages_handled_total",
    "Stream entries whose handler returned and which were acked.",
    ["topic", "group"],
)
HANDLER_FAILURES = Counter(
    "profiles_bus_handler_failures_total",
    "Handler calls that raised; the entry stays pending and is retried.",
    ["topic", "group"],
)
DEAD_LETTERED = Counter(
    "profiles_bus_messages_dead_lettered_total",
    "Stream entries moved to the dead-letter stream.",
    ["topic", "group", "reason"],
)
CONSUMER_LAG = Gauge(
    "profiles_bus_consumer_lag",
    "Entries of the stream not yet delivered to the group.",
    ["topic", "group"],
)
PENDING_ENTRIES = Gauge(
    "profiles_bus_pending_entries",
    "Entries delivered to the group and not yet acked.",
    ["topic", "group"],
)
TRIMMED = Counter(
    "profiles_bus_entries_expired_total",
    "Entries removed for being older than the retention, from a topic's stream (`stream`) or"
    " its dead-letter stream (`dead`).",
    ["topic", "stream"],
)
UNREAD_EXPIRED = Counter(
    "profiles_bus_unread_entries_expired_total",
    "Trims that removed entries a consumer group had not read yet (it was stopped longer than"
    " the retention): those entries are lost to it.",
    ["topic", "group"],
)
PENDING_EXPIRED = Counter(
    "profiles_bus_pending_entries_expired_total",
    "Entries a consumer found trimmed from the stream (retention or size cap) while they were"
    " delivered to its group and not yet acked: acked without being handled.",
    ["topic", "group"],
)


@dataclass(frozen=True, slots=True)
class Topic:
    """A stream and the protobuf message classes allowed on it."""

    name: str
    messages: tuple[type[Message], ...]
    # Entries stay at least this long whatever the bus retention (milliseconds): for a stream
    # whose readers are promised a longer history than the bus keeps (segment changes).
    keep_at_least_ms: int = 0
    _by_kind: Mapping[str, type[Message]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not _TOPIC_NAME.match(self.name):
            # Braces or colons would break the hash tag and the key layout.
            raise ValueError(f"topic name must match {_TOPIC_NAME.pattern}: {self.name!r}")
        by_kind = {m.DESCRIPTOR.full_name: m for m in self.messages}
        object.__setattr__(self, "_by_kind", by_kind)

    def message_class(self, kind: str) -> type[Message] | None:
        return self._by_kind.get(kind)

    def kind_of(self, message: Message) -> str:
        """The message's kind; raises ValueError if the topic does not carry it."""
        kind = message.DESCRIPTOR.full_name
        if self._by_kind.get(kind) is not type(message):
            raise ValueError(f"topic {self.name} does not carry {kind}")
        return kind


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message to publish, already serialized (the outbox stores it so)."""

    project_id: str
    kind: str
    data: bytes
    message_id: str = ""

    @classmethod
    def of(cls, topic: Topic, project_id: object, message: Message, message_id: str = "") -> Self:
        return cls(str(project_id), topic.kind_of(message), message.SerializeToString(), message_id)

    def fields(self) -> dict[bytes, bytes]:
        return {
            b"kind": self.kind.encode(),
            b"data": self.data,
            b"project": self.project_id.encode(),
            b"id": self.message_id.encode(),
        }


@dataclass(frozen=True, slots=True)
class Notice:
    """A live notice received on a pub/sub channel (name without the prefix)."""

    channel: str
    data: bytes


class PoisonMessage(ValueError):
    """An entry no handler can ever process: unknown kind, missing field or undecodable data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_entry(topic: Topic, fields: Mapping[bytes, bytes]) -> tuple[str, Message]:
    """The entry's project id and message; raises PoisonMessage if it cannot be decoded."""
    try:
        kind = fields[b"kind"].decode()
        data = fields[b"data"]
        project_id = fields[b"project"].decode()
    except (KeyError, UnicodeDecodeError) as exc:
        raise PoisonMessage("malformed_entry") from exc
    message_class = topic.message_class(kind)
    if message_class is None:
        raise PoisonMessage("unknown_kind")
    try:
        return project_id, message_class.FromString(data)
    except DecodeError as exc:
        raise PoisonMessage("undecodable_data") from exc


class Backoff:
    """Bounded exponential backoff with jitter that logs an outage once, and its end once."""

    def __init__(self, event: str, *, initial: float, maximum: float, **log_context: Any) -> None:
        self._event = event
        self._initial = initial
        self._maximum = maximum
        self._context = log_context
        self._failures = 0

    def failed(self, exc: BaseException) -> float:
        """Records a failure; returns how long to wait before the next attempt (seconds)."""
        if self._failures == 0:
            log.warning(self._event, error=type(exc).__name__, **self._context)
        self._failures += 1
        delay = min(self._maximum, self._initial * 2 ** (self._failures - 1))
        # Jitter so that every consumer of a restarted Redis does not reconnect at the same instant.
        return delay * random.uniform(0.5, 1.0)

    def recovered(self) -> None:
        if self._failures:
            log.info(f"{self._event}_recovered", attempts=self._failures, **self._context)
            self._failures = 0


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleeps, but returns at once when `stop` is set, so a stop never waits out a backoff."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


# Redis errors that mean it is away for now, as a handler meets them (the built-in TimeoutError
# of REDIS_UNAVAILABLE is left out: a handler's own timeout is no outage).
_REDIS_AWAY: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)


def redis_unavailable(exc: BaseException) -> bool:
    """True if `exc`, or what it was raised from, means Redis is away for now."""
    return raised_from(exc, lambda error: isinstance(error, _REDIS_AWAY))


def dependency_unavailable(exc: BaseException) -> bool:
    """True if `exc` (or what it was raised from) means the database or Redis is away for now:
    a failure to wait out, not a fault of the message being handled."""
    return connection_lost(exc) or redis_unavailable(exc)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# What dead_letter adds to a dead entry beside the message's own fields.
DEAD_LETTER_FIELDS = (b"reason", b"entry", b"group", b"deliveries")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry of a topic's dead-letter stream: why and where it failed, and the message's
    own fields as published (kind, project, data, id)."""

    topic: str
    dead_id: str  # its ID in the dead-letter stream
    reason: str  # handler_failed, max_deliveries, unknown_kind, undecodable_data, ...
    group: str  # the consumer group that gave up on it ("" for none)
    entry_id: str  # its ID in the topic's stream when it failed
    deliveries: int
    kind: str
    project: str
    message_fields: Mapping[bytes, bytes]

    @classmethod
    def of(cls, topic: str, dead_id: str, fields: Mapping[bytes, bytes]) -> DeadLetter:
        def text(key: bytes) -> str:
            return _text(fields.get(key, b""))

        deliveries = text(b"deliveries")
        return cls(
            topic=topic,
            dead_id=dead_id,
            reason=text(b"reason"),
            group=text(b"group"),
            entry_id=text(b"entry"),
            deliveries=int(deliveries) if deliveries.isdigit() else 0,
            kind=text(b"kind"),
            project=text(b"project"),
            message_fields={k: v for k, v in fields.items() if k not in DEAD_LETTER_FIELDS},
        )


class Bus:
    """Publishes to topic streams and pub/sub channels under one key prefix."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        retention_ms: int = DEFAULT_RETENTION_MS,
    ) -> None:
        if retention_ms <= 0:
            raise ValueError(f"the bus retention must be above 0 ms, not {retention_ms}")
        self.redis = redis
        self.prefix = prefix
        self.maxlen = maxlen
        self.retention_ms = retention_ms

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        retention_ms: int = DEFAULT_RETENTION_MS,
    ) -> Self:
        """A bus with its own client (one server or a cluster: shared.redis_client); `aclose()`
        it on shutdown."""
        redis = connect(
            url,
            # Above the longest XREADGROUP BLOCK a consumer uses, so a block is not a timeout.
            socket_timeout=30,
            socket_connect_timeout=5,
            health_check_interval=30,
            # One quick retry re-dials a connection that a Redis restart left stale; longer
            # outages are the callers' business (consumers and relay back off on their own).
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        )
        return cls(redis, prefix, maxlen=maxlen, retention_ms=retention_ms)

    async def aclose(self) -> None:
        await self.redis.aclose()

    def stream_key(self, topic_name: str) -> str:
        return f"{self.prefix}:{{{topic_name}}}"

    def dead_key(self, topic_name: str) -> str:
        return f"{self.stream_key(topic_name)}:dead"

    def channel_key(self, channel: str) -> str:
        return f"{self.prefix}:notice:{channel}"

    async def publish(self, topic: Topic, items: Sequence[Envelope]) -> list[str]:
        """Adds one entry per item (one round trip); returns the entry ids in order.

        Raises ValueError for a kind the topic does not carry, before anything is sent.
        """
        return await self.publish_batches([(topic, items)])

    async def publish_batches(
        self, batches: Sequence[tuple[Topic, Sequence[Envelope]]]
    ) -> list[str]:
        """Publishes to several topics in one pipeline; returns all entry ids in order."""
        for topic, items in batches:
            for item in items:
                if topic.message_class(item.kind) is None:
                    raise ValueError(f"topic {topic.name} does not carry {item.kind}")
        if not any(items for _, items in batches):
            return []
        # No MULTI: the topics may live in different cluster slots, and a partial publish only
        # means duplicates on retry, which consumers tolerate.
        async with self.redis.pipeline(transaction=False) as pipe:
            for topic, items in batches:
                key = self.stream_key(topic.name)
                for item in items:
                    fields: dict[Any, Any] = item.fields()  # redis-py types fields invariantly
                    pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)
            entry_ids = await pipe.execute()
        for topic, items in batches:
            if items:
                PUBLISHED.labels(topic.name).inc(len(items))
        return [_text(entry_id) for entry_id in entry_ids]

    async def trim_expired(self, topics: Iterable[Topic]) -> int:
        """Removes the entries older than the retention (by Redis's clock) from the topics'
        streams (kept at least `keep_at_least_ms`) and their dead-letter streams, and from
        every other dead-letter stream under the prefix; returns how many. Logs and counts the
        consumer groups that lose entries they had not read."""
        removed = 0
        known = set()
        for topic in topics:
            known.add(topic.name)
            stream_retention = max(self.retention_ms, topic.keep_at_least_ms)
            removed += await self._trim_key(topic.name, "stream", stream_retention)
            removed += await self._trim_key(topic.name, "dead", self.retention_ms)
        # A dead letter keeps the message it could not deliver (personal data, like any entry)
        # whether or not its topic is still in the catalogue: a topic renamed or removed leaves
        # a dead-letter stream no relay is given. Every dead-letter stream follows the bus
        # retention, whatever its topic, so these are trimmed alike. (A topic's own stream is
        # left to the relays that know it: one may keep it longer, keep_at_least_ms.)
        for topic_name in await self.dead_letter_topics():
            if topic_name not in known:
                removed += await self._trim_key(topic_name, "dead", self.retention_ms)
        return removed

    async def dead_letter_topics(self) -> list[str]:
        """The topics that have a dead-letter stream under the prefix, in name order, found by
        SCAN (on every node of a cluster): one pass over the database's keys, SCAN_COUNT a
        call."""
        escaped = _GLOB_SPECIAL.sub(r"\\\1", self.prefix)
        pattern = escaped + ":{*}:dead"
        topic_name = _TOPIC_NAME.pattern.removeprefix("^").removesuffix("$")
        key_shape = re.compile(re.escape(self.prefix) + r":\{(" + topic_name + r")\}:dead")
        names = set()
        async for key in self.redis.scan_iter(match=pattern, count=SCAN_COUNT, _type="stream"):
            found = key_shape.fullmatch(_text(key))
            if found is not None:
                names.add(found[1])
        return sorted(names)

    async def _trim_key(self, topic_name: str, stream: str, retention_ms: int) -> int:
        key = self.stream_key(topic_name) if stream == "stream" else self.dead_key(topic_name)
        removed = 0
        losers: set[str] = set()
        while True:
            reply = await self.redis.eval(TRIM_EXPIRED, 1, key, retention_ms, TRIM_STEP_LIMIT)
            removed += int(reply[0])
            losers.update(_text(group) for group in reply[2:])
            if not int(reply[1]):
                break
        if removed:
            TRIMMED.labels(topic_name, stream).inc(removed)
            log.info("bus_entries_expired", topic=topic_name, stream=stream, removed=removed)
        for group in sorted(losers):
            UNREAD_EXPIRED.labels(topic_name, group).inc()
            log.error(
                "bus_unread_entries_expired",
                topic=topic_name,
                group=group,
                retention_ms=retention_ms,
                hint="the group was stopped longer than the bus retention and lost entries;"
                " see docs/running.md (bus retention) for how to recover",
            )
        return removed

    async def dead_letter(
        self,
        topic_name: str,
        fields: Mapping[bytes, bytes],
        reason: str,
        *,
        group: str = "",
        entry_id: str = "",
        deliveries: int = 0,
    ) -> None:
        """Adds an entry to the topic's dead-letter stream and, given a group, acks the original.

        Both happen in one MULTI (same hash tag), so an entry is never both dead and pending.
        """
        dead_fields: dict[Any, Any] = {
            **fields,
            b"reason": reason.encode(),
            b"entry": entry_id.encode(),
            b"group": group.encode(),
            b"deliveries": str(deliveries).encode(),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_key(topic_name), dead_fields, maxlen=self.maxlen, approximate=True)
            if group and entry_id:
                pipe.xack(self.stream_key(topic_name), group, entry_id)
            await pipe.execute()
        DEAD_LETTERED.labels(topic_name, group, reason).inc()
        log.warning(
            "bus_entry_dead_lettered",
            topic=topic_name,
            group=group,
            entry_id=entry_id,
            reason=reason,
            deliveries=deliveries,
        )

    async def dead_letters(self, topic_name: str, *, limit: int = 10_000) -> list[DeadLetter]:
        """The topic's dead letters, oldest first (at most `limit`)."""
        entries: Any = await self.redis.xrange(self.dead_key(topic_name), count=limit)
        return [DeadLetter.of(topic_name, _text(dead_id), fields) for dead_id, fields in entries]

    async def replay_dead_letter(self, letter: DeadLetter) -> str:
        """Puts a dead letter's message back on its topic, as it was published, and removes the
        letter, in one MULTI (same hash tag): it is never both or neither. Every group of the
        topic gets it again; consumers tolerate the repeat (at-least-once delivery). Returns
        the new entry's ID."""
        async with self.redis.pipeline(transaction=True) as pipe:
            fields: dict[Any, Any] = dict(letter.message_fields)
            pipe.xadd(
                self.stream_key(letter.topic),
                fields,
                maxlen=self.maxlen,
                approximate=True,
            )
            pipe.xdel(self.dead_key(letter.topic), letter.dead_id)
            entry_id, _ = await pipe.execute()
        log.info(
            "bus_dead_letter_replayed",
            topic=letter.topic,
            dead_id=letter.dead_id,
            reason=letter.reason,
            entry_id=_text(entry_id),
        )
        return _text(entry_id)

    async def notify(self, channel: str, message: Message | bytes) -> int:
        """Publishes a live notice; returns how many listeners got it (on a cluster: those
        subscribed on the node it reached, so 0 says nothing). Best effort: no retry."""
        return (await self.notify_many([(channel, message)]))[0]

    async def notify_many(self, notices: Sequence[tuple[str, Message | bytes]]) -> list[int]:
        """Publishes (channel, message) notices in order, in one round trip; returns the
        receiver counts as `notify` does. Best effort: no retry."""
        if not notices:
            return []
        pieces: list[bytes] = []
        for channel, message in notices:
            pieces.append(self.channel_key(channel).encode())
            pieces.append(message if isinstance(message, bytes) else message.SerializeToString())
        sizes = " ".join([str(len(piece)) for piece in pieces])
        # One script of PUBLISHes, not a pipeline of them: a batch's notices (one per touched
        # profile, hundreds per TrackEvents batch) cost one command and one reply to encode and
        # parse instead of hundreds, which was most of the publishing CPU; and the notices go
        # packed in two arguments and the counts come back in one string, since redis-py
        # encodes each argument and parses each reply element in Python. No keys, so
        # a cluster runs it on any node, and a cluster forwards a PUBLISH (from a script too)
        # to every node, so subscribers anywhere hear it.
        counts = await self.redis.execute_command("EVAL", PUBLISH_ALL, 0, sizes, b"".join(pieces))
        return [int(count) for count in counts.split()]

    async def pubsub(self) -> PubSub:
        """A pub/sub connection for a reader of its own (WatchProfile); `aclose()` it."""
        return await pubsub(self.redis)

    async def listen(
        self,
        channels: Iterable[str],
        *,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> AsyncIterator[Notice]:
        """Yields notices from the channels until the caller stops iterating.

        Reconnects and resubscribes on its own; notices sent while Redis was away are missed,
        which is what pub/sub promises. Redis drops a subscriber that falls too far behind
        (client-output-buffer-limit), so a slow reader costs no unbounded memory here either.
        """
        keys = {self.channel_key(c): c for c in channels}
        prefix_len = len(self.channel_key(""))
        backoff = Backoff(
            "bus_listen_redis_unavailable", initial=backoff_initial_s, maximum=backoff_max_s
        )
        while True:
            subscriber: PubSub | None = None
            try:
                subscriber = await self.pubsub()
                await subscriber.subscribe(*keys)
                while True:
                    raw = await subscriber.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    backoff.recovered()
                    if raw is None or raw.get("type") != "message":
                        continue
                    channel = _text(raw["channel"])[prefix_len:]
                    yield Notice(channel, raw["data"])
            except REDIS_UNAVAILABLE as exc:
                await asyncio.sleep(backoff.failed(exc))
            finally:
                if subscriber is not None:
                    with contextlib.suppress(*REDIS_UNAVAILABLE):
                        await subscriber.aclose()


Handler = Callable[[str, Message, str], Awaitable[None]]
"""A bus handler: (project id, decoded message, entry id). Raising leaves the entry pending."""


class Consumer:
    """Runs `handler` for every entry of `topic` delivered to `name` in consumer group `group`.

    On start (and after every reconnect) it re-reads its own pending entries from `0`, then reads
    new ones with `>`; every `claim_interval_s` it claims entries idle longer than `claim_idle_ms`
    (from crashed or failing consumers). An entry is acked only after its handler returned. An
    entry is dead-lettered when it cannot be decoded, or when its handler failed on its
    `max_deliveries`-th delivery. A handler that fails because the database or Redis is away is
    run again in place, with backoff, until it no longer does: an outage spends no delivery.
    Handlers run one at a time, at most `count` entries per read.
    """

    def __init__(
        self,
        bus: Bus,
        topic: Topic,
        group: str,
        name: str,
        handler: Handler,
        *,
        count: int = 100,
        block_ms: int = 2000,
        claim_idle_ms: int = 60_000,
        claim_interval_s: float | None = None,
        max_deliveries: int = 5,
        start_id: str = "0",
        handler_timeout_s: float | None = None,
        metrics_interval_s: float = 15.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._bus = bus
        self._redis = bus.redis
        self._topic = topic
        self._key = bus.stream_key(topic.name)
        self._group = group
        self._name = name
        self._handler = handler
        self._count = count
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._claim_interval_s = (
            claim_interval_s if claim_interval_s is not None else claim_idle_ms / 2000
        )
        self._max_deliveries = max_deliveries
        # "0": a new group also gets what the stream already retains, so messages published
        # before the group existed (first deploy, a Redis restart) are not skipped.
        self._start_id = start_id
        self._handler_timeout_s = handler_timeout_s
        self._metrics_interval_s = metrics_interval_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stop = asyncio.Event()
        self._waiting_for_new = False
        self._group_ready = False
        self._own_pending_due = True
        self._next_claim = 0.0
        self._next_metrics = 0.0
        self._log = log.bind(topic=topic.name, group=group, consumer=name)

    def stop(self) -> None:
        """Asks `run()` to return once the current batch is handled."""
        self._stop.set()

    @property
    def waiting_for_new(self) -> bool:
        """True while blocked reading new entries, with none in hand."""
        return self._waiting_for_new

    async def run(self) -> None:
        """Consumes until `stop()`; survives Redis outages and handler failures."""
        self._stop.clear()
        self._group_ready = False
        self._own_pending_due = True
        backoff = Backoff(
            "bus_consumer_redis_unavailable",
            initial=self._backoff_initial_s,
            maximum=self._backoff_max_s,
            topic=self._topic.name,
            group=self._group,
            consumer=self._name,
        )
        self._log.info("bus_consumer_started")
        try:
            while not self._stop.is_set():
                try:
                    await self._step()
                    backoff.recovered()
                except REDIS_UNAVAILABLE as exc:
                    # A new connection may reach a Redis that lost its data: recreate the group
                    # and re-read our own pending entries before anything else.
                    self._group_ready = False
                    self._own_pending_due = True
                    await sleep_unless(self._stop, backoff.failed(exc))
                except ResponseError as exc:
                    if str(exc).startswith("NOGROUP"):
                        # The stream or group was deleted under us (e.g. Redis restarted empty).
                        self._log.warning("bus_consumer_group_missing")
                        self._group_ready = False
                        continue
                    self._log.error("bus_consumer_redis_error", error=type(exc).__name__)
                    await sleep_unless(self._stop, backoff.failed(exc))
                except Exception:
                    # A bug here must not stop consumption for good; log it and go on slowly.
                    self._log.exception("bus_consumer_failed")
                    await sleep_unless(self._stop, self._backoff_max_s)
        finally:
            self._log.info("bus_consumer_stopped")

    async def _step(self) -> None:
        if not self._group_ready:
            await self._create_group()
        if self._own_pending_due:
            await self._handle_own_pending()
        now = time.monotonic()
        if now >= self._next_claim:
            await self._claim_idle()
            self._next_claim = time.monotonic() + self._claim_interval_s
        if now >= self._next_metrics:
            await self.update_metrics()
            self._next_metrics = time.monotonic() + self._metrics_interval_s
        if not self._stop.is_set():
            await self._read_new()

    async def _create_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._key, self._group, self._start_id, mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        self._group_ready = True
        self._own_pending_due = True

    async def _handle_own_pending(self) -> None:
        """Re-handles entries delivered to this consumer name and never acked (a restart)."""
        cursor = "0"
        while not self._stop.is_set():  # stopped: the rest waits for the next run
            entries = await self._read(cursor, block_ms=None)
            if not entries:
                self._own_pending_due = False
                return
            # Failed entries stay pending; moving the cursor past them ends the pass.
            cursor = _text(entries[-1][0])
            await self._process(entries, await self._delivery_counts(entries))

    async def _claim_idle(self) -> None:
        cursor = "0-0"
        while not self._stop.is_set():
            async with asyncio.timeout(self._remote_timeout_s()):
                result = await self._redis.xautoclaim(
                    self._key,
                    self._group,
                    self._name,
                    min_idle_time=self._claim_idle_ms,
                    start_id=cursor,
                    count=self._count,
                )
            cursor = _text(result[0])
            entries = result[1]
            # Redis 7 drops pending entries trimmed from the stream from the group's pending
            # list itself and names them here (6.2 answers them as (nil, nil) among `entries`).
            for entry_id in result[2] if len(result) > 2 else ():
                self._expired_while_pending(_text(entry_id))
            if entries:
                await self._process(entries, await self._delivery_counts(entries))
            if cursor == "0-0":
                return

    async def _read_new(self) -> None:
        self._waiting_for_new = True
        try:
            entries = await self._read(">", block_ms=self._block_ms)
        finally:
            self._waiting_for_new = False
        if entries:
            # A `>` read is by definition the first delivery.
            await self._process(entries, {})

    async def _read(self, cursor: str, *, block_ms: int | None) -> list[Any]:
        async with asyncio.timeout(self._remote_timeout_s()):
            # Typed for RESP3 too; this client speaks RESP2: [[key, [(id, fields), ...]]].
            response: Any = await self._redis.xreadgroup(
                self._group, self._name, {self._key: cursor}, count=self._count, block=block_ms
            )
        return list(response[0][1]) if response else []

    def _remote_timeout_s(self) -> float:
        # Long enough for a full BLOCK, short enough that a silently dead connection is noticed.
        return self._block_ms / 1000 + 10

    async def _delivery_counts(self, entries: Sequence[Any]) -> dict[str, int]:
        """Delivery count of each entry, from XPENDING, in one round trip."""
        ids = [_text(entry_id) for entry_id, _ in entries if entry_id is not None]
        if not ids:
            return {}
        async with asyncio.timeout(self._remote_timeout_s()):
            async with self._redis.pipeline(transaction=False) as pipe:
                for entry_id in ids:
                    pipe.xpending_range(self._key, self._group, entry_id, entry_id, 1)
                replies = await pipe.execute()
        return {
            _text(row["message_id"]): int(row["times_delivered"])
            for reply in replies
            for row in reply
        }

    async def _process(self, entries: Sequence[Any], deliveries: Mapping[str, int]) -> None:
        for raw_id, fields in entries:
            if raw_id is None:
                # Redis 6.2 claims an entry trimmed from the stream as (nil, nil) and keeps it in
                # our pending list; the next read from `0` shows its id so it can be acked.
                self._own_pending_due = True
                continue
            entry_id = _text(raw_id)
            if not fields:
                # Trimmed (retention or MAXLEN) or deleted while pending: nothing left to
                # handle, and acking it is what takes it out of the pending list.
                await self._redis.xack(self._key, self._group, entry_id)
                self._expired_while_pending(entry_id)
                continue
            await self._process_one(entry_id, fields, deliveries.get(entry_id, 1))

    def _expired_while_pending(self, entry_id: str) -> None:
        PENDING_EXPIRED.labels(self._topic.name, self._group).inc()
        self._log.warning(
            "bus_pending_entry_expired",
            entry_id=entry_id,
            hint="trimmed from the stream before its handler completed; the message is lost to"
            " this group (docs/running.md, bus retention)",
        )

    async def _process_one(
        self, entry_id: str, fields: Mapping[bytes, bytes], delivery: int
    ) -> None:
        try:
            project_id, message = decode_entry(self._topic, fields)
        except PoisonMessage as exc:
            await self._dead_letter(entry_id, fields, exc.reason, delivery)
            return
        if delivery > self._max_deliveries:
            # Delivered too often without a handler failure being seen: its consumers crashed
            # (or timed out) while handling it. Stop trying.
            await self._dead_letter(entry_id, fields, "max_deliveries", delivery)
            return
        failure = await self._call_handler(project_id, message, entry_id, delivery)
        if failure is not None and dependency_unavailable(failure):
            failure = await self._retry_while_unavailable(
                project_id, message, entry_id, delivery, failure
            )
            if self._stop.is_set() and failure is not None:
                return  # left pending for the next run, its delivery count unchanged
        if failure is None:
            await self._redis.xack(self._key, self._group, entry_id)
            HANDLED.labels(self._topic.name, self._group).inc()
        elif delivery >= self._max_deliveries:
            await self._dead_letter(entry_id, fields, "handler_failed", delivery)

    async def _call_handler(
        self, project_id: str, message: Message, entry_id: str, delivery: int
    ) -> Exception | None:
        """Runs the handler; None once it returned, else what it raised."""
        try:
            async with asyncio.timeout(self._handler_timeout_s):
                await self._handler(project_id, message, entry_id)
        except Exception as exc:
            # Left pending: another delivery (via claim) retries it, up to max_deliveries.
            HANDLER_FAILURES.labels(self._topic.name, self._group).inc()
            if dependency_unavailable(exc):
                self._log.warning(
                    "bus_handler_dependency_unavailable",
                    entry_id=entry_id,
                    delivery=delivery,
                    error=type(exc).__name__,
                )
            else:
                self._log.exception("bus_handler_failed", entry_id=entry_id, delivery=delivery)
            return exc
        return None

    async def _retry_while_unavailable(
        self,
        project_id: str,
        message: Message,
        entry_id: str,
        delivery: int,
        failure: Exception,
    ) -> Exception | None:
        """Runs the handler again, in place and with backoff, for as long as it fails because
        the database (or Redis) is away: an outage is no fault of the entry, so it must not
        spend the entry's deliveries (a redelivery counts one), or a few minutes of outage
        dead-letter acknowledged data. Meanwhile the entry is kept claimed (XCLAIM JUSTID,
        which counts no delivery) so that no other consumer takes it. Returns the last
        failure (None once handled); returns early when the consumer is stopped."""
        backoff = Backoff(
            "bus_handler_waits_for_its_dependency",
            initial=self._backoff_initial_s,
            maximum=self._backoff_max_s,
            topic=self._topic.name,
            group=self._group,
            consumer=self._name,
        )
        last: Exception | None = failure
        while last is not None and dependency_unavailable(last):
            await sleep_unless(self._stop, backoff.failed(last))
            if self._stop.is_set():
                return last
            await self._redis.xclaim(self._key, self._group, self._name, 0, [entry_id], justid=True)
            last = await self._call_handler(project_id, message, entry_id, delivery)
        backoff.recovered()
        return last

    async def _dead_letter(
        self, entry_id: str, fields: Mapping[bytes, bytes], reason: str, delivery: int
    ) -> None:
        await self._bus.dead_letter(
            self._topic.name,
            fields,
            reason,
            group=self._group,
            entry_id=entry_id,
            deliveries=delivery,
        )

    async def update_metrics(self) -> None:
        """Sets the lag and pending gauges of this topic and group from XINFO GROUPS."""
        async with asyncio.timeout(self._remote_timeout_s()):
            groups = await self._redis.xinfo_groups(self._key)
            info = next((g for g in groups if _text(g["name"]) == self._group), None)
            if info is None:
                return
            lag = info.get("lag")
            if lag is None:
                lag = await self._count_undelivered(_text(info["last-delivered-id"]))
        CONSUMER_LAG.labels(self._topic.name, self._group).set(int(lag))
        PENDING_ENTRIES.labels(self._topic.name, self._group).set(int(info["pending"]))

    async def _count_undelivered(self, last_delivered_id: str) -> int:
        entries: Any = await self._redis.xrange(
            self._key, min=f"({last_delivered_id}", max="+", count=LAG_SCAN_LIMIT
        )
        return len(entries)


class ConsumerWorker:
    """Runs a Consumer beside a server (shared.server's worker protocol). stop() asks it to stop
    reading and waits a moment for the batch in hand; past that the server cancels it, which is
    safe: an entry is acked only after its handler returned, so an interrupted one comes again."""

    def __init__(self, consumer: Consumer, *, stop_wait_s: float = 0.5) -> None:
        self._consumer = consumer
        self._stop_wait_s = stop_wait_s
        self._finished = asyncio.Event()

    async def run(self) -> None:
        try:
            await self._consumer.run()
        finally:
            self._finished.set()

    async def stop(self) -> None:
        self._consumer.stop()
        if self._consumer.waiting_for_new:
            # Blocked in XREADGROUP with nothing in hand: the server cancels it now rather than
            # at the BLOCK's end (every service stop waited up to stop_wait_s per consumer).
            # Entries Redis delivers to the cancelled read stay pending under this consumer's
            # name and are handled again (its next run, or another consumer's claim).
            return
        # A consumer handling a batch sees the stop once the batch is handled.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._stop_wait_s):
                await self._finished.wait()
