"""The ingest servicer's answer to a batch (services/ingest/servicer.py): one EventResult per
event, in order, each what result_to_proto says of it, and the counts per outcome."""

from __future__ import annotations

import uuid

import pytest

from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest import model
from services.ingest.model import Rejection
from services.ingest.service import BatchResult, EventResult
from services.ingest.servicer import _fill, result_to_proto

PROFILE = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER = uuid.UUID("00000000-0000-4000-8000-000000000002")


def mixed_batch() -> BatchResult:
    return BatchResult(
        [
            EventResult(0, "e0", "accepted", PROFILE),
            EventResult(1, "e1", "duplicate"),
            EventResult(
                2, "e2", "rejected", None, Rejection(model.NAME_INVALID, "custom.name", "bad")
            ),
            EventResult(3, "e3", "accepted", OTHER),
            EventResult(4, "e4", "rejected", None, Rejection(model.ERASED, "custom_id", "erased")),
            EventResult(5, "e5", "accepted", PROFILE),
            EventResult(6, "e6", "duplicate", OTHER),
        ]
    )


@pytest.mark.parametrize(
    "response_type", [pb.TrackEventsResponse, pb.ImportEventsResponse, pb.StreamEventsResponse]
)
def test_a_batch_is_answered_event_by_event_as_result_to_proto_says(
    response_type: type[pb.TrackEventsResponse],
) -> None:
    batch = mixed_batch()
    response = response_type()
    _fill(response, batch)
    assert list(response.results) == [result_to_proto(r) for r in batch.results]
    assert [r.profile_id for r in response.results] == [
        str(PROFILE),
        "",
        "",
        str(OTHER),
        "",
        str(PROFILE),
        str(OTHER),
    ]
    assert response.results[0].status.code == 0
    assert response.results[0].HasField("status")
    assert response.results[2].reason == model.NAME_INVALID
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (
        3,
        2,
        2,
    )
