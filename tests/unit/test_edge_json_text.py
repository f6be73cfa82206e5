"""The edge's JSON reader: too deep is a ValueError like any unreadable text, and a lone
surrogate becomes U+FFFD while valid pairs, and everything else, stay as sent."""

from __future__ import annotations

import json

import pytest

from services.edge import json_text


@pytest.mark.parametrize("depth", [2_000, 100_000])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_nesting_too_deep_is_a_value_error(depth: int, kind: str) -> None:
    text = "[" * depth + "]" * depth if kind == "array" else '{"a":' * depth + "1" + "}" * depth
    with pytest.raises(ValueError, match="nested too deeply"):
        json_text.loads(text.encode())


@pytest.mark.parametrize(
    ("sent", "read"),
    [
        (r'{"s": "\ud800"}', {"s": "\ufffd"}),
        (r'{"s": "a\udc00b"}', {"s": "a\ufffdb"}),
        (r'{"s": "\ud83d\ude00"}', {"s": "\U0001f600"}),  # a pair is its character
        (r'{"\ud800k": ["x", {"y": "\udfff"}]}', {"\ufffdk": ["x", {"y": "\ufffd"}]}),
        (r'["\ud83d", 1, null]', ["\ufffd", 1, None]),
    ],
)
def test_lone_surrogates_become_replacement_characters(sent: str, read: object) -> None:
    assert json_text.loads(sent.encode()) == read
    assert json_text.loads(sent) == read
    json.dumps(json_text.loads(sent), ensure_ascii=False).encode()  # storable: no error


def test_a_surrogate_encoded_in_the_bytes_is_replaced_too() -> None:
    raw = b'{"s": "a' + "\ud800".encode("utf-8", "surrogatepass") + b'"}'
    assert json_text.loads(raw) == {"s": "a\ufffd"}


def test_ordinary_json_reads_as_json_does() -> None:
    text = '{"a": [1, 2.5, "\u00e9\u4e2d", true, null, {"b": "c"}], "d": "\\\\ud800"}'
    assert json_text.loads(text.encode()) == json.loads(text)
