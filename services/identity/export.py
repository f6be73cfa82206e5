"""The JSON shape of ExportProfile (documented on ExportSection in identity_service.proto): rows
in, JSON-ready records out, then cut into chunks. No I/O."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from google.protobuf import json_format

from profiles.common.v1 import types_pb2
from services.identity.messages import history_entry
from services.identity.model import (
    ERASED_SIDE,
    EXPORT_CHUNK_BYTES,
    EXPORT_CHUNK_RECORDS,
    EXPORT_FORMAT_VERSION,
    EXPORT_OTHER_PROFILE,
    ExportChunk,
    ExportSection,
    IdentityChange,
)


class Row(Protocol):
    """A database row (asyncpg.Record) read by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


# The member of pb.Event's `payload` oneof (proto3 JSON name) for each stored EventKind, so an
# exported event's payload reads as it was sent: {"custom": {...}}. The inner object is the
# stored detail (events.payload).
PAYLOAD_FIELDS: dict[int, str] = {
    types_pb2.EVENT_KIND_CUSTOM: "custom",
    types_pb2.EVENT_KIND_SESSION_START: "sessionStart",
    types_pb2.EVENT_KIND_SESSION_HEARTBEAT: "sessionHeartbeat",
    types_pb2.EVENT_KIND_SESSION_END: "sessionEnd",
    types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE: "attributeOperations",
    types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE: "subscriptionChange",
    types_pb2.EVENT_KIND_INSTALLATION_UPDATE: "installationUpdate",
    types_pb2.EVENT_KIND_CRASH: "crash",
}

# installation_details columns and their export names; anything else there is left out (field
# times are bookkeeping).
INSTALLATION_FIELDS = {
    "platform": "platform",
    "app_version": "appVersion",
    "os_version": "osVersion",
    "device_model": "deviceModel",
    "push_token": "pushToken",
    "push_opt_in": "pushOptIn",
    "language": "language",
    "timezone": "timezone",
    "uninstalled": "uninstalled",
    "imported": "imported",
}


def rfc3339(moment: datetime | str | None) -> str | None:
    """A time in RFC 3339 UTC with a Z, as proto3 JSON writes Timestamps."""
    if moment is None:
        return None
    if isinstance(moment, str):  # from to_jsonb(): ISO 8601 with an offset
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def platform_name(number: int | None) -> str | None:
    return None if number is None else types_pb2.Platform.Name(types_pb2.Platform.ValueType(number))


def profile_record(row: Row, now: datetime, former: Iterable[Row]) -> dict[str, Any]:
    """The profile section; `former`: the installations it left, as they were then."""
    return {
        "profileId": str(row["profile_id"]),
        "customId": row["custom_id"],
        "aliasCustomIds": list(row["alias_custom_ids"]),
        "firstSeenTime": rfc3339(row["first_seen_time"]),
        "lastSeenTime": rfc3339(row["last_seen_time"]),
        "exportTime": rfc3339(now),
        "formatVersion": EXPORT_FORMAT_VERSION,
        "mergedProfileIds": [str(p) for p in row["merged_profile_ids"]],
        "lastCrash": None
        if row["crash_event_id"] is None
        else {
            "eventId": row["crash_event_id"],
            "installationId": row["crash_installation_id"],
            "crashTime": rfc3339(row["crash_time"]),
            "name": row["crash_name"],
            "reason": row["crash_reason"],
            "fatal": row["crash_fatal"],
        },
        "formerInstallations": [former_installation_record(r) for r in former],
    }


def former_installation_record(row: Row) -> dict[str, Any]:
    """An installation the profile left, with its details as they were when it left."""
    return {
        "installationId": row["installation_id"],
        "leaveTime": rfc3339(row["leave_time"]),
        "platform": platform_name(row["platform"]),
        "appVersion": row["app_version"],
        "osVersion": row["os_version"],
        "deviceModel": row["device_model"],
        "language": row["language"],
        "timezone": row["timezone"],
        "imported": row["imported"],
        "firstSeenTime": rfc3339(row["first_seen"]),
        "lastSeenTime": rfc3339(row["last_seen"]),
    }


def attributes_record(rows: Iterable[Row]) -> dict[str, Any]:
    """Native attributes as name -> string value, custom ones with their type and set time."""
    native: dict[str, str] = {}
    custom: dict[str, Any] = {}
    for row in rows:
        value = row["value"]
        inner = value.get("value") if isinstance(value, dict) else value
        if row["native"]:
            native[row["name"]] = inner if isinstance(inner, str) else json.dumps(inner)
        else:
            custom[row["name"]] = {
                "type": row["value_type"],
                "value": inner,
                "setTime": rfc3339(row["update_time"]),
            }
    return {"native": native, "custom": custom}


def subscription_record(row: Row) -> dict[str, Any]:
    return {
        "channel": row["channel"],
        "kind": row["kind"],
        "subscribed": row["subscribed"],
        "changeTime": rfc3339(row["change_time"]),
    }


def installation_record(row: Row) -> dict[str, Any]:
    details: Mapping[str, Any] = row["details"] or {}
    record: dict[str, Any] = {"installationId": row["installation_id"]}
    for column, name in INSTALLATION_FIELDS.items():
        record[name] = details.get(column)
    record["platform"] = platform_name(details.get("platform"))
    record["uninstalled"] = bool(details.get("uninstalled", False))
    record["imported"] = bool(details.get("imported", False))
    record["firstSeenTime"] = rfc3339(details.get("first_seen") or row["create_time"])
    record["lastSeenTime"] = rfc3339(details.get("last_seen") or row["create_time"])
    return record


def history_record(change: IdentityChange) -> dict[str, Any]:
    """The proto3 JSON form of profiles.common.v1.IdentityHistoryEntry, except that a side
    that is not the exported person's (ERASED_SIDE, as ExportReader.changes reads it) reads
    EXPORT_OTHER_PROFILE: a split on a shared device names the person who used it next (or
    before), whose profile ID the exported person has no right to. Which side it was, the
    kind and cause, the time and the device stay, so the person can follow their history."""
    record = json_format.MessageToDict(history_entry(change))
    for field, side in (
        ("sourceProfileId", change.source_profile_id),
        ("targetProfileId", change.target_profile_id),
    ):
        if side == ERASED_SIDE:
            record[field] = EXPORT_OTHER_PROFILE
    return record


def session_record(row: Row) -> dict[str, Any]:
    return {
        "sessionId": row["session_id"],
        "installationId": row["installation_id"],
        "platform": platform_name(row["platform"]),
        "country": row["country"],
        "startTime": rfc3339(row["start_time"]),
        "endTime": rfc3339(row["end_time"]),
        "durationSeconds": row["duration_seconds"],
        "eventCount": row["event_count"],
    }


def event_record(row: Row) -> dict[str, Any]:
    field = PAYLOAD_FIELDS.get(row["kind"])
    payload = row["payload"]
    return {
        "eventId": row["event_id"],
        "installationId": row["installation_id"],
        "customId": row["custom_id"],
        "platform": platform_name(row["platform"]),
        "kind": types_pb2.EventKind.Name(row["kind"]),
        "sessionId": row["session_id"],
        "eventTime": rfc3339(row["event_time"]),
        "receiveTime": rfc3339(row["receive_time"]),
        "payload": {field: payload} if field is not None else payload,
    }


def rejected_event_record(row: Row) -> dict[str, Any]:
    return {
        "eventId": row["event_id"],
        "reason": row["reason"],
        "fieldPath": row["field_path"],
        "message": row["message"],
        "receiveTime": rfc3339(row["receive_time"]),
        "rawPayload": row["payload"],
    }


def segments_record(custom: Iterable[Row], smart: Iterable[Row]) -> dict[str, Any]:
    """Custom segment memberships and smart segments (platform 0, all platforms, as null)."""
    return {
        "custom": [
            {
                "segmentId": str(r["segment_id"]),
                "displayName": r["display_name"],
                "enterTime": rfc3339(r["enter_time"]),
            }
            for r in custom
        ],
        "smart": [
            {
                "platform": platform_name(r["platform"] or None),
                "segment": None
                if r["segment"] is None
                else types_pb2.SmartSegment.Name(r["segment"]),
                "flag": types_pb2.SmartSegmentFlag.Name(r["flag"]) if r["flag"] else None,
                "nextTransitionTime": rfc3339(r["next_transition_time"]),
            }
            for r in smart
        ],
    }


def engagement_record(row: Row) -> dict[str, Any]:
    return {
        "score": row["score"],
        "score1": row["score1"],
        "score2": row["score2"],
        "score3": row["score3"],
        "sessionCount": row["session_count"],
        "averageSessionDurationSeconds": row["average_session_us"] / 1_000_000,
        "activeDays": row["active_days"],
        "timeZone": row["time_zone"],
        "windowStartTime": rfc3339(row["window_start_time"]),
        "windowEndTime": rfc3339(row["window_end_time"]),
    }


def funnel_progress_records(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Segments' rows (one per funnel and step, in order) as one record per funnel."""
    funnels: dict[Any, dict[str, Any]] = {}
    for row in rows:
        funnel = funnels.setdefault(
            row["funnel_id"],
            {"funnelId": str(row["funnel_id"]), "displayName": row["display_name"], "steps": []},
        )
        funnel["steps"].append(
            {
                "stepNumber": row["step_number"],
                "eventName": row["event_name"],
                "completeTime": rfc3339(row["complete_time"]),
            }
        )
    for funnel in funnels.values():
        # The best attempt completes a prefix of the steps.
        done = sum(1 for step in funnel["steps"] if step["completeTime"] is not None)
        funnel["completedStepCount"] = done
        funnel["converted"] = done == len(funnel["steps"])
    return list(funnels.values())


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def object_chunk(section: ExportSection, record: Mapping[str, Any]) -> ExportChunk:
    """PROFILE, ATTRIBUTES, SEGMENTS and ENGAGEMENT: one chunk holding one JSON object."""
    return ExportChunk(section, 0, _dumps(record), 1, section_end=True)


async def array_chunks(
    section: ExportSection, records: AsyncIterable[Mapping[str, Any]] | Sequence[Mapping[str, Any]]
) -> AsyncIterator[ExportChunk]:
    """A section's records as JSON arrays of at most EXPORT_CHUNK_RECORDS records and about
    EXPORT_CHUNK_BYTES each, in order; `[]` alone when there are none."""
    pending: list[str] = []
    size = 0
    index = 0

    def cut(end: bool) -> ExportChunk:
        nonlocal pending, size, index
        chunk = ExportChunk(section, index, "[" + ",".join(pending) + "]", len(pending), end)
        pending, size, index = [], 0, index + 1
        return chunk

    async for record in _aiter(records):
        encoded = _dumps(record)
        if pending and (
            len(pending) >= EXPORT_CHUNK_RECORDS
            or size + len(encoded.encode()) > EXPORT_CHUNK_BYTES
        ):
            yield cut(end=False)
        pending.append(encoded)
        size += len(encoded.encode()) + 1
    yield cut(end=True)


async def _aiter(
    records: AsyncIterable[Mapping[str, Any]] | Sequence[Mapping[str, Any]],
) -> AsyncIterator[Mapping[str, Any]]:
    if isinstance(records, AsyncIterable):
        async for record in records:
            yield record
    else:
        for record in records:
            yield record
