"""SDK property values to contract attribute values, shared by every dialect.

A property becomes a custom event attribute: its name through names.normalize_name after
names.flatten, its value by `attribute_value`. Properties whose name starts with `$` (the SDKs'
own: $lib, $browser, $current_url...) are not attributes: a dialect takes what it maps to
installation details from them and drops the rest, so they never count against the contract's
20 attributes per event. An event left with more than 20 attributes is rejected by ingest
(TOO_MANY_ATTRIBUTES) and listed, never cut.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from profiles.common.v1 import types_pb2
from services.edge.names import flatten, normalize_name

MAX_LIST_ITEMS = 25


def attribute_value(value: Any) -> types_pb2.AttributeValue | None:
    """The attribute value of a JSON value; None for null (left out).

    bool -> bool; number -> number; string -> URL when it is an absolute http(s) URL, else
    string; list of scalars -> string list (items as text); anything else (a list holding
    objects) -> its compact JSON text as a string."""
    if value is None:
        return None
    if isinstance(value, bool):
        return types_pb2.AttributeValue(bool_value=value)
    if isinstance(value, int | float):
        return types_pb2.AttributeValue(number_value=_number(value))
    if isinstance(value, str):
        if value.startswith(("http://", "https://")) and " " not in value:
            return types_pb2.AttributeValue(url_value=value)
        return types_pb2.AttributeValue(string_value=value)
    if isinstance(value, list) and all(
        isinstance(v, str | int | float | bool) and v is not None for v in value
    ):
        items = [v if isinstance(v, str) else json.dumps(v) for v in value]
        return types_pb2.AttributeValue(string_list_value=types_pb2.StringList(values=items))
    return types_pb2.AttributeValue(string_value=json.dumps(value, separators=(",", ":")))


def _number(value: int | float) -> float:
    """The double of a JSON number. An integer past a double's range is infinite, like 1e400
    (Python's json reads that as inf): ingest rejects the event for it (VALUE_INVALID) and lists
    it, where float() would raise."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


@dataclass(slots=True)
class Attributes:
    """Custom attributes built from SDK properties, and the property names nothing usable was
    left of (reported in a rejection rather than dropped silently)."""

    values: dict[str, types_pb2.AttributeValue] = field(default_factory=dict)
    unusable: list[str] = field(default_factory=list)


def custom_attributes(properties: Mapping[str, Any], skip_sdk_own: bool = True) -> Attributes:
    """Attributes for an event's properties: flattened, names normalized, `$`-prefixed keys
    skipped (when `skip_sdk_own`), nulls left out. Two keys normalizing to the same name: the
    later one wins, as in a JSON object with a repeated key."""
    result = Attributes()
    for key, value in flatten(properties):
        if skip_sdk_own and key.startswith("$"):
            continue
        name = normalize_name(key)
        if name is None:
            result.unusable.append(key)
            continue
        converted = attribute_value(value)
        if converted is not None:
            result.values[name] = converted
    return result
