"""Countly's write API (`/i`, `/i/bulk`) to contract steps: a pure translator, no I/O.

A Countly SDK sends one request per queued action, each holding `app_key`, `device_id`,
`timestamp` (milliseconds, unique per request and device), `tz`, `sdk_name`, and one or more of:
`begin_session` with `metrics`, `session_duration`, `end_session`, `events`, `user_details`,
`crash`, `token_session` with `ios_token`/`android_token`, `old_device_id`. Parameters arrive as
a query string, a form or a JSON object; structured ones (`metrics`, `events`, `user_details`,
`crash`, bulk `requests`) as JSON text or as objects. The handler merges them into one mapping
and calls `translate` (or `translate_bulk`); docs/edge.md has the mapping table.

Countly events carry no ID, so every event gets one derived from the request (`event_id`): the
same request retried (Countly SDKs resend the very same parameters until answered) gives the
same IDs, and ingest stores it once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from services.edge import json_text
from services.edge.backstop import backstop
from services.edge.build import (
    derived_id,
    details_event_id,
    full_name_operations,
    identifier,
    ip_of,
    language_of,
    phone_text,
    rejection,
)
from services.edge.names import flatten, normalize_name
from services.edge.platforms import API, platform_of
from services.edge.properties import attribute_value, custom_attributes
from services.edge.steps import (
    SECRET_KEYS,
    Identify,
    Logout,
    Reject,
    RequestInvalid,
    Step,
    Track,
    Translation,
    scrub,
)
from shared.contract_limits import MAX_STRING_LENGTH
from shared.convert import set_timestamp

DIALECT = "countly"

_Platform: TypeAlias = types_pb2.Platform.ValueType
_Native: TypeAlias = types_pb2.NativeAttribute.ValueType
_Kind: TypeAlias = types_pb2.AttributeOperationKind.ValueType

# What Countly's server answers for these requests (400 with {"result": ...}); a Countly SDK
# logs it. They can never succeed, so nothing is stored.
MISSING_KEY_OR_DEVICE = 'Missing parameter "app_key" or "device_id"'
MISSING_REQUESTS = 'Missing parameter "requests"'
ZERO_DEVICE_ID = "Ignoring device_id"

# iOS reports this advertising ID when the user opted out of tracking; Countly ignores it, as
# every such device would otherwise be one installation.
ZERO_IDFA = "00000000-0000-0000-0000-000000000000"

# Rejection reasons of the messages this dialect cannot translate (UntranslatedMessage).
PARAMETER_INVALID = "PARAMETER_INVALID"
NAME_UNUSABLE = "NAME_UNUSABLE"
PROPERTY_NAME_UNUSABLE = "PROPERTY_NAME_UNUSABLE"
OPERATION_UNSUPPORTED = "OPERATION_UNSUPPORTED"
VALUE_INVALID = "VALUE_INVALID"
DEVICE_ID_MISSING = "DEVICE_ID_MISSING"
APP_KEY_MISMATCH = "APP_KEY_MISMATCH"

# Countly's own parameters that hold a credential, an address or a push token: removed from a
# message kept as a rejected event, on top of steps.SECRET_KEYS.
_COUNTLY_SECRETS = frozenset(
    {"ip_address", "ios_token", "android_token", "huawei_token", "checksum", "checksum256"}
)
_SECRETS = SECRET_KEYS | _COUNTLY_SECRETS

# Countly SDK names (`sdk_name`) by the platform they name. An SDK's name is sent on every
# request, its OS only with `metrics`, so the name decides first and every request of one app
# gets the same platform (the Web SDK in an Android browser stays WEB).
_SDK_NAME_PLATFORMS: tuple[tuple[str, _Platform], ...] = (
    ("web", types_pb2.PLATFORM_WEB),
    ("ios", types_pb2.PLATFORM_IOS),
    ("android", types_pb2.PLATFORM_ANDROID),
)
_SDK_NAME_PARTS = re.compile(r"[^a-z0-9]+")

# Countly's predefined user details: native contract attributes where the contract has one.
# `name` is a full name: see build.full_name_operations.
_NATIVE_DETAILS: dict[str, _Native] = {
    "email": types_pb2.NATIVE_ATTRIBUTE_EMAIL,
    "phone": types_pb2.NATIVE_ATTRIBUTE_PHONE,
    "picture": types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL,
}
# ... and the custom attributes the others become (named as in Countly).
_CUSTOM_DETAILS = ("username", "organization", "gender", "byear")

# Countly's custom property modifiers and the contract operations they become. `$addToSet` is a
# removal followed by an append in one event (applied in order), so the value is there once.
_SET = types_pb2.ATTRIBUTE_OPERATION_KIND_SET
_SET_ONCE = types_pb2.ATTRIBUTE_OPERATION_KIND_SET_ONCE
_UNSET = types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET
_INCREMENT = types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT
_APPEND = types_pb2.ATTRIBUTE_OPERATION_KIND_APPEND
_REMOVE = types_pb2.ATTRIBUTE_OPERATION_KIND_REMOVE
_LIST_MODIFIERS: dict[str, tuple[_Kind, ...]] = {
    "$push": (_APPEND,),
    "$addToSet": (_REMOVE, _APPEND),
    "$pull": (_REMOVE,),
}
# Modifiers the contract has no operation for: each refused per property, never approximated
# (a multiply or a max applied as a set would store a wrong number).
_UNSUPPORTED_MODIFIERS = {
    "$mul": "the contract has no multiply operation",
    "$min": "the contract has no minimum operation",
    "$max": "the contract has no maximum operation",
}

# Countly's views: the SDKs send a `[CLY]_view` event when a view starts (segmentation
# `visit: 1`, with `name`, and `start`, `view`, `segment`... as each SDK has them) and another,
# under the same event `id`, when it ends: `dur` (seconds on the view), `name`, no `visit`.
# Countly's server counts only the `visit` ones as views (its drill stores those alone) and adds
# the end's duration to the view. Contract events are immutable, so the end is an event of its
# own, `cly_view_end` (name and duration kept, one per view), and `cly_view` is the view itself:
# a timeline shows the view once with how long it lasted after it, and a funnel or a count on
# `cly_view` counts views, not views twice. Any `[CLY]_view` without a (truthy) `visit` is an
# end, as it is no view to Countly.
VIEW_KEY = "[CLY]_view"
VIEW_END_NAME = "cly_view_end"

# The SDKs' internal events that are no user activity, read and not stored (they would count as
# custom events): `[CLY]_orientation` (countly-sdk-web, the mobile SDKs: the screen's
# orientation, sent on every page load before the session), `[CLY]_action` (countly-sdk-web's
# click and scroll heatmap data: coordinates and page size). The other `[CLY]_` events are the
# user's doing and kept as custom events: `[CLY]_view` (above), `[CLY]_star_rating` (a rating
# given), `[CLY]_nps` and `[CLY]_survey` (a feedback widget answered or closed),
# `[CLY]_push_action` (a push notification opened).
SDK_INTERNAL_EVENTS = frozenset({"[CLY]_orientation", "[CLY]_action"})

# Countly timestamps are milliseconds (every current SDK) or seconds (older SDKs and scripts):
# a value above this is milliseconds (1e11 seconds is the year 5138).
_MILLISECONDS_ABOVE = 100_000_000_000

# Countly's `tz` is the device's offset from UTC in minutes. The contract takes an IANA zone;
# a whole-hour offset has one that never changes (Etc/GMT-2 is UTC+2: POSIX inverts the sign),
# which days are counted in until an SDK sends a real zone.
_ETC_GMT_OFFSETS = range(-12, 15)


@dataclass(frozen=True, slots=True)
class _Request:
    """One Countly request, with what every message it holds shares."""

    params: Mapping[str, Any]
    device_id: str
    stamp: str  # the request's `timestamp` as sent ("" when none): part of every derived ID
    time: datetime  # when the request was made (its `timestamp`, else when it was received)
    platform: _Platform
    client_ip: str


@dataclass(slots=True)
class _Output:
    """The steps of a request as they are built; consecutive events share one Track."""

    steps: list[Step] = field(default_factory=list)
    pending: list[ingest_pb.Event] = field(default_factory=list)
    message_count: int = 0
    position: int = 0  # the next message's position in the request, part of its derived ID
    # What the translator raised on messages it rejected instead (backstop.py).
    failures: list[Exception] = field(default_factory=list)

    def next_position(self) -> int:
        self.position += 1
        return self.position - 1

    def event(self, event: ingest_pb.Event) -> None:
        self.pending.append(event)

    def step(self, step: Step) -> None:
        self.flush()
        self.steps.append(step)

    def flush(self) -> None:
        if self.pending:
            self.steps.append(Track(events=tuple(self.pending)))
            self.pending = []

    def reject(self, reject: Reject) -> None:
        self.message_count += 1
        self.step(reject)

    def translation(self) -> Translation:
        self.flush()
        return Translation(
            steps=tuple(self.steps),
            message_count=self.message_count,
            failures=tuple(self.failures),
        )


def request_app_key(params: Mapping[str, Any]) -> str:
    """The app key a request authenticates with: its own `app_key`, else (for `/i/bulk`) the
    first bulk request's. Empty when there is none."""
    key = params.get("app_key")
    if isinstance(key, str) and key:
        return key
    requests = _json(params.get("requests"))
    if isinstance(requests, list):
        for entry in requests:
            if isinstance(entry, Mapping) and isinstance(entry.get("app_key"), str):
                return str(entry["app_key"])
    return ""


def check_request(params: Mapping[str, Any]) -> str:
    """The device ID of an `/i` request; raises RequestInvalid (400, Countly's wording) when
    the request has no `app_key` or no `device_id`, or the zero advertising ID."""
    device_id = _device_id(params.get("device_id"))
    if not params.get("app_key") or device_id is None:
        raise RequestInvalid(MISSING_KEY_OR_DEVICE)
    if device_id == ZERO_IDFA:
        raise RequestInvalid(ZERO_DEVICE_ID)
    return device_id


def check_bulk(params: Mapping[str, Any]) -> list[Any]:
    """The requests of an `/i/bulk` request; raises RequestInvalid (400, Countly's wording)
    when `requests` is missing or not a JSON list."""
    requests = _json(params.get("requests"))
    if not isinstance(requests, list):
        raise RequestInvalid(MISSING_REQUESTS)
    return requests


def translate(
    params: Mapping[str, Any],
    *,
    receive_time: datetime,
    client_ip: str = "",
) -> Translation:
    """The steps of one `/i` request. Raises RequestInvalid as `check_request` does."""
    device_id = check_request(params)
    output = _Output()
    _translate_request(params, device_id, receive_time, client_ip, output)
    return output.translation()


def translate_bulk(
    params: Mapping[str, Any],
    *,
    receive_time: datetime,
    client_ip: str = "",
) -> Translation:
    """The steps of one `/i/bulk` request: each of its `requests` translated as an `/i`
    request, in order. A bulk request that is not one of the caller's app key, or has no
    usable device ID, is rejected and listed (Countly skips them silently). Raises
    RequestInvalid (400) when `requests` is missing or not a JSON list."""
    requests = check_bulk(params)
    app_key = request_app_key(params)
    output = _Output()
    for index, entry in enumerate(requests):
        if not isinstance(entry, Mapping):
            output.message_count += 1
            output.step(_reject(PARAMETER_INVALID, f"requests[{index}] is not an object", entry))
            continue
        entry_key = entry.get("app_key")
        device_id = _device_id(entry.get("device_id"))
        if entry_key not in (None, "", app_key):
            output.message_count += 1
            reason, why = APP_KEY_MISMATCH, f"requests[{index}] names another app key"
            output.step(_reject(reason, why, entry, device_id or ""))
        elif device_id is None or device_id == ZERO_IDFA:
            output.message_count += 1
            why = f"requests[{index}] has no usable device_id"
            output.step(_reject(DEVICE_ID_MISSING, why, entry))
        else:
            where = f"requests[{index}]"
            _translate_request(entry, device_id, receive_time, client_ip, output, where)
    return output.translation()


# ---------------------------------------------------------------------------------------------
# One request


def _translate_request(
    params: Mapping[str, Any],
    device_id: str,
    receive_time: datetime,
    client_ip: str,
    output: _Output,
    where: str = "",
) -> None:
    """Appends the steps of one request (`where`: its place in a bulk request); one the
    translator fails on is rejected and listed (backstop.py), and a bulk's other requests kept."""
    with backstop(output, params, where=where, installation_id=device_id, secrets=_SECRETS):
        _translate_parts(params, device_id, receive_time, client_ip, output)


def _translate_parts(
    params: Mapping[str, Any],
    device_id: str,
    receive_time: datetime,
    client_ip: str,
    output: _Output,
) -> None:
    """Appends the steps of one request in the order Countly's server applies it: the device
    ID change first (later messages are the new ID's), then the session start and the
    installation details, push token, user details, crash, events, and the session's end."""
    stamp = _stamp(params.get("timestamp"))
    metrics = _json(params.get("metrics"))
    metrics = metrics if isinstance(metrics, Mapping) else {}
    request = _Request(
        params=params,
        device_id=device_id,
        stamp=stamp,
        time=_time(stamp) or receive_time,
        platform=_platform(params.get("sdk_name"), metrics.get("_os")),
        client_ip=ip_of(params.get("ip_address")) or client_ip,
    )
    _device_id_change(request, output)
    if _flag(params.get("begin_session")):
        _session_start(request, output)
    # countly-sdk-web's health check (`hc`, on every page load, consent or not) carries the
    # app version and `tz`: not activity, so no details come from it.
    health_check = "hc" in params and not _flag(params.get("begin_session"))
    if not health_check and (metrics or (_flag(params.get("begin_session")) and "tz" in params)):
        _installation_details(request, metrics, output)
    if _flag(params.get("token_session")):
        _push_token(request, output)
    if "user_details" in params:
        _user_details(request, output)
    if "crash" in params:
        _crash(request, output)
    if "events" in params:
        _events(request, output)
    if _flag(params.get("end_session")):
        _session_end(request, output)
    elif "session_duration" in params:
        _session_heartbeat(request, output)


def _device_id_change(request: _Request, output: _Output) -> None:
    """A device ID change with merge (`old_device_id`): how Countly's SDKs log a user in, the
    new device ID being the user's ID. The old installation logs in with it (its anonymous
    history joins the identified profile), then the new device ID, as an installation, logs in
    too, so that later requests under it land on that profile with their platform. Both are
    Identify: a retried request changes nothing more. The SDK's session goes on under the new
    ID: its next heartbeat starts a session of the new installation (which has none open), and
    ingest closes the old installation's 30 minutes after its last heartbeat. A change
    without merge sends nothing to the server; the new device ID is then simply a new
    installation on a new anonymous profile, as after Countly's logout."""
    old_device_id = _device_id(request.params.get("old_device_id"))
    if old_device_id is None or old_device_id == request.device_id:
        return
    new_id = request.device_id
    output.message_count += 1
    for installation_id in (old_device_id, new_id):
        request_id = derived_id("identify", installation_id, new_id, request.stamp)
        output.step(
            Identify(installation_id=installation_id, custom_id=new_id, request_id=request_id)
        )


# ---------------------------------------------------------------------------------------------
# Sessions


# Countly's sessions carry no ID, and `session_duration` is the time since the previous request,
# not since the start. The start gets an ID derived from the device and the request; heartbeats
# and ends ask ingest for the device's open session (SESSION_RULE_OPEN_SESSION), which ingest
# finds, and whose duration it computes, in the transaction that stores them: the edge keeps no
# session state, so any replica may serve any request. The duration they carry is Countly's,
# used by ingest only for a session they start (no open one: its start was lost or is stale).
# Custom events, crashes and user details carry no session either: they ask for the open
# session too (_in_open_session), and ingest joins them to it; with none open at their time
# (sent before `begin_session`, after `end_session`, or with session tracking off) they are
# stored without session, never refused for it.


def _in_open_session(event: ingest_pb.Event) -> ingest_pb.Event:
    """The event, joined by ingest to its installation's session open at its time."""
    event.session_rule = ingest_pb.SESSION_RULE_OPEN_SESSION
    return event


def _session_start(request: _Request, output: _Output) -> None:
    """The session's country comes from the IP (`ip_address`, else the connection's): Countly's
    `country_code` is a free-form override that ingest would refuse when it is not ISO 3166
    ("UK"), which would cost the session its start.

    A session starting under a device ID that a login merged into a user is a logout: after a
    merge, Countly's server holds no user of the old ID, and the iOS SDK's logout
    (`changeDeviceIDWithoutMerge(nil)`) goes back to the stored ID, the very ID of before the
    login; without this, what the next person does on the device would land on the user who
    logged out. So the start logs its installation out first, unless the device ID is its
    profile's own custom ID (the user's ID, after a login): identity's Logout with
    `unless_custom_id`, a no-op on an anonymous profile and on an installation never seen.
    Only then does the old ID get a new anonymous profile: logging it out at the login itself
    would leave an empty profile behind every login."""
    output.step(
        Logout(
            installation_id=request.device_id,
            request_id=derived_id("logout", request.device_id, request.stamp),
            unless_custom_id=request.device_id,
        )
    )
    start = ingest_pb.SessionStart(client_ip=request.client_ip)
    event = _event(request, output, "begin_session")
    event.session_id = derived_id("session", request.device_id, request.stamp)
    event.session_start.CopyFrom(start)
    output.message_count += 1
    output.event(event)


def _session_heartbeat(request: _Request, output: _Output) -> None:
    seconds = _seconds(request.params.get("session_duration"))
    if seconds is None:
        _reject_param(request, output, "session_duration", "not a number of seconds")
        return
    event = _event(request, output, "session_duration", seconds)
    event.session_rule = ingest_pb.SESSION_RULE_OPEN_SESSION
    event.session_heartbeat.duration.FromTimedelta(_capped(seconds))
    output.message_count += 1
    output.event(event)


def _session_end(request: _Request, output: _Output) -> None:
    seconds = _seconds(request.params.get("session_duration", 0))
    if seconds is None:
        _reject_param(request, output, "session_duration", "not a number of seconds")
        return
    event = _event(request, output, "end_session", seconds)
    event.session_rule = ingest_pb.SESSION_RULE_OPEN_SESSION
    event.session_end.duration.FromTimedelta(_capped(seconds))
    output.message_count += 1
    output.event(event)


def _capped(seconds: int) -> timedelta:
    """Countly's seconds within the contract's 0 to 24 hours."""
    return timedelta(seconds=min(max(seconds, 0), 24 * 3600))


# ---------------------------------------------------------------------------------------------
# Installation details and push tokens


def _installation_details(request: _Request, metrics: Mapping[str, Any], output: _Output) -> None:
    """`metrics` (the mobile SDKs send them with begin_session, countly-sdk-web with every
    request) and `tz` to the installation's details; the other metrics (resolution, carrier,
    density, store, browser...) have no contract field."""
    update = ingest_pb.InstallationUpdate()
    # Cut to the contract's lengths, as the other dialects do: a long OS build string must not
    # cost the whole update.
    for metric, target, limit in (
        ("_app_version", "app_version", 64),
        ("_os_version", "os_version", 64),
        ("_device", "device_model", 128),
    ):
        value = metrics.get(metric)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and str(value):
            setattr(update, target, str(value)[:limit])
    # The time zone in an update of its own, as countly-sdk-web sends `tz` with metrics that
    # hold no app version (`_ua` alone) on every request: the same zone is one update. The
    # language too: ingest refuses a code that is not ISO 639-1 ("zz"), which must not cost
    # the app version and the rest.
    timezone = _timezone(request.params.get("tz"))
    language = language_of(metrics.get("_locale"))
    day = request.time.date().isoformat()
    for one in (
        update,
        ingest_pb.InstallationUpdate(timezone=timezone) if timezone else None,
        ingest_pb.InstallationUpdate(language=language) if language else None,
    ):
        if one is not None and one.ListFields():
            event = _event(request, output, "metrics", one.SerializeToString().hex())
            # countly-sdk-web sends its metrics and `tz` with every request, not only at
            # session start: an ID derived from the details and the day (not the request)
            # stores them once a day, the others answered DUPLICATE.
            event.event_id = details_event_id(request.device_id, one, day)
            event.installation_update.CopyFrom(one)
            output.message_count += 1
            output.event(event)


def _push_token(request: _Request, output: _Output) -> None:
    """`token_session` with `ios_token` or `android_token` (or `huawei_token`): the
    installation's push token; an empty token (the user refused notifications) clears it.
    `test_mode` (a development or ad hoc build's token) has no contract field: the token is
    kept like a production one."""
    params = request.params
    for parameter, platform in (
        ("ios_token", types_pb2.PLATFORM_IOS),
        ("android_token", types_pb2.PLATFORM_ANDROID),
        ("huawei_token", types_pb2.PLATFORM_ANDROID),
    ):
        if parameter not in params:
            continue
        token = params.get(parameter)
        token = token if isinstance(token, str) else ""
        update = ingest_pb.InstallationUpdate(push_token=token, push_opt_in=bool(token))
        language = language_of(params.get("locale"))
        if language:
            update.language = language
        event = _event(request, output, parameter, hashlib.sha256(token.encode()).hexdigest())
        # The token's kind names the device's platform when nothing else in the request does.
        if request.platform == API and not params.get("sdk_name"):
            event.platform = platform
        event.installation_update.CopyFrom(update)
        output.message_count += 1
        output.event(event)
        return


# ---------------------------------------------------------------------------------------------
# User details


def _user_details(request: _Request, output: _Output) -> None:
    """`user_details`: each property its own attribute event, so that one bad value (an email
    that is not one) is rejected alone and the others are kept."""
    details = _json(request.params.get("user_details"))
    if not isinstance(details, Mapping):
        _reject_param(request, output, "user_details", "not a JSON object")
        return
    for key in ("name", *_NATIVE_DETAILS, *_CUSTOM_DETAILS):
        if key in details:
            value = details[key]
            _attribute_event(request, output, key, value, _detail_operations(key, value))
    custom = details.get("custom")
    if isinstance(custom, Mapping):
        for key, value in flatten_custom(custom):
            _custom_property(request, output, key, value)
    elif custom is not None:
        _reject_param(request, output, "user_details.custom", "not a JSON object")


def _detail_operations(key: str, value: Any) -> list[types_pb2.AttributeOperation]:
    if key == "name":
        return full_name_operations(value)
    if key in _NATIVE_DETAILS:
        return _native_operations(_NATIVE_DETAILS[key], key, value)
    return _set_operations(key, value)


def _native_operations(native: _Native, key: str, value: Any) -> list[types_pb2.AttributeOperation]:
    if value is None or value == "":
        return [types_pb2.AttributeOperation(kind=_UNSET, native_attribute=native)]
    text = str(value).strip()
    if key == "phone":
        text = phone_text(text)
    return [_native_set(native, text)]


def _native_set(native: _Native, text: str) -> types_pb2.AttributeOperation:
    value = (
        types_pb2.AttributeValue(url_value=text)
        if native == types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL
        else types_pb2.AttributeValue(string_value=text)
    )
    return types_pb2.AttributeOperation(kind=_SET, native_attribute=native, value=value)


def _set_operations(name: str, value: Any) -> list[types_pb2.AttributeOperation]:
    """A plain value sets the custom attribute; null or "" unsets it (Countly's SDKs unset a
    property by sending it empty)."""
    if value is None or value == "":
        return [types_pb2.AttributeOperation(kind=_UNSET, custom_attribute=name)]
    converted = attribute_value(value)
    return [types_pb2.AttributeOperation(kind=_SET, custom_attribute=name, value=converted)]


def flatten_custom(custom: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Custom user properties, nested objects flattened by names.flatten, except that an object
    whose keys are modifiers ({"$inc": 1}) is one property's operation, not a nested value."""
    for key, value in custom.items():
        if isinstance(value, Mapping) and value and all(str(k).startswith("$") for k in value):
            yield str(key), value
        elif isinstance(value, Mapping):
            yield from flatten_custom(dict(flatten(value, str(key))))
        else:
            yield str(key), value


def _custom_property(request: _Request, output: _Output, key: str, value: Any) -> None:
    """One custom property: a plain value, or an object of modifiers ($set, $setOnce, $inc,
    $push, $addToSet, $pull). A modifier the contract lacks ($mul, $min, $max) or does not
    know is refused and listed; the property's other modifiers are still applied."""
    name = normalize_name(key)
    if name is None:
        message = {"user_details": {"custom": {key: value}}}
        why = f"custom property {key!r} has no usable name"
        _refuse(request, output, PROPERTY_NAME_UNUSABLE, why, message)
        return
    if not isinstance(value, Mapping):
        _attribute_event(request, output, key, value, _set_operations(name, value))
        return
    for modifier, operand in value.items():
        message = {"user_details": {"custom": {key: {modifier: operand}}}}
        if modifier in ("$set", "$setOnce"):
            kind = _SET if modifier == "$set" else _SET_ONCE
            operations = _set_operations(name, operand)
            if operations[0].kind == _SET:
                operations[0].kind = kind
        elif modifier == "$inc":
            number = _number(operand)
            if number is None:
                why = f"custom property {key!r}: $inc takes a number"
                _refuse(request, output, VALUE_INVALID, why, message)
                continue
            operations = [
                types_pb2.AttributeOperation(
                    kind=_INCREMENT,
                    custom_attribute=name,
                    value=types_pb2.AttributeValue(number_value=number),
                )
            ]
        elif modifier in _LIST_MODIFIERS:
            items = operand if isinstance(operand, list) else [operand]
            texts = [item if isinstance(item, str) else json.dumps(item) for item in items]
            listed = types_pb2.AttributeValue(string_list_value=types_pb2.StringList(values=texts))
            operations = [
                types_pb2.AttributeOperation(kind=kind, custom_attribute=name, value=listed)
                for kind in _LIST_MODIFIERS[modifier]
            ]
        else:
            why = _UNSUPPORTED_MODIFIERS.get(str(modifier), "an unknown modifier")
            why = f"custom property {key!r}: {modifier} refused, {why}"
            _refuse(request, output, OPERATION_UNSUPPORTED, why, message)
            continue
        _attribute_event(request, output, f"{key}{modifier}", operand, operations)


def _attribute_event(
    request: _Request,
    output: _Output,
    key: str,
    value: Any,
    operations: list[types_pb2.AttributeOperation],
) -> None:
    event = _in_open_session(_event(request, output, "user_details", key, value))
    event.attribute_operations.operations.extend(operations)
    output.message_count += 1
    output.event(event)


# ---------------------------------------------------------------------------------------------
# Crashes and events


def _crash(request: _Request, output: _Output) -> None:
    """`crash`: `_error` is the stack trace, `_nonfatal` false (or missing) a fatal crash; name
    and reason as `crash_name_and_reason` reads them, cut to the contract's 300 characters (the
    full text stays in the stack trace)."""
    crash = _json(request.params.get("crash"))
    if not isinstance(crash, Mapping):
        _reject_param(request, output, "crash", "not a JSON object")
        return
    error = str(crash.get("_error") or "")
    name, reason = crash_name_and_reason(crash, error)
    event = _in_open_session(_event(request, output, "crash", crash))
    event.crash.CopyFrom(
        ingest_pb.Crash(
            name=name.strip()[:MAX_STRING_LENGTH] or "crash",
            reason=reason.strip()[:MAX_STRING_LENGTH],
            stack_trace=error,
            fatal=not _flag(crash.get("_nonfatal")),
        )
    )
    output.message_count += 1
    output.event(event)


# PLCrashReporter's iOS text report (what countly-sdk-ios sends as `_error` of a crash of the
# previous run, with `_plcrash`): its header names the signal, and an uncaught NSException
# adds the line Apple's own reports have.
_PLCRASH_FIRST_LINE = "Incident Identifier:"
_PLCRASH_SIGNAL = re.compile(r"^Exception Type:\s*(.*?)\s*$", re.MULTILINE)
_PLCRASH_CODES = re.compile(r"^Exception Codes:\s*(.*?)\s*$", re.MULTILINE)
_PLCRASH_EXCEPTION = re.compile(
    r"^\*\*\* Terminating app due to uncaught exception '(.*?)', reason: '(.*)'\s*$",
    re.MULTILINE,
)


def crash_name_and_reason(crash: Mapping[str, Any], error: str) -> tuple[str, str]:
    """The contract's crash name (the exception's class) and reason (its message), by what
    each SDK sends:
    - countly-sdk-ios, an NSException or a Swift error: `_type` is the exception's name
      (`NSRangeException`), `_name` its description, the message;
    - countly-sdk-ios, a PLCrashReporter report: no `_name`, `_error` the text report, whose
      uncaught-exception line gives both, else its `Exception Type` (the signal: `SIGSEGV`)
      and `Exception Codes` (`SEGV_MAPERR at 0x0`);
    - countly-sdk-android, countly-sdk-web and the others: no `_type`; the name is `_name`
      when sent (the Web SDK's), else the first line's exception type
      (`java.lang.IllegalStateException: cart is empty`, `TypeError: x is undefined`), the
      reason the rest of that line."""
    given_name = _text(crash.get("_name"))
    given_type = _text(crash.get("_type"))
    if given_type:
        return given_type, given_name
    if not given_name and (
        _flag(crash.get("_plcrash")) or error.lstrip().startswith(_PLCRASH_FIRST_LINE)
    ):
        exception = _PLCRASH_EXCEPTION.search(error)
        if exception:
            return exception.group(1), exception.group(2)
        signal = _PLCRASH_SIGNAL.search(error)
        if signal and signal.group(1):
            codes = _PLCRASH_CODES.search(error)
            return signal.group(1), codes.group(1) if codes else ""
    first_line = error.strip().splitlines()[0] if error.strip() else ""
    kind, colon, rest = first_line.partition(":")
    name = given_name or (kind if colon else first_line) or "crash"
    return name, rest.strip() if colon else ""


def _events(request: _Request, output: _Output) -> None:
    events = _json(request.params.get("events"))
    if not isinstance(events, list):
        _reject_param(request, output, "events", "not a JSON list")
        return
    for index, item in enumerate(events):
        # An event the translator fails on is rejected alone, the request's others kept.
        where = f"events[{index}]"
        with backstop(
            output, item, where=where, installation_id=request.device_id, secrets=_SECRETS
        ):
            _one_event(request, output, index, item)


def _one_event(request: _Request, output: _Output, index: int, item: Any) -> None:
    """A Countly event: `key` the name (normalized by names.normalize_name), `segmentation` the
    attributes (flattened, normalized), `count`, `sum` and `dur` attributes of those names
    (they win over segmentation keys of the same name), `timestamp` the event time. A view's
    end (`[CLY]_view` without `visit`) is named `cly_view_end`; the SDKs' internal events
    (SDK_INTERNAL_EVENTS) are counted and dropped."""
    position = output.next_position()
    if not isinstance(item, Mapping) or not isinstance(item.get("key"), str):
        output.message_count += 1
        output.step(
            _reject(
                PARAMETER_INVALID,
                f"events[{index}] has no key",
                {"events": [item]},
                request.device_id,
                derived_id("event", request.device_id, request.stamp, position, item),
            )
        )
        return
    if item["key"] in SDK_INTERNAL_EVENTS:
        # Read (a message of the request, counted) and not stored. Its position stays taken, so
        # the request's other events keep their IDs.
        output.message_count += 1
        return
    event_id = derived_id("event", request.device_id, request.stamp, position, item)
    name = normalize_name(item["key"])
    segmentation = item.get("segmentation")
    if item["key"] == VIEW_KEY and not _view_visit(segmentation):
        name = VIEW_END_NAME
    attributes = custom_attributes(
        segmentation if isinstance(segmentation, Mapping) else {}, skip_sdk_own=False
    )
    if name is None or attributes.unusable:
        reason = NAME_UNUSABLE if name is None else PROPERTY_NAME_UNUSABLE
        why = (
            f"event key {item['key']!r} has no usable name"
            if name is None
            else f"segmentation keys without a usable name: {', '.join(attributes.unusable)}"
        )
        output.message_count += 1
        output.step(_reject(reason, why, {"events": [item]}, request.device_id, event_id))
        return
    for measure in ("count", "sum", "dur"):
        number = _number(item.get(measure))
        if number is not None:
            attributes.values[measure] = types_pb2.AttributeValue(number_value=number)
    event = _in_open_session(
        ingest_pb.Event(
            event_id=event_id,
            installation_id=request.device_id,
            platform=request.platform,
            custom=ingest_pb.CustomEvent(name=name, attributes=attributes.values),
        )
    )
    stamp = _stamp(item.get("timestamp"))
    set_timestamp(event.event_time, _time(stamp) or request.time)
    output.message_count += 1
    output.event(event)


def _view_visit(segmentation: Any) -> bool:
    """Whether a `[CLY]_view`'s segmentation says it starts a view: `visit` set to a value that
    is true in JavaScript, as Countly's server tests it (`1`, `"1"`, `true`...)."""
    if not isinstance(segmentation, Mapping):
        return False
    visit = segmentation.get("visit")
    if isinstance(visit, float) and math.isnan(visit):
        return False
    return visit not in (None, False, 0, "")


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _event(request: _Request, output: _Output, *content: Any) -> ingest_pb.Event:
    """An event of the request at the request's time, with the ID derived from the device,
    the request's timestamp, the message's position in the request and its content."""
    position = output.next_position()
    event_id = derived_id("message", request.device_id, request.stamp, position, content)
    event = ingest_pb.Event(
        event_id=event_id, installation_id=request.device_id, platform=request.platform
    )
    set_timestamp(event.event_time, request.time)
    return event


def _reject(
    reason: str,
    explanation: str,
    message: Any,
    installation_id: str = "",
    event_id: str = "",
) -> Reject:
    kept = message if isinstance(message, Mapping) else {"message": message}
    kept = scrub(kept, _COUNTLY_SECRETS)
    event_id = event_id or derived_id("rejected", installation_id, kept)
    return rejection(reason, explanation, kept, event_id, installation_id)


def _refuse(request: _Request, output: _Output, reason: str, why: str, message: Any) -> None:
    """A message of the request that cannot be translated: kept as a rejected event, with an
    ID derived like an event's, so that a retried request lists it once."""
    position = output.next_position()
    event_id = derived_id("rejected", request.device_id, request.stamp, position, message)
    output.message_count += 1
    output.step(_reject(reason, why, message, request.device_id, event_id))


def _reject_param(request: _Request, output: _Output, name: str, why: str) -> None:
    value = request.params.get(name.partition(".")[0])
    _refuse(request, output, PARAMETER_INVALID, f"{name}: {why}", {name: value})


def _json(value: Any) -> Any:
    """A structured parameter, sent as JSON text or already as an object; None when the text
    is not JSON."""
    if isinstance(value, str | bytes):
        try:
            return json_text.loads(value)
        except ValueError:
            return None
    return value


def _device_id(value: Any) -> str | None:
    """A device ID as text (Countly's server stringifies numbers too, as `identifier` spells
    them); None when missing, and for NaN or an infinity (a JSON body's `NaN`, `1e400`), which
    would make every such client one installation."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = identifier(value)
    if not isinstance(value, str) or not value:
        return None
    return value


def _text(value: Any) -> str:
    """A crash field as text: "" when missing, null or not a scalar."""
    if value is None or isinstance(value, Mapping | list):
        return ""
    return str(value).strip()


def _flag(value: Any) -> bool:
    """Countly's flags: `1`, `"1"`, `true`, `"true"` are set."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true")
    return value is True or (isinstance(value, int | float) and value == 1)


def _number(value: Any) -> float | None:
    """A finite number from a JSON number or its text; None for anything else (NaN, "inf",
    1e400 or an integer past a double's range are no timestamp, duration or offset)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _seconds(value: Any) -> int | None:
    """A session duration in whole seconds, not negative; None when it is not a number."""
    number = _number(value)
    if number is None or number != number or number < 0:
        return None
    return int(min(number, 86_400))


def _stamp(value: Any) -> str:
    """A Countly timestamp as sent, normalized to text of digits; "" when missing or not one."""
    number = _number(value)
    if number is None or number <= 0 or number != number:
        return ""
    return str(int(number))


def _time(stamp: str) -> datetime | None:
    if not stamp:
        return None
    number = int(stamp)
    seconds = number / 1000 if number > _MILLISECONDS_ABOVE else number
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _platform(sdk_name: Any, os_name: Any) -> _Platform:
    """The platform of a request: the SDK's name when it names one ("java-native-android",
    "objc-native-ios", "javascript_native_web", "dart-flutterb-ios"...), else the OS of its
    metrics, else PLATFORM_API (the Node.js, Python, Java and other server-side SDKs, and raw
    requests)."""
    if isinstance(sdk_name, str):
        parts = set(_SDK_NAME_PARTS.split(sdk_name.lower()))
        for part, platform in _SDK_NAME_PLATFORMS:
            if part in parts:
                return platform
    return types_pb2.Platform.ValueType(platform_of(os_name, None, API))


def _timezone(offset: Any) -> str:
    """The IANA zone of a whole-hour `tz` offset in minutes; "" for other offsets."""
    number = _number(offset)
    if number is None or number % 60:
        return ""
    hours = int(number // 60)
    if hours not in _ETC_GMT_OFFSETS:
        return ""
    if hours == 0:
        return "Etc/UTC"
    return f"Etc/GMT{-hours:+d}"


__all__: Sequence[str] = (
    "DIALECT",
    "check_bulk",
    "check_request",
    "request_app_key",
    "translate",
    "translate_bulk",
)
