"""WatchProfile: one profile's live notices (bus_pb2.ProfileChanged on Redis pub/sub), turned into
WatchProfileResponse items through a bounded buffer.

Order of start-up: subscribe (and wait for Redis to confirm), then read the profile's version,
then send `started`: a notice committed after that read cannot be missed, and a view from
GetProfile at that version already holds everything before it. A reader task moves notices
into the buffer; when the client falls behind and the buffer is full, new items are discarded
and counted, and a `dropped` item takes their place in the stream. On MERGED_AWAY the watch
moves to the survivor's channel.

Redis may go away (an outage, a restart, or a connection it drops itself, such as a subscriber
over its output buffer limit, which redis-py renews on its own), or stop answering on a
connection that stays open (a hung or stopped server, a partition that closes nothing: found by
PINGs on the subscription, see PONG_TIMEOUT_S): the stream stays open, the watch subscribes
again (with backoff) once Redis answers, then re-reads the profile's version.
Notices published meanwhile are lost, so when the version moved past the last one the watch
saw, a `dropped` item with no count tells the client to resync from GetProfile (the contract:
nothing is missed after `started` unless a `dropped` item says so). A merge announced meanwhile
is followed; an erasure ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog
from google.protobuf.message import DecodeError
from redis.asyncio.client import PubSub

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.query.v1 import live_pb2, profile_pb2
from profiles.query.v1 import query_service_pb2 as pb
from services.query import convert
from services.query.errors import ProfileNotFound
from services.query.repository import QueryRepository
from shared.bus import REDIS_UNAVAILABLE, Backoff, Bus
from shared.clock import Clock
from shared.convert import timestamp_of
from shared.notices import PUBLISH_TIMEOUT_S
from shared.topics import profile_channel

log = structlog.get_logger(__name__)

BUFFER_SIZE = 256
SUBSCRIBE_TIMEOUT_S = 5.0
# A subscription Redis stopped answering without closing it looks like a quiet channel
# (get_message returns None), while the publishers give their notices up (PUBLISH_TIMEOUT_S
# without an answer). So the watch PINGs its subscription once it has heard nothing on it for
# PING_INTERVAL_S (pub/sub answers in order with the messages), and takes a PING unanswered
# after PONG_TIMEOUT_S for a lost connection. A PING goes out at most PING_INTERVAL_S into a
# stall and is found unanswered PONG_TIMEOUT_S later: a stall long enough to make a publisher
# drop a notice is noticed. (A notice's version skipping ahead tells nothing: some version
# bumps publish no notice, such as an erasure renaming another profile's installations, and
# ingest's and identity's notices travel on different connections, in no common order.)
PING_INTERVAL_S = 1.0
PONG_TIMEOUT_S = PUBLISH_TIMEOUT_S - PING_INTERVAL_S
PING_MESSAGE = "profiles-watch-ping"

MERGE_CAUSES = {
    types_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY: profile_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY,
    types_pb2.IDENTITY_CHANGE_CAUSE_LOGOUT: profile_pb2.IDENTITY_CHANGE_CAUSE_LOGOUT,
    types_pb2.IDENTITY_CHANGE_CAUSE_OPERATOR_MERGE: (
        profile_pb2.IDENTITY_CHANGE_CAUSE_OPERATOR_MERGE
    ),
    types_pb2.IDENTITY_CHANGE_CAUSE_TOKEN_REINTEGRATION: (
        profile_pb2.IDENTITY_CHANGE_CAUSE_TOKEN_REINTEGRATION
    ),
    types_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY_SWITCH: (
        profile_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY_SWITCH
    ),
}
TRANSITIONS = {
    types_pb2.MEMBERSHIP_CHANGE_ENTERED: live_pb2.SEGMENT_TRANSITION_ENTERED,
    types_pb2.MEMBERSHIP_CHANGE_LEFT: live_pb2.SEGMENT_TRANSITION_LEFT,
}


class SubscriptionStalled(TimeoutError):
    """Redis left the watch's PING unanswered for PONG_TIMEOUT_S: the subscription is taken for
    lost (a TimeoutError, so one of REDIS_UNAVAILABLE)."""


@dataclass(frozen=True, slots=True)
class _Closed:
    """The call is over (the client went away): the stream returns and cleans up."""


@dataclass(frozen=True, slots=True)
class _Ended:
    """The profile was erased (`error` None: the stream ends with NOT_FOUND), or the reader
    failed (`error` is re-raised: INTERNAL, logged once by the interceptor)."""

    error: BaseException | None = None


class WatchBuffer:
    """A bounded FIFO of items; overflow is counted and delivered as one `dropped` item."""

    def __init__(self, size: int, clock: Clock) -> None:
        self._size = size
        self._clock = clock
        self._items: deque[pb.WatchProfileResponse | _Ended | _Closed] = deque()
        self._ready = asyncio.Event()
        self._dropped = 0
        self._first_drop: datetime | None = None

    def close(self) -> None:
        """Ends the stream after what is buffered, whatever the bound (from any callback)."""
        self._items.append(_Closed())
        self._ready.set()

    def put(self, item: pb.WatchProfileResponse | _Ended) -> None:
        if self._dropped and len(self._items) < self._size:
            self._items.append(self._dropped_item())
        if len(self._items) >= self._size and not isinstance(item, _Ended):
            self._dropped += 1
            self._first_drop = self._first_drop or self._clock.now()
            return
        self._items.append(item)
        self._ready.set()

    def _dropped_item(self) -> pb.WatchProfileResponse:
        assert self._first_drop is not None
        dropped = live_pb2.DroppedItems(dropped_count=self._dropped)
        dropped.first_drop_time.CopyFrom(timestamp_of(self._first_drop))
        self._dropped, self._first_drop = 0, None
        # profile_id is filled by the watch when it is delivered.
        return convert.watch_item("", 0, self._clock.now(), dropped=dropped)

    async def get(self) -> pb.WatchProfileResponse | _Ended | _Closed:
        while not self._items:
            if self._dropped:
                return self._dropped_item()
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class ProfileWatch:
    def __init__(self, bus: Bus, repository: QueryRepository, clock: Clock) -> None:
        self._bus = bus
        self._repository = repository
        self._clock = clock

    async def watch(
        self, project_id: UUID, requested: UUID, closed: asyncio.Event | None = None
    ) -> AsyncIterator[pb.WatchProfileResponse]:
        """Yields `started`, then live items, until the client cancels (or `closed` is set:
        the call ended), or the profile is erased (ProfileNotFound). Raises ProfileNotFound at
        once for an unknown profile."""
        profile_id = await self._live(project_id, requested)
        state = _State(project_id, profile_id)
        state.pubsub = await self._subscribe(state)
        reader: asyncio.Task[None] | None = None
        closer: asyncio.Task[None] | None = None
        try:
            async with self._repository.reads() as reads:
                version = await reads.profile_version(project_id, state.profile_id)
            if version is None:
                raise ProfileNotFound("no such profile in this project")
            state.version = version
            started = live_pb2.WatchStarted(version=version)
            yield convert.watch_item(
                str(state.profile_id), version, self._clock.now(), started=started
            )
            buffer = WatchBuffer(BUFFER_SIZE, self._clock)
            reader = asyncio.create_task(self._read_or_fail(state, buffer))
            if closed is not None:
                closer = asyncio.create_task(_close_when(closed, buffer))
            while True:
                item = await buffer.get()
                if isinstance(item, _Closed):
                    return
                if isinstance(item, _Ended):
                    if item.error is not None:
                        raise item.error
                    raise ProfileNotFound("the profile was erased")
                if item.WhichOneof("item") == "dropped":
                    item.profile_id = str(state.delivered_profile_id)
                else:
                    state.delivered_profile_id = UUID(item.profile_id)
                yield item
        finally:
            for task in (reader, closer):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            # The reader's last subscription (it renews it after an outage).
            if state.pubsub is not None:
                with contextlib.suppress(*REDIS_UNAVAILABLE):
                    await state.pubsub.aclose()

    async def _live(self, project_id: UUID, profile_id: UUID) -> UUID:
        async with self._repository.reads() as reads:
            found = await reads.profile_exists(project_id, profile_id)
        if found is None:
            raise ProfileNotFound("no such profile in this project")
        return found[0]

    async def _subscribe(self, state: _State) -> PubSub:
        """A new pub/sub connection subscribed to the profile's channel, once Redis confirmed
        it; raises what REDIS_UNAVAILABLE lists (closing the connection: a watch retrying
        through a long outage must not leave one behind per attempt)."""
        key = self._bus.channel_key(profile_channel(state.project_id, state.profile_id))
        pubsub: PubSub | None = None
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                pubsub = await self._bus.pubsub()
                await pubsub.subscribe(key)
                # The confirmation comes back once Redis has registered the subscription.
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "subscribe":
                        break
        except BaseException:
            if pubsub is not None:
                with contextlib.suppress(*REDIS_UNAVAILABLE):
                    await pubsub.aclose()
            raise
        state.channel_key = key
        state.moving_to = ""
        return pubsub

    async def _read_or_fail(self, state: _State, buffer: WatchBuffer) -> None:
        """Runs the reader; a failure reaches the stream instead of dying with the task."""
        try:
            await self._read(state, buffer)
        except Exception as exc:
            buffer.put(_Ended(exc))

    async def _read(self, state: _State, buffer: WatchBuffer) -> None:
        backoff = Backoff("watch_redis_unavailable", initial=0.1, maximum=5.0)
        heartbeat = _Heartbeat(self._clock)
        # When the subscription was lost (renew it), and since when notices may have been lost
        # (resync once subscribed again).
        lost: datetime | None = None
        gap: datetime | None = None
        while True:
            try:
                if lost is not None:
                    await self._renew(state)
                    heartbeat.reset()
                    gap, lost = gap or lost, None
                if gap is not None:
                    if not await self._resync(state, buffer, gap):
                        return
                    gap = None
                pubsub = state.pubsub
                assert pubsub is not None
                # Bounded as a whole: redis-py re-dials a connection that failed inside these
                # calls, which a hung Redis would hold for the client's socket timeout.
                async with asyncio.timeout(PING_INTERVAL_S + SUBSCRIBE_TIMEOUT_S):
                    message = await pubsub.get_message(timeout=await heartbeat.beat(pubsub))
                    if message is None and heartbeat.overdue():
                        # What a busy event loop left unread, else Redis is not answering.
                        message = await pubsub.get_message(timeout=0)
                        if message is None:
                            raise SubscriptionStalled("the watch's PING went unanswered")
                backoff.recovered()
            except REDIS_UNAVAILABLE as exc:
                # Retried until Redis answers (the client may cancel meanwhile), at most
                # `maximum` seconds apart. Notices may have been lost since Redis last answered.
                lost = lost or heartbeat.heard
                await asyncio.sleep(backoff.failed(exc))
                continue
            if message is None:
                continue
            heartbeat.answered(message)
            if message.get("type") == "subscribe":
                channel = _text(message["channel"])
                if channel == state.moving_to:
                    state.moving_to = ""  # _move's own subscription
                elif channel == state.channel_key:
                    # redis-py reconnected on its own and subscribed again (Redis dropped the
                    # connection, or restarted at once): notices may have been lost meanwhile.
                    # A PING sent on the old connection has no answer to come.
                    gap = self._clock.now()
                    heartbeat.reset()
                continue
            if message.get("type") != "message":
                continue
            try:
                notice = bus_pb2.ProfileChanged.FromString(message["data"])
            except DecodeError:
                log.warning("watch_notice_undecodable")
                continue
            if notice.profile_id != str(state.profile_id):
                continue
            state.version = max(state.version, notice.profile_version)
            for item in await self._items(state, notice):
                buffer.put(item)
            if bus_pb2.PROFILE_CHANGE_KIND_DELETED in notice.kinds:
                buffer.put(_Ended())
                return
            if (
                bus_pb2.PROFILE_CHANGE_KIND_MERGED_AWAY in notice.kinds
                and notice.merge.target_profile_id
            ):
                state.profile_id = UUID(notice.merge.target_profile_id)
                try:
                    await self._move(state)
                except REDIS_UNAVAILABLE as exc:
                    # Renewed on the survivor's channel once Redis answers again.
                    lost = self._clock.now()
                    await asyncio.sleep(backoff.failed(exc))

    async def _renew(self, state: _State) -> None:
        """Replaces a lost subscription; raises what REDIS_UNAVAILABLE lists while Redis is
        away."""
        if state.pubsub is not None:
            old, state.pubsub = state.pubsub, None
            with contextlib.suppress(*REDIS_UNAVAILABLE):
                await old.aclose()
        state.pubsub = await self._subscribe(state)

    async def _resync(self, state: _State, buffer: WatchBuffer, since: datetime) -> bool:
        """After the subscription was renewed: re-reads the profile's version (as at start, after
        subscribing) and, when it moved past the last notice seen, tells the client with a
        `dropped` item that it may have missed items since `since`. Follows a merge whose notice
        was lost; returns False when the profile was erased (the stream then ends NOT_FOUND)."""
        async with self._repository.reads() as reads:
            version = await reads.profile_version(state.project_id, state.profile_id)
        if version is None:
            try:
                survivor = await self._live(state.project_id, state.profile_id)
            except ProfileNotFound:
                buffer.put(_Ended())
                return False
            # Merged away meanwhile: its notice (and the merge item) was lost.
            state.profile_id = survivor
            await self._move(state)
            async with self._repository.reads() as reads:
                version = await reads.profile_version(state.project_id, state.profile_id)
        if version is None or version > state.version:
            # How many items were lost is unknown: no count (the contract's `dropped`, count 0).
            dropped = live_pb2.DroppedItems(dropped_count=0)
            dropped.first_drop_time.CopyFrom(timestamp_of(since))
            buffer.put(convert.watch_item("", 0, self._clock.now(), dropped=dropped))
            state.version = max(state.version, version or 0)
        return True

    async def _move(self, state: _State) -> None:
        """Follows a merge: the survivor's channel instead of the tombstone's."""
        pubsub = state.pubsub
        assert pubsub is not None
        old_key = state.channel_key
        key = self._bus.channel_key(profile_channel(state.project_id, state.profile_id))
        state.moving_to = key  # its confirmation is not a renewed subscription
        await pubsub.subscribe(key)
        if old_key and old_key != key:
            await pubsub.unsubscribe(old_key)
        state.channel_key = key

    async def _items(
        self, state: _State, notice: bus_pb2.ProfileChanged
    ) -> list[pb.WatchProfileResponse]:
        profile = notice.profile_id
        version = notice.profile_version
        when = (
            notice.change_time.ToDatetime(UTC)
            if notice.HasField("change_time")
            else (self._clock.now())
        )
        items: list[pb.WatchProfileResponse] = []

        def add(**item: Any) -> None:
            items.append(convert.watch_item(profile, version, when, **item))

        kinds = set(notice.kinds)
        for event in notice.events:
            if event.kind not in (types_pb2.EVENT_KIND_MERGE, types_pb2.EVENT_KIND_SPLIT):
                add(event=convert.ingested_to_proto(event))
        if bus_pb2.PROFILE_CHANGE_KIND_ATTRIBUTES in kinds:
            for change in await self._attribute_changes(state, notice):
                add(attribute_change=change)
        if bus_pb2.PROFILE_CHANGE_KIND_SUBSCRIPTIONS in kinds:
            for event in notice.events:
                if event.WhichOneof("detail") == "subscription_change":
                    detail = event.subscription_change
                    subscription = live_pb2.SubscriptionChange(
                        channel=detail.channel, kind=detail.kind, subscribed=detail.subscribed
                    )
                    subscription.change_time.CopyFrom(event.event_time)
                    add(subscription_change=subscription)
        if kinds & {bus_pb2.PROFILE_CHANGE_KIND_MERGED_IN, bus_pb2.PROFILE_CHANGE_KIND_MERGED_AWAY}:
            add(identity_change=_merge_change(notice.merge))
        if bus_pb2.PROFILE_CHANGE_KIND_SPLIT in kinds:
            add(identity_change=_split_change(notice.split))
        for segment_change in notice.segment_changes:
            add(segment_change=_segment_change(segment_change))
        if bus_pb2.PROFILE_CHANGE_KIND_MERGED_AWAY in kinds and notice.merge.target_profile_id:
            # From here on the stream follows the survivor.
            target = notice.merge.target_profile_id
            for item in items:
                if item.WhichOneof("item") == "identity_change":
                    item.profile_id = target
        return items

    async def _attribute_changes(
        self, state: _State, notice: bus_pb2.ProfileChanged
    ) -> list[live_pb2.AttributeChange]:
        """The attributes the notice's events changed, with their state now. An operation that
        changed nothing (a late, older set) leaves the attribute's update time elsewhere: only
        attributes whose update time is one of the events' times are reported."""
        names = convert.names_of(notice.events)
        if not names:
            return []
        times = {
            e.event_time.ToDatetime(UTC)
            for e in notice.events
            if e.WhichOneof("detail") == "attribute_change"
        }
        async with self._repository.reads() as reads:
            current = await reads.attributes_state(state.project_id, UUID(notice.profile_id), names)
        changes = []
        for (native, name), found in current.items():
            if found is None or found[1] not in times:
                continue
            change = live_pb2.AttributeChange(name=name, native=native)
            if found[0] is not None:
                change.value.CopyFrom(convert.attribute_value(found[0]))
            change.update_time.CopyFrom(timestamp_of(found[1]))
            changes.append(change)
        return changes


class _Heartbeat:
    """The PINGs on one subscription (see PONG_TIMEOUT_S), and when Redis last answered on it."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self.reset()

    def reset(self) -> None:
        """A subscription just confirmed: Redis answered now, and no PING is awaited."""
        self.heard = self._clock.now()
        self._due = self._loop.time() + PING_INTERVAL_S
        self._deadline: float | None = None

    async def beat(self, pubsub: PubSub) -> float:
        """Sends a PING when one is due; returns how long to wait for a message before checking
        again (until the next PING is due, or the awaited one is overdue)."""
        now = self._loop.time()
        if self._deadline is None and now >= self._due:
            await pubsub.ping(PING_MESSAGE)
            self._deadline = now + PONG_TIMEOUT_S
        until = self._due if self._deadline is None else self._deadline
        return max(until - now, 0.0)

    def answered(self, message: dict[str, Any]) -> None:
        """Redis answered on the subscription (any message): the next PING is due once it has
        been quiet for PING_INTERVAL_S. An awaited PING is answered by its PONG only (any
        message before it was sent before it)."""
        self.heard = self._clock.now()
        if message.get("type") == "pong" and _text(message["data"]) == PING_MESSAGE:
            self._deadline = None
        if self._deadline is None:
            self._due = self._loop.time() + PING_INTERVAL_S

    def overdue(self) -> bool:
        return self._deadline is not None and self._loop.time() >= self._deadline


async def _close_when(closed: asyncio.Event, buffer: WatchBuffer) -> None:
    await closed.wait()
    buffer.close()


@dataclass(slots=True)
class _State:
    project_id: UUID
    profile_id: UUID
    channel_key: str = ""
    delivered_profile_id: UUID | None = None
    # The current subscription (renewed after an outage) and the channel `_move` subscribed to,
    # until Redis confirms it.
    pubsub: PubSub | None = None
    moving_to: str = ""
    # The profile's version at start, then of the newest notice seen: a higher one after an
    # outage means notices were lost.
    version: int = 0

    def __post_init__(self) -> None:
        self.delivered_profile_id = self.profile_id


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _merge_change(merge: bus_pb2.ProfileMerged) -> profile_pb2.IdentityChange:
    change = profile_pb2.IdentityChange(
        change_id=merge.change_id,
        kind=profile_pb2.IDENTITY_CHANGE_KIND_MERGE,
        cause=MERGE_CAUSES.get(merge.cause, 0),  # type: ignore[arg-type]
        source_profile_id=merge.source_profile_id,
        target_profile_id=merge.target_profile_id,
        installation_ids=list(merge.installation_ids),
        alias_custom_id=merge.alias_custom_id,
    )
    change.change_time.CopyFrom(merge.merge_time)
    return change


def _split_change(split: bus_pb2.ProfileSplit) -> profile_pb2.IdentityChange:
    change = profile_pb2.IdentityChange(
        change_id=split.change_id,
        kind=profile_pb2.IDENTITY_CHANGE_KIND_SPLIT,
        cause=MERGE_CAUSES.get(split.cause, 0),  # type: ignore[arg-type]
        source_profile_id=split.old_profile_id,
        target_profile_id=split.new_profile_id,
        installation_ids=[split.installation_id],
    )
    change.change_time.CopyFrom(split.split_time)
    return change


def _segment_change(message: bus_pb2.SegmentMembershipChanged) -> live_pb2.SegmentMembershipChange:
    change = live_pb2.SegmentMembershipChange(
        transition=TRANSITIONS.get(message.transition, 0)  # type: ignore[arg-type]
    )
    which = message.WhichOneof("segment")
    if which == "smart_segment":
        change.smart_segment = message.smart_segment
    elif which == "flag":
        change.flag = message.flag
    elif which == "custom_segment_id":
        change.custom_segment_id = message.custom_segment_id
    change.change_time.CopyFrom(message.change_time)
    return change
