"""Bus handlers of query's projection: a decoded message in, the profiles and installations it
touched recounted, return. Also the worker that runs a consumer beside the server."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

import structlog
from google.protobuf.message import Message

from profiles.common.v1 import bus_pb2
from services.query.service import RollupService

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


async def on_message(
    rollups: RollupService, project_id: str, message: Message, entry_id: str
) -> None:
    """Recounts what the message touched; a redelivery recounts again and moves nothing."""
    profiles, installations = touched(message)
    moved = await rollups.recount(UUID(project_id), profiles, installations)
    log.debug(
        "query_rollups_recounted",
        entry_id=entry_id,
        profiles=len(profiles),
        installations=len(installations),
        counters_moved=moved,
    )
