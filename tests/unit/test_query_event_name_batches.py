"""What query's consumer takes from an EventsIngested for ListEventNames' counts: its custom
events (profile, name, times, event ID) under one batch ID that every copy of the message
shares."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from profiles.common.v1 import bus_pb2, types_pb2
from services.query.consumers import named_events
from services.query.rollup import NamedEvent
from shared.convert import set_timestamp

RECEIVED = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def ingested(batch_id: str) -> bus_pb2.EventsIngested:
    profile = str(uuid.UUID(int=7))
    message = bus_pb2.EventsIngested(project_id=str(uuid.UUID(int=1)), batch_id=batch_id)
    for n, (kind, name) in enumerate(
        [
            (types_pb2.EVENT_KIND_SESSION_START, ""),
            (types_pb2.EVENT_KIND_CUSTOM, "purchase"),
            (types_pb2.EVENT_KIND_CRASH, ""),
            (types_pb2.EVENT_KIND_CUSTOM, "purchase"),
        ]
    ):
        event = message.events.add(event_id=f"e{n}", profile_id=profile, kind=kind)
        set_timestamp(event.event_time, datetime(2030, 6, 1, 11, n, 30, 123456, tzinfo=UTC))
        set_timestamp(event.receive_time, RECEIVED)
        if kind == types_pb2.EVENT_KIND_CUSTOM:
            event.custom.name = name
        elif kind == types_pb2.EVENT_KIND_CRASH:
            event.crash.name = "not an event name"
    return message


def test_only_custom_events_are_counted_under_the_messages_batch_id() -> None:
    batch_id = uuid.uuid4()
    names = named_events(ingested(str(batch_id)))
    assert names.batch_id == batch_id
    assert names.events == (
        NamedEvent(
            uuid.UUID(int=7),
            "purchase",
            datetime(2030, 6, 1, 11, 1, 30, 123456, tzinfo=UTC),
            RECEIVED,
            "e1",
        ),
        NamedEvent(
            uuid.UUID(int=7),
            "purchase",
            datetime(2030, 6, 1, 11, 3, 30, 123456, tzinfo=UTC),
            RECEIVED,
            "e3",
        ),
    )


def test_a_message_without_a_batch_uuid_is_known_by_its_bytes() -> None:
    """Every copy of one message (a redelivery, a second relay) gets the same ID; another
    message another one."""
    first = named_events(ingested(""))
    again = named_events(bus_pb2.EventsIngested.FromString(ingested("").SerializeToString()))
    other = ingested("")
    other.events[1].event_id = "e9"
    assert first.batch_id == again.batch_id != named_events(other).batch_id
