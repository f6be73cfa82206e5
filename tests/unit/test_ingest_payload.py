"""The fast JSON form of custom events equals protobuf's json_format output."""

from __future__ import annotations

from google.protobuf import json_format

from profiles.common.v1 import bus_pb2
from services.ingest.validation import custom_payload


def test_custom_payload_matches_json_format_for_every_value_kind() -> None:
    details = [bus_pb2.CustomEventDetail(name="plain")]
    full = bus_pb2.CustomEventDetail(name="purchase", label="shop")
    full.attributes["s"].string_value = "text"
    full.attributes["empty"].string_value = ""
    full.attributes["n"].number_value = 3.0
    full.attributes["big"].number_value = 1e300
    full.attributes["neg"].number_value = -0.25
    full.attributes["b"].bool_value = False
    full.attributes["t"].timestamp_value.FromNanoseconds(1_700_000_000_123_456_000)
    full.attributes["u"].url_value = "https://example.com/a?b=c"
    full.attributes["l"].string_list_value.values.extend(["a", "b"])
    full.attributes["none"].string_list_value.SetInParent()
    details.append(full)
    for detail in details:
        expected = json_format.MessageToDict(detail, preserving_proto_field_name=True)
        assert custom_payload(detail) == expected
