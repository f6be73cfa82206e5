"""How contract messages read on a page: names, times, durations, values, charts, definitions.

Pure functions of protobuf messages and plain values: no I/O, no HTTP, unit-testable. Templates
call them as filters and globals; everything they return is plain text (autoescaped by Jinja)
or numbers for SVG geometry.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from google.protobuf import duration_pb2, timestamp_pb2

from profiles.common.v1 import types_pb2
from profiles.query.v1 import overview_pb2, profile_pb2, query_service_pb2, timeline_pb2
from profiles.segments.v1 import filters_pb2, funnels_pb2
from services.console.errors import BadInput
from shared.convert import datetime_of

PLATFORMS = {"all": 0, "ios": 1, "android": 2, "web": 3}
PLATFORM_LABELS = {0: "—", 1: "iOS", 2: "Android", 3: "Web", 4: "API"}
# A platform of the overview's switch (PLATFORMS) by its label.
PLATFORM_NAMES = {name: PLATFORM_LABELS[value] for name, value in PLATFORMS.items() if value}
SMART_SEGMENTS = {1: "New", 2: "One-time", 3: "Engaged", 4: "Dormant"}
SMART_FLAGS = {1: "Promising New", 2: "Promising Dormant", 3: "Risky Engaged"}
CHANNELS = {1: "Email", 2: "SMS", 3: "Push"}
KINDS = {1: "Marketing", 2: "Transactional"}
# What a push token means on each platform, for the opt-in figure's hover text.
TOKEN_MEANING = (
    "iOS: a token the app registered with APNs; Android: an FCM registration token;"
    " Web: a browser push subscription. Opted in means the person allowed notifications."
)


def ts(value: timestamp_pb2.Timestamp) -> datetime | None:
    """A set Timestamp as an aware datetime; None when unset (all zero)."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    return datetime_of(value)


WHEN_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


def when(value: timestamp_pb2.Timestamp | datetime | None) -> str:
    """'2026-12-02 20:31:05 UTC', or '—' when unset."""
    if isinstance(value, timestamp_pb2.Timestamp):
        if value.seconds == 0 and value.nanos == 0:
            return "—"
        # gmtime of the seconds: the same text as ToDatetime(UTC).strftime, without building a
        # datetime (once per cell of a 50-row table).
        return time.strftime(WHEN_FORMAT, time.gmtime(value.seconds))
    return value.strftime(WHEN_FORMAT) if value else "—"


def ago(value: timestamp_pb2.Timestamp | datetime | None, now: datetime | None = None) -> str:
    """How long before `now` (the present by default) `value` was, in words beside its time in
    UTC: "just now", "5 min ago", "3 h ago", "2 days ago", "4 months ago", "1 year ago"; "in
    5 min" for a time ahead (a device's clock); "" when unset. console.js words it alike as
    the page stays open."""
    moment = ts(value) if isinstance(value, timestamp_pb2.Timestamp) else value
    if moment is None:
        return ""
    seconds = int(((now or datetime.now(UTC)) - moment).total_seconds())
    gap = abs(seconds)
    if gap < 60:
        return "just now"
    minutes, hours, days = gap // 60, gap // 3600, gap // 86400
    if minutes < 60:
        words = f"{minutes} min"
    elif hours < 48:
        words = f"{hours} h"
    elif days < 60:
        words = count_of(days, "day")
    elif days < 730:
        words = count_of(days // 30, "month")
    else:
        words = count_of(days // 365, "year")
    return f"{words} ago" if seconds > 0 else f"in {words}"


def iso(value: timestamp_pb2.Timestamp) -> str:
    moment = ts(value)
    return moment.isoformat().replace("+00:00", "Z") if moment else ""


def seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def span(value: duration_pb2.Duration | float) -> str:
    """'1 h 02 min', '3 min 05 s', '42 s'."""
    total = int(value if isinstance(value, int | float) else seconds(value))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


# ListProfilesRequest.name_prefix's limit, as the contract documents it.
NAME_SEARCH_MAX = 100
# How much of what a person typed a page repeats back to them (a caption, a message): a 5,000
# character filter must not push the page sideways.
ECHO_MAX = 40


def isolated(text: str) -> str:
    """`text` between a first strong isolate and its pop: where no markup can isolate it (a
    page's <title>), a right-to-left override in a name ends with the name."""
    return f"\u2068{text}\u2069"


def shorten(text: str, limit: int = ECHO_MAX) -> str:
    """`text` cut to at most `limit` characters, an ellipsis saying so."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


PAGE_LINK_STALE = "This page link is out of date or was altered: start again from the first page."
# A refused request field in the words of the box a person filled: never the contract's name
# for it (`name_prefix`, `reasons[0]`), which means nothing on a page.
FIELD_WORDS = {
    "name_prefix": f"A name search holds at most {NAME_SEARCH_MAX} characters.",
    "custom_id_prefix": "A custom ID holds at most 512 characters: no custom ID starts so.",
    "email_prefix": "An email address holds at most 254 characters: no email starts so.",
    "segment_id": "No such segment: choose one from the list.",
    "reasons": "A reason code holds 1 to 64 characters, such as EVENT_TIME_IN_FUTURE.",
    "start_time": "Not a time the service accepts.",
    "end_time": "The end must be after the start.",
    "email": "An email address looks like name@example.com.",
    "phone": "A phone number is + and 2 to 15 digits (E.164), such as +33612345678.",
    "profile_id": "A profile ID is a UUID, such as 6f1e2c1a-0d7e-4a51-9b55-1d7c7d3f0a11.",
    "event_names": "An event name is 1 to 30 letters, digits or underscores, such as purchase.",
    "session_id": "No such session: a session ID holds 1 to 64 characters, without control"
    " characters. Choose a session in the list.",
}
# A phone number as people write it: a leading +, then digits with spaces, dashes, dots,
# slashes or brackets between them ("+1 (555) 000-0003").
_WRITTEN_PHONE = re.compile(r"\+[\s(]*\d[\d\s().\-/]*")
PHONE_MATCHING = (
    "Phone numbers are matched in E.164 form: + then the country code and the number, digits"
    " only (spaces, dashes, dots and brackets are left out: “+1 (555) 000-0003” is"
    " +15550000003). A number written without its country code matches nothing."
)


def phone_number(text: str) -> str:
    """`text` as the E.164 form the contract matches phones in ("+15550000003" for
    "+1 555 000 0003" or "+1 (555) 000-0003"), or "" when it is not written as a phone."""
    text = text.strip()
    if not _WRITTEN_PHONE.fullmatch(text):
        return ""
    return "+" + re.sub(r"\D", "", text)


# What a search found a profile by, said on its page when the text could be several kinds.
FOUND_BY = {"custom_id": "Found by custom ID."}
REFUSED = "The service refused this request: check the filters, or start again from the first page."


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused request as a page tells it: the form box at fault (its id; empty for the page
    as a whole, such as a stale page link) and what to say."""

    box: str
    text: str


def refusal(bad: BadInput, boxes: Mapping[str, str] | None = None) -> Refusal:
    """`bad` in a person's words; `boxes` maps a request field to the id of the box the page
    filled it from (a field with no box is told at the page's level)."""
    if bad.reason == "PAGE_TOKEN_INVALID":
        return Refusal("", PAGE_LINK_STALE)
    for path in bad.fields:
        field = re.split(r"[.\[]", path, maxsplit=1)[0]  # reasons[0] -> reasons
        if field in FIELD_WORDS:
            return Refusal((boxes or {}).get(field, ""), FIELD_WORDS[field])
    return Refusal("", REFUSED)


def problem_text(bad: BadInput) -> str:
    """What a person reads for a refused request on a page of its own."""
    return refusal(bad).text


# The codes ingest rejects an event with (IngestService's comment in the contract lists them),
# offered by the rejected events page's Reason box. An edge gateway may add its own codes.
REJECTION_REASONS = (
    "EVENT_ID_INVALID",
    "ORIGIN_MISSING",
    "INSTALLATION_ID_INVALID",
    "CUSTOM_ID_INVALID",
    "ERASED",
    "PLATFORM_MISSING",
    "EVENT_TIME_MISSING",
    "TIMESTAMP_INVALID",
    "EVENT_TIME_IN_FUTURE",
    "EVENT_TIME_TOO_OLD",
    "PAYLOAD_MISSING",
    "SESSION_ID_INVALID",
    "NAME_INVALID",
    "LABEL_INVALID",
    "ATTRIBUTE_NAME_INVALID",
    "TOO_MANY_ATTRIBUTES",
    "VALUE_INVALID",
    "OPERATION_INVALID",
    "EMAIL_INVALID",
    "PHONE_INVALID",
    "LANGUAGE_INVALID",
    "REGION_INVALID",
    "COUNTRY_INVALID",
    "TIMEZONE_INVALID",
    "PROFILE_ATTRIBUTE_LIMIT",
    "DURATION_INVALID",
    "SUBSCRIPTION_INVALID",
    "EVENT_TOO_LARGE",
    "UNTRANSLATED",
)


NO_SUCH_PROFILE = "No such profile in your project: the link may be altered, or the profile erased."
_PROFILE_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def is_profile_id(text: str) -> bool:
    """Whether `text` is written as the contract reads a profile ID (a hyphenated UUID, either
    case), so that the page can tell a mistyped one beside its chip without asking."""
    return _PROFILE_ID.fullmatch(text) is not None


# How the users table shows a profile ID (`display_name`, `user_rows`): its first 8 hex digits,
# after "Anonymous" for a nameless person, after "profile" under a name. The search box takes
# them back as the start of an ID, as ListProfiles' profile_id_prefix reads it (1 to 32 hex
# digits, dashes ignored).
SHOWN_ID_DIGITS = 8
_SHOWN_ID = re.compile(r"(?:anonymous|profile)\s+([0-9a-f-]+)", re.IGNORECASE)
_ID_START = re.compile(r"-*(?:[0-9a-f]-*){1,32}", re.IGNORECASE)


def profile_id_prefix(text: str, kind: str = "auto") -> str:
    """The start of a profile ID that `text` stands for, as lower-case hex digits without
    dashes, or "" when it stands for none. Searched by profile ID, any 1 to 32 hex digits; in
    a search of any kind ("auto"), the users table's own spellings ("Anonymous dcae577b",
    "profile dcae577b", any case) with 1 to 32 digits, or a lone token of 8 to 32 (what the
    table shows, or more of it): a shorter one is more likely a name or an ID of another
    kind."""
    text = text.strip()
    if kind not in ("auto", "profile_id"):
        return ""
    shown = _SHOWN_ID.fullmatch(text) if kind == "auto" else None
    token = shown.group(1) if shown else text
    if _ID_START.fullmatch(token) is None:
        return ""
    digits = token.replace("-", "").lower()
    if kind == "auto" and not shown and len(digits) < SHOWN_ID_DIGITS:
        return ""
    return digits


def shows_a_profile_id(text: str) -> bool:
    """Whether `text` is the users table's spelling of a profile ID ("Anonymous dcae577b",
    "profile dcae577b"): no name, so no name search."""
    shown = _SHOWN_ID.fullmatch(text.strip())
    return shown is not None and _ID_START.fullmatch(shown.group(1)) is not None


# What a search says of each lookup that found nothing ({} is what was looked up).
SEARCH_MISSES = {
    "email": "No profile has the email address “{}”.",
    "phone": "No profile has the phone number {}.",
    "profile_id": "No profile has the ID {}.",
    "custom_id": "No profile has the custom ID “{}”.",
    "installation_id": "No profile has an installation with the ID “{}”.",
    "id_prefix": "No profile has an ID starting with {}.",
    "custom_id_prefix": "No profile has a custom ID starting with “{}”.",
    "email_prefix": "No profile has an email address starting with “{}” (in any case).",
    "name": "No profile has a word of its name starting with “{}”.",
}
# What a search offers when several kinds of value start with the text ({} is the text).
START_LISTS = {
    "custom_id_prefix": "Profiles whose custom ID starts with “{}”",
    "email_prefix": "Profiles whose email address starts with “{}”",
    "name": "Profiles with a word of their name starting with “{}”",
}


def search_miss(kind: str, value: str) -> str:
    """The sentence of a lookup of `kind` (a GetProfile lookup, "id_prefix", "custom_id_prefix",
    "email_prefix" or "name") that found no profile, quoting what was looked up (cut to
    ECHO_MAX)."""
    return SEARCH_MISSES[kind].format(shorten(value))


def rejected_link(**filters: str) -> str:
    """The rejected events page with these filters (reason, start, end, profile, page_token;
    empty ones left out), in a fixed order so that the same view has one address."""
    order = ("reason", "start", "end", "profile", "page_token")
    kept = {name: filters[name] for name in order if filters.get(name)}
    return "/rejected" + ("?" + urlencode(kept) if kept else "")


def reason_code(text: str) -> str:
    """A typed reason as the code it means: reason codes are UPPER_SNAKE and matched exactly,
    so 'name_invalid' and ' name invalid ' mean NAME_INVALID."""
    return "_".join(re.split(r"[\s_-]+", text.strip())).upper()


# Where ingest's field paths name an attribute: the i-th attribute operation (its name is in
# the payload, as a native enum or a custom name) or a custom event's attribute (its name is in
# the path, quoted as JSON: shared.contract_rules.key_path).
_OPERATION_PATH = re.compile(r"attribute_operations\.operations\[(\d+)\](?:\.[a-z_]+)?")
_EVENT_ATTRIBUTE_PATH = re.compile(r'custom\.attributes\[("(?:[^"\\]|\\.)*")\]')
NATIVE_ATTRIBUTE_PREFIX = "NATIVE_ATTRIBUTE_"


@dataclass(frozen=True, slots=True)
class RejectionText:
    """A rejected event's explanation in the console's words: the attribute it is about ("" when
    the path names none) and what was wrong with it ("email: not a valid email"). The exact
    field path stays beside it, as ingest recorded it."""

    attribute: str
    text: str


def rejection_text(rejected: timeline_pb2.RejectedEvent) -> RejectionText:
    """What a person reads of a rejection: ingest's message repeats the contract's path
    ("attribute_operations.operations[0].value is not a valid email"), which names no
    attribute; the attribute's name comes from the path or the raw payload when they tell it,
    and the path is dropped from the message."""
    path, message = rejected.field_path, rejected.message
    attribute = _attribute_of(path, rejected.raw_payload_json)
    said = message
    if path and message.startswith(path + " "):
        said = message[len(path) + 1 :].removeprefix("is ")
    if not attribute:
        return RejectionText("", message)
    if said.startswith(attribute + " "):
        return RejectionText(attribute, said)  # "email takes a string_value"
    return RejectionText(attribute, f"{attribute}: {said}")


def _attribute_of(path: str, raw_payload_json: str) -> str:
    """The attribute a field path is about, "" when it names none or the payload does not
    tell (an erased event keeps no payload; one not expressible as JSON is base64)."""
    found = _EVENT_ATTRIBUTE_PATH.match(path)
    if found:
        try:
            name = json.loads(found.group(1))
        except ValueError:
            return ""
        return name if isinstance(name, str) else ""
    found = _OPERATION_PATH.fullmatch(path)
    if not found or not raw_payload_json:
        return ""
    try:
        payload = json.loads(raw_payload_json)
        operation = payload["attribute_operations"]["operations"][int(found.group(1))]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    if not isinstance(operation, dict):
        return ""
    native = operation.get("native_attribute")
    if isinstance(native, str) and native.startswith(NATIVE_ATTRIBUTE_PREFIX):
        return native.removeprefix(NATIVE_ATTRIBUTE_PREFIX).lower()
    custom = operation.get("custom_attribute")
    return custom if isinstance(custom, str) else ""


def rejected_person(rejected: timeline_pb2.RejectedEvent) -> str:
    """Where a rejected event's person is: the profile it arrived for (the profile page opens
    a merged-away one's survivor), else a search for the installation that sent it, or the
    custom ID a server-side event named, which finds the profile they belong to now; "" when
    the row tells none."""
    if rejected.profile_id:
        return f"/profiles/{rejected.profile_id}"
    if rejected.installation_id:
        return "/search?" + urlencode({"q": rejected.installation_id, "by": "installation_id"})
    try:
        custom_id = json.loads(rejected.raw_payload_json).get("custom_id", "")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(custom_id, str) or not custom_id:
        return ""
    return "/search?" + urlencode({"q": custom_id, "by": "custom_id"})


@dataclass(frozen=True, slots=True)
class ReasonChip:
    """One reason of the rejected events page's time range with its count ("" for every
    reason), as a chip that filters by it."""

    reason: str
    label: str
    count: str
    selected: bool


def reason_chips(
    counts: Iterable[query_service_pb2.RejectedReasonCount], *, at_least: bool, selected: str
) -> list[ReasonChip]:
    """Every reason (most frequent first, as the service orders them) after one chip for all of
    them. A count past the service's cap reads "at least"; a selected reason the range does
    not hold still has its chip, at 0, so the page shows what it filters by."""
    pairs = [(c.reason, c.count) for c in counts]
    if selected and selected not in {reason for reason, _ in pairs}:
        pairs.append((selected, 0))

    def number(count: int) -> str:
        return f"at least {count:,}" if at_least and count else f"{count:,}"

    everything = ReasonChip("", "All reasons", number(sum(c for _, c in pairs)), not selected)
    return [everything] + [
        ReasonChip(reason, reason, number(count), reason == selected) for reason, count in pairs
    ]


def count_of(
    count: int, noun: str, verb_one: str = "", verb_many: str = "", *, plural: str = ""
) -> str:
    """`1 session`, `2 sessions`: a count with its noun, `plural` when not the regular one
    (`noun` + s); with a verb, the verb that agrees with the count ("1 profile matches",
    "2 profiles match"). Every sentence of the console that counts something says it so."""
    one = count == 1
    text = f"{count} {noun if one else plural or noun + 's'}"
    verb = verb_one if one else verb_many
    return f"{text} {verb}" if verb else text


def shown_rows(page: int, page_size: int, rows: int, total: int, *, at_least: bool) -> str:
    """What the users table says it shows: "Profiles 51 to 100 of 2,345" (page 2), "of 10,000+"
    past the service's count, "No profile" when none matches."""
    if rows == 0:
        return "No profile" if page == 1 else f"No profile past {(page - 1) * page_size:,}"
    first = (page - 1) * page_size + 1
    of = f"{total:,}+" if at_least else f"{total:,}"
    if rows == 1:
        return f"Profile {first:,} of {of}"
    return f"Profiles {first:,} to {first + rows - 1:,} of {of}"


# -- the users table's filters, and the links that open them ----------------------------------

# The users table's `reach` parameter: the channel a marketing message reaches a profile on
# (ListProfilesRequest.reachable_channel), as the overview's channel reach counts them.
REACH = {
    "email": types_pb2.CHANNEL_EMAIL,
    "sms": types_pb2.CHANNEL_SMS,
    "push": types_pb2.CHANNEL_PUSH,
}
REACH_BY_CHANNEL = {channel: name for name, channel in REACH.items()}
REACH_LABELS = {"email": "email", "sms": "SMS", "push": "push"}
# ISO 639-1 languages and ISO 3166-1 alpha-2 countries are both two letters: the shape the
# contract accepts (anything else is INVALID_ARGUMENT, which a URL's typo must not turn into an
# error page).
_TWO_LETTERS = re.compile(r"[A-Za-z]{2}")


def language_code(text: str) -> str:
    """`text` as the language code the users table filters by (lower case, as the overview
    counts languages), or "" when it cannot be one."""
    text = text.strip()
    return text.lower() if _TWO_LETTERS.fullmatch(text) else ""


def country_code(text: str) -> str:
    """`text` as the country code the users table filters by (upper case, as sessions record
    countries and the overview counts them), or "" when it cannot be one."""
    text = text.strip()
    return text.upper() if _TWO_LETTERS.fullmatch(text) else ""


def users_url(**parameters: str) -> str:
    """The users table filtered by `parameters` (empty values and the platform "all" left out):
    the list behind an overview figure, its count equal to the figure."""
    kept = {k: v for k, v in parameters.items() if v and not (k == "platform" and v == "all")}
    return "/users?" + urlencode(kept) if kept else "/users"


@dataclass(frozen=True, slots=True)
class Chip:
    """An active filter of the users table that an overview figure or a search opened (a box
    of the form may show it too), with the parameter whose removal lifts it."""

    label: str
    parameter: str


def filter_chips(
    *,
    language: str,
    country: str,
    reach: str,
    id_prefix: str = "",
    custom_id: str = "",
    email: str = "",
) -> list[Chip]:
    chips = []
    if id_prefix:
        chips.append(Chip(f"Profile ID starting with {id_prefix}", "id"))
    if custom_id:
        chips.append(Chip(f"Custom ID starting with “{shorten(custom_id)}”", "custom_id"))
    if email:
        chips.append(Chip(f"Email starting with “{shorten(email)}”", "email"))
    if language:
        chips.append(Chip(f"Language: {language}", "language"))
    if country:
        chips.append(Chip(f"Country: {country}", "country"))
    if reach:
        chips.append(Chip(f"Reachable by {REACH_LABELS[reach]}", "reach"))
    return chips


# What the users table's caption starts with, by tab.
TAB_CAPTIONS = {
    "all": "Profiles",
    "identified": "Identified profiles",
    "anonymous": "Anonymous profiles",
    "details": "Profiles with user details",
}


def users_caption(
    *,
    segment: str,
    custom_segments: Mapping[str, str],
    platform: str,
    country: str,
    language: str,
    reach: str,
    id_prefix: str,
    custom_id: str,
    email: str,
    name: str,
) -> list[tuple[str, str]]:
    """Every filter of the users table in its caption's words, in the order of their boxes: a
    (words, typed) pair each, `typed` being text people typed or named (a custom segment's name,
    a start of a custom ID), which the template quotes, shortens and isolates ("" when none). A
    custom segment the page could not name (the segments service not answering) reads by ID."""
    parts: list[tuple[str, str]] = []
    kind, _, rest = segment.partition(":")
    if kind == "smart" and rest.isdigit() and int(rest) in SMART_SEGMENTS:
        parts.append(("in the smart segment", SMART_SEGMENTS[int(rest)]))
    elif kind == "flag" and rest.isdigit() and int(rest) in SMART_FLAGS:
        parts.append(("with the predictive flag", SMART_FLAGS[int(rest)]))
    elif kind == "custom" and rest:
        parts.append(("in the custom segment", custom_segments.get(rest, rest)))
    if platform in PLATFORM_NAMES:
        parts.append((f"on {PLATFORM_NAMES[platform]}", ""))
    if country:
        parts.append((f"whose last session was in {country}", ""))
    if language:
        parts.append((f"whose language is {language}", ""))
    if reach in REACH_LABELS:
        parts.append((f"reachable by {REACH_LABELS[reach]}", ""))
    if id_prefix:
        parts.append((f"whose ID starts with {id_prefix}", ""))
    if custom_id:
        parts.append(("whose custom ID starts with", custom_id))
    if email:
        parts.append(("whose email starts with", email))
    if name:
        parts.append(("with a word of their name starting with", name))
    return parts


def platform(value: int) -> str:
    return PLATFORM_LABELS.get(value, "—")


def smart_segment(value: int) -> str:
    return SMART_SEGMENTS.get(value, "—")


def smart_flag(value: int) -> str:
    return SMART_FLAGS.get(value, "")


def percent(value: float) -> str:
    return f"{value * 100:.1f} %"


def percent_of(whole: int, rate: float) -> str:
    """A rate as `percent` does, or "—" over nobody (never "0.0 %" of nothing)."""
    return percent(rate) if whole else "—"


def display_name(first_name: str, last_name: str, custom_id: str, profile_id: str) -> str:
    """The name a person is shown by: their name, else their custom ID, else 'Anonymous'."""
    name = f"{first_name} {last_name}".strip()
    if name:
        return name
    if custom_id:
        return custom_id
    return f"Anonymous {profile_id[:8]}"


@dataclass(frozen=True, slots=True)
class UserRow:
    """One line of the users table, its cells already text: the template only places them.
    (Fifty protobuf rows read field by field through template filters and a global were the
    largest part of the table's rendering in a profile.)"""

    profile_id: str
    name: str
    # What tells two rows of the same name apart under it: the custom ID when the name is not
    # already it; for an anonymous person with a name, the start of the profile ID. (The email
    # has its own column.)
    also: str
    # A person known by user details (a name, an email, a phone) but not by a custom ID:
    # Countly's users table tells them apart from the truly anonymous.
    details_without_id: bool
    device: str
    platform: str  # empty when unknown
    sessions: int
    last_seen: str
    time_spent: str
    segment: str
    email: str  # "—" when none
    country: str  # ISO 3166-1 alpha-2, of the last session; "—" when unknown
    language: str  # ISO 639-1; "—" when unknown
    last_seen_ago: str = ""  # "5 min ago" beside `last_seen`; "" when never seen
    last_seen_iso: str = ""


def segment_label(row: query_service_pb2.ProfileRow) -> str:
    """A row's smart segment with its flag ("Engaged · Risky Engaged"), "—" for none."""
    segment = SMART_SEGMENTS.get(row.smart_segment, "—")
    if row.smart_segment_flag:
        segment += " · " + smart_flag(row.smart_segment_flag)
    return segment


def user_rows(rows: Iterable[query_service_pb2.ProfileRow]) -> list[UserRow]:
    found = []
    now = datetime.now(UTC)
    for row in rows:
        segment = segment_label(row)
        name = display_name(row.first_name, row.last_name, row.custom_id, row.profile_id)
        told = [row.custom_id] if row.custom_id and name != row.custom_id else []
        if not told and not row.custom_id and not name.startswith("Anonymous "):
            told.append(f"profile {row.profile_id[:8]}")
        also = " · ".join(told)
        found.append(
            UserRow(
                profile_id=row.profile_id,
                name=name,
                also=also,
                details_without_id=row.anonymous and row.has_user_details,
                device=row.device_model or "—",
                platform=PLATFORM_LABELS.get(row.platform, "") if row.platform else "",
                sessions=row.session_count,
                last_seen=when(row.last_seen_time),
                time_spent=span(row.total_time_spent),
                segment=segment,
                email=row.email or "—",
                country=row.country or "—",
                language=row.language or "—",
                last_seen_ago=ago(row.last_seen_time, now),
                last_seen_iso=iso(row.last_seen_time),
            )
        )
    return found


# The platform breakdown's values are the enum's names (PLATFORM_IOS).
_PLATFORM_BY_NAME = {
    name: PLATFORM_LABELS.get(number, name) for name, number in types_pb2.Platform.items()
}


def breakdown_value(item: overview_pb2.ValueCount) -> str:
    """A native segment's value as a person reads it: 'Web' for PLATFORM_WEB, and an app
    version with its platform ('4.2.0 (iOS)'), since the same version number on two platforms
    is two rows."""
    if item.value in _PLATFORM_BY_NAME:
        return _PLATFORM_BY_NAME[item.value]
    if item.platform:
        return f"{item.value} ({PLATFORM_LABELS.get(item.platform, '?')})"
    return item.value


def attribute_value(value: types_pb2.AttributeValue) -> str:
    kind = value.WhichOneof("value")
    if kind is None:
        return "—"
    if kind == "timestamp_value":
        return when(value.timestamp_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "number_value":
        number = value.number_value
        return str(int(number)) if number.is_integer() else f"{number:g}"
    if kind == "string_list_value":
        return ", ".join(value.string_list_value.values)
    return str(getattr(value, kind))


def attribute_type(value: int) -> str:
    name = profile_pb2.AttributeType.Name(value)  # type: ignore[arg-type]
    name = name.removeprefix("ATTRIBUTE_TYPE_")
    return name.lower().replace("_", " ") if value else "—"


# The native attributes' labels by name, in the contract's order.
NATIVE_LABELS = {
    "email": "Email",
    "phone": "Phone",
    "first_name": "First name",
    "last_name": "Last name",
    "language": "Language",
    "region": "Region",
    "country": "Country",
    "timezone": "Timezone",
    "avatar_url": "Avatar URL",
}


def native_attributes(native: profile_pb2.NativeAttributes) -> list[tuple[str, str, str]]:
    """(name, label, value) of the set native attributes, in the contract's order."""
    return [
        (name, label, getattr(native, name))
        for name, label in NATIVE_LABELS.items()
        if getattr(native, name)
    ]


def value_type(value: types_pb2.AttributeValue) -> str:
    """The type of a value, in `attribute_type`'s words ('string list'); '—' when unset."""
    kind = value.WhichOneof("value")
    return kind.removesuffix("_value").replace("_", " ") if kind else "—"


# The profile timeline's kind filter: its `kind` parameter, the choice's label, and the
# TimelineEventKind values it lists (ListEventsRequest.kinds).
TIMELINE_KINDS: dict[str, tuple[str, tuple[timeline_pb2.TimelineEventKind.ValueType, ...]]] = {
    "session": ("Sessions", (timeline_pb2.TIMELINE_EVENT_KIND_SESSION,)),
    "custom": ("Custom events", (timeline_pb2.TIMELINE_EVENT_KIND_CUSTOM,)),
    "attribute": ("Attribute changes", (timeline_pb2.TIMELINE_EVENT_KIND_ATTRIBUTE_CHANGE,)),
    "consent": ("Consent changes", (timeline_pb2.TIMELINE_EVENT_KIND_CONSENT_CHANGE,)),
    "installation": (
        "Installation updates",
        (timeline_pb2.TIMELINE_EVENT_KIND_INSTALLATION_UPDATE,),
    ),
    "crash": ("Crashes", (timeline_pb2.TIMELINE_EVENT_KIND_CRASH,)),
    "identity": (
        "Merges and splits",
        (timeline_pb2.TIMELINE_EVENT_KIND_MERGE, timeline_pb2.TIMELINE_EVENT_KIND_SPLIT),
    ),
}


def timeline_filter_words(
    kind: str,
    event_name: str,
    *,
    first_day: date | None = None,
    last_day: date | None = None,
    without_heartbeats: bool = False,
) -> str:
    """What a filtered timeline shows, as its heading says it ("" when unfiltered): the kind
    and name, the days (UTC, both included) and whether session heartbeats are left out."""
    words = []
    if event_name:
        # Only custom events carry a name: with another kind, nothing matches, and it says so.
        named = f"custom events named “{shorten(event_name)}”"
        if kind and kind != "custom":
            words.append(f"{TIMELINE_KINDS[kind][0].lower()} and {named}")
        else:
            words.append(named)
    elif kind:
        words.append(TIMELINE_KINDS[kind][0].lower())
    if first_day and first_day == last_day:
        words.append(f"on {first_day.isoformat()} (UTC)")
    elif first_day and last_day:
        words.append(f"from {first_day.isoformat()} to {last_day.isoformat()} (UTC)")
    elif first_day:
        words.append(f"from {first_day.isoformat()} (UTC)")
    elif last_day:
        words.append(f"until {last_day.isoformat()} (UTC)")
    if without_heartbeats:
        words.append("without session heartbeats")
    return ", ".join(words)


# What the timeline's day boxes say of a day they cannot read (only an altered link holds
# one: a date box sends year-month-day, whatever order the browser's language shows), or of a
# reversed range.
NOT_A_DAY = (
    "Not a day this box can read: pick one in the box (a link writes a day as"
    " year-month-day, 2026-12-06)."
)
NOT_A_TIME = (
    "Not a date and time this box can read: pick one in the box (a link writes it as"
    " year-month-day, then the time in UTC: 2026-12-06T16:58)."
)
LAST_DAY_BEFORE_FIRST = "The last day is before the first: nothing can be in between."
# A day as a date box and the timeline's `from` and `to` parameters write it.
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def calendar_day(text: str) -> date | None:
    """`text` as a day written YYYY-MM-DD, or None when it is not one (2026-02-30, 6/12)."""
    if _DAY.fullmatch(text) is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def day_bounds(first: date | None, last: date | None) -> tuple[datetime | None, datetime | None]:
    """The event times of the days from `first` to `last`, both included, in UTC: [start,
    end), either None when unbounded (a last day of 9999-12-31 has no day after it)."""
    start = datetime(first.year, first.month, first.day, tzinfo=UTC) if first else None
    end = None
    if last is not None and last < date.max:
        after = last + timedelta(days=1)
        end = datetime(after.year, after.month, after.day, tzinfo=UTC)
    return start, end


@dataclass(frozen=True, slots=True)
class NameMiss:
    """What a timeline filtered by a custom event name that matched nothing says of the names
    the profile has: whether it has that name at all (then the other filters left its events
    out), the names closest to what was typed, and every name read (`partial` when only its
    newest custom events were read)."""

    typed: str
    has_name: bool
    closest: tuple[str, ...]
    names: tuple[str, ...]
    partial: bool


# The names offered: past this many, the closest ones still are.
NAME_MISS_NAMES = 30


def name_miss(typed: str, names: Iterable[str], *, partial: bool) -> NameMiss:
    """`typed` (a custom event name that listed nothing) against the names of the profile's
    custom events: names are lower-case and the filter ignores case, so "Purchase" is
    "purchase"; a typo ("purchse") finds the names that look like it."""
    held = sorted(set(names))
    wanted = typed.lower()
    closest = tuple(difflib.get_close_matches(wanted, held, n=3, cutoff=0.6))
    return NameMiss(
        typed=shorten(typed),
        has_name=wanted in held,
        closest=closest,
        names=tuple(held[:NAME_MISS_NAMES]),
        partial=partial or len(held) > NAME_MISS_NAMES,
    )


def session_started(
    session_id: str,
    sessions: Iterable[timeline_pb2.Session],
    events: Iterable[timeline_pb2.TimelineEvent],
) -> str:
    """When the session `session_id` started, as `when` writes times, from what the profile
    page read anyway: its row among the sessions listed, else its start event among the
    events shown; "" when neither holds it (a session of another sessions page, whose
    events fill more than a page)."""
    for session in sessions:
        if session.session_id == session_id:
            return when(session.start_time)
    for event in events:
        if (
            event.session_id == session_id
            and event.WhichOneof("details") == "session"
            and event.session.type == timeline_pb2.SESSION_EVENT_TYPE_START
        ):
            return when(event.event_time)
    return ""


def event_title(event: timeline_pb2.TimelineEvent) -> str:
    """One line saying what happened."""
    kind = event.WhichOneof("details")
    if kind == "custom":
        return event.custom.name  # its label is a detail (`event_details`)
    if kind == "session":
        name = timeline_pb2.SessionEventType.Name(event.session.type)
        step = name.removeprefix("SESSION_EVENT_TYPE_").lower()
        return f"Session {step}"
    if kind == "attribute_change":
        names = ", ".join(op.name for op in event.attribute_change.operations)
        return f"Attributes changed: {names}"
    if kind == "consent_change":
        change = event.consent_change
        state = "subscribed" if change.subscribed else "unsubscribed"
        return f"{CHANNELS.get(change.channel, '?')} {KINDS.get(change.kind, '?')}: {state}"
    if kind == "installation_update":
        return "Installation updated"
    if kind == "crash":
        return f"Crash: {event.crash.name}"
    if kind == "identity_change":
        return identity_change(event.identity_change)
    return timeline_pb2.TimelineEventKind.Name(event.kind).removeprefix("TIMELINE_EVENT_KIND_")


def event_details(event: timeline_pb2.TimelineEvent) -> list[tuple[str, str]]:
    """(name, value) pairs shown under an event."""
    kind = event.WhichOneof("details")
    if kind == "custom":
        label = [("label", event.custom.label)] if event.custom.label else []
        return label + [(k, attribute_value(v)) for k, v in sorted(event.custom.attributes.items())]
    if kind == "attribute_change":
        rows = []
        for op in event.attribute_change.operations:
            verb = timeline_pb2.AttributeOperationType.Name(op.type)
            rows.append((op.name, f"{verb.removeprefix('ATTRIBUTE_OPERATION_TYPE_').lower()} "
                         f"{attribute_value(op.value)}"))  # fmt: skip
        return rows
    if kind == "session":
        rows = []
        if event.session.HasField("duration"):
            rows.append(("duration", span(event.session.duration)))
        if event.session.country:
            rows.append(("country", event.session.country))
        return rows
    if kind == "crash":
        return [("reason", event.crash.reason), ("fatal", str(event.crash.fatal).lower())]
    if kind == "installation_update":
        update = event.installation_update
        pairs = [
            ("app version", update.app_version),
            ("OS version", update.os_version),
            ("device", update.device_model),
            ("language", update.language),
            ("timezone", update.timezone),
        ]
        # Push and uninstall: set only when the update carried them (a token itself is never
        # returned, only whether one was registered or removed).
        if update.HasField("push_token_present"):
            pairs.append(("push token", "registered" if update.push_token_present else "removed"))
        if update.HasField("push_opt_in"):
            pairs.append(("push opt-in", "on" if update.push_opt_in else "off"))
        if update.uninstalled:
            pairs.append(("app", "uninstalled"))
        return [(k, v) for k, v in pairs if v]
    if kind == "identity_change":
        change = event.identity_change
        pairs = [("from", change.source_profile_id), ("into", change.target_profile_id)]
        if change.installation_ids:
            pairs.append(("installations", ", ".join(change.installation_ids)))
        if change.alias_custom_id:
            pairs.append(("custom ID kept as an alias", change.alias_custom_id))
        return [(k, v) for k, v in pairs if v]
    return []


def event_origin(
    event: timeline_pb2.TimelineEvent, app_versions: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """(name, value) pairs saying where an event came from: the installation and platform that
    sent it, its session, whether an import brought it, the merged profile it was first on.
    For a crash, the app version its installation runs now, from `app_versions` (installation
    ID to app version, of the installations the profile holds): the contract keeps no app
    version with a crash, so the words say "now"."""
    pairs = []
    if event.installation_id:
        pairs.append(("installation", event.installation_id))
    if event.platform:
        pairs.append(("platform", PLATFORM_LABELS.get(event.platform, "?")))
    version = (app_versions or {}).get(event.installation_id, "")
    if version and event.WhichOneof("details") == "crash":
        pairs.append(("app version now", version))
    if event.session_id and event.WhichOneof("details") != "session":
        pairs.append(("session", event.session_id))
    if event.imported:
        pairs.append(("imported", "yes, by an import (not sent live)"))
    if event.merged_from_profile_id:
        pairs.append(("merged from profile", event.merged_from_profile_id))
    return pairs


def stack_trace(event: timeline_pb2.TimelineEvent) -> str:
    """A crash's stack trace as sent ("" for another kind, or none sent)."""
    return event.crash.stack_trace if event.WhichOneof("details") == "crash" else ""


IMPORTED_UNSEEN = "imported, not seen yet"


def installation_last_seen(installation: profile_pb2.Installation) -> str:
    """When an installation was last seen, or IMPORTED_UNSEEN for a push token imported from a
    previous provider that no SDK has sent since: its times are the import's, not a device's."""
    if installation.imported:
        return IMPORTED_UNSEEN
    return when(installation.last_seen_time)


def push_devices(installations: Iterable[profile_pb2.Installation]) -> str:
    """Whether a push can reach the profile's devices, as the overview's push reach counts it:
    an installation with a push token whose device allows notifications (the operating
    system's opt-in), which no subscription choice is needed for ("opted in on 2 of 2 devices
    with a token")."""
    held = list(installations)
    if not held:
        return "no device"
    tokens = [i for i in held if i.push_token_present]
    if not tokens:
        return "no device has a push token"
    opted_in = sum(1 for i in tokens if i.push_opt_in)
    return f"opted in on {opted_in} of {count_of(len(tokens), 'device')} with a token"


def identity_change(change: profile_pb2.IdentityChange) -> str:
    kind = "Merge" if change.kind == profile_pb2.IDENTITY_CHANGE_KIND_MERGE else "Split"
    cause = profile_pb2.IdentityChangeCause.Name(change.cause)
    cause_text = cause.removeprefix("IDENTITY_CHANGE_CAUSE_").lower().replace("_", " ")
    return f"{kind} ({cause_text})"


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One merge or split of a profile's history, its profiles as IDs to link ("this profile"
    marks the one whose page it is)."""

    when: str
    change: str
    source: str
    source_is_here: bool
    target: str
    target_is_here: bool
    installations: str


# What the contract names in place of a profile erased since the change (the nil UUID).
ERASED_PROFILE_ID = "00000000-0000-0000-0000-000000000000"


def history_rows(changes: Iterable[profile_pb2.IdentityChange], here: str) -> list[HistoryRow]:
    """The identity history, newest first (ties by change ID, so that two changes committed in
    the same second always read in the same order)."""
    ordered = sorted(
        changes,
        key=lambda c: (c.change_time.seconds, c.change_time.nanos, c.change_id),
        reverse=True,
    )
    return [
        HistoryRow(
            when=when(c.change_time),
            change=identity_change(c),
            source=c.source_profile_id,
            source_is_here=c.source_profile_id == here,
            target=c.target_profile_id,
            target_is_here=c.target_profile_id == here,
            installations=", ".join(c.installation_ids) or "—",
        )
        for c in ordered
    ]


def funnel_step_status(value: int) -> str:
    return {1: "Completed", 2: "Not Completed", 3: "Not reached"}.get(value, "—")


@dataclass(frozen=True, slots=True)
class FunnelStepFigures:
    """One step of a funnel with the profiles that reached it and what it kept of the steps
    before; a rate over no profile (a first step nobody reached) is "—", never a division by
    zero or a 0 % that would read as everybody lost."""

    event_name: str
    reached: int
    from_previous: str  # "—" for the first step
    from_first: str
    dropped: int  # profiles that reached the previous step but not this one; 0 for the first
    dropped_share: str  # of the previous step's; "—" for the first step


def _rate(part: int, whole: int) -> str:
    return percent(part / whole) if whole else "—"


def funnel_figures(event_names: Sequence[str], reached: Sequence[int]) -> list[FunnelStepFigures]:
    """Each step's conversion from the previous step and from the first, and its drop-off, from
    the profiles that reached each step (Funnel.reached_profile_counts, non-increasing). Empty
    when the counts do not match the steps (a reply without them)."""
    if len(reached) != len(event_names) or not reached:
        return []
    first = reached[0]
    figures = []
    for index, (name, count) in enumerate(zip(event_names, reached, strict=True)):
        previous = reached[index - 1] if index else None
        figures.append(
            FunnelStepFigures(
                event_name=name,
                reached=count,
                from_previous="—" if previous is None else _rate(count, previous),
                from_first=_rate(count, first),
                dropped=0 if previous is None else previous - count,
                dropped_share="—" if previous is None else _rate(previous - count, previous),
            )
        )
    return figures


# -- the profiles behind a funnel step ----------------------------------------------------------

# The `people` parameter of a funnel step's list: ListFunnelProfilesRequest.selection.
FUNNEL_PEOPLE = {
    "reached": funnels_pb2.FUNNEL_PROFILE_SELECTION_REACHED,
    "dropped": funnels_pb2.FUNNEL_PROFILE_SELECTION_DROPPED,
}


@dataclass(frozen=True, slots=True)
class FunnelPersonRow:
    """One person of a funnel step's list: who (the users table's row, or None when the table
    does not list them: named by the start of the ID), when their best attempt completed the
    step, and when its conversion window closes (`window_open`: still open at the list's
    moment, so a person who dropped off may yet go on)."""

    profile_id: str
    user: UserRow | None
    label: str
    complete_time: str
    deadline: str
    window_open: bool


def funnel_person_rows(
    profiles: Iterable[funnels_pb2.FunnelStepProfile],
    users: Mapping[str, UserRow],
    as_of: timestamp_pb2.Timestamp,
) -> list[FunnelPersonRow]:
    """The list's rows in the service's order, each named by its users table row when there
    is one (what GetProfileRows answered)."""
    moment = (as_of.seconds, as_of.nanos)
    rows = []
    for item in profiles:
        user = users.get(item.profile_id)
        deadline = item.attempt_deadline_time
        rows.append(
            FunnelPersonRow(
                profile_id=item.profile_id,
                user=user,
                label=user.name if user is not None else short_profile(item.profile_id),
                complete_time=when(item.complete_time),
                deadline=when(deadline),
                window_open=(deadline.seconds, deadline.nanos) > moment,
            )
        )
    return rows


def funnel_step_total(reached: Sequence[int], step: int, people: str) -> int:
    """How many profiles a step's list holds by the funnel's counts: those that reached the
    step, or for a drop-off those that reached it less those that reached the next."""
    if not 1 <= step <= len(reached):
        return 0
    count = reached[step - 1]
    if people == "dropped" and step < len(reached):
        count -= reached[step]
    return count


# -- charts ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value: int
    title: str


def bar_chart(
    items: Sequence[tuple[str, int, str]], *, width: float = 600, height: float = 120
) -> list[Bar]:
    """Vertical bars for (label, value, hover text), scaled to the largest value."""
    if not items:
        return []
    top = max(value for _, value, _ in items) or 1
    step = width / len(items)
    bars = []
    for index, (label, value, title) in enumerate(items):
        bar_height = height * value / top
        bars.append(
            Bar(
                x=round(index * step + step * 0.1, 2),
                y=round(height - bar_height, 2),
                width=round(step * 0.8, 2),
                height=round(bar_height, 2),
                label=label,
                value=value,
                title=title,
            )
        )
    return bars


@dataclass(frozen=True, slots=True)
class ActivityDay:
    """One day of a profile's activity as its table reads it."""

    date: str
    sessions: int
    events: int
    time_spent: str


def activity_days(days: Iterable[Any]) -> list[ActivityDay]:
    """GetActivity's days (DayActivity) as rows, newest first: the chart's figures without
    hovering, for a keyboard and a screen reader."""
    rows = [
        ActivityDay(day.date, day.session_count, day.event_count, span(day.time_spent))
        for day in days
    ]
    return sorted(rows, key=lambda row: row.date, reverse=True)


def activity_zone(zone: str) -> str:
    """The zone the activity chart counts days in, as its heading names it."""
    return zone or "UTC"


def hbars(items: Iterable[tuple[str, int]], *, width: float = 300) -> list[tuple[str, int, float]]:
    """(label, value, bar width) for horizontal bars scaled to the largest value."""
    rows = list(items)
    top = max((value for _, value in rows), default=0) or 1
    return [(label, value, round(width * value / top, 2)) for label, value in rows]


def gauge_arc(percentage: float, radius: float = 50) -> str:
    """The SVG path of a half-circle gauge filled to `percentage` (0 to 100)."""
    fraction = min(max(percentage, 0.0), 100.0) / 100
    angle = math.pi * (1 - fraction)
    x = 60 + radius * math.cos(angle)
    y = 60 - radius * math.sin(angle)
    return f"M {60 - radius} 60 A {radius} {radius} 0 0 1 {x:.2f} {y:.2f}"


# -- segment definitions in words ---------------------------------------------------------------

_OPERATORS = {
    1: "is",
    2: "is not",
    3: "is less than",
    4: "is at most",
    5: "is more than",
    6: "is at least",
    7: "is one of",
    8: "contains",
    9: "starts with",
    10: "exists",
}


def filter_words(node: filters_pb2.FilterNode) -> str:
    """A segment's filter tree as a sentence, such as 'platform is iOS and country is FR'."""
    kind = node.WhichOneof("node")
    if kind == "group":
        parts = [filter_words(child) for child in node.group.children]
        if node.group.operator == filters_pb2.GROUP_OPERATOR_NOT:
            return "not (" + " and ".join(parts) + ")"
        joiner = " or " if node.group.operator == filters_pb2.GROUP_OPERATOR_OR else " and "
        return "(" + joiner.join(parts) + ")" if len(parts) > 1 else "".join(parts)
    if kind == "condition":
        return _condition_words(node.condition)
    return "every profile"


def _condition_words(condition: filters_pb2.Condition) -> str:
    kind = condition.WhichOneof("condition")
    if kind == "attribute":
        attribute = condition.attribute
        if attribute.WhichOneof("attribute") == "native_attribute":
            name = filters_pb2.NativeAttribute.Name(attribute.native_attribute)
            name = name.removeprefix("NATIVE_ATTRIBUTE_").lower()
        else:
            name = attribute.custom_attribute
        operator = _OPERATORS.get(attribute.operator, "?")
        if attribute.operator == filters_pb2.OPERATOR_EXISTS:
            return f"{name} exists"
        if attribute.values:
            value = ", ".join(attribute_value(v) for v in attribute.values)
        else:
            value = attribute_value(attribute.value)
        return f"{name} {operator} {value}"
    if kind == "platform":
        return "platform is " + " or ".join(platform(p) for p in condition.platform.platforms)
    if kind == "country":
        return "country is " + " or ".join(condition.country.countries)
    if kind == "subscription":
        sub = condition.subscription
        state = "subscribed to" if sub.subscribed else "not subscribed to"
        return f"{state} {CHANNELS.get(sub.channel, '?')} {KINDS.get(sub.kind, '?').lower()}"
    if kind == "smart_segment":
        names = [smart_segment(s) for s in condition.smart_segment.segments]
        names += [smart_flag(f) for f in condition.smart_segment.flags]
        return "smart segment is " + " or ".join(names)
    if kind == "engagement":
        engagement = condition.engagement
        return f"engagement {_OPERATORS.get(engagement.operator, '?')} {engagement.score:g}"
    if kind in ("first_seen", "last_seen"):
        window: filters_pb2.TimeWindow = getattr(condition, kind)
        label = kind.replace("_", " ")
        if window.WhichOneof("window") == "within_last_days":
            return f"{label} within the last {count_of(window.within_last_days, 'day')}"
        return f"{label} between {when(window.range.start_time)} and {when(window.range.end_time)}"
    if kind == "event_count":
        count = condition.event_count
        within = count.within_last_days
        days = f" in the last {count_of(within, 'day')}" if within else ""
        operator = _OPERATORS.get(count.operator, "?")
        return f"{count.event_name} events {operator} {count.count}{days}"
    return "?"


def funnel_step_words(step: funnels_pb2.FunnelStep) -> str:
    """A funnel step as a phrase: its event, and its attribute condition when it has one
    ("purchase where amount is more than 20")."""
    if not step.HasField("attribute_condition"):
        return step.event_name
    test = step.attribute_condition
    if test.operator == filters_pb2.OPERATOR_EXISTS:
        return f"{step.event_name} where {test.attribute_name} exists"
    if test.values:
        value = ", ".join(attribute_value(v) for v in test.values)
    else:
        value = attribute_value(test.value)
    operator = _OPERATORS.get(test.operator, "?")
    case = " (ignoring case)" if test.ignore_case else ""
    return f"{step.event_name} where {test.attribute_name} {operator} {value}{case}"


def enum_options(labels: dict[int, str]) -> list[tuple[int, str]]:
    return sorted(labels.items())


def message_kind(message: Any) -> str:
    return type(message).__name__


def zone_today(zone: str, now: datetime) -> date:
    """Today's date in the IANA `zone` (UTC's when the zone is unknown here)."""
    try:
        return now.astimezone(ZoneInfo(zone)).date() if zone else now.astimezone(UTC).date()
    except (ZoneInfoNotFoundError, ValueError):
        return now.astimezone(UTC).date()


def last_days(days: Sequence[Any], zone: str, now: datetime, count: int) -> list[Any]:
    """The `count` days (GetActivity's DayActivity) ending today in `zone`, the zone the
    service counted them in: not UTC's today, which is another day in much of the world."""
    today = zone_today(zone, now)
    first = (today - timedelta(days=count - 1)).isoformat()
    return [day for day in days if first <= day.date <= today.isoformat()]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def name_control_characters(name: str) -> bool:
    """Whether a name search holds control characters (`%00`), which no name has."""
    return bool(_CONTROL.search(name))


def name_refusal(name: str) -> str:
    """Why a name search was refused, in the Name box's words: what was wrong with it."""
    if name_control_characters(name):
        return "A name search cannot hold control characters (such as %00): type letters."
    if len(name) > NAME_SEARCH_MAX:
        return (
            f"A name search holds at most {NAME_SEARCH_MAX} characters; this one has {len(name):,}."
        )
    return "The service refused this name search: try a shorter word of the name."


def datetime_local(text: str) -> str:
    """A time of the URL ("2026-12-01T10:30:00Z", "+00:00", any offset) as a datetime-local box
    shows it, in UTC ("2026-12-01T10:30"); the text as given when it is no time."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return text
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S" if moment.second else "%Y-%m-%dT%H:%M")


# -- erasure (GDPR) ---------------------------------------------------------------------------

FORM_EXPIRED = "This form expired (you signed in again since): nothing was erased. Try again."
# An erasure whose profile was merged into another since its confirmation page was shown.
ERASURE_MERGED = (
    "This profile was merged into the one shown below since you opened the confirmation:"
    " nothing was erased. Check who this is now before you confirm again."
)
# What a person types to confirm the erasure of a profile without a custom ID.
ERASE_WORD = "delete"
# Why the confirmation asks for the profile ID when the profile has a custom ID.
ERASURE_BY_PROFILE_ID = (
    "Its custom ID holds characters a text box cannot hold (such as a line break), so the"
    " profile ID confirms instead."
)


def typeable(text: str) -> bool:
    """Whether a person can enter `text` in a one-line text box: a browser drops line breaks
    from an <input type=text>, and no keyboard types the other control characters (nor the
    Unicode line and paragraph separators, which show as nothing)."""
    return not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def erasure_word(custom_id: str, profile_id: str = "") -> str:
    """What confirms the erasure of a profile: its custom ID, else the word "delete". A custom
    ID no one can enter (`typeable`) gives way to the profile ID (when given), which names the
    person as surely: the custom ID would make the console's erasure impossible."""
    if custom_id and not typeable(custom_id):
        return profile_id or ERASE_WORD
    return custom_id or ERASE_WORD


def erasure_word_instead(custom_id: str) -> str:
    """What the confirmation says when it does not ask for the profile's custom ID although
    there is one (`erasure_word`), else ""."""
    return ERASURE_BY_PROFILE_ID if custom_id and not typeable(custom_id) else ""


def erasure_confirmed(expected: str, typed: str) -> bool:
    """Whether `typed` confirms the erasure: exactly `expected` (spaces around it ignored; a
    custom ID is case-sensitive, so "User-1" does not erase "user-1")."""
    return bool(expected) and typed.strip() == expected


def erasure_refusal(expected: str, typed: str) -> str:
    """Why the confirmation box did not confirm, in its own words."""
    if not typed.strip():
        return f"Type “{expected}” to confirm: nothing was erased."
    return f"“{shorten(typed.strip())}” is not “{expected}”: nothing was erased."


def byte_size(count: int) -> str:
    """A size in bytes as a person reads it: "64 KiB", "8 MiB"."""
    if count >= 1 << 20 and count % (1 << 20) == 0:
        return f"{count >> 20:,} MiB"
    if count >= 1 << 10:
        return f"{count / 1024:,.0f} KiB"
    return count_of(count, "byte")


FORM_EXPIRED_KEPT = (
    "This form expired (you signed in again since): nothing was changed. Send it again."
)


DELETED = {"segment": "The segment was deleted.", "funnel": "The funnel was deleted."}


@dataclass(frozen=True, slots=True)
class Created:
    """A definition just created, as the segments page announces it."""

    kind: str  # segment or funnel
    ident: str
    name: str
    size: int  # a segment's members; a funnel's profiles at its first step


def created_notice(value: str, segments: Iterable[Any], funnels: Iterable[Any]) -> Created | None:
    """The `created` parameter (`segment:<id>`, `funnel:<id>`) when it names a definition of the
    project; None otherwise (an altered link announces nothing)."""
    kind, _, ident = value.partition(":")
    if kind == "segment":
        for segment in segments:
            if segment.segment_id == ident:
                return Created(kind, ident, segment.display_name, segment.size)
    elif kind == "funnel":
        for funnel in funnels:
            if funnel.funnel_id == ident:
                first = funnel.reached_profile_counts[0] if funnel.reached_profile_counts else 0
                return Created(kind, ident, funnel.display_name, first)
    return None


# -- operator merge -----------------------------------------------------------------------------

# What the merge form's "by" box looks the other profile up by (GetProfile's lookups).
MERGE_LOOKUPS = {
    "auto": "profile ID, custom ID or installation ID",
    "profile_id": "profile ID",
    "custom_id": "custom ID",
    "installation_id": "installation ID",
}
MERGE_EMPTY = "Type the other profile's profile ID, custom ID or installation ID."
MERGE_NO_MATCH = "No profile matches “{}”: nothing to merge. An erased profile matches nothing."
MERGE_SAME = "“{}” is this profile: choose another profile to merge into it."
MERGE_ALREADY = (
    "“{}” was merged into this profile already: they are one profile, there is nothing to merge."
)
MERGE_FORM_EXPIRED = (
    "This form expired (you signed in again since): nothing was merged. Confirm again."
)
MERGE_CONFLICT = (
    "Both profiles are identified, with different custom IDs: nothing was merged. To merge them"
    " anyway, tick “Merge anyway”; “{}” then stays an alias that opens this profile."
)
MERGE_SOURCE_GONE = (
    "The other profile no longer exists (it was erased since you chose it): nothing was merged."
)
MERGE_SOURCE_MOVED = (
    "The other profile was merged into the one shown below since you chose it: nothing was"
    " merged. Check who it is now before you confirm again."
)
MERGE_TARGET_MOVED = (
    "This profile was merged into the one shown here since you opened the confirmation: nothing"
    " was merged. Choose the other profile again."
)
MERGE_RACE = (
    "Another change to one of these profiles happened at the same moment: nothing was merged."
    " Check them below and confirm again."
)
MERGE_REQUEST_REUSED = (
    "This confirmation was already sent with another choice: nothing more was merged. Check the"
    " profiles below and confirm again."
)
MERGE_ALREADY_ONE = "“{}” and this profile were already one profile: nothing changed."


@dataclass(frozen=True, slots=True)
class MergeSide:
    """One of the two profiles a merge's confirmation shows side by side, as text."""

    profile_id: str
    name: str
    custom_id: str
    first_seen: str
    last_seen: str
    events: str
    sessions: str
    crashes: str
    installations: str


def merge_side(profile: profile_pb2.Profile) -> MergeSide:
    summary, counters = profile.summary, profile.counters
    return MergeSide(
        profile_id=summary.profile_id,
        name=display_name(
            summary.first_name, summary.last_name, summary.custom_id, summary.profile_id
        ),
        custom_id=summary.custom_id,
        first_seen=when(summary.first_seen_time),
        last_seen=when(summary.last_seen_time),
        events=count_of(counters.event_count, "event"),
        sessions=count_of(counters.session_count, "session"),
        crashes=count_of(counters.crash_count, "crash", plural="crashes"),
        installations=count_of(len(profile.installations), "installation"),
    )


def merge_custom_ids(source_custom_id: str, target_custom_id: str) -> str:
    """What a merge does with the custom IDs, as MergeProfiles decides it: "none" (the profile
    merged away has none), "inherit" (the survivor has none and takes the other's), "conflict"
    (both are identified: refused unless allowed, then the other's becomes an alias)."""
    if not source_custom_id:
        return "none"
    if not target_custom_id:
        return "inherit"
    return "conflict"


def merge_lookups(text: str, kind: str) -> list[dict[str, str]]:
    """The GetProfile lookups that find the profile to merge from what was typed, in order: a
    profile ID (what looks like one, written with or without dashes, in any case), then a
    custom ID, then an installation ID; or only the kind chosen."""
    text = text.strip()
    if kind in ("custom_id", "installation_id"):
        return [{kind: text}]
    profile_id = _uuid_text(text)
    if kind == "profile_id":
        return [{kind: profile_id or text}]
    tries = [{"custom_id": text}, {"installation_id": text}]
    return ([{"profile_id": profile_id}] if profile_id else []) + tries


def _uuid_text(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return ""


def crash_link(profile_id: str, crash: profile_pb2.Crash) -> str:
    """Where a profile's last crash is in its timeline: the crashes of its UTC day, opened at
    the crash itself (its timeline entry, `event_anchor`). The last crash is the profile's
    latest by event time, so it heads that list. "" without an event ID."""
    moment = ts(crash.crash_time)
    if not crash.event_id or moment is None:
        return ""
    day = moment.astimezone(UTC).date().isoformat()
    query = urlencode({"kind": "crash", "from": day, "to": day})
    return f"/profiles/{profile_id}?{query}#{event_anchor(crash.event_id)}"


def event_anchor(event_id: str) -> str:
    """A timeline entry's fragment: its element id (`timeline-event-<event ID>`, a prefix no
    other id of the page starts with) percent-encoded, as a browser decodes it to find the
    element (an event ID is the client's, any text)."""
    return "timeline-event-" + quote(event_id, safe="")


# -- the segments page: its live table's segment filter, its people, funnel windows -----------


@dataclass(frozen=True, slots=True)
class LiveSegment:
    """The segment the live entries and exits table shows (its `segment` parameter, the users
    table's form: `smart:3`, `flag:1`, `custom:<ID>`), as WatchSegmentChangesRequest's
    segment field and its name."""

    value: str
    label: str
    field: str  # smart_segment, flag or custom_segment_id
    operand: int | str


def live_segment(value: str, segments: Iterable[Any]) -> LiveSegment | None:
    """The live table's segment of `value`, among the smart segments, flags and the project's
    custom segments (`segments`, ListSegments' own); None for one the project does not have."""
    kind, _, rest = value.partition(":")
    if kind in ("smart", "flag") and rest.isdigit():
        labels = SMART_SEGMENTS if kind == "smart" else SMART_FLAGS
        if int(rest) in labels:
            field = "smart_segment" if kind == "smart" else "flag"
            return LiveSegment(value, labels[int(rest)], field, int(rest))
    if kind == "custom":
        for segment in segments:
            if segment.segment_id == rest:
                return LiveSegment(value, segment.display_name, "custom_segment_id", rest)
    return None


# SegmentChangeCause in a word or two, under a live table's change.
CHANGE_CAUSES = {
    1: "by an event",
    2: "by time passing",
    3: "by a merge",
    4: "by a split",
    5: "by an erasure",
    6: "by a recomputation",
    7: "by the segment's definition",
}


def short_profile(profile_id: str) -> str:
    """A profile named by the start of its ID, as the users table and the rejected events
    page show one without a name: "profile 1a2b3c4d"."""
    return f"profile {profile_id[:8]}"


_WINDOW_UNITS = (("day", 86_400_000), ("hour", 3_600_000), ("minute", 60_000))


def conversion_window(value: duration_pb2.Duration) -> str:
    """A funnel's conversion window as a person says it: "within 1 hour", "within 7 days",
    "within 1 hour 30 minutes", "within 2 minutes 1.5 seconds" (kept to the millisecond, as
    the service keeps it)."""
    millis = value.seconds * 1000 + value.nanos // 1_000_000
    parts = []
    for unit, size in _WINDOW_UNITS:
        count, millis = divmod(millis, size)
        if count:
            parts.append(count_of(count, unit))
    if millis:
        seconds_text = f"{millis / 1000:g}"
        parts.append(f"{seconds_text} {'second' if millis == 1000 else 'seconds'}")
    return "within " + (" ".join(parts) if parts else "0 seconds")
