"""Ingest's pure rules: reason codes, value formats, limits, and the origin of an event.

No I/O and no grpc here, so every rule is a unit test. One rule lives in SQL instead: the
replay of attribute operations in event-time order (profiles_ingest_fold_attribute in
0010_attribute_replay.sql), because identity's merge must apply it in its own transaction;
ingest adds operations to the log and calls it, and tests/api/test_attribute_replay.py checks
it against a plain-Python replay.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from shared import contract_rules
from shared.contract_limits import MAX_CUSTOM_ID_LENGTH, MAX_EMAIL_LENGTH, MAX_URL_LENGTH
from shared.time_zones import is_time_zone

# Rejection reasons: stable codes listed on IngestService in the contract.
EVENT_ID_INVALID = "EVENT_ID_INVALID"
ORIGIN_MISSING = "ORIGIN_MISSING"
INSTALLATION_ID_INVALID = "INSTALLATION_ID_INVALID"
CUSTOM_ID_INVALID = "CUSTOM_ID_INVALID"
ERASED = "ERASED"
PLATFORM_MISSING = "PLATFORM_MISSING"
EVENT_TIME_MISSING = "EVENT_TIME_MISSING"
# A Timestamp outside its documented range (years 1 to 9999, nanos 0 to 999,999,999): the code
# every other request gets for one from the contract's interceptor.
TIMESTAMP_INVALID = contract_rules.TIMESTAMP_INVALID
EVENT_TIME_IN_FUTURE = "EVENT_TIME_IN_FUTURE"
EVENT_TIME_TOO_OLD = "EVENT_TIME_TOO_OLD"
PAYLOAD_MISSING = "PAYLOAD_MISSING"
SESSION_ID_INVALID = "SESSION_ID_INVALID"
NAME_INVALID = "NAME_INVALID"
LABEL_INVALID = "LABEL_INVALID"
ATTRIBUTE_NAME_INVALID = "ATTRIBUTE_NAME_INVALID"
TOO_MANY_ATTRIBUTES = "TOO_MANY_ATTRIBUTES"
VALUE_INVALID = "VALUE_INVALID"
OPERATION_INVALID = "OPERATION_INVALID"
EMAIL_INVALID = "EMAIL_INVALID"
PHONE_INVALID = "PHONE_INVALID"
LANGUAGE_INVALID = "LANGUAGE_INVALID"
REGION_INVALID = "REGION_INVALID"
COUNTRY_INVALID = "COUNTRY_INVALID"
TIMEZONE_INVALID = "TIMEZONE_INVALID"
PROFILE_ATTRIBUTE_LIMIT = "PROFILE_ATTRIBUTE_LIMIT"
DURATION_INVALID = "DURATION_INVALID"
SUBSCRIPTION_INVALID = "SUBSCRIPTION_INVALID"
EVENT_TOO_LARGE = "EVENT_TOO_LARGE"
# An edge gateway's UntranslatedMessage whose own reason is not a well-formed code.
UNTRANSLATED = "UNTRANSLATED"
# ImportTokens rejection reasons (TokenResult.reason).
PLATFORM_INVALID = "PLATFORM_INVALID"
PUSH_TOKEN_INVALID = "PUSH_TOKEN_INVALID"

# The oldest event time accepted at all, also by ImportEvents.
OLDEST_EVENT_TIME = datetime(1900, 1, 1, tzinfo=UTC)

NAME_PATTERN = re.compile(r"[a-zA-Z0-9_]{1,30}")
PHONE_PATTERN = re.compile(r"\+[1-9][0-9]{1,14}")
# An RFC 5322 addr-spec without comments or quoted local parts: what mail providers accept.
EMAIL_PATTERN = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)


def _codes(text: str) -> frozenset[str]:
    return frozenset(text.split())


LANGUAGES = _codes(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv"
    " cy da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr"
    " ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw"
    " ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv"
    " ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr"
    " ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi"
    " yo za zh zu"
)
# ISO 3166-1 alpha-2, as the tz database's iso3166.tab lists them.
COUNTRIES = _codes(
    "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ"
    " BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM"
    " DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS"
    " GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN"
    " KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ"
    " MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM"
    " PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV"
    " SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI"
    " VN VU WF WS YE YT ZA ZM ZW"
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one event was refused: a stable reason, the field path within the event, a message."""

    reason: str
    field_path: str
    message: str


class Invalid(Exception):
    """Raised by checks deep inside an event; the validator turns it into a Rejection."""

    def __init__(self, reason: str, field_path: str, message: str) -> None:
        super().__init__(message)
        self.rejection = Rejection(reason, field_path, message)


def has_nul(text: str) -> bool:
    # PostgreSQL text and jsonb cannot hold U+0000: refuse it up front rather than fail a batch.
    return "\x00" in text


def is_name(text: str) -> bool:
    return NAME_PATTERN.fullmatch(text) is not None


def custom_id_problem(custom_id: str) -> str | None:
    """Why `custom_id` cannot name a profile as far as ingest checks it (empty, too long, a NUL
    character), or None. Junk values ("null", "undefined", a project's own list) and padding are
    identity's rule: ResolveProfiles refuses them per key (CUSTOM_ID_INVALID), and ingest
    rejects the event with identity's answer, so the rule lives in one place."""
    if not custom_id:
        return "custom_id is empty"
    if len(custom_id) > MAX_CUSTOM_ID_LENGTH:
        return f"custom_id is over {MAX_CUSTOM_ID_LENGTH} characters"
    if has_nul(custom_id):
        return "custom_id contains a NUL character"
    return None


def is_url(text: str) -> bool:
    """An absolute URL with a scheme and a host, at most 2048 characters."""
    if len(text) > MAX_URL_LENGTH or has_nul(text) or any(c.isspace() for c in text):
        return False
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return bool(parts.scheme) and bool(parts.hostname)


def is_http_url(text: str) -> bool:
    return is_url(text) and urlsplit(text).scheme.lower() in ("http", "https")


def is_email(text: str) -> bool:
    return len(text) <= MAX_EMAIL_LENGTH and EMAIL_PATTERN.fullmatch(text) is not None


def is_phone(text: str) -> bool:
    return PHONE_PATTERN.fullmatch(text) is not None


def is_language(text: str) -> bool:
    return text.lower() in LANGUAGES


def is_country(text: str) -> bool:
    return text.upper() in COUNTRIES


def is_timezone(text: str) -> bool:
    return is_time_zone(text)


def is_finite(number: float) -> bool:
    return math.isfinite(number)


# ---------------------------------------------------------------------------------------------
# Values and operations


ValueType = Literal["string", "number", "bool", "timestamp", "url", "string_list"]


@dataclass(frozen=True, slots=True)
class Value:
    """A typed attribute value; timestamps are ISO 8601 strings in UTC."""

    type: ValueType
    value: Any

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "value": self.value}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Value:
        return cls(data["type"], data["value"])


OperationKind = Literal["set", "set_once", "unset", "increment", "append", "remove"]


@dataclass(frozen=True, slots=True)
class AttributeOperation:
    """One validated operation on a native (typed) or custom attribute; name is lower-case."""

    kind: OperationKind
    native: bool
    name: str
    value: Value | None = None


def event_origin(installation_id: str | None, custom_id: str | None) -> str:
    """An event's origin in the replay order of attribute operations and consent changes:
    events of one time sort by event ID, then by this ('c:' custom ID, 'i:' installation ID;
    an event is unique per origin and event ID), then by their own order of operations. The
    order itself is the database's (0010_attribute_replay.sql), the one place that folds."""
    if custom_id is not None:
        return "c:" + custom_id
    assert installation_id is not None
    return "i:" + installation_id


@dataclass(frozen=True, slots=True)
class HeldAttribute:
    """A custom attribute as the limit judges it: whether the profile holds it (an unset leaves
    a tombstone: not held) and the event time of its latest change."""

    held: bool
    change_time: datetime


def custom_attributes_after(
    attributes: Mapping[str, HeldAttribute],
    operations: Iterable[AttributeOperation],
    event_time: datetime,
) -> dict[str, HeldAttribute]:
    """The custom attributes of a profile (`attributes`) once an arriving event's `operations`
    (at `event_time`) apply. Each operation decides whether its name is held only when it is at
    least as late as the name's latest change: an unset frees it, any other operation takes it;
    an older one leaves it to the later change, as the replay does. This is admission, judged on
    arrival against the limit of 50 (an event refused is never stored, so the replay never sees
    it); the state itself is the replay's. (A later change that did not apply, a set-once on a
    held value, is not seen here: its name is judged by the one before it.)"""
    after = dict(attributes)
    for op in operations:
        if op.native:
            continue
        latest = after.get(op.name)
        if latest is None or event_time >= latest.change_time:
            after[op.name] = HeldAttribute(op.kind != "unset", event_time)
    return after


def held_names(attributes: Mapping[str, HeldAttribute]) -> set[str]:
    return {name for name, attribute in attributes.items() if attribute.held}


# ---------------------------------------------------------------------------------------------
# Subscriptions


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """An opt-in or opt-out for one channel (email, sms, push) and kind (marketing, ...)."""

    channel: str
    kind: str
    subscribed: bool


# ---------------------------------------------------------------------------------------------
# Installations: each field keeps the value of its latest change by event time, so a late update
# does not overwrite a newer one; first and last seen widen to every event's time. Applied to a
# whole batch in SQL (profiles_ingest_apply_batch_state, profiles_ingest_field_wins; 0027).


# ---------------------------------------------------------------------------------------------
# Sessions

# A session with no end is closed this long after its last activity (start, heartbeat or any
# event naming it), with the duration seen so far.
SESSION_TIMEOUT = timedelta(minutes=30)

# What one batch does to its sessions is applied in SQL (profiles_ingest_apply_batch_state):
# the span of event times widens, counts add up, the latest end by event time sets end time
# and duration, and until then duration is the longest seen (a heartbeat's, or last activity
# minus start).


# ---------------------------------------------------------------------------------------------
# Imported push tokens


def imported_installation_id(platform_name: str, push_token: str) -> str:
    """The installation ID ImportTokens gives a token: stable (a re-run finds it again), never a
    valid SDK installation ID by accident, and without the token itself (a hash prefix)."""
    digest = hashlib.sha256(push_token.encode()).hexdigest()[:32]
    return f"imported:{platform_name}:{digest}"
