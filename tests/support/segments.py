"""Helpers of the segments tests: bus messages as ingest and identity publish them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from google.protobuf.message import Message

from profiles.common.v1 import bus_pb2, types_pb2
from shared.bus import Bus, Envelope, Topic
from shared.topics import EVENTS, IDENTITY, SEGMENT_CHANGES

IOS = types_pb2.PLATFORM_IOS
ANDROID = types_pb2.PLATFORM_ANDROID
WEB = types_pb2.PLATFORM_WEB


def new_id() -> str:
    return str(uuid.uuid4())


def event(
    profile_id: str,
    kind: int,
    moment: datetime,
    *,
    installation_id: str = "inst-1",
    session_id: str = "",
    platform: int = IOS,
    duration: timedelta | None = None,
) -> bus_pb2.IngestedEvent:
    message = bus_pb2.IngestedEvent(
        event_id=new_id(),
        installation_id=installation_id,
        profile_id=profile_id,
        platform=platform,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        session_id=session_id,
    )
    message.event_time.FromDatetime(moment)
    message.receive_time.FromDatetime(moment)
    if duration is not None or kind in (
        types_pb2.EVENT_KIND_SESSION_START,
        types_pb2.EVENT_KIND_SESSION_END,
        types_pb2.EVENT_KIND_SESSION_HEARTBEAT,
    ):
        message.session.duration.FromTimedelta(duration or timedelta())
    return message


def session(
    profile_id: str,
    start: datetime,
    minutes: float = 1.0,
    *,
    platform: int = IOS,
    installation_id: str = "",
    session_id: str = "",
) -> list[bus_pb2.IngestedEvent]:
    """A session's start and end events, as an SDK sends them."""
    installation_id = installation_id or f"inst-{platform}"
    session_id = session_id or new_id()
    duration = timedelta(minutes=minutes)
    common: dict[str, Any] = {
        "installation_id": installation_id,
        "session_id": session_id,
        "platform": platform,
    }
    return [
        event(profile_id, types_pb2.EVENT_KIND_SESSION_START, start, **common),
        event(
            profile_id,
            types_pb2.EVENT_KIND_SESSION_END,
            start + duration,
            duration=duration,
            **common,
        ),
    ]


# The timezone attribute as ingest's replay leaves it after a set (0010's row shape). Segments'
# tests drive segments through the bus alone, so they stand in for what ingest stores before it
# announces the events: segments reads the profile's zone from ingest's rule (0045).
STORE_TIME_ZONE_ATTRIBUTE = """
    INSERT INTO profile_attributes (project_id, profile_id, native, name, value, value_type,
                                    update_time)
    VALUES ($1, $2, true, 'timezone', jsonb_build_object('type', 'string', 'value', $3::text),
            'string', $4)
    ON CONFLICT (project_id, profile_id, native, name) DO UPDATE SET
        value = EXCLUDED.value, value_type = EXCLUDED.value_type,
        update_time = EXCLUDED.update_time"""


async def store_time_zone(
    pool: asyncpg.Pool, project_id: object, profile_id: str, zone: str, moment: datetime
) -> None:
    """Stores the profile's timezone attribute as ingest would (see STORE_TIME_ZONE_ATTRIBUTE)."""
    await pool.execute(STORE_TIME_ZONE_ATTRIBUTE, project_id, uuid.UUID(profile_id), zone, moment)


async def time_zone_event(
    pool: asyncpg.Pool, project_id: object, profile_id: str, zone: str, moment: datetime
) -> bus_pb2.IngestedEvent:
    """The event that sets the profile's timezone attribute, its outcome stored as ingest
    stores it before announcing the event."""
    await store_time_zone(pool, project_id, profile_id, zone, moment)
    message = event(profile_id, types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE, moment)
    operation = message.attribute_change.operations.add()
    operation.kind = types_pb2.ATTRIBUTE_OPERATION_KIND_SET
    operation.native_attribute = types_pb2.NATIVE_ATTRIBUTE_TIMEZONE
    operation.value.string_value = zone
    return message


def ingested(project_id: object, events: Sequence[bus_pb2.IngestedEvent]) -> bus_pb2.EventsIngested:
    return bus_pb2.EventsIngested(project_id=str(project_id), batch_id=new_id(), events=events)


async def publish(bus: Bus, topic: Topic, project_id: object, message: Message) -> str:
    """Adds one entry to the topic's stream, exactly as the outbox relay does."""
    (entry_id,) = await bus.publish(topic, [Envelope.of(topic, project_id, message, new_id())])
    return entry_id


async def publish_events(
    bus: Bus, project_id: object, events: Sequence[bus_pb2.IngestedEvent]
) -> str:
    return await publish(bus, EVENTS, project_id, ingested(project_id, events))


def merged(project_id: object, source: str, target: str) -> bus_pb2.ProfileMerged:
    return bus_pb2.ProfileMerged(
        project_id=str(project_id),
        change_id=new_id(),
        cause=types_pb2.IDENTITY_CHANGE_CAUSE_OPERATOR_MERGE,
        source_profile_id=source,
        target_profile_id=target,
    )


def deleted(project_id: object, profile_id: str) -> bus_pb2.ProfileDeleted:
    return bus_pb2.ProfileDeleted(project_id=str(project_id), profile_id=profile_id)


async def publish_identity(bus: Bus, project_id: object, message: Message) -> str:
    return await publish(bus, IDENTITY, project_id, message)


async def drained(bus: Bus, topic: Topic, group: str = "segments") -> bool:
    """True when the group has been delivered every entry of the topic and acked them all."""
    key = bus.stream_key(topic.name)
    last: Any = await bus.redis.xrevrange(key, "+", "-", count=1)
    if not last:
        return True
    try:
        groups: Any = await bus.redis.xinfo_groups(key)
    except Exception:
        return False
    info = next((g for g in groups if _text(g["name"]) == group), None)
    if info is None:
        return False
    return int(info["pending"]) == 0 and _text(info["last-delivered-id"]) == _text(last[0][0])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def outbox_changes(pool: asyncpg.Pool) -> list[bus_pb2.SegmentMembershipChanged]:
    """The segment changes waiting in the outbox, in commit order."""
    rows = await pool.fetch(
        "SELECT payload FROM outbox WHERE topic = $1 ORDER BY outbox_id", SEGMENT_CHANGES.name
    )
    return [bus_pb2.SegmentMembershipChanged.FromString(r["payload"]) for r in rows]


def describe(change: bus_pb2.SegmentMembershipChanged) -> tuple[str, str, str, str]:
    """(profile, ENTERED/LEFT, segment or flag name, cause) of a change, for assertions."""
    which = change.WhichOneof("segment")
    name = (
        types_pb2.SmartSegment.Name(change.smart_segment)
        if which == "smart_segment"
        else types_pb2.SmartSegmentFlag.Name(change.flag)
    )
    return (
        change.profile_id,
        types_pb2.MembershipChange.Name(change.transition).removeprefix("MEMBERSHIP_CHANGE_"),
        name.removeprefix("SMART_SEGMENT_").removeprefix("FLAG_"),
        types_pb2.MembershipChangeCause.Name(change.cause).removeprefix("MEMBERSHIP_CHANGE_CAUSE_"),
    )
