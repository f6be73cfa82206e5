"""Contract messages the Segment and PostHog translators build alike: event IDs, times,
derived sessions, trait operations and installation details. Pure functions, no I/O.

Sessions. Segment and PostHog send no session events, yet engagement and smart segments count
sessions. PostHog's `$session_id`, when the SDK sends one, is the session: the first event of a
(installation, session) pair in a request is preceded by a SessionStart whose event ID is
derived from the pair. Otherwise "a new session after 30 minutes without events" needs the
installation's last event time across requests and replicas, which only ingest has: the events
ask ingest to derive it (SESSION_RULE_INACTIVITY) in the transaction that stores them, with the
client IP for the country of a session they start. See docs/edge.md ("Sessions").
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from services.edge.names import flatten, normalize_name
from services.edge.properties import attribute_value, is_http_url
from services.edge.steps import Identify, Reject, Step, Track, scrub
from shared.contract_limits import (
    MAX_EVENT_BYTES,
    MAX_LIST_ITEMS,
    MAX_OPERATIONS_PER_EVENT,
    MAX_STRING_LENGTH,
    MAX_URL_LENGTH,
)
from shared.contract_rules import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS, NANOS
from shared.convert import timestamp_of

MAX_ID_LENGTH = 64

# Trait names (after normalize_name) that are native profile attributes; every other trait is a
# custom attribute. Shared by Segment's traits and PostHog's $set / $set_once.
NATIVE_TRAITS: dict[str, int] = {
    "email": types_pb2.NATIVE_ATTRIBUTE_EMAIL,
    "phone": types_pb2.NATIVE_ATTRIBUTE_PHONE,
    "phone_number": types_pb2.NATIVE_ATTRIBUTE_PHONE,
    "firstname": types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME,
    "first_name": types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME,
    "lastname": types_pb2.NATIVE_ATTRIBUTE_LAST_NAME,
    "last_name": types_pb2.NATIVE_ATTRIBUTE_LAST_NAME,
    "avatar": types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL,
    "avatar_url": types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL,
    "language": types_pb2.NATIVE_ATTRIBUTE_LANGUAGE,
    "timezone": types_pb2.NATIVE_ATTRIBUTE_TIMEZONE,
    "country": types_pb2.NATIVE_ATTRIBUTE_COUNTRY,
    "address_country": types_pb2.NATIVE_ATTRIBUTE_COUNTRY,
    "region": types_pb2.NATIVE_ATTRIBUTE_REGION,
}


# Native attributes whose value ingest checks against a format (EMAIL_INVALID, PHONE_INVALID...).
CHECKED_NATIVES = frozenset(
    {
        types_pb2.NATIVE_ATTRIBUTE_EMAIL,
        types_pb2.NATIVE_ATTRIBUTE_PHONE,
        types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL,
        types_pb2.NATIVE_ATTRIBUTE_LANGUAGE,
        types_pb2.NATIVE_ATTRIBUTE_TIMEZONE,
        types_pb2.NATIVE_ATTRIBUTE_COUNTRY,
        types_pb2.NATIVE_ATTRIBUTE_REGION,
    }
)
# Formatting people put in phone numbers; the contract takes E.164 ("+33612345678").
_PHONE_FORMATTING = re.compile(r"[\s().\-/]")


def derived_id(prefix: str, *parts: object) -> str:
    """A deterministic ID of at most 64 characters: the same parts give the same ID, so a
    retried request carries the same event and request IDs."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:40]
    return f"{prefix}:{digest}"


def message_id(value: object, prefix: str, message: Mapping[str, Any]) -> str:
    """The SDK's message ID as the event ID when usable; a digest of the message otherwise."""
    if isinstance(value, str | int) and 1 <= len(str(value)) <= MAX_ID_LENGTH:
        return str(value)
    return derived_id(prefix, json.dumps(message, sort_keys=True, default=str))


def identifier(value: object) -> str:
    """An SDK identifier as text ("" when missing); SDKs send numbers for user IDs too.

    A whole float is its integer's digits (a JavaScript SDK's 42 may arrive as 42.0); another
    finite float keeps its decimals, so that 1.5 and 1 stay two IDs; NaN and the infinities
    (which Python's json reads, and 1e400 becomes) are no identifier at all."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int | str):
        return str(value).strip()
    return ""


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 time (with Z or an offset; naive is UTC) or epoch milliseconds, or None
    (also for a time whose UTC moment is outside years 1 to 9999, such as
    "9999-12-31T23:59:59-14:00": no Timestamp holds it)."""
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if not parsed.tzinfo:
            return parsed.replace(tzinfo=UTC)
        try:
            parsed.astimezone(UTC)
        except OverflowError:
            return None
        return parsed
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1000, UTC)
        except (OverflowError, ValueError, OSError):
            return None
    return None


@dataclass(frozen=True, slots=True)
class Origin:
    """Who a message comes from, its platform and its times."""

    installation_id: str
    custom_id: str
    platform: int
    event_time: datetime
    send_time: datetime | None
    event_stamp: Timestamp = field(init=False, repr=False, compare=False)
    send_stamp: Timestamp | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once per message, copied into each of its events.
        object.__setattr__(self, "event_stamp", timestamp_of(self.event_time))
        send = None if self.send_time is None else timestamp_of(self.send_time)
        object.__setattr__(self, "send_stamp", send)


@dataclass(frozen=True, slots=True)
class Session:
    """The session an event names: an explicit ID, or none and a rule ingest derives it by
    (SESSION_RULE_INACTIVITY, with the client IP for the country of a session it starts)."""

    session_id: str = ""
    rule: int = ingest_pb.SESSION_RULE_UNSPECIFIED
    client_ip: str = ""


NO_SESSION = Session()


def derived_session(origin: Origin, client_ip: str) -> Session:
    """The session of an installation's event that names none: ingest's 30-minute inactivity
    rule. Server-side events (no installation) have no session."""
    if not origin.installation_id:
        return NO_SESSION
    return Session(rule=ingest_pb.SESSION_RULE_INACTIVITY, client_ip=client_ip)


def event(event_id: str, origin: Origin, session: Session = NO_SESSION) -> ingest_pb.Event:
    """An event without payload: the installation wins as origin when both are known (the
    login the message implies was done before)."""
    built = ingest_pb.Event(
        event_id=event_id,
        platform=origin.platform,  # type: ignore[arg-type]
        session_id=session.session_id,
        session_rule=session.rule,  # type: ignore[arg-type]
        session_client_ip=session.client_ip,
    )
    if origin.installation_id:
        built.installation_id = origin.installation_id
    elif origin.custom_id:
        built.custom_id = origin.custom_id
    built.event_time.CopyFrom(origin.event_stamp)
    if origin.send_stamp is not None:
        built.send_time.CopyFrom(origin.send_stamp)
    return built


def custom_event(
    event_id: str,
    origin: Origin,
    session: Session,
    name: str,
    attributes: Mapping[str, types_pb2.AttributeValue],
    label: str = "",
) -> ingest_pb.Event:
    """A custom event `name` with its attributes and label (cut to the contract's 200
    characters)."""
    built = event(event_id, origin, session)
    built.custom.name = name
    if label:
        built.custom.label = label[:200]
    for key, value in attributes.items():
        built.custom.attributes[key].CopyFrom(value)
    return built


# The trait names of first and last names: a `name` trait beside one of them is left as is.
_NAME_PART_TRAITS = frozenset({"firstname", "first_name", "lastname", "last_name"})

# Segment's reserved traits that are objects, with the fields its spec gives them. An object
# trait becomes flattened attributes (`company_name`); a null for it must unset them, and the
# edge keeps no state to know which were sent: for these two it knows the shape. Other fields
# (`company.size`) and other object traits stay (docs/edge.md, "Limits"). `address.country` is
# the native country, which other traits set too: a null address leaves it.
NESTED_TRAIT_FIELDS: dict[str, tuple[str, ...]] = {
    "address": ("city", "postalCode", "state", "street"),
    "company": ("name", "id", "industry", "employee_count", "plan"),
}


def _nested_unsets(key: str, kind: int) -> list[types_pb2.AttributeOperation]:
    if kind == types_pb2.ATTRIBUTE_OPERATION_KIND_SET_ONCE:
        return []
    unsets = []
    for part in NESTED_TRAIT_FIELDS[key]:
        name = normalize_name(f"{key}_{part}")
        if name is not None and name not in NATIVE_TRAITS:
            unsets.append(
                types_pb2.AttributeOperation(
                    kind=types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET, custom_attribute=name
                )
            )
    return unsets


def trait_operations(
    traits: Mapping[str, Any], kind: int = types_pb2.ATTRIBUTE_OPERATION_KIND_SET
) -> tuple[list[types_pb2.AttributeOperation], list[str]]:
    """One operation per trait (flattened, names normalized), native where the name is native,
    custom otherwise; nulls unset (and are skipped in a set-once). `name`, a full name (Segment's
    spec), sets the first and last names (full_name_operations) unless the traits hold a first
    or last name. A null `address` or `company` also unsets the fields Segment's spec gives
    them (NESTED_TRAIT_FIELDS). Also the trait names nothing usable was left of."""
    operations: list[types_pb2.AttributeOperation] = []
    unusable: list[str] = []
    # A full name fills the first and last names unless they come themselves.
    split_name = not {normalize_name(str(key)) for key in traits} & _NAME_PART_TRAITS
    for key, value in flatten(traits):
        if key.startswith("$"):
            continue
        name = normalize_name(key)
        if name is None:
            unusable.append(key)
            continue
        if name == "name" and key in traits and split_name:
            operations.extend(full_name_operations(value, kind))
            continue
        if value is None and key in NESTED_TRAIT_FIELDS:
            operations.extend(_nested_unsets(key, kind))
        operation = types_pb2.AttributeOperation(kind=kind)  # type: ignore[arg-type]
        native = NATIVE_TRAITS.get(name)
        if native is not None:
            operation.native_attribute = native  # type: ignore[assignment]
        else:
            operation.custom_attribute = name
        if value is None:
            if kind == types_pb2.ATTRIBUTE_OPERATION_KIND_SET_ONCE:
                # A set-once of nothing sets nothing (posthog-js sends its campaign keys as
                # nulls in $set_once on every identify): as an unset it erased their values.
                continue
            operation.kind = types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET
        elif native is not None:
            text = str(value)
            if native == types_pb2.NATIVE_ATTRIBUTE_PHONE:
                text = phone_text(text)
            if native == types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL:
                operation.value.url_value = text
            else:
                operation.value.string_value = text
        else:
            converted = attribute_value(value)
            if converted is None:
                continue
            operation.value.CopyFrom(converted)
        operations.append(operation)
    return operations, unusable


def full_name_operations(
    value: object, kind: int = types_pb2.ATTRIBUTE_OPERATION_KIND_SET
) -> list[types_pb2.AttributeOperation]:
    """A full name ("Ada Lovelace": Countly's `name` user detail, Segment's reserved `name`
    trait, PostHog's `name` person property) as the contract's first and last names: the first
    word is the first name, the rest (if any) the last name, unset when there is none. An empty
    or null name unsets both. In a set-once (`kind`), the names are set once and nothing is
    unset."""
    first_name = types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME
    last_name = types_pb2.NATIVE_ATTRIBUTE_LAST_NAME
    unset = types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET
    set_once = kind == types_pb2.ATTRIBUTE_OPERATION_KIND_SET_ONCE
    if value is None or (isinstance(value, str) and not value.strip()):
        if set_once:
            return []
        return [
            types_pb2.AttributeOperation(kind=unset, native_attribute=first_name),
            types_pb2.AttributeOperation(kind=unset, native_attribute=last_name),
        ]
    first, _, last = str(value).strip().partition(" ")
    operations = []
    for native, part in ((first_name, first), (last_name, last.strip())):
        if part:
            operations.append(
                types_pb2.AttributeOperation(
                    kind=kind,  # type: ignore[arg-type]
                    native_attribute=native,
                    value=types_pb2.AttributeValue(string_value=part),
                )
            )
        elif not set_once:
            operations.append(types_pb2.AttributeOperation(kind=unset, native_attribute=native))
    return operations


def phone_text(text: str) -> str:
    """A phone number as people write it, towards the contract's E.164: spaces, brackets,
    dots, dashes and slashes dropped, a leading international 00 made "+" ("+1 (555)
    123-4567" -> "+15551234567"). A number without its country code stays invalid."""
    digits = _PHONE_FORMATTING.sub("", text.strip())
    return "+" + digits[2:] if digits.startswith("00") else digits


def refused_value(operation: types_pb2.AttributeOperation) -> bool:
    """Whether ingest refuses the operation's value whatever the event holds (VALUE_INVALID,
    docs/ingest.md's table): a string over 300 characters or holding U+0000 (a first or last
    name also empty), a list over 25 items or with such an item, a URL over 2,048 characters or
    without a scheme and host (the edge makes http(s) URLs only: another is taken as refused),
    a number that is not finite, a time no Timestamp holds, no value at all. An unset has none
    to refuse."""
    if operation.kind == types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET:
        return False
    value = operation.value
    which = value.WhichOneof("value")
    if which == "string_value":
        minimum = 1 if operation.WhichOneof("attribute") == "native_attribute" else 0
        return not _storable_text(value.string_value, minimum)
    if which == "string_list_value":
        items = value.string_list_value.values
        return len(items) > MAX_LIST_ITEMS or not all(_storable_text(i) for i in items)
    if which == "url_value":
        url = value.url_value
        return len(url) > MAX_URL_LENGTH or not is_http_url(url)
    if which == "number_value":
        return not math.isfinite(value.number_value)
    if which == "timestamp_value":
        stamp = value.timestamp_value
        seconds_in_range = MIN_TIMESTAMP_SECONDS <= stamp.seconds <= MAX_TIMESTAMP_SECONDS
        return not (seconds_in_range and 0 <= stamp.nanos < NANOS)
    return which != "bool_value"


def _storable_text(text: str, minimum: int = 0) -> bool:
    return minimum <= len(text) <= MAX_STRING_LENGTH and "\x00" not in text


def _travels_alone(operation: types_pb2.AttributeOperation) -> bool:
    """Whether an operation goes in an event of its own: a value ingest refuses (refused_value),
    or one it checks against a format the edge does not know (an email, a phone number...)."""
    if refused_value(operation):
        return True
    return (
        operation.native_attribute in CHECKED_NATIVES
        and operation.kind != types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET
    )


def attribute_events(
    event_id: str, origin: Origin, operations: list[types_pb2.AttributeOperation]
) -> list[ingest_pb.Event]:
    """Attribute operations as events. Each operation ingest may refuse for its value travels
    in an event of its own (_travels_alone: a string over the contract's 300 characters, a bad
    email...), so that one bad trait is rejected and listed alone, with ingest's reason, instead
    of taking the identify's other traits with it. The rest share events within the contract's
    limits per event (20 operations, 32 KiB serialized), in their order. The first event has ID
    `event_id`, the others IDs derived from it and their place: the same operations make the
    same events, so a retried request stores nothing twice."""
    shared: list[types_pb2.AttributeOperation] = []
    alone: list[types_pb2.AttributeOperation] = []
    for operation in operations:
        (alone if _travels_alone(operation) else shared).append(operation)
    built: list[ingest_pb.Event] = []

    def start() -> ingest_pb.Event:
        index = len(built)
        one = event(event_id if index == 0 else derived_id("attrs", event_id, index), origin)
        built.append(one)
        return one

    current: ingest_pb.Event | None = None
    for operation in shared:
        if current is None or len(current.attribute_operations.operations) >= (
            MAX_OPERATIONS_PER_EVENT
        ):
            current = start()
        held = current.attribute_operations.operations
        held.append(operation)
        if len(held) > 1 and current.ByteSize() > MAX_EVENT_BYTES:
            # Valid values too large together (lists of 25 long strings): the next event.
            del held[-1]
            current = start()
            current.attribute_operations.operations.append(operation)
    for operation in alone:
        start().attribute_operations.operations.append(operation)
    return built


@dataclass(frozen=True, slots=True)
class Details:
    """Installation details from an SDK's context ($os_version, context.app.version...)."""

    app_version: str = ""
    os_version: str = ""
    device_model: str = ""
    push_token: str = ""
    language: str = ""
    timezone: str = ""

    def updates(self) -> list[ingest_pb.InstallationUpdate]:
        """The installation updates these details make: app version, OS version and device
        model together (cut to the contract's lengths); the push token, the language and the
        time zone each in an update of its own, because ingest checks each alone (a token over
        4,096 characters, LANGUAGE_INVALID, TIMEZONE_INVALID: Android's "GMT+05:30") and one it
        refuses must not cost the others, as for Countly's language."""
        common = ingest_pb.InstallationUpdate()
        if self.app_version:
            common.app_version = self.app_version[:64]
        if self.os_version:
            common.os_version = self.os_version[:64]
        if self.device_model:
            common.device_model = self.device_model[:128]
        updates = [common] if common.ListFields() else []
        if self.push_token:
            # A token the SDK reports is a device registered for push: opted in, as Countly's
            # token_session and PostHog's push subscription say (Segment's spec has no opt-in
            # of its own; without it no Segment user was ever reachable by push).
            updates.append(
                ingest_pb.InstallationUpdate(push_token=self.push_token, push_opt_in=True)
            )
        if self.language:
            updates.append(ingest_pb.InstallationUpdate(language=self.language))
        if self.timezone:
            updates.append(ingest_pb.InstallationUpdate(timezone=self.timezone))
        return updates


def details_event_id(installation_id: str, update: ingest_pb.InstallationUpdate, day: str) -> str:
    """The event ID of an installation update the edge makes from the details an SDK repeats
    (Segment's and PostHog's context, Countly's metrics), derived from the installation, what
    the update says and the UTC day: the same details sent all day are stored once a day (ingest
    answers the others DUPLICATE), not once a request. A push token (opted in as reported:
    Details.updates) is stored once per installation and token, whatever the day: the SDK
    repeats it on every message, and a later day's repeat must not undo an opt-out recorded
    since."""
    content = update.SerializeToString(deterministic=True).hex()
    return derived_id("details", installation_id, content, "" if update.push_token else day)


# The ISO 639 codes Java's Locale gave before JDK 17 for Hebrew, Indonesian and Yiddish, which
# Android SDKs building the locale from Locale.getLanguage() (analytics-kotlin) still send.
LEGACY_LANGUAGE_CODES = {"iw": "he", "in": "id", "ji": "yi"}


def language_of(locale: object) -> str:
    """The ISO 639-1 part of a locale ("en-US" -> "en", "iw-IL" -> "he"), or ""."""
    if not isinstance(locale, str):
        return ""
    code = locale.replace("_", "-").split("-")[0].strip().lower()
    if len(code) != 2 or not code.isalpha():
        return ""
    return LEGACY_LANGUAGE_CODES.get(code, code)


def ip_of(value: object) -> str:
    """An IP address an SDK reports for its user (Segment's `context.ip`, PostHog's `$ip`,
    Countly's `ip_address`), normalized; "" when it is none, and the connection's address is
    used: the address only serves the session's country, and ingest refuses an event whose
    session IP is not one."""
    try:
        return str(ipaddress.ip_address(str(value).strip())) if value else ""
    except ValueError:
        return ""


def text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


@dataclass(slots=True)
class StepBuilder:
    """Collects a request's steps in order: events are appended to the current Track step;
    an Identify or Reject closes it. Starts each derived session once per request, updates each
    installation's details once per request, and logs an installation in with a custom ID unless
    its latest login in the request already did."""

    dialect: str
    steps: list[Step] = field(default_factory=list)
    _events: list[ingest_pb.Event] = field(default_factory=list)
    _sessions: set[tuple[str, str]] = field(default_factory=set)
    _details: set[tuple[str, Details]] = field(default_factory=set)
    # Each installation's custom ID as of its latest login in the request.
    _identified: dict[str, str] = field(default_factory=dict)
    # Logins not placed yet, and the installations and custom IDs they and the current events
    # name: a login waits in front of the current events unless they share one.
    _logins: list[Identify] = field(default_factory=list)
    _login_keys: set[str] = field(default_factory=set)
    _origins: set[str] = field(default_factory=set)
    # What the translator raised on messages it rejected instead (backstop.py).
    failures: list[Exception] = field(default_factory=list)

    def add(self, *events: ingest_pb.Event) -> None:
        for one in events:
            self._origins.add(one.installation_id or one.custom_id)
        self._events.extend(events)

    def _flush(self) -> None:
        self.steps.extend(self._logins)
        self._logins, self._login_keys = [], set()
        if self._events:
            self.steps.append(Track(events=self._events))
            self._events, self._origins = [], set()

    def identify(
        self,
        installation_id: str,
        custom_id: str,
        request_id: str,
        then: Sequence[ingest_pb.Event] = (),
    ) -> None:
        """Logs the installation in, unless its latest login in the request was with the same
        custom ID (an SDK's identified events each say who is logged in; a browser that switched
        from A to B and back to A in one request is logged in three times). Events of that
        installation (or custom ID) added before it are stored before the login; events of
        others may be stored after it, so the logins of a batch of many users go out together,
        before its events, and the client layer runs them concurrently (a login per user would
        otherwise wait for the one before). `then`: events sent only if the login succeeds
        (Identify.then)."""
        if self._identified.get(installation_id) == custom_id:
            return
        self._identified[installation_id] = custom_id
        keys = (installation_id, custom_id)
        if any(k in self._origins or k in self._login_keys for k in keys):
            self._flush()
        self._logins.append(Identify(installation_id, custom_id, request_id, then))
        self._login_keys.update(keys)

    def reject(self, reject: Reject) -> None:
        # Rejections travel in the same TrackEvents call as the events around them.
        self._flush()
        self.steps.append(reject)

    def session(self, origin: Origin, session_id: str, client_ip: str) -> Session:
        """The SDK's session for an event of `origin`, after adding its SessionStart the first
        time the request names it. Server-side events (no installation) have no session."""
        if not origin.installation_id:
            return NO_SESSION
        key = (origin.installation_id, session_id)
        session = Session(session_id)
        if key not in self._sessions:
            self._sessions.add(key)
            start = event(derived_id("session", *key), origin, session)
            start.session_start.SetInParent()
            if client_ip:
                start.session_start.client_ip = client_ip
            self.add(start)
        return session

    def details(self, origin: Origin, details: Details) -> None:
        """The installation updates of the details, when they differ from those already sent
        in this request (see Details.updates and details_event_id)."""
        if not origin.installation_id or (origin.installation_id, details) in self._details:
            return
        self._details.add((origin.installation_id, details))
        day = origin.event_time.date().isoformat()
        for update in details.updates():
            one = event(details_event_id(origin.installation_id, update, day), origin)
            one.installation_update.CopyFrom(update)
            self.add(one)

    def finish(self) -> list[Step]:
        self._flush()
        return self.steps


def rejection(
    reason: str,
    explanation: str,
    message: Mapping[str, Any],
    event_id: str = "",
    installation_id: str = "",
    custom_id: str = "",
) -> Reject:
    return Reject(
        reason=reason,
        explanation=explanation,
        message=scrub(message),
        event_id=event_id,
        installation_id=installation_id,
        custom_id=custom_id,
    )


def summary(message: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The few top-level fields of an oversized message worth keeping in its rejection."""
    return {k: message[k] for k in keys if k in message and not isinstance(message[k], dict)}
