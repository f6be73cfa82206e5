"""Bus handlers of query's projection: a decoded message in, the profiles and installations it
touched recounted (and an EventsIngested's custom events added to the event name counts),
return. Also the worker that runs a consumer beside the server."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from uuid import UUID

import structlog
from google.protobuf.message import Message

from profiles.common.v1 import bus_pb2, types_pb2
from services.query.rollup import NamedEvent, NamedEvents
from services.query.service import RollupService
from shared.convert import datetime_of

log = structlog.get_logger(__name__)


def _uuids(values: Iterable[str]) -> list[UUID]:
    found = []
    for value in values:
        try:
            found.append(UUID(value))
        except ValueError:
            continue  # never sent by the producers; nothing to recount
    return found


def touched(message: Message) -> tuple[list[UUID], list[str]]:
    """The profiles and installations whose facts a message may have changed."""
    profiles: list[str] = []
    installations: list[str] = []
    if isinstance(message, bus_pb2.EventsIngested):
        for event in message.events:
            profiles.append(event.profile_id)
            installations.append(event.installation_id)
    elif isinstance(message, bus_pb2.ProfileCreated | bus_pb2.ProfileIdentified):
        profiles.append(message.profile_id)
        installations.append(message.installation_id)
    elif isinstance(message, bus_pb2.ProfileMerged):
        profiles.extend((message.source_profile_id, message.target_profile_id))
        profiles.extend(message.redirected_profile_ids)
        installations.extend(message.installation_ids)
    elif isinstance(message, bus_pb2.ProfileSplit):
        profiles.extend((message.old_profile_id, message.new_profile_id))
        installations.append(message.installation_id)
    elif isinstance(message, bus_pb2.ProfileDeleted):
        profiles.append(message.profile_id)
        profiles.extend(message.tombstone_profile_ids)
        installations.extend(message.installation_ids)
    elif isinstance(message, bus_pb2.InstallationsImported):
        for installation in message.installations:
            profiles.append(installation.profile_id)
            installations.append(installation.installation_id)
    elif isinstance(message, bus_pb2.InstallationReintegrated):
        profiles.extend((message.imported_profile_id, message.profile_id))
        installations.extend((message.imported_installation_id, message.installation_id))
    elif isinstance(message, bus_pb2.PushTokenMoved):
        profiles.extend((message.profile_id, message.to_profile_id))
        installations.extend((message.installation_id, message.to_installation_id))
    return _uuids(p for p in profiles if p), [i for i in installations if i]


def named_events(message: bus_pb2.EventsIngested) -> NamedEvents:
    """The custom events of a stored batch, for the event name counts, under its batch ID (a
    UUID ingest draws per batch; for a message without one, a UUID of its bytes, which every
    delivery of it shares too)."""
    events = []
    for event in message.events:
        if event.kind != types_pb2.EVENT_KIND_CUSTOM or not event.custom.name:
            continue
        try:
            profile_id = UUID(event.profile_id)
        except ValueError:
            continue  # never sent by ingest; no profile to count it for
        events.append(
            NamedEvent(
                profile_id,
                event.custom.name,
                datetime_of(event.event_time),
                datetime_of(event.receive_time),
                event.event_id,
            )
        )
    try:
        batch_id = UUID(message.batch_id)
    except ValueError:
        batch_id = uuid.uuid5(uuid.NAMESPACE_OID, message.SerializeToString().hex())
    return NamedEvents(batch_id, tuple(events))


async def on_message(
    rollups: RollupService, project_id: str, message: Message, entry_id: str
) -> None:
    """Recounts what the message touched; a redelivery recounts again and moves nothing, and
    an EventsIngested's custom events are counted once whatever its deliveries."""
    profiles, installations = touched(message)
    names = named_events(message) if isinstance(message, bus_pb2.EventsIngested) else None
    moved = await rollups.recount(UUID(project_id), profiles, installations, names)
    log.debug(
        "query_rollups_recounted",
        entry_id=entry_id,
        profiles=len(profiles),
        installations=len(installations),
        custom_events=len(names.events) if names is not None else 0,
        counters_moved=moved,
    )
