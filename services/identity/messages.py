"""Bus messages identity publishes through the outbox, built from model values."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import bus_pb2, types_pb2
from services.identity.model import ChangeCause, ChangeKind, DeleteResult, Erasure, IdentityChange
from shared.outbox import OutboxItem
from shared.topics import IDENTITY

CAUSES: dict[ChangeCause, types_pb2.IdentityChangeCause.ValueType] = {
    ChangeCause.IDENTIFY: types_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY,
    ChangeCause.LOGOUT: types_pb2.IDENTITY_CHANGE_CAUSE_LOGOUT,
    ChangeCause.OPERATOR_MERGE: types_pb2.IDENTITY_CHANGE_CAUSE_OPERATOR_MERGE,
    ChangeCause.TOKEN_REINTEGRATION: types_pb2.IDENTITY_CHANGE_CAUSE_TOKEN_REINTEGRATION,
    ChangeCause.IDENTIFY_SWITCH: types_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY_SWITCH,
}


KINDS: dict[ChangeKind, types_pb2.IdentityChangeKind.ValueType] = {
    ChangeKind.MERGE: types_pb2.IDENTITY_CHANGE_KIND_MERGE,
    ChangeKind.SPLIT: types_pb2.IDENTITY_CHANGE_KIND_SPLIT,
}


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def profile_created(
    project_id: UUID, profile_id: UUID, installation_id: str, identified: bool, now: datetime
) -> OutboxItem:
    message = bus_pb2.ProfileCreated(
        project_id=str(project_id),
        profile_id=str(profile_id),
        installation_id=installation_id,
        identified=identified,
        create_time=timestamp(now),
    )
    return OutboxItem(project_id, IDENTITY, message, profile_id)


def profile_identified(
    project_id: UUID, change_id: UUID, profile_id: UUID, installation_id: str, now: datetime
) -> OutboxItem:
    message = bus_pb2.ProfileIdentified(
        project_id=str(project_id),
        change_id=str(change_id),
        profile_id=str(profile_id),
        installation_id=installation_id,
        identify_time=timestamp(now),
    )
    return OutboxItem(project_id, IDENTITY, message, profile_id)


def profile_merged(
    project_id: UUID, change: IdentityChange, redirected_profile_ids: Sequence[UUID]
) -> OutboxItem:
    message = bus_pb2.ProfileMerged(
        project_id=str(project_id),
        change_id=str(change.change_id),
        cause=CAUSES[change.cause],
        source_profile_id=str(change.source_profile_id),
        target_profile_id=str(change.target_profile_id),
        installation_ids=list(change.installation_ids),
        redirected_profile_ids=[str(p) for p in redirected_profile_ids],
        alias_custom_id=change.alias_custom_id or "",
        merge_time=timestamp(change.change_time),
    )
    return OutboxItem(project_id, IDENTITY, message, change.target_profile_id)


def profile_split(
    project_id: UUID, change: IdentityChange, new_profile_created: bool
) -> OutboxItem:
    message = bus_pb2.ProfileSplit(
        project_id=str(project_id),
        change_id=str(change.change_id),
        cause=CAUSES[change.cause],
        installation_id=change.installation_ids[0],
        old_profile_id=str(change.source_profile_id),
        new_profile_id=str(change.target_profile_id),
        new_profile_created=new_profile_created,
        split_time=timestamp(change.change_time),
    )
    return OutboxItem(project_id, IDENTITY, message, change.target_profile_id)


def profile_deleted(project_id: UUID, result: DeleteResult, erasure: Erasure) -> OutboxItem:
    """No PII: IDs and counts only. Enqueued without a profile_id, so that no later purge of
    the (gone) profile's outbox rows can drop the announcement of its erasure."""
    message = bus_pb2.ProfileDeleted(
        project_id=str(project_id),
        profile_id=str(result.profile_id),
        tombstone_profile_ids=[str(p) for p in erasure.tombstone_profile_ids],
        installation_ids=list(erasure.installation_ids),
        custom_id_quarantined=result.custom_id_quarantined,
        delete_time=timestamp(result.delete_time),
    )
    return OutboxItem(project_id, IDENTITY, message)


def history_entry(change: IdentityChange) -> types_pb2.IdentityHistoryEntry:
    """A recorded merge or split as the profile's feed and export show it."""
    return types_pb2.IdentityHistoryEntry(
        change_id=str(change.change_id),
        kind=KINDS[change.kind],
        cause=CAUSES[change.cause],
        change_time=timestamp(change.change_time),
        source_profile_id=str(change.source_profile_id),
        target_profile_id=str(change.target_profile_id),
        installation_ids=list(change.installation_ids),
        alias_custom_id=change.alias_custom_id or "",
    )
