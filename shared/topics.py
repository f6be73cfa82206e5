"""The catalogue of bus topics: which typed messages travel on which Redis stream.

A producer enqueues through the outbox with one of these topics; a consumer group reads one.
Live notices (pub/sub, best effort) use `profile_channel`.
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
# Segment entries and exits, for WatchSegmentChanges and automation engines.
SEGMENT_CHANGES = Topic("segment-changes", (bus_pb2.SegmentMembershipChanged,))

TOPICS: dict[str, Topic] = {t.name: t for t in (EVENTS, IDENTITY, SEGMENT_CHANGES)}


def profile_channel(project_id: object, profile_id: object) -> str:
    """The pub/sub channel of one profile's live notices (bus_pb2.ProfileChanged)."""
    return f"profile:{project_id}:{profile_id}"
