"""The export's records of what segments keeps (services/identity/export.py), from rows shaped
as segments' segments_read_export_* contracts return them; no database. Each proto value of
ExportSection has a section, named as the console names its member."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

from profiles.common.v1 import types_pb2
from profiles.identity.v1 import identity_service_pb2 as pb
from services.identity.export import funnel_progress_records, segments_record
from services.identity.model import ExportSection
from services.identity.servicer import EXPORT_SECTIONS

T1 = datetime(2030, 6, 1, 10, 0, tzinfo=UTC)
T2 = datetime(2030, 6, 1, 11, 0, tzinfo=UTC)


def test_every_export_section_of_the_contract_is_streamed_under_its_camel_case_name() -> None:
    assert sorted(EXPORT_SECTIONS.values()) == [
        v for v in pb.ExportSection.values() if v != pb.EXPORT_SECTION_UNSPECIFIED
    ]
    for section, number in EXPORT_SECTIONS.items():
        head, *tail = pb.ExportSection.Name(number).removeprefix("EXPORT_SECTION_").split("_")
        assert section.value == head.lower() + "".join(part.title() for part in tail)
    assert list(EXPORT_SECTIONS) == list(ExportSection)  # stream order is the proto's


def test_funnel_rows_become_one_record_per_funnel_in_their_order() -> None:
    first, second = uuid4(), uuid4()
    rows = [
        {"funnel_id": first, "display_name": "Checkout", "step_number": 1,
         "event_name": "view", "complete_time": T1},
        {"funnel_id": first, "display_name": "Checkout", "step_number": 2,
         "event_name": "cart", "complete_time": T2},
        {"funnel_id": first, "display_name": "Checkout", "step_number": 3,
         "event_name": "pay", "complete_time": None},
        {"funnel_id": second, "display_name": "Signup", "step_number": 1,
         "event_name": "signup", "complete_time": T1},
    ]  # fmt: skip
    assert funnel_progress_records(rows) == [
        {
            "funnelId": str(first),
            "displayName": "Checkout",
            "steps": [
                {"stepNumber": 1, "eventName": "view", "completeTime": "2030-06-01T10:00:00Z"},
                {"stepNumber": 2, "eventName": "cart", "completeTime": "2030-06-01T11:00:00Z"},
                {"stepNumber": 3, "eventName": "pay", "completeTime": None},
            ],
            "completedStepCount": 2,
            "converted": False,
        },
        {
            "funnelId": str(second),
            "displayName": "Signup",
            "steps": [
                {"stepNumber": 1, "eventName": "signup", "completeTime": "2030-06-01T10:00:00Z"}
            ],
            "completedStepCount": 1,
            "converted": True,
        },
    ]
    assert funnel_progress_records([]) == []


def test_smart_segments_read_as_names_with_all_platforms_and_no_flag_as_null() -> None:
    segment = uuid4()
    record = segments_record(
        [{"segment_id": segment, "display_name": "Pro", "enter_time": T1}],
        [
            {"platform": 0, "segment": types_pb2.SMART_SEGMENT_ENGAGED,
             "flag": types_pb2.SMART_SEGMENT_FLAG_RISKY_ENGAGED, "next_transition_time": T2},
            {"platform": types_pb2.PLATFORM_WEB, "segment": types_pb2.SMART_SEGMENT_NEW,
             "flag": types_pb2.SMART_SEGMENT_FLAG_UNSPECIFIED, "next_transition_time": None},
        ],
    )  # fmt: skip
    assert record == {
        "custom": [
            {"segmentId": str(segment), "displayName": "Pro", "enterTime": "2030-06-01T10:00:00Z"}
        ],
        "smart": [
            {
                "platform": None,
                "segment": "SMART_SEGMENT_ENGAGED",
                "flag": "SMART_SEGMENT_FLAG_RISKY_ENGAGED",
                "nextTransitionTime": "2030-06-01T11:00:00Z",
            },
            {
                "platform": "PLATFORM_WEB",
                "segment": "SMART_SEGMENT_NEW",
                "flag": None,
                "nextTransitionTime": None,
            },
        ],
    }
