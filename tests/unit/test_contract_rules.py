"""The rules every request follows (shared/contract_rules.py), without a server."""

from __future__ import annotations

import pytest

from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from shared.contract_rules import (
    RequestUndecodable,
    RequestInvalid,
    Undecodable,
    check_request,
    key_path,
    tolerant,
    unstorable_paths,
)


def test_a_map_key_is_quoted_and_escaped_as_json() -> None:
    assert key_path("price") == '["price"]'
    assert key_path("a\x00b") == '["a\\u0000b"]'
    assert key_path('say "hi"') == '["say \\"hi\\""]'
    assert "\x00" not in key_path("\x00")


def test_paths_reach_nested_lists_and_map_keys_and_values() -> None:
    request = identity_pb.ResolveProfilesRequest()
    request.keys.add(custom_id="ok")
    request.keys.add(installation_id="a\x00b")
    assert list(unstorable_paths(request)) == ["keys[1].installation_id"]
    event = ingest_pb.Event(event_id="e\x00")
    event.custom.attributes["a\x00b"].string_value = "ok"
    event.custom.attributes["k"].string_value = "v\x00"
    assert sorted(unstorable_paths(event)) == [
        'custom.attributes["a\\u0000b"]',
        'custom.attributes["k"].string_value',
        "event_id",
    ]


def test_a_request_with_a_nul_names_every_path() -> None:
    request = identity_pb.IdentifyRequest(installation_id="a\x00", custom_id="b\x00")
    with pytest.raises(RequestInvalid) as raised:
        check_request(request)
    assert raised.value.reason == "STRING_UNSTORABLE"
    assert sorted(v.field for v in raised.value.violations) == ["custom_id", "installation_id"]


def test_a_timestamp_or_duration_outside_its_range_is_invalid() -> None:
    from profiles.query.v1 import query_service_pb2 as query_pb

    request = query_pb.ListSessionsRequest()
    request.start_time.nanos = -1
    with pytest.raises(RequestInvalid) as raised:
        check_request(request)
    assert raised.value.reason == "TIMESTAMP_INVALID"
    assert [v.field for v in raised.value.violations] == ["start_time"]
    request.start_time.nanos = 0
    request.start_time.seconds = 253_402_300_800  # year 10000
    with pytest.raises(RequestInvalid):
        check_request(request)
    request.start_time.seconds = 253_402_300_799
    check_request(request)


def test_items_answered_one_by_one_are_left_to_the_service() -> None:
    request = ingest_pb.StreamEventsRequest(events=[ingest_pb.Event(event_id="a\x00")])
    check_request(request)
    request.batch_id = "b\x00"
    with pytest.raises(RequestInvalid) as raised:
        check_request(request)
    assert [v.field for v in raised.value.violations] == ["batch_id"]


def test_undecodable_bytes_become_a_refusal_not_an_exception_of_the_deserializer() -> None:
    deserialize = tolerant(ingest_pb.TrackEventsRequest.FromString)
    assert deserialize is not None
    decoded = deserialize(bytes.fromhex("0a0e0a04fffec3281204696e73743001"))
    assert isinstance(decoded, Undecodable)
    with pytest.raises(RequestUndecodable):
        check_request(decoded)
    assert isinstance(deserialize(b""), ingest_pb.TrackEventsRequest)
