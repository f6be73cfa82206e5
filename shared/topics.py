"""The catalogue of bus topics: which typed messages travel on which Redis stream.

A producer enqueues through the outbox with one of these topics; a consumer group reads one.
Live notices (pub/sub, best effort) use `profile_channel`. Every stream is trimmed by time
(shared/bus.py, PROFILES_BUS_RETENTION_HOURS); `keep_at_least_ms` keeps one longer.
"""

from __future__ import annotations

from profiles.common.v1 import bus_pb2
from shared.bus import Topic

# Every stored event, in batches: segments and query projections consume it.
EVENTS = Topic("events", (bus_pb2.EventsIngested,))
# Who is who: merges, splits, creations, identifications, erasures, token imports and moves.
IDENTITY = Topic(
    "identity",
    (
        bus_pb2.ProfileCreated,
        bus_pb2.ProfileIdentified,
        bus_pb2.ProfileMerged,
        bus_pb2.ProfileSplit,
        bus_pb2.ProfileDeleted,
        bus_pb2.InstallationsImported,
        bus_pb2.InstallationReintegrated,
        bus_pb2.PushTokenMoved,
    ),
)
# The longest `segments.change_retention_days` a project may set (shared/project_settings.py).
SEGMENT_CHANGES_KEPT_DAYS = 365
# Segment entries and exits, for WatchSegmentChanges and automation engines. Watchers resume
# from a cursor up to their project's `segments.change_retention_days` back, so the stream keeps
# entries that long whatever the bus retention (which still trims its dead letters). Its entries
# name a profile by its random ID only (no attribute values, no custom or installation IDs).
SEGMENT_CHANGES = Topic(
    "segment-changes",
    (bus_pb2.SegmentMembershipChanged,),
    keep_at_least_ms=SEGMENT_CHANGES_KEPT_DAYS * 24 * 3_600_000,
)

TOPICS: dict[str, Topic] = {t.name: t for t in (EVENTS, IDENTITY, SEGMENT_CHANGES)}


def profile_channel(project_id: object, profile_id: object) -> str:
    """The pub/sub channel of one profile's live notices (bus_pb2.ProfileChanged)."""
    return f"profile:{project_id}:{profile_id}"
