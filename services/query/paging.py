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
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from services.query.errors import PageTokenInvalid, RequestInvalid
from shared.errors import FieldViolation

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
TOKEN_VERSION = 1

MAX_BIGINT = 9_223_372_036_854_775_807
MIN_BIGINT = -MAX_BIGINT - 1
# Keyset positions before the first row of an ascending or descending walk.
NEG_INFINITY = datetime(1, 1, 1, tzinfo=UTC)
POS_INFINITY = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
NIL_UUID = UUID(int=0)
# Above every name in code point order (collation "C"): the start of a descending name walk.
MAX_TEXT = "\U0010ffff" * 4
MAX_UUID = UUID(int=(1 << 128) - 1)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The keyset bounds as microseconds since the epoch: a timestamp in a token lies between them.
MIN_MICROS = (NEG_INFINITY - _EPOCH) // timedelta(microseconds=1)
MAX_MICROS = (POS_INFINITY - _EPOCH) // timedelta(microseconds=1)


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
    return _encode(body)


def _encode(body: Mapping[str, Any]) -> str:
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# A token field's parser: the JSON value as encode_token wrote it in, the typed value out;
# raises PageTokenInvalid for any other value. A position reaches SQL as typed parameters, so
# what the parsers let through must be what asyncpg can send (bigint, timestamptz, uuid, text).
FieldParser = Callable[[object], Any]
TokenShape = Mapping[str, FieldParser]


def decode_token(token: str, bound_to: str, shape: TokenShape) -> dict[str, Any]:
    """The position in `token`, each field parsed by its parser in `shape`; raises
    PageTokenInvalid unless `token` is exactly one encode_token issued for `bound_to` with
    the keys of `shape` (a tampered field, a missing or extra key, another RPC's token)."""
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeError, RecursionError):
        # ValueError covers bad JSON and integers over Python's digit limit; RecursionError
        # deep nesting ("[[[[...").
        raise not_a_token() from None
    if not isinstance(body, dict) or type(body.get("v")) is not int or body["v"] != TOKEN_VERSION:
        raise not_a_token()
    if body.get("f") != bound_to:
        raise _invalid("was issued for other request fields; start again without a token")
    if body.keys() != {"v", "f", *shape}:
        raise not_a_token()
    # What we issue is canonical compact JSON: anything else (spaces, a repeated key, 1.0 for
    # 1, stray base64 characters the decoder skips) was written by someone else.
    if _encode(body) != token:
        raise not_a_token()
    return {key: parse(body[key]) for key, parse in shape.items()}


def not_a_token() -> PageTokenInvalid:
    """The error for a token this RPC did not issue (also for a position that parsed field by
    field but is inconsistent as a whole)."""
    return _invalid("is not a page token of this RPC")


def int64(value: object) -> int:
    """A bigint: a JSON integer (not a boolean, not 1.0) within PostgreSQL's bigint."""
    if type(value) is not int or not MIN_BIGINT <= value <= MAX_BIGINT:
        raise not_a_token()
    return value


def micros(value: object) -> datetime:
    """A timestamp as microseconds since the epoch, within the keyset bounds (year 1 to 9999)."""
    number = int64(value)
    if not MIN_MICROS <= number <= MAX_MICROS:
        raise not_a_token()
    return _EPOCH + timedelta(microseconds=number)


def uuid(value: object) -> UUID:
    """A UUID in its canonical text form (what str(UUID) writes)."""
    if not isinstance(value, str):
        raise not_a_token()
    try:
        parsed = UUID(value)
    except ValueError:
        raise not_a_token() from None
    if str(parsed) != value:
        raise not_a_token()
    return parsed


def text(value: object) -> str:
    """A text PostgreSQL can hold: no NUL, no lone surrogate (not encodable as UTF-8)."""
    if not isinstance(value, str) or "\x00" in value:
        raise not_a_token()
    try:
        value.encode()
    except UnicodeEncodeError:
        raise not_a_token() from None
    return value


def one_of(*allowed: int) -> FieldParser:
    """An integer among `allowed`."""

    def parse(value: object) -> int:
        if type(value) is not int or value not in allowed:
            raise not_a_token()
        return value

    return parse


def nullable(parse: FieldParser) -> FieldParser:
    """JSON null as None, else `parse`."""

    def parse_or_none(value: object) -> Any:
        return None if value is None else parse(value)

    return parse_or_none


def _invalid(why: str) -> PageTokenInvalid:
    return PageTokenInvalid(
        f"page_token {why}", [FieldViolation("page_token", why, PageTokenInvalid.reason)]
    )
