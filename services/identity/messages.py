"""Bus messages identity publishes, built from model values: durable ones through the outbox
(in the transaction), live ProfileChanged notices through notices.py (after commit)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from uuid import UUID

from profiles.common.v1 import bus_pb2, types_pb2
from services.identity.model import (
    ChangeCause,
    ChangeKind,
    DeleteResult,
    Erasure,
    IdentityChange,
    MergeMoves,
)
from shared.convert import timestamp_of
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


def profile_created(
    project_id: UUID, profile_id: UUID, installation_id: str, identified: bool, now: datetime
) -> OutboxItem:
    message = bus_pb2.ProfileCreated(
        project_id=str(project_id),
        profile_id=str(profile_id),
        installation_id=installation_id,
        identified=identified,
        create_time=timestamp_of(now),
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
        identify_time=timestamp_of(now),
    )
    return OutboxItem(project_id, IDENTITY, message, profile_id)


def profile_merged(
    project_id: UUID, change: IdentityChange, redirected_profile_ids: Sequence[UUID]
) -> OutboxItem:
    message = merged_message(project_id, change, redirected_profile_ids)
    return OutboxItem(project_id, IDENTITY, message, change.target_profile_id)


def merged_message(
    project_id: UUID, change: IdentityChange, redirected_profile_ids: Sequence[UUID]
) -> bus_pb2.ProfileMerged:
    return bus_pb2.ProfileMerged(
        project_id=str(project_id),
        change_id=str(change.change_id),
        cause=CAUSES[change.cause],
        source_profile_id=str(change.source_profile_id),
        target_profile_id=str(change.target_profile_id),
        installation_ids=list(change.installation_ids),
        redirected_profile_ids=[str(p) for p in redirected_profile_ids],
        alias_custom_id=change.alias_custom_id or "",
        merge_time=timestamp_of(change.change_time),
    )


def profile_split(
    project_id: UUID, change: IdentityChange, new_profile_created: bool
) -> OutboxItem:
    message = split_message(project_id, change, new_profile_created)
    return OutboxItem(project_id, IDENTITY, message, change.target_profile_id)


def split_message(
    project_id: UUID, change: IdentityChange, new_profile_created: bool
) -> bus_pb2.ProfileSplit:
    return bus_pb2.ProfileSplit(
        project_id=str(project_id),
        change_id=str(change.change_id),
        cause=CAUSES[change.cause],
        installation_id=change.installation_ids[0],
        old_profile_id=str(change.source_profile_id),
        new_profile_id=str(change.target_profile_id),
        new_profile_created=new_profile_created,
        split_time=timestamp_of(change.change_time),
    )


def profile_deleted(project_id: UUID, result: DeleteResult, erasure: Erasure) -> OutboxItem:
    """No PII: IDs and counts only. Enqueued without a profile_id, so that no later purge of
    the (gone) profile's outbox rows can drop the announcement of its erasure."""
    message = bus_pb2.ProfileDeleted(
        project_id=str(project_id),
        profile_id=str(result.profile_id),
        tombstone_profile_ids=[str(p) for p in erasure.tombstone_profile_ids],
        # Then each renamed installation's old ID (gone) and new ID: consumers recount both.
        installation_ids=[
            *erasure.installation_ids,
            *(ids for pair in erasure.renamed_installations for ids in pair),
        ],
        custom_id_quarantined=result.custom_id_quarantined,
        delete_time=timestamp_of(result.delete_time),
    )
    return OutboxItem(project_id, IDENTITY, message)


# -- Live notices (ProfileChanged), one per profile involved --------------------------------------


def identified_notice(
    project_id: UUID, profile_id: UUID, version: int, now: datetime
) -> bus_pb2.ProfileChanged:
    """Rule 1: the profile received a custom ID."""
    return bus_pb2.ProfileChanged(
        project_id=str(project_id),
        profile_id=str(profile_id),
        kinds=[bus_pb2.PROFILE_CHANGE_KIND_IDENTIFIED],
        profile_version=version,
        change_time=timestamp_of(now),
    )


def merge_notices(
    project_id: UUID, change: IdentityChange, moves: MergeMoves, target_version: int
) -> list[bus_pb2.ProfileChanged]:
    """The target's MERGED_IN, then the source's MERGED_AWAY, in that order: a watcher of the
    source moves to the target's channel only on MERGED_AWAY, so it does not also get the
    target's notice of the same merge."""
    merge = merged_message(project_id, change, moves.redirected_profile_ids)
    sides = (
        (change.target_profile_id, bus_pb2.PROFILE_CHANGE_KIND_MERGED_IN, target_version),
        (change.source_profile_id, bus_pb2.PROFILE_CHANGE_KIND_MERGED_AWAY, moves.source_version),
    )
    return [
        bus_pb2.ProfileChanged(
            project_id=str(project_id),
            profile_id=str(profile_id),
            kinds=[kind],
            profile_version=version,
            change_time=merge.merge_time,
            merge=merge,
        )
        for profile_id, kind, version in sides
    ]


def split_notices(
    project_id: UUID,
    change: IdentityChange,
    new_profile_created: bool,
    versions: Mapping[UUID, int],
) -> list[bus_pb2.ProfileChanged]:
    """The profile the installation left, then the one it joined; both carry the split."""
    split = split_message(project_id, change, new_profile_created)
    return [
        bus_pb2.ProfileChanged(
            project_id=str(project_id),
            profile_id=str(profile_id),
            kinds=[bus_pb2.PROFILE_CHANGE_KIND_SPLIT],
            profile_version=versions.get(profile_id, 0),
            change_time=split.split_time,
            split=split,
        )
        for profile_id in (change.source_profile_id, change.target_profile_id)
    ]


def deleted_notice(project_id: UUID, result: DeleteResult) -> bus_pb2.ProfileChanged:
    """The erased profile: its watchers end. Version 0: the profile has none any more."""
    return bus_pb2.ProfileChanged(
        project_id=str(project_id),
        profile_id=str(result.profile_id),
        kinds=[bus_pb2.PROFILE_CHANGE_KIND_DELETED],
        change_time=timestamp_of(result.delete_time),
    )


def history_entry(change: IdentityChange) -> types_pb2.IdentityHistoryEntry:
    """A recorded merge or split as the profile's feed and export show it."""
    return types_pb2.IdentityHistoryEntry(
        change_id=str(change.change_id),
        kind=KINDS[change.kind],
        cause=CAUSES[change.cause],
        change_time=timestamp_of(change.change_time),
        source_profile_id=str(change.source_profile_id),
        target_profile_id=str(change.target_profile_id),
        installation_ids=list(change.installation_ids),
        alias_custom_id=change.alias_custom_id or "",
    )
