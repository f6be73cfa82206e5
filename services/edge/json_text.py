"""JSON as the SDKs send it, read once for every dialect.

Two things Python's json module does that a gateway must not pass on: it raises RecursionError
(not ValueError) for text nested deeper than the interpreter's recursion limit, which a few KB
of brackets reach, and it decodes an unpaired UTF-16 escape ("\\ud800") to a lone surrogate,
a str that can never be encoded, stored or put in a protobuf string. So: too deep is a
ValueError like any text that is not JSON (a 400 for a body, a parameter listed as invalid for
Countly), and each lone surrogate becomes U+FFFD, as Go's encoding/json reads it, so that the
rest of the message is kept.
"""

from __future__ import annotations

import json
import re
from typing import Any

# An escaped surrogate, or one encoded in the bytes themselves (json.loads decodes bytes with
# surrogatepass): only then can the parsed value hold a lone one, so the walk below is skipped
# for every other body.
_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE_TEXT = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


class TooDeep(ValueError):
    """JSON nested deeper than it can be read."""


def loads(data: bytes | str) -> Any:
    """The JSON value of `data`, lone surrogates replaced by U+FFFD; raises ValueError
    (json.JSONDecodeError, TooDeep) for text that cannot be read as JSON."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise TooDeep("The JSON is nested too deeply") from None
    pattern = _SURROGATE_BYTES if isinstance(data, bytes) else _SURROGATE_TEXT
    if pattern.search(data):  # type: ignore[arg-type]
        value = _without_lone_surrogates(value)
    return value


def _storable(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        # Through UTF-16 with surrogatepass and back: a pair stays its character (json
        # already joined valid pairs), an unpaired half becomes U+FFFD.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _without_lone_surrogates(root: Any) -> Any:
    """`root` with every string (keys too) storable; iterative, as deep as json let it be."""
    holder = [root]
    pending: list[tuple[Any, Any]] = [(holder, 0)]
    while pending:
        container, key = pending.pop()
        item = container[key]
        if isinstance(item, str):
            container[key] = _storable(item)
        elif isinstance(item, list):
            pending.extend((item, index) for index in range(len(item)))
        elif isinstance(item, dict):
            if any(_storable(name) != name for name in item):
                item = {_storable(name): value for name, value in item.items()}
                container[key] = item
            pending.extend((item, name) for name in item)
    return holder[0]
