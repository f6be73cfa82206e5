"""The one rule that turns a free-text name into a contract name: how the edge stores the names
SDKs send ("Product Viewed" -> product_viewed), and how the console reads a name an operator
types as an SDK sent it. The rule's steps are described in services/edge/names.py.

The contract names events and attributes `^[a-zA-Z0-9_]{1,30}$` (case-insensitive, stored
lower-case).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

MAX_NAME_LENGTH = 30
_NOT_WORD = re.compile(r"[^a-zA-Z0-9]+")
_KEPT = MAX_NAME_LENGTH - 7


@functools.lru_cache(maxsize=8192)
def normalize_name(text: str) -> str | None:
    """The contract name for a free-text SDK name, or None when nothing usable is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = _NOT_WORD.sub("_", ascii_text.removeprefix("$")).strip("_").lower()
    if not name:
        return None
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(name.encode()).hexdigest()[:6]
        name = f"{name[:_KEPT].rstrip('_')}_{digest}"
    return name
