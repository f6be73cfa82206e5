"""The strings of an untranslated SDK message that ingest checks against the erasure quarantine
before keeping the message as a rejected event (payloads.message_ids)."""

from __future__ import annotations

from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest.payloads import MAX_MESSAGE_IDS, message_ids


def untranslated(message: dict[str, object]) -> pb.Event:
    event = pb.Event(event_id="e1", installation_id="anon-1")
    event.untranslated.reason = "NAME_UNUSABLE"
    event.untranslated.message.update(message)
    return event


def test_the_strings_of_the_first_two_levels_are_taken_top_level_first() -> None:
    event = untranslated(
        {
            "properties": {"$anon_distinct_id": "anon-2", "deep": {"id": "too-deep"}},
            "userId": "alice",
            "count": 3,
            "events": [{"key": "!!!"}, "listed"],
            "empty": "",
            "long": "x" * 513,
        }
    )
    assert sorted(message_ids(event)) == ["alice", "anon-2", "listed"]


def test_at_most_the_bound_each_once_and_the_top_level_first() -> None:
    nested = {f"k{i:03}": f"v{i % 100}" for i in range(300)}
    ids = message_ids(untranslated({"properties": nested, "userId": "alice"}))
    assert len(ids) == MAX_MESSAGE_IDS
    assert len(set(ids)) == len(ids)
    assert ids[0] == "alice"


def test_an_event_that_is_no_untranslated_message_has_none() -> None:
    event = pb.Event(event_id="e1", installation_id="anon-1")
    event.custom.name = "alice"
    assert message_ids(event) == []
