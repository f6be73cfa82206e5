"""SDK property values to contract attribute values, shared by every dialect.

A property becomes a custom event attribute: its name through names.normalize_name after
names.flatten, its value by `attribute_value`. Properties whose name starts with `$` (the SDKs'
own: $lib, $browser, $current_url...) are not attributes: a dialect takes what it maps to
installation details from them and drops the rest, so they never count against the contract's
20 attributes per event. An event left with more than 20 attributes is rejected by ingest
(TOO_MANY_ATTRIBUTES) and listed, never cut.

Values keep the type they show: a string that is a date-time or a date (`time_of`) is a
timestamp, one that is an absolute http(s) URL a URL (rules in docs/edge.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from profiles.common.v1 import types_pb2
from services.edge.names import flatten, normalize_name
from shared.contract_limits import (
    MAX_ATTRIBUTES_PER_EVENT,
    MAX_STRING_LENGTH,
    MAX_URL_LENGTH,
)
from shared.convert import timestamp_of

# What `time_of` takes for a time: RFC 3339's date-time (a `T`, minutes at least, a fraction of
# up to 9 digits, an offset `Z`, `+01:00` or `+0100`) with the offset optional, or a bare date.
# Strict on purpose: datetime.fromisoformat alone also reads "20240102" (an order number?),
# "2024-W01" or "2024-01-02 03", which no SDK sends for a time.
_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[Tt]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:[Zz]|[+-]\d{2}:?\d{2})?)?",
    re.ASCII,
)


def attribute_value(value: Any) -> types_pb2.AttributeValue | None:
    """The attribute value of a JSON value; None for null (left out).

    bool -> bool; number -> number; string -> timestamp when it is a date-time or a date
    (`time_of`), URL when it is an absolute http(s) URL, else string; list of scalars ->
    string list (items as text); anything else (a list holding objects) -> its compact JSON
    text as a string."""
    if value is None:
        return None
    if isinstance(value, bool):
        return types_pb2.AttributeValue(bool_value=value)
    if isinstance(value, int | float):
        return types_pb2.AttributeValue(number_value=_number(value))
    if isinstance(value, str):
        moment = time_of(value)
        if moment is not None:
            return types_pb2.AttributeValue(timestamp_value=timestamp_of(moment))
        if is_http_url(value):
            return types_pb2.AttributeValue(url_value=value)
        return types_pb2.AttributeValue(string_value=value)
    if isinstance(value, list) and all(
        isinstance(v, str | int | float | bool) and v is not None for v in value
    ):
        items = [v if isinstance(v, str) else json.dumps(v) for v in value]
        return types_pb2.AttributeValue(string_list_value=types_pb2.StringList(values=items))
    return types_pb2.AttributeValue(string_value=json.dumps(value, separators=(",", ":")))


def time_of(text: str) -> datetime | None:
    """The UTC moment a string names, or None when it names none (it stays a string).

    - A date-time with a `Z` or an offset: what JSON.stringify makes of a JavaScript Date
      ("2024-01-02T03:04:05.000Z"), Python's isoformat() of an aware datetime, Java's and
      Swift's ISO 8601 formatters. Taken as the moment it names.
    - A date-time without one: what segment-analytics-python and posthog-python send for a
      naive datetime ("2024-01-02T03:04:05"). Taken as UTC, the rule of the SDK messages' own
      times (build.parse_time): nothing in the value says its zone, and a naive datetime in a
      server is as often UTC as local.
    - A bare date ("1990-05-17": Python's isoformat() of a date, a birthday): its midnight UTC,
      so that it keeps its day in UTC and compares with other times.
    Anything else is no time: a date-time with a space instead of the `T`, a week or ordinal
    date, a leap second, a date that does not exist (2023-02-29), or one whose UTC moment is
    outside years 1 to 9999 (no Timestamp holds it)."""
    if len(text) > 40 or not _TIME.fullmatch(text):
        return None
    try:
        # fromisoformat wants the upper-case `T` and `Z` (RFC 3339 allows both cases).
        moment = datetime.fromisoformat(text.upper())
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # "0001-01-01T00:00:00+01:00" is in year 0 in UTC
        return None


def is_http_url(text: str) -> bool:
    """An absolute http(s) URL with a host, without white space or NUL: what ingest takes for
    a URL value (under its 2,048 characters). "https://" alone or a URL with a tab is text."""
    if not text.startswith(("http://", "https://")) or "\x00" in text:
        return False
    if any(c.isspace() for c in text):
        return False
    try:
        return bool(urlsplit(text).hostname)
    except ValueError:  # an invalid IPv6 host, "http://[::1"
        return False


def sdk_text_value(value: Any) -> types_pb2.AttributeValue | None:
    """The attribute value of a text an SDK adds on its own, not the app (Segment's page and
    campaign fields): a URL when it is an absolute http(s) URL, cut to 2,048 characters, else a
    string cut to 300, NULs removed; never a time or a number (a page titled "2024-01-02" is a
    title). None for anything but non-empty text. Cut rather than refused: ingest refuses an
    event for a value over the contract's limits, and a long page title the app never wrote
    must not cost it its event."""
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "")
    if not value:
        return None
    if is_http_url(value):
        cut = value[:MAX_URL_LENGTH]
        if is_http_url(cut):
            return types_pb2.AttributeValue(url_value=cut)
    return types_pb2.AttributeValue(string_value=value[:MAX_STRING_LENGTH])


# Where an event happened and which campaign brought the user, under one set of names whatever
# the SDK (Segment's context.page and context.campaign, PostHog's $current_url, $pathname,
# $referrer and utm_ properties: each dialect's table says which of its fields is which), so
# that one segment filter or funnel step works for an app that sends from two SDKs. In the
# order they are kept while the event has room (what segments are most often built on first).
PAGE_CONTEXT_ATTRIBUTES = (
    "page_url",
    "page_path",
    "page_referrer",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
    "page_title",
    "page_search",
)


def add_page_context(
    values: dict[str, types_pb2.AttributeValue], fields: Mapping[str, Any]
) -> None:
    """Adds an event's page and campaign fields (`fields`: attribute name in
    PAGE_CONTEXT_ATTRIBUTES -> what the SDK sent) to its attributes (`values`, its
    properties'), in PAGE_CONTEXT_ATTRIBUTES' order: a property of the same name wins (the app
    said it), and they stop where the event has 20 attributes, so that what the SDK adds on its
    own never makes ingest reject the event (TOO_MANY_ATTRIBUTES). Text only, cut to the
    contract's limits (sdk_text_value); an empty field (analytics.js's `referrer: ""`) is left
    out."""
    for attribute in PAGE_CONTEXT_ATTRIBUTES:
        if len(values) >= MAX_ATTRIBUTES_PER_EVENT:
            return
        if attribute in values:
            continue
        value = sdk_text_value(fields.get(attribute))
        if value is not None:
            values[attribute] = value


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
