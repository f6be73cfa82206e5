"""The one rule that turns SDK names into contract names, and the one flattening rule.

The contract names events and attributes `^[a-zA-Z0-9_]{1,30}$` (case-insensitive, stored
lower-case). SDKs send free text: "Order Completed", "$current_url", "Größe", "plan.tier".

`normalize_name` (in shared/names.py: the console reads the names operators type by it too):
1. Unicode is decomposed (NFKD) and what is not ASCII is dropped ("Größe" -> "Groe",
   "café" -> "cafe").
2. A leading `$` (the SDKs' own namespace) is dropped; every run of characters other than
   letters and digits becomes one `_`; `_` at either end is dropped; the result is lower-case
   ("Order Completed" -> "order_completed", "$current_url" -> "current_url").
3. Over 30 characters: the first 23 characters, `_` and 6 hex digits of the SHA-256 of the
   whole normalized name, so that two long names stay distinct and a retry gives the same name.
4. Nothing left (a name of only symbols or only non-Latin script): None, and the message is
   rejected as NAME_UNUSABLE (an event name) or the property is left out and listed in the
   event's rejection (a property name) - never guessed.

Names repeat from message to message (the same properties, the same events), so the last 8,192
distinct names are remembered (a pure function: the cache changes nothing but time).

`flatten`: nested objects become one level, their keys joined with `_` before normalizing
({"plan": {"tier": "pro"}} -> {"plan_tier": "pro"}); lists are values, not flattened.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# The rule lives in shared/, as the console reads the names operators type by it too.
from shared.names import MAX_NAME_LENGTH, normalize_name

__all__ = ["MAX_NAME_LENGTH", "flatten", "normalize_name"]


def flatten(properties: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(joined key, value) for every leaf of a nested object; keys are not normalized yet."""
    for key, value in properties.items():
        joined = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from flatten(value, joined)
        else:
            yield joined, value
