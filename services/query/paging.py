"""Opaque page tokens: a keyset position, the snapshot fixed by the first page, and a
fingerprint of the request's other fields (a token is valid only with the same fields).

A token is URL-safe base64 of compact JSON. It is not signed: whatever a caller forges, every
statement still filters on the caller's project, so a forged token can only skip or repeat rows
of the caller's own data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from services.query.errors import PageTokenInvalid, RequestInvalid
from shared.errors import FieldViolation

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
TOKEN_VERSION = 1

MAX_BIGINT = 9_223_372_036_854_775_807
# Keyset positions before the first row of an ascending or descending walk.
NEG_INFINITY = datetime(1, 1, 1, tzinfo=UTC)
POS_INFINITY = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
NIL_UUID = UUID(int=0)
# Above every name in code point order (collation "C"): the start of a descending name walk.
MAX_TEXT = "\U0010ffff" * 4
MAX_UUID = UUID(int=(1 << 128) - 1)


def page_size(requested: int, *, field: str = "page_size") -> int:
    """0 means the default, above the maximum is coerced, negative is INVALID_ARGUMENT."""
    if requested < 0:
        raise RequestInvalid(
            f"{field} must not be negative",
            [FieldViolation(field, "must not be negative", RequestInvalid.reason)],
        )
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def fingerprint(*fields: object) -> str:
    """A short digest of the request fields a token is bound to."""
    text = json.dumps([_plain(f) for f in fields], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: object) -> object:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, int | float | str | bool):
        return value
    return str(value)


def encode_token(bound_to: str, position: Mapping[str, Any]) -> str:
    body = {"v": TOKEN_VERSION, "f": bound_to, **position}
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, bound_to: str, keys: Sequence[str]) -> dict[str, Any]:
    """The position in `token`; raises PageTokenInvalid if it is malformed, lacks one of `keys`
    or was issued for other request fields."""
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise _invalid("is not a page token of this RPC") from None
    if not isinstance(body, dict) or body.get("v") != TOKEN_VERSION:
        raise _invalid("is not a page token of this RPC")
    if body.get("f") != bound_to:
        raise _invalid("was issued for other request fields; start again without a token")
    if any(k not in body for k in keys):
        raise _invalid("is not a page token of this RPC")
    return body


def _invalid(why: str) -> PageTokenInvalid:
    return PageTokenInvalid(
        f"page_token {why}", [FieldViolation("page_token", why, PageTokenInvalid.reason)]
    )
