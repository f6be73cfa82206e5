"""The pool's json/jsonb encoder (shared/db.py): the text json.dumps gives, for every kind of
JSON value, and the same refusal of what JSON cannot hold."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.db import encode_json

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities too: json.dumps writes them (allow_nan)
    | st.text(),  # any code point: escapes, surrogates, non-ASCII
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@given(JSON_VALUES)
def test_encode_json_writes_what_json_dumps_writes(value: Any) -> None:
    assert encode_json(value) == json.dumps(value)


@pytest.mark.parametrize(
    "value",
    [
        {"name": "view_item", "attributes": {"price": {"number_value": 12.5}}},
        {"duration": "30s"},
        {},
        [],
        "é\x00\n",
        (1, "two"),  # a tuple is written as a list, as json.dumps does
        {1: "int key", False: "bool key", None: "null key", 2.5: "float key"},
        10**30,
        -0.0,
    ],
)
def test_encode_json_writes_an_event_payload_as_json_dumps(value: Any) -> None:
    assert encode_json(value) == json.dumps(value)


@pytest.mark.parametrize("value", [{1, 2}, {"at": datetime(2030, 1, 1, tzinfo=UTC)}, b"x"])
def test_encode_json_refuses_what_json_cannot_hold_as_json_dumps(value: Any) -> None:
    with pytest.raises(TypeError) as dumps_refusal:
        json.dumps(value)
    with pytest.raises(TypeError) as refusal:
        encode_json(value)
    assert str(refusal.value) == str(dumps_refusal.value)
