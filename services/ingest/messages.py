"""The bus messages ingest publishes, built from validated events: the EventsIngested of a stored
batch, the session end of a session closed idle, and the live ProfileChanged notices. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from uuid import UUID

from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import bus_pb2, types_pb2
from services.ingest.repository import ClosedSession
from services.ingest.validation import ValidEvent
from shared.convert import set_timestamp, timestamp_of
from shared.notices import SerializedNotice

# What a ProfileChanged says beside EVENTS, by the kind of the events stored.
CHANGE_KINDS = {
    types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE: bus_pb2.PROFILE_CHANGE_KIND_ATTRIBUTES,
    types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE: bus_pb2.PROFILE_CHANGE_KIND_SUBSCRIPTIONS,
    types_pb2.EVENT_KIND_INSTALLATION_UPDATE: bus_pb2.PROFILE_CHANGE_KIND_INSTALLATIONS,
}


def _fill_ingested(
    one: bus_pb2.IngestedEvent,
    event: ValidEvent,
    profile_id: str,
    receive_time: Timestamp,
    imported: bool,
) -> None:
    """The bus form of a stored event, written into `one`; `receive_time` is the batch's."""
    # Field by field into a message that is already where it goes (the batch's repeated
    # field): building a separate message and copying it in cost twice as much per event.
    one.event_id = event.event_id
    if event.installation_id is not None:
        one.installation_id = event.installation_id
    if event.custom_id is not None:
        one.custom_id = event.custom_id
    one.profile_id = profile_id
    one.platform = event.platform  # type: ignore[assignment]
    one.kind = event.kind  # type: ignore[assignment]
    if event.session_id is not None:
        one.session_id = event.session_id
    if imported:
        one.imported = True
    set_timestamp(one.event_time, event.event_time)
    one.receive_time.CopyFrom(receive_time)
    getattr(one, event.detail_field).CopyFrom(event.detail)


def events_ingested(
    project_id: UUID,
    batch_id: str,
    events: Sequence[ValidEvent],
    accepted: Mapping[int, UUID],
    receive_time: datetime,
    commit_time: datetime,
    *,
    imported: bool,
    session_countries: Mapping[tuple[str, str], str],
    derived_starts: Sequence[bus_pb2.IngestedEvent] = (),
) -> tuple[bus_pb2.EventsIngested, list[bus_pb2.IngestedEvent]]:
    """The outbox message of a stored batch and its IngestedEvents in order (the message's own
    elements): the derived session starts first, then each accepted event (`accepted`: index ->
    profile). A heartbeat or end without a country takes its session's (`session_countries`,
    keyed by installation and session ID)."""
    message = bus_pb2.EventsIngested(project_id=str(project_id), batch_id=batch_id)
    set_timestamp(message.commit_time, commit_time)
    received = timestamp_of(receive_time)
    profile_ids: dict[UUID, str] = {}
    added = message.events.add
    message.events.extend(derived_starts)
    for event in events:
        profile_id = accepted.get(event.index)
        if profile_id is None:
            continue
        text = profile_ids.get(profile_id)
        if text is None:
            text = profile_ids[profile_id] = str(profile_id)
        one = added()
        _fill_ingested(one, event, text, received, imported)
        if event.detail_field == "session" and not one.session.country:
            key = (event.installation_id or "", event.session_id or "")
            one.session.country = session_countries.get(key, "")
    return message, list(message.events)


def _change_kinds(events: Sequence[bus_pb2.IngestedEvent]) -> list[int]:
    caused = {CHANGE_KINDS[e.kind] for e in events if e.kind in CHANGE_KINDS}
    return [bus_pb2.PROFILE_CHANGE_KIND_EVENTS, *sorted(caused)]


def profile_changes(
    project_id: UUID,
    events: Sequence[bus_pb2.IngestedEvent],
    versions: dict[UUID, int],
    change_time: Timestamp,
) -> list[bus_pb2.ProfileChanged]:
    """One ProfileChanged per profile the events touched, with the versions they reached."""
    by_profile: dict[str, list[bus_pb2.IngestedEvent]] = {}
    for event in events:
        by_profile.setdefault(event.profile_id, []).append(event)
    version_of = {str(p): v for p, v in versions.items()}
    project = str(project_id)
    notices = []
    for profile_id, profile_events in by_profile.items():
        notices.append(
            bus_pb2.ProfileChanged(
                project_id=project,
                profile_id=profile_id,
                kinds=_change_kinds(profile_events),  # type: ignore[arg-type]
                profile_version=version_of.get(profile_id, 0),
                events=profile_events,
                change_time=change_time,
            )
        )
    return notices


def serialized_profile_changes(
    project_id: UUID,
    events: Sequence[bus_pb2.IngestedEvent],
    versions: dict[UUID, int],
    change_time: Timestamp,
) -> list[SerializedNotice]:
    """profile_changes, serialized: the very bytes of those messages (a unit test checks it),
    built from each event's bytes instead of copies of the events, and from the batch's shared
    fields serialized once: a batch's notices cost a third of building and serializing them.

    Serialized protobuf messages concatenate (parsing the concatenation merges them), so a
    notice is its fields serialized one by one, in field number order as a whole message's
    serialization writes them: the project (1, the batch's), the profile (2), the kinds (3,
    serialized once per distinct set), the version (4, omitted when 0), the change time (5, the
    batch's), then each event as an element of the repeated field 6."""
    by_profile: dict[str, list[bus_pb2.IngestedEvent]] = {}
    for event in events:
        by_profile.setdefault(event.profile_id, []).append(event)
    version_of = {str(p): v for p, v in versions.items()}
    project = str(project_id)
    project_field = bus_pb2.ProfileChanged(project_id=project).SerializeToString()
    time_field = bus_pb2.ProfileChanged(change_time=change_time).SerializeToString()
    kinds_fields: dict[frozenset[int], bytes] = {}
    notices = []
    for profile_id, profile_events in by_profile.items():
        caused: set[int] = set()
        chunks = [b"", b"", b"", b"", b""]  # the fields before the events, filled below
        for event in profile_events:
            kind = CHANGE_KINDS.get(event.kind)
            if kind is not None:
                caused.add(kind)
            data = event.SerializeToString()
            chunks.append(_EVENTS_TAG + _varint(len(data)))  # the event's bytes not copied
            chunks.append(data)
        key = frozenset(caused)
        kinds_field = kinds_fields.get(key)
        if kinds_field is None:
            kinds = [bus_pb2.PROFILE_CHANGE_KIND_EVENTS, *sorted(caused)]
            message = bus_pb2.ProfileChanged(kinds=kinds)  # type: ignore[arg-type]
            kinds_field = kinds_fields[key] = message.SerializeToString()
        profile = profile_id.encode()
        chunks[0] = project_field
        chunks[1] = _PROFILE_TAG + _varint(len(profile)) + profile
        chunks[2] = kinds_field
        version = version_of.get(profile_id, 0)
        if version:
            chunks[3] = _VERSION_TAG + _varint(version)
        chunks[4] = time_field
        notices.append(SerializedNotice(project, profile_id, b"".join(chunks)))
    return notices


# Tags (field number << 3 | wire type) of ProfileChanged's fields written here directly:
# profile_id (2, length-delimited), profile_version (4, varint), each of events (6,
# length-delimited).
_PROFILE_TAG = bytes([2 << 3 | 2])
_VERSION_TAG = bytes([4 << 3 | 0])
_EVENTS_TAG = bytes([6 << 3 | 2])
_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def _varint(value: int) -> bytes:
    """A non-negative int in protobuf's base-128 varint encoding."""
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:  # an event's length, most often
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def timeout_event_id(session_id: str, profile_id: UUID, end_time: datetime) -> str:
    """The event ID of the session end ingest publishes for a profile's part of a session closed
    idle: the same however often that closing is published, so consumers deduplicate it, and
    another for another profile's part of the session (0054) or a later closing of a part a
    merge opened again."""
    key = f"{session_id}\x00{profile_id}\x00{end_time.isoformat()}"
    return "session_timeout:" + hashlib.sha256(key.encode()).hexdigest()[:40]


def timeout_end(session: ClosedSession, now: datetime) -> bus_pb2.IngestedEvent:
    """The session end ingest publishes for a session closed idle, at its last activity."""
    event = bus_pb2.IngestedEvent(
        event_id=timeout_event_id(session.session_id, session.profile_id, session.end_time),
        installation_id=session.installation_id,
        profile_id=str(session.profile_id),
        platform=session.platform,  # type: ignore[arg-type]
        kind=types_pb2.EVENT_KIND_SESSION_END,
        session_id=session.session_id,
    )
    set_timestamp(event.event_time, session.end_time)
    set_timestamp(event.receive_time, now)
    event.session.duration.FromTimedelta(session.duration)
    event.session.country = session.country
    return event
