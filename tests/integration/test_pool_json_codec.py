"""The services' pool (shared/db.py create_pool) sends and reads json and jsonb in PostgreSQL's
binary format: every JSON value, alone and as an element of an array argument, is stored as
the server itself parses its text, and read back as json.loads reads that text."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.db import create_pool

# An array argument's elements are payloads, JSON objects (a Python list inside an array
# argument would be a dimension of it, and None is SQL's NULL). jsonb holds no NaN, infinities
# nor U+0000, and keeps numbers as numeric (1.0 stays 1.0, an integer too large for a float
# stays exact): the values below are what a payload may hold.
JSON_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | JSON_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(JSON_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=2)
    yield pool
    await pool.close()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.dictionaries(JSON_TEXT, JSON_VALUES, max_size=4), min_size=1, max_size=5))
async def test_jsonb_array_argument_is_stored_as_the_server_parses_its_text(
    pool: asyncpg.Pool, values: list[Any]
) -> None:
    texts = [json.dumps(v) for v in values]
    rows = await pool.fetch(
        """SELECT v = t::jsonb AS same, v AS value, v::text AS text
           FROM unnest($1::jsonb[], $2::text[]) AS u(v, t)""",
        values,
        texts,
    )
    assert [r["same"] for r in rows] == [True] * len(values)
    expected = [await pool.fetchval("SELECT $1::text::jsonb::text", t) for t in texts]
    assert [r["text"] for r in rows] == expected
    assert [r["value"] for r in rows] == [json.loads(t) for t in expected]


async def test_json_and_jsonb_scalars_round_trip(pool: asyncpg.Pool) -> None:
    payload = {"name": 'say "hi"\\', "nested": [1, 2.5, None, True, {"é": "\u2603"}]}
    assert await pool.fetchval("SELECT $1::jsonb", payload) == payload
    assert await pool.fetchval("SELECT $1::json", payload) == payload
    # json keeps its text as sent (key order, duplicates); jsonb normalizes it
    assert await pool.fetchval("""SELECT '{"b": 1, "a": 2, "a": 3}'::json::text""") == (
        '{"b": 1, "a": 2, "a": 3}'
    )
    assert await pool.fetchval("""SELECT '{"b": 1, "a": 2, "a": 3}'::jsonb""") == {"a": 3, "b": 1}
    assert await pool.fetchval("SELECT NULL::jsonb") is None
    assert await pool.fetchval("SELECT 'null'::jsonb") is None
    assert await pool.fetchval("SELECT ARRAY['[1]', '{}']::jsonb[]") == [[1], {}]


async def test_a_value_jsonb_refuses_is_invalid_input_not_a_codec_error(
    pool: asyncpg.Pool,
) -> None:
    with pytest.raises(asyncpg.exceptions.UntranslatableCharacterError):
        await pool.fetchval("SELECT $1::jsonb", {"x": "\x00"})
