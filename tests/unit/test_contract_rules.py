"""The rules every request follows (shared/contract_rules.py), without a server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.message import Message

from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as query_pb
from shared.contract_rules import (
    Refused,
    RequestInvalid,
    RequestUndecodable,
    broken_rule,
    check_request,
    key_path,
    tolerant,
    unstorable_paths,
)


def _received(message: Message) -> Any:
    """What the server's handler gets for `message` sent over the wire."""
    deserialize: Callable[[bytes], Any] | None = tolerant(type(message).FromString)
    assert deserialize is not None
    return deserialize(message.SerializeToString())


def _refusal(message: Message) -> RequestInvalid:
    received = _received(message)
    assert isinstance(received, Refused)
    with pytest.raises(RequestInvalid) as raised:
        check_request(received)
    return raised.value


def test_a_map_key_is_quoted_and_escaped_as_json() -> None:
    assert key_path("price") == '["price"]'
    assert key_path("a\x00b") == '["a\\u0000b"]'
    assert key_path('say "hi"') == '["say \\"hi\\""]'
    assert "\x00" not in key_path("\x00")


def test_paths_reach_nested_lists_and_map_keys_and_values() -> None:
    request = identity_pb.ResolveProfilesRequest()
    request.keys.add(custom_id="ok")
    request.keys.add(installation_id="a\x00b")
    assert unstorable_paths(request) == ["keys[1].installation_id"]
    event = ingest_pb.Event(event_id="e\x00")
    event.custom.attributes["a\x00b"].string_value = "ok"
    event.custom.attributes["k"].string_value = "v\x00"
    assert sorted(unstorable_paths(event)) == [
        'custom.attributes["a\\u0000b"]',
        'custom.attributes["k"].string_value',
        "event_id",
    ]


def test_a_request_with_a_nul_is_refused_naming_every_path() -> None:
    error = _refusal(identity_pb.IdentifyRequest(installation_id="a\x00", custom_id="b\x00"))
    assert error.reason == "STRING_UNSTORABLE"
    assert sorted(v.field for v in error.violations) == ["custom_id", "installation_id"]


def test_a_refusal_names_at_most_twenty_paths_so_it_fits_in_trailing_metadata() -> None:
    request = identity_pb.ResolveProfilesRequest()
    for i in range(1000):
        request.keys.add(installation_id=f"inst-{i}\x00")
    error = _refusal(request)
    assert len(error.violations) == 20
    assert error.violations[0].field == "keys[0].installation_id"


def test_a_request_without_a_nul_passes_untouched() -> None:
    request = identity_pb.ResolveProfilesRequest()
    for i in range(3):
        request.keys.add(installation_id=f"inst-{i}")
    assert _received(request) == request
    assert broken_rule(request) is None


def test_a_timestamp_or_duration_outside_its_range_is_invalid() -> None:
    request = query_pb.ListSessionsRequest()
    request.start_time.nanos = -1
    error = _refusal(request)
    assert error.reason == "TIMESTAMP_INVALID"
    assert [v.field for v in error.violations] == ["start_time"]
    request.start_time.nanos = 0
    request.start_time.seconds = 253_402_300_800  # year 10000
    assert isinstance(_received(request), Refused)
    request.start_time.seconds = 253_402_300_799
    assert _received(request) == request


def test_items_answered_one_by_one_are_left_to_the_service() -> None:
    request = ingest_pb.StreamEventsRequest(events=[ingest_pb.Event(event_id="a\x00")])
    request.events[0].event_time.nanos = -1
    assert broken_rule(request) is None
    request.batch_id = "b\x00"
    error = broken_rule(request)
    assert error is not None
    assert [v.field for v in error.violations] == ["batch_id"]


def test_undecodable_bytes_become_a_refusal_not_an_exception_of_the_deserializer() -> None:
    deserialize = tolerant(ingest_pb.TrackEventsRequest.FromString)
    assert deserialize is not None
    decoded = deserialize(bytes.fromhex("0a0e0a04fffec3281204696e73743001"))
    with pytest.raises(RequestUndecodable):
        check_request(decoded)
    assert isinstance(deserialize(b""), ingest_pb.TrackEventsRequest)
