"""A new segment's entries serialized once and spliced (entries_to_bus) are byte for byte the
messages change_to_bus serializes one by one, whatever the IDs, times and causes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from profiles.common.v1 import bus_pb2
from services.segments.messages import _PLACEHOLDER, change_to_bus, entries_to_bus
from services.segments.model import ChangeCause, MembershipChange

uuids = st.builds(uuid.UUID, int=st.integers(min_value=0, max_value=2**128 - 1))
times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@given(
    project_id=uuids,
    segment_id=uuids,
    profile_ids=st.lists(uuids, max_size=20),
    entered=st.booleans(),
    change_time=times,
    cause=st.sampled_from(list(ChangeCause)),
)
def test_spliced_entries_equal_the_messages_serialized_one_by_one(
    project_id: uuid.UUID,
    segment_id: uuid.UUID,
    profile_ids: list[uuid.UUID],
    entered: bool,
    change_time: datetime,
    cause: ChangeCause,
) -> None:
    change = MembershipChange(entered, change_time, cause, custom_segment_id=segment_id)
    expected = [change_to_bus(project_id, p, change).SerializeToString() for p in profile_ids]
    assert entries_to_bus(project_id, profile_ids, change) == expected


def test_the_stand_in_s_own_id_elsewhere_falls_back_to_plain_serialization() -> None:
    """A project or segment whose ID is the stand-in's: the splice point would be ambiguous."""
    profiles = [uuid.uuid4(), _PLACEHOLDER, uuid.uuid4()]
    change = MembershipChange(
        True,
        datetime.now(UTC) - timedelta(days=3),
        ChangeCause.DEFINITION,
        custom_segment_id=_PLACEHOLDER,
    )
    spliced = entries_to_bus(_PLACEHOLDER, profiles, change)
    parsed = [bus_pb2.SegmentMembershipChanged.FromString(b) for b in spliced]
    assert [m.profile_id for m in parsed] == [str(p) for p in profiles]
    assert spliced == [change_to_bus(_PLACEHOLDER, p, change).SerializeToString() for p in profiles]
