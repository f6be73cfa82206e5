"""The one helper per conversion (shared/convert.py): the fast Timestamp arithmetic gives what
protobuf's own FromDatetime gives, and a profile ID is parsed the way every service answers it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from shared.convert import (
    ProfileIdInvalid,
    datetime_of,
    profile_id_of,
    set_timestamp,
    timestamp_of,
)
from shared.errors import FieldViolation, InvalidArgument

# Away from year 1 and 9999 by more than any offset, where FromDatetime itself overflows.
MOMENTS = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31))
OFFSETS = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


def from_datetime(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


@given(MOMENTS, OFFSETS)
def test_timestamp_of_an_aware_moment_equals_from_datetime(
    moment: datetime, zone: timezone
) -> None:
    aware = moment.replace(tzinfo=zone)
    assert timestamp_of(aware) == from_datetime(aware)
    target = Timestamp(seconds=5, nanos=7)
    set_timestamp(target, aware)
    assert target == from_datetime(aware)


@given(MOMENTS)
def test_a_naive_moment_is_taken_as_utc_as_from_datetime_does(moment: datetime) -> None:
    assert timestamp_of(moment) == from_datetime(moment)
    target = Timestamp()
    set_timestamp(target, moment)
    assert target == from_datetime(moment)


@given(MOMENTS, OFFSETS)
def test_datetime_of_reads_back_the_same_instant_in_utc(moment: datetime, zone: timezone) -> None:
    aware = moment.replace(tzinfo=zone)
    back = datetime_of(timestamp_of(aware))
    assert back == aware
    assert back.tzinfo is UTC


def test_datetime_of_truncates_nanoseconds_to_microseconds() -> None:
    assert datetime_of(Timestamp(seconds=0, nanos=1_999)) == datetime(
        1970, 1, 1, microsecond=1, tzinfo=UTC
    )


@pytest.mark.parametrize("spelling", [str, lambda u: str(u).upper()])
def test_a_canonical_profile_id_parses_in_either_case(spelling: object) -> None:
    profile_id = uuid4()
    assert profile_id_of(spelling(profile_id)) == profile_id  # type: ignore[operator]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not-a-uuid",
        "{12345678-1234-5678-1234-567812345678}",
        "12345678123456781234567812345678",
        "urn:uuid:12345678-1234-5678-1234-567812345678",
        " 12345678-1234-5678-1234-567812345678",
    ],
)
def test_anything_else_is_profile_id_invalid_on_the_field_named(text: str) -> None:
    with pytest.raises(ProfileIdInvalid) as raised:
        profile_id_of(text, "target_profile_id")
    assert raised.value.reason == "PROFILE_ID_INVALID"
    assert raised.value.violations == [
        FieldViolation("target_profile_id", "must be a UUID", "PROFILE_ID_INVALID")
    ]


def test_a_service_may_name_its_own_reason() -> None:
    class RequestInvalid(InvalidArgument):
        reason = "REQUEST_INVALID"

    with pytest.raises(RequestInvalid) as raised:
        profile_id_of("x", error=RequestInvalid)
    assert raised.value.violations == [
        FieldViolation("profile_id", "must be a UUID", "REQUEST_INVALID")
    ]
    assert isinstance(profile_id_of(str(UUID(int=1))), UUID)
