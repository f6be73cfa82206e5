"""Validation checks the common attribute values (strings, numbers, booleans) inline where it
reads them, in a custom event's attributes and in attribute operations, and leaves the rest and
every rejection to the value rule (`_attribute_value`). Random values, near every limit, through
all three: the inline checks must accept exactly what the rule accepts, and keep the same value."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest import model
from services.ingest.model import Invalid
from services.ingest.payloads import value_json
from services.ingest.validation import RejectedEvent, ValidEvent, _attribute_value, validate_event
from shared import contract_limits as limits

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
LIMIT = limits.MAX_STRING_LENGTH


def random_text(rng: random.Random) -> str:
    length = rng.choice([0, 1, 2, LIMIT - 1, LIMIT, LIMIT + 1, rng.randint(0, 2 * LIMIT)])
    letters = "aZé😀 \x00" if rng.random() < 0.2 else "abcXYZ é😀"
    return "".join(rng.choice(letters) for _ in range(length))


def random_value(rng: random.Random) -> types_pb2.AttributeValue:
    value = types_pb2.AttributeValue()
    roll = rng.randrange(7)
    if roll == 0:
        value.string_value = random_text(rng)
    elif roll == 1:
        value.number_value = rng.choice(
            [0.0, -0.0, 1, -1.5, 1e308, -1e308, math.inf, -math.inf, math.nan, rng.random()]
        )
    elif roll == 2:
        value.bool_value = rng.random() < 0.5
    elif roll == 3:
        value.url_value = rng.choice(["https://a.io/x", "nope", "", "ftp://h/" + "p" * 2100])
    elif roll == 4:
        value.timestamp_value.FromDatetime(NOW)
    elif roll == 5:
        value.string_list_value.values.extend(random_text(rng) for _ in range(rng.randint(0, 3)))
    # roll 6: no value at all
    return value


def canonical(value: types_pb2.AttributeValue) -> model.Value | None:
    try:
        return _attribute_value(value, "v")
    except Invalid:
        return None


def custom_event(value: types_pb2.AttributeValue) -> pb.Event:
    event = pb.Event(event_id="e1", installation_id="i1", platform=types_pb2.PLATFORM_WEB)
    event.event_time.FromDatetime(NOW)
    event.custom.name = "view"
    event.custom.attributes["price"].CopyFrom(value)
    return event


def set_operation(value: types_pb2.AttributeValue) -> pb.Event:
    event = pb.Event(event_id="e1", installation_id="i1", platform=types_pb2.PLATFORM_WEB)
    event.event_time.FromDatetime(NOW)
    operation = event.attribute_operations.operations.add(
        kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET, custom_attribute="price"
    )
    operation.value.CopyFrom(value)
    return event


@pytest.mark.parametrize("seed", range(5))
def test_the_inline_value_checks_agree_with_the_value_rule(seed: int) -> None:
    rng = random.Random(seed)
    seen: set[tuple[str | None, bool]] = set()
    for _ in range(400):
        value = random_value(rng)
        expected = canonical(value)
        seen.add((value.WhichOneof("value"), expected is not None))

        custom = validate_event(0, custom_event(value), request_send_time=None, now=NOW)
        if expected is None:
            assert isinstance(custom, RejectedEvent), value
            assert custom.rejection.reason == model.VALUE_INVALID
        else:
            assert isinstance(custom, ValidEvent), value
            assert custom.payload["attributes"]["price"] == value_json(value)

        operation = validate_event(0, set_operation(value), request_send_time=None, now=NOW)
        if expected is None:
            assert isinstance(operation, RejectedEvent), value
            assert operation.rejection.reason == model.VALUE_INVALID
        else:
            assert isinstance(operation, ValidEvent), value
            (checked,) = operation.operations
            assert checked.value == expected
            assert operation.payload["operations"][0]["value"] == value_json(value)
    # Every kind met both answers where it has two.
    for kind in ("string_value", "number_value", "url_value", "string_list_value"):
        assert (kind, True) in seen, kind
        assert (kind, False) in seen, kind
