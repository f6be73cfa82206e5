"""Proto conversions of the query servicer: requests to lookups and queries (raising
RequestInvalid with field paths), views to responses. No I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.query.v1 import overview_pb2, profile_pb2, timeline_pb2
from profiles.query.v1 import query_service_pb2 as pb
from services.query.errors import RequestInvalid
from services.query.service import (
    EventNamesQuery,
    EventsQuery,
    Lookup,
    ProfilesQuery,
    RejectedQuery,
    SessionsQuery,
)
from services.query.views import (
    AttributeView,
    BreakdownView,
    CrashView,
    DayView,
    EventNameView,
    EventView,
    FunnelProgressView,
    IdentityChangeView,
    InstallationView,
    OverviewView,
    ProfileRowView,
    ProfileView,
    RejectedView,
    SessionView,
    TimelineItem,
    UsersTableFilters,
)
from shared import convert as shared_convert
from shared.auth import Caller
from shared.convert import set_timestamp as set_time
from shared.errors import FieldViolation
from shared.time_zones import is_time_zone

MAX_CUSTOM_ID_LENGTH = 512
MAX_INSTALLATION_ID_LENGTH = 128
MAX_SESSION_ID_LENGTH = 64
MAX_EVENT_NAMES = 20
MAX_KINDS = 8
MAX_REASONS = 20
MAX_TOP_VALUES = 100
DEFAULT_TOP_VALUES = 10
MAX_ACTIVITY_DAYS = 366
# GetOverview's trend: at most about a quarter of days (each day more reads more sessions).
MAX_TREND_DAYS = 90
# The days GetActivity counts: a day's bounds in any time zone (offsets are under a day), and the
# day after the last, stay within the datetimes Python and the keyset bounds hold (years 1 to
# 9999).
FIRST_ACTIVITY_DATE = date(2, 1, 1)
LAST_ACTIVITY_DATE = date(9998, 12, 31)
# What the rows of one ListRejectedEvents reply may take (raw payloads reach 1 MB each): well
# under the servers' 8 MiB maximum message size (shared/server.py), and under the 4 MiB a gRPC
# client (grpcurl included) receives by default, with room for the token and the envelope.
REJECTED_PAGE_BYTES = 2 * 1024 * 1024

PHONE_PATTERN = re.compile(r"\+[1-9][0-9]{1,14}")
# The addr-spec ingest accepts for the email attribute (services/ingest/model.py has its own
# copy: services share no code).
EMAIL_PATTERN = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_]{1,30}")
COUNTRY_PATTERN = re.compile(r"[A-Za-z]{2}")
LANGUAGE_PATTERN = re.compile(r"[A-Za-z]{2}")
# ListProfiles name_prefix, after its spaces are normalized: longer than any name worth typing.
NAME_PREFIX_MAX = 100
# ListProfiles profile_id_prefix once its dashes are left out: 1 to 32 hex digits, a UUID's.
PROFILE_ID_PREFIX_PATTERN = re.compile(r"[0-9a-f]{1,32}")
# ListProfiles email_prefix: no longer than an email may be (ingest refuses longer ones).
MAX_EMAIL_LENGTH = 254
DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")

NATIVE_NAMES = (
    "email",
    "phone",
    "language",
    "region",
    "timezone",
    "first_name",
    "last_name",
    "avatar_url",
    "country",
)
CHANNELS = {
    "email": types_pb2.CHANNEL_EMAIL,
    "sms": types_pb2.CHANNEL_SMS,
    "push": types_pb2.CHANNEL_PUSH,
}
SUBSCRIPTION_KINDS = {
    "marketing": types_pb2.SUBSCRIPTION_KIND_MARKETING,
    "transactional": types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL,
}
CHANGE_KINDS = {
    "merge": profile_pb2.IDENTITY_CHANGE_KIND_MERGE,
    "split": profile_pb2.IDENTITY_CHANGE_KIND_SPLIT,
}
CHANGE_CAUSES = {
    "identify": profile_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY,
    "logout": profile_pb2.IDENTITY_CHANGE_CAUSE_LOGOUT,
    "operator_merge": profile_pb2.IDENTITY_CHANGE_CAUSE_OPERATOR_MERGE,
    "token_reintegration": profile_pb2.IDENTITY_CHANGE_CAUSE_TOKEN_REINTEGRATION,
    "identify_switch": profile_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY_SWITCH,
}
# profiles.common.v1.EventKind -> TimelineEventKind.
TIMELINE_KINDS = {
    types_pb2.EVENT_KIND_CUSTOM: timeline_pb2.TIMELINE_EVENT_KIND_CUSTOM,
    types_pb2.EVENT_KIND_SESSION_START: timeline_pb2.TIMELINE_EVENT_KIND_SESSION,
    types_pb2.EVENT_KIND_SESSION_HEARTBEAT: timeline_pb2.TIMELINE_EVENT_KIND_SESSION,
    types_pb2.EVENT_KIND_SESSION_END: timeline_pb2.TIMELINE_EVENT_KIND_SESSION,
    types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE: timeline_pb2.TIMELINE_EVENT_KIND_ATTRIBUTE_CHANGE,
    types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE: timeline_pb2.TIMELINE_EVENT_KIND_CONSENT_CHANGE,
    types_pb2.EVENT_KIND_INSTALLATION_UPDATE: timeline_pb2.TIMELINE_EVENT_KIND_INSTALLATION_UPDATE,
    types_pb2.EVENT_KIND_CRASH: timeline_pb2.TIMELINE_EVENT_KIND_CRASH,
}
SESSION_TYPES = {
    types_pb2.EVENT_KIND_SESSION_START: timeline_pb2.SESSION_EVENT_TYPE_START,
    types_pb2.EVENT_KIND_SESSION_HEARTBEAT: timeline_pb2.SESSION_EVENT_TYPE_HEARTBEAT,
    types_pb2.EVENT_KIND_SESSION_END: timeline_pb2.SESSION_EVENT_TYPE_END,
}
# Known enum numbers, read once from the descriptors rather than on every request.
TIMELINE_KIND_NUMBERS = frozenset(timeline_pb2.TimelineEventKind.values()) - {0}
PLATFORM_NUMBERS = frozenset(types_pb2.Platform.values())
PROFILES_QUERY_ENUMS = {
    "identity_filter": frozenset(pb.ProfileIdentityFilter.values()),
    "smart_segment": frozenset(types_pb2.SmartSegment.values()),
    "smart_segment_flag": frozenset(types_pb2.SmartSegmentFlag.values()),
    "platform": PLATFORM_NUMBERS,
    "reachable_channel": frozenset(types_pb2.Channel.values()),
    "order_by": frozenset(pb.ProfileOrderBy.values()),
    "sort_order": frozenset(pb.SortOrder.values()),
}
# Flags that apply to each main smart segment (common/v1/types.proto).
SEGMENT_FLAGS = {
    types_pb2.SMART_SEGMENT_NEW: (types_pb2.SMART_SEGMENT_FLAG_PROMISING_NEW,),
    types_pb2.SMART_SEGMENT_ONE_TIME: (),
    types_pb2.SMART_SEGMENT_ENGAGED: (types_pb2.SMART_SEGMENT_FLAG_RISKY_ENGAGED,),
    types_pb2.SMART_SEGMENT_DORMANT: (types_pb2.SMART_SEGMENT_FLAG_PROMISING_DORMANT,),
}


# -- requests ---------------------------------------------------------------------------------


def _invalid(field: str, why: str) -> RequestInvalid:
    return RequestInvalid(f"{field} {why}", [FieldViolation(field, why, RequestInvalid.reason)])


def _raise_all(violations: list[FieldViolation]) -> None:
    if violations:
        raise RequestInvalid(
            "; ".join(f"{v.field} {v.description}" for v in violations), violations
        )


def _violation(field: str, why: str) -> FieldViolation:
    return FieldViolation(field, why, RequestInvalid.reason)


def profile_id_of(text: str, field: str = "profile_id") -> UUID:
    """A UUID in canonical form, as every service reads one (shared.convert.profile_id_of:
    braces, URNs or missing hyphens are refused, not read as the same ID)."""
    if not text:
        raise _invalid(field, "is required")
    return shared_convert.profile_id_of(text, field, error=RequestInvalid)


# GetProfileRows: at most this many IDs a call (the users table's largest page).
MAX_PROFILE_ROWS_IDS = 500


def profile_row_ids_from_proto(request: pb.GetProfileRowsRequest) -> tuple[UUID, ...]:
    """The IDs asked for, each once in the order of its first mention; every bad ID is its own
    violation (`profile_ids[i]`)."""
    texts = request.profile_ids
    if not texts:
        raise _invalid("profile_ids", "is required: 1 to 500 profile IDs")
    if len(texts) > MAX_PROFILE_ROWS_IDS:
        raise _invalid("profile_ids", f"holds {len(texts)} IDs; at most {MAX_PROFILE_ROWS_IDS}")
    ids: dict[UUID, None] = {}
    violations: list[FieldViolation] = []
    for index, text in enumerate(texts):
        try:
            ids.setdefault(profile_id_of(text, f"profile_ids[{index}]"))
        except RequestInvalid as invalid:
            violations.extend(invalid.violations)
    _raise_all(violations)
    return tuple(ids)


def lookup_from_proto(request: pb.GetProfileRequest) -> Lookup:
    which = request.WhichOneof("lookup")
    if which is None:
        raise _invalid(
            "lookup", "is required: one of profile_id, custom_id, email, phone, installation_id"
        )
    value: str = getattr(request, which)
    if which == "profile_id":
        return Lookup("profile_id", str(profile_id_of(value)))
    if which == "custom_id":
        if not 1 <= len(value) <= MAX_CUSTOM_ID_LENGTH:
            raise _invalid("custom_id", f"must hold 1 to {MAX_CUSTOM_ID_LENGTH} characters")
        return Lookup("custom_id", value)
    if which == "email":
        if len(value) > 254 or EMAIL_PATTERN.fullmatch(value) is None:
            raise _invalid("email", "is not a well-formed email address")
        return Lookup("email", value.lower())
    if which == "phone":
        if PHONE_PATTERN.fullmatch(value) is None:
            raise _invalid("phone", 'is not an E.164 phone number such as "+33612345678"')
        return Lookup("phone", value)
    if not 1 <= len(value) <= MAX_INSTALLATION_ID_LENGTH:
        raise _invalid("installation_id", f"must hold 1 to {MAX_INSTALLATION_ID_LENGTH} characters")
    return Lookup("installation_id", value)


def _time_range(
    start: Timestamp, end: Timestamp, has_start: bool, has_end: bool, violations: list[Any]
) -> tuple[datetime | None, datetime | None]:
    first = start.ToDatetime(UTC) if has_start else None
    last = end.ToDatetime(UTC) if has_end else None
    if first is not None and last is not None and last <= first:
        violations.append(_violation("end_time", "must be after start_time"))
    return first, last


def events_query_from_proto(request: pb.ListEventsRequest) -> EventsQuery:
    violations: list[FieldViolation] = []
    profile_id = profile_id_of(request.profile_id)
    if len(request.session_id) > MAX_SESSION_ID_LENGTH:
        violations.append(
            _violation("session_id", f"must be at most {MAX_SESSION_ID_LENGTH} characters")
        )
    if len(request.event_names) > MAX_EVENT_NAMES:
        violations.append(_violation("event_names", f"must hold at most {MAX_EVENT_NAMES} names"))
    for i, name in enumerate(request.event_names):
        if NAME_PATTERN.fullmatch(name) is None:
            violations.append(_violation(f"event_names[{i}]", "must match ^[a-zA-Z0-9_]{1,30}$"))
    if len(request.kinds) > MAX_KINDS:
        violations.append(_violation("kinds", f"must hold at most {MAX_KINDS} kinds"))
    for i, kind in enumerate(request.kinds):
        if kind not in TIMELINE_KIND_NUMBERS:
            violations.append(_violation(f"kinds[{i}]", "must be a known kind, not UNSPECIFIED"))
    if request.page_size < 0:
        violations.append(_violation("page_size", "must not be negative"))
    start, end = _time_range(
        request.start_time,
        request.end_time,
        request.HasField("start_time"),
        request.HasField("end_time"),
        violations,
    )
    _raise_all(violations)
    return EventsQuery(
        profile_id=profile_id,
        page_size=request.page_size,
        page_token=request.page_token,
        session_id=request.session_id,
        names=tuple(sorted({n.lower() for n in request.event_names})),
        kinds=tuple(sorted(set(request.kinds))),
        start=start,
        end=end,
        exclude_heartbeats=request.exclude_heartbeats,
    )


def event_names_query_from_proto(request: pb.ListEventNamesRequest) -> EventNamesQuery:
    violations: list[FieldViolation] = []
    if request.page_size < 0:
        violations.append(_violation("page_size", "must not be negative"))
    # A prefix of a name: a name's characters and length, in any case (names are stored
    # lower-case, as ListEvents' `event_names` are matched).
    if request.name_prefix and NAME_PATTERN.fullmatch(request.name_prefix) is None:
        violations.append(_violation("name_prefix", "must match ^[a-zA-Z0-9_]{1,30}$"))
    _raise_all(violations)
    return EventNamesQuery(
        page_size=request.page_size,
        page_token=request.page_token,
        name_prefix=request.name_prefix.lower(),
    )


def event_name_to_proto(view: EventNameView) -> pb.EventName:
    message = pb.EventName(name=view.name, event_count=view.event_count)
    set_time(message.last_seen_time, view.last_seen_time)
    return message


def sessions_query_from_proto(request: pb.ListSessionsRequest) -> SessionsQuery:
    violations: list[FieldViolation] = []
    profile_id = profile_id_of(request.profile_id)
    if request.page_size < 0:
        violations.append(_violation("page_size", "must not be negative"))
    start, end = _time_range(
        request.start_time,
        request.end_time,
        request.HasField("start_time"),
        request.HasField("end_time"),
        violations,
    )
    _raise_all(violations)
    return SessionsQuery(profile_id, request.page_size, request.page_token, start, end)


def rejected_query_from_proto(request: pb.ListRejectedEventsRequest) -> RejectedQuery:
    violations: list[FieldViolation] = []
    if request.page_size < 0:
        violations.append(_violation("page_size", "must not be negative"))
    if len(request.reasons) > MAX_REASONS:
        violations.append(_violation("reasons", f"must hold at most {MAX_REASONS} reasons"))
    for i, reason in enumerate(request.reasons):
        if not reason or len(reason) > 64:
            violations.append(_violation(f"reasons[{i}]", "must hold 1 to 64 characters"))
    start, end = _time_range(
        request.start_time,
        request.end_time,
        request.HasField("start_time"),
        request.HasField("end_time"),
        violations,
    )
    profile_id = None
    if request.profile_id:
        try:
            profile_id = profile_id_of(request.profile_id)
        except RequestInvalid as bad:
            violations.extend(bad.violations)
    _raise_all(violations)
    return RejectedQuery(
        request.page_size,
        request.page_token,
        tuple(sorted(set(request.reasons))),
        start,
        end,
        request.include_reason_counts,
        profile_id,
    )


def profiles_query_from_proto(request: pb.ListProfilesRequest) -> ProfilesQuery:
    violations: list[FieldViolation] = []
    if request.page_size < 0:
        violations.append(_violation("page_size", "must not be negative"))
    if request.country and COUNTRY_PATTERN.fullmatch(request.country) is None:
        violations.append(_violation("country", "must be an ISO 3166-1 alpha-2 code"))
    if request.language and LANGUAGE_PATTERN.fullmatch(request.language) is None:
        violations.append(_violation("language", "must be an ISO 639-1 code"))
    segment_id = None
    if request.segment_id:
        try:
            segment_id = profile_id_of(request.segment_id, "segment_id")
        except RequestInvalid as invalid:
            violations.extend(invalid.violations)
    for name, known in PROFILES_QUERY_ENUMS.items():
        if getattr(request, name) not in known:
            violations.append(_violation(name, "is not a known value"))
    name_prefix = " ".join(request.name_prefix.split())
    if len(name_prefix) > NAME_PREFIX_MAX:
        violations.append(
            _violation("name_prefix", f"must hold at most {NAME_PREFIX_MAX} characters")
        )
    # Dashes are left out wherever they are: a prefix copied from a UUID, cut anywhere.
    profile_id_prefix = request.profile_id_prefix.replace("-", "").lower()
    if request.profile_id_prefix and PROFILE_ID_PREFIX_PATTERN.fullmatch(profile_id_prefix) is None:
        violations.append(
            _violation("profile_id_prefix", "must be 1 to 32 hex digits (dashes are ignored)")
        )
    # Longer than any stored value could be: refused rather than read as "nobody".
    if len(request.custom_id_prefix) > MAX_CUSTOM_ID_LENGTH:
        violations.append(
            _violation("custom_id_prefix", f"must hold at most {MAX_CUSTOM_ID_LENGTH} characters")
        )
    if len(request.email_prefix) > MAX_EMAIL_LENGTH:
        violations.append(
            _violation("email_prefix", f"must hold at most {MAX_EMAIL_LENGTH} characters")
        )
    _raise_all(violations)
    return ProfilesQuery(
        page_size=request.page_size,
        page_token=request.page_token,
        filters=UsersTableFilters(
            identity_filter=request.identity_filter,
            platform=request.platform,
            country=request.country.upper(),
            smart_segment=request.smart_segment,
            smart_segment_flag=request.smart_segment_flag,
            name_prefix=name_prefix,
            segment_id=segment_id,
            language=request.language.lower(),
            reachable_channel=request.reachable_channel,
            profile_id_prefix=profile_id_prefix,
            custom_id_prefix=request.custom_id_prefix,
            # Emails are stored lower-case (ingest lowers them as str.lower does).
            email_prefix=request.email_prefix.lower(),
        ),
        order_by=request.order_by or pb.PROFILE_ORDER_BY_LAST_SEEN,
        ascending=request.sort_order == pb.SORT_ORDER_ASCENDING,
        include_total_size=request.include_total_size,
    )


def activity_from_proto(request: pb.GetActivityRequest) -> tuple[UUID, date, date, str]:
    violations: list[FieldViolation] = []
    profile_id = profile_id_of(request.profile_id)
    days: dict[str, date] = {}
    for name in ("start_date", "end_date"):
        text = getattr(request, name)
        if not text:
            violations.append(_violation(name, 'is required ("YYYY-MM-DD")'))
            continue
        try:
            if DATE_PATTERN.fullmatch(text) is None:
                raise ValueError(text)
            day = date.fromisoformat(text)
        except ValueError:
            violations.append(_violation(name, 'is not a date "YYYY-MM-DD"'))
            continue
        if not FIRST_ACTIVITY_DATE <= day <= LAST_ACTIVITY_DATE:
            violations.append(
                _violation(
                    name,
                    f"must be from {FIRST_ACTIVITY_DATE.isoformat()} "
                    f"to {LAST_ACTIVITY_DATE.isoformat()}",
                )
            )
            continue
        days[name] = day
    if len(days) == 2:
        span = (days["end_date"] - days["start_date"]).days
        if span < 0:
            violations.append(_violation("end_date", "must not be before start_date"))
        elif span > MAX_ACTIVITY_DAYS:
            violations.append(
                _violation("end_date", f"must be at most {MAX_ACTIVITY_DAYS} days after start_date")
            )
    if request.time_zone and not is_time_zone(request.time_zone):
        violations.append(_violation("time_zone", "is not an IANA time zone"))
    _raise_all(violations)
    return profile_id, days["start_date"], days["end_date"], request.time_zone


def top_values_of(request: pb.GetOverviewRequest) -> int:
    violations = []
    if request.top_values < 0:
        violations.append(_violation("top_values", "must not be negative"))
    if not 0 <= request.trend_days <= MAX_TREND_DAYS:
        violations.append(_violation("trend_days", f"must be from 0 to {MAX_TREND_DAYS}"))
    if request.platform not in PLATFORM_NUMBERS:
        violations.append(_violation("platform", "is not a known value"))
    _raise_all(violations)
    if request.top_values == 0:
        return DEFAULT_TOP_VALUES
    return min(request.top_values, MAX_TOP_VALUES)


# -- responses --------------------------------------------------------------------------------


def set_duration_ms(target: Duration, milliseconds: int) -> None:
    # Seconds and nanos carry the same sign (what Duration.FromTimedelta produces).
    sign = -1 if milliseconds < 0 else 1
    magnitude = abs(milliseconds)
    target.seconds = sign * (magnitude // 1000)
    target.nanos = sign * (magnitude % 1000) * 1_000_000


def duration_ms(milliseconds: int) -> Duration:
    result = Duration()
    set_duration_ms(result, milliseconds)
    return result


def attribute_value(value: Mapping[str, Any]) -> types_pb2.AttributeValue:
    kind = value.get("type")
    raw: Any = value.get("value")
    result = types_pb2.AttributeValue()
    if kind == "number":
        result.number_value = float(raw)
    elif kind == "bool":
        result.bool_value = bool(raw)
    elif kind == "timestamp":
        result.timestamp_value.FromDatetime(datetime.fromisoformat(str(raw)))
    elif kind == "url":
        result.url_value = str(raw)
    elif kind == "string_list":
        result.string_list_value.values.extend(str(v) for v in raw)
    else:
        result.string_value = str(raw)
    return result


ATTRIBUTE_TYPES = {
    "string": profile_pb2.ATTRIBUTE_TYPE_STRING,
    "number": profile_pb2.ATTRIBUTE_TYPE_NUMBER,
    "bool": profile_pb2.ATTRIBUTE_TYPE_BOOL,
    "timestamp": profile_pb2.ATTRIBUTE_TYPE_TIMESTAMP,
    "url": profile_pb2.ATTRIBUTE_TYPE_URL,
    "string_list": profile_pb2.ATTRIBUTE_TYPE_STRING_LIST,
}


def _native_text(attribute: AttributeView) -> str:
    raw = attribute.value.get("value")
    return "" if raw is None else str(raw)


def installation_to_proto(view: InstallationView) -> profile_pb2.Installation:
    message = profile_pb2.Installation(
        installation_id=view.installation_id,
        platform=view.platform,  # type: ignore[arg-type]
        app_version=view.app_version,
        os_version=view.os_version,
        device_model=view.device_model,
        push_token_present=view.push_token_present,
        push_opt_in=view.push_opt_in,
        uninstalled=view.uninstalled,
        imported=view.imported,
    )
    set_time(message.first_seen_time, view.first_seen)
    if view.last_seen is not None:
        set_time(message.last_seen_time, view.last_seen)
    return message


def identity_change_to_proto(view: IdentityChangeView) -> profile_pb2.IdentityChange:
    message = profile_pb2.IdentityChange(
        change_id=str(view.change_id),
        kind=CHANGE_KINDS[view.kind],
        cause=CHANGE_CAUSES[view.cause],
        source_profile_id=str(view.source_profile_id),
        target_profile_id=str(view.target_profile_id),
        installation_ids=list(view.installation_ids),
        alias_custom_id=view.alias_custom_id,
    )
    set_time(message.change_time, view.change_time)
    return message


def crash_to_proto(view: CrashView) -> profile_pb2.Crash:
    message = profile_pb2.Crash(
        name=view.name,
        reason=view.reason,
        fatal=view.fatal,
        installation_id=view.installation_id,
        event_id=view.event_id,
    )
    set_time(message.crash_time, view.crash_time)
    return message


def profile_to_proto(view: ProfileView) -> profile_pb2.Profile:
    native = {a.name: _native_text(a) for a in view.attributes if a.native}
    summary = profile_pb2.ProfileSummary(
        profile_id=str(view.profile_id),
        custom_id=view.custom_id,
        anonymous=not view.custom_id,
        language=view.language,
        region=native.get("region", ""),
        timezone=view.time_zone,
        last_session_country=view.last_session_country,
        first_name=native.get("first_name", ""),
        last_name=native.get("last_name", ""),
        avatar_url=native.get("avatar_url", ""),
    )
    if view.first_seen is not None:
        set_time(summary.first_seen_time, view.first_seen)
    if view.last_seen is not None:
        set_time(summary.last_seen_time, view.last_seen)
    message = profile_pb2.Profile(summary=summary, version=view.version)
    held = {(s.channel, s.kind): s for s in view.subscriptions}
    for channel, channel_number in CHANNELS.items():
        for kind, kind_number in SUBSCRIPTION_KINDS.items():
            entry = message.subscriptions.add(channel=channel_number, kind=kind_number)
            state = held.get((channel, kind))
            if state is not None:
                entry.subscribed = state.subscribed
                set_time(entry.last_change_time, state.change_time)
    message.installations.extend(installation_to_proto(i) for i in view.installations)
    message.native_attributes.CopyFrom(
        profile_pb2.NativeAttributes(**{n: native.get(n, "") for n in NATIVE_NAMES})
    )
    for attribute in view.attributes:
        if attribute.native:
            continue
        custom = message.custom_attributes.add(
            name=attribute.name,
            type=ATTRIBUTE_TYPES.get(str(attribute.value.get("type")), 0),
        )
        custom.value.CopyFrom(attribute_value(attribute.value))
        set_time(custom.update_time, attribute.update_time)
    if view.engagement is not None:
        engagement = view.engagement
        message.engagement.score1 = engagement.score1
        message.engagement.score2 = engagement.score2
        message.engagement.score3 = engagement.score3
        message.engagement.score = engagement.score
        message.engagement.percentage = engagement.percentage
        set_time(message.engagement.window_end_time, engagement.window_end_time)
    if view.smart_segment is not None:
        message.smart_segment.segment = view.smart_segment.segment  # type: ignore[assignment]
        message.smart_segment.flag = view.smart_segment.flag  # type: ignore[assignment]
        if view.smart_segment.next_transition_time is not None:
            set_time(
                message.smart_segment.next_transition_time,
                view.smart_segment.next_transition_time,
            )
    counters = view.counters
    message.counters.event_count = counters.event_count
    message.counters.session_count = counters.session_count
    message.counters.crash_count = counters.crash_count
    set_duration_ms(message.counters.total_time_spent, counters.total_time_ms)
    set_duration_ms(message.counters.average_session_duration, counters.average_session_ms)
    if counters.last_crash is not None:
        message.counters.last_crash.CopyFrom(crash_to_proto(counters.last_crash))
    message.identity_changes.extend(identity_change_to_proto(c) for c in view.identity_changes)
    for membership in view.segment_memberships:
        member = message.segment_memberships.add(
            segment_id=str(membership.segment_id), display_name=membership.display_name
        )
        set_time(member.enter_time, membership.enter_time)
    message.funnels.extend(funnel_progress_to_proto(f) for f in view.funnels)
    return message


def funnel_progress_to_proto(view: FunnelProgressView) -> profile_pb2.FunnelProgress:
    """Steps before the first not completed one are COMPLETED (with their time), that one
    NOT_COMPLETED, the rest NOT_REACHED."""
    completed = view.completed_step_count
    message = profile_pb2.FunnelProgress(
        funnel_id=str(view.funnel_id),
        display_name=view.display_name,
        completed_step_count=completed,
        converted=completed == len(view.steps),
    )
    for step in view.steps:
        progress = message.steps.add(step_number=step.step_number, event_name=step.event_name)
        if step.complete_time is not None:
            progress.status = profile_pb2.FUNNEL_STEP_STATUS_COMPLETED
            set_time(progress.complete_time, step.complete_time)
        elif step.step_number == completed + 1:
            progress.status = profile_pb2.FUNNEL_STEP_STATUS_NOT_COMPLETED
        else:
            progress.status = profile_pb2.FUNNEL_STEP_STATUS_NOT_REACHED
    return message


def _attribute_operation(
    operation: types_pb2.AttributeOperation,
) -> timeline_pb2.AttributeOperation:
    which = operation.WhichOneof("attribute")
    if which == "native_attribute":
        name = types_pb2.NativeAttribute.Name(operation.native_attribute)
        name = name.removeprefix("NATIVE_ATTRIBUTE_").lower()
        native = True
    else:
        name, native = operation.custom_attribute.lower(), False
    result = timeline_pb2.AttributeOperation(
        type=operation.kind,  # type: ignore[arg-type]
        name=name,
        native=native,
    )
    if operation.HasField("value"):
        result.value.CopyFrom(operation.value)
    return result


def _set_value(value: Mapping[str, Any], target: types_pb2.AttributeValue) -> None:
    """Fills `target` from an AttributeValue in proto JSON (field names kept); KeyError on a
    field it does not know."""
    for field, raw in value.items():
        if field == "string_value":
            target.string_value = raw
        elif field == "number_value":
            if isinstance(raw, bool):
                raise TypeError(field)
            target.number_value = float(raw)
        elif field == "bool_value":
            if not isinstance(raw, bool):
                raise TypeError(field)
            target.bool_value = raw
        elif field == "timestamp_value":
            target.timestamp_value.FromJsonString(raw)
        elif field == "url_value":
            target.url_value = raw
        elif field == "string_list_value":
            target.string_list_value.SetInParent()
            target.string_list_value.values.extend(raw.get("values", ()))
        else:
            raise KeyError(field)


def _custom_details(payload: Mapping[str, Any], details: timeline_pb2.CustomEventDetails) -> None:
    for field, raw in payload.items():
        if field == "name":
            details.name = raw
        elif field == "label":
            details.label = raw
        elif field == "attributes":
            for name, value in raw.items():
                _set_value(value, details.attributes[name])
        else:
            raise KeyError(field)


def _session_details(payload: Mapping[str, Any], details: timeline_pb2.SessionEventDetails) -> None:
    for field, raw in payload.items():
        if field == "country":
            details.country = raw
        elif field == "duration":
            details.duration.FromJsonString(raw)
        else:
            raise KeyError(field)


def _consent_details(
    payload: Mapping[str, Any], details: timeline_pb2.ConsentChangeDetails
) -> None:
    for field, raw in payload.items():
        if field == "channel":
            details.channel = types_pb2.Channel.Value(raw)
        elif field == "kind":
            details.kind = types_pb2.SubscriptionKind.Value(raw)
        elif field == "subscribed":
            if not isinstance(raw, bool):
                raise TypeError(field)
            details.subscribed = raw
        else:
            raise KeyError(field)


# The details field of the timeline's oneof that each stored kind fills.
DETAILS_FIELD: dict[int, str] = {
    types_pb2.EVENT_KIND_CUSTOM: "custom",
    types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE: "attribute_change",
    types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE: "consent_change",
    types_pb2.EVENT_KIND_INSTALLATION_UPDATE: "installation_update",
    types_pb2.EVENT_KIND_CRASH: "crash",
    **{kind: "session" for kind in SESSION_TYPES},
}

# Details whose stored payload holds scalar fields of the same names only.
SCALAR_DETAIL_FIELDS = {
    "installation_update": frozenset(
        timeline_pb2.InstallationUpdateDetails.DESCRIPTOR.fields_by_name
    ),
    "crash": frozenset(timeline_pb2.CrashDetails.DESCRIPTOR.fields_by_name),
}


def _scalar_details(
    payload: Mapping[str, Any], details: Message, field_names: frozenset[str]
) -> None:
    for field, raw in payload.items():
        if field not in field_names:
            raise KeyError(field)
        if isinstance(getattr(details, field), bool) and not isinstance(raw, bool):
            raise TypeError(field)
        setattr(details, field, raw)


def _parsed_details(
    kind: int, payload: Mapping[str, Any], event: timeline_pb2.TimelineEvent
) -> None:
    """The general (slow) way: json_format reads any proto JSON of the detail."""
    data = dict(payload)
    if kind == types_pb2.EVENT_KIND_CUSTOM:
        json_format.ParseDict(data, event.custom, ignore_unknown_fields=True)
    elif kind in SESSION_TYPES:
        json_format.ParseDict(data, event.session, ignore_unknown_fields=True)
    elif kind == types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE:
        json_format.ParseDict(data, event.consent_change, ignore_unknown_fields=True)
    elif kind == types_pb2.EVENT_KIND_INSTALLATION_UPDATE:
        json_format.ParseDict(data, event.installation_update, ignore_unknown_fields=True)
    elif kind == types_pb2.EVENT_KIND_CRASH:
        json_format.ParseDict(data, event.crash, ignore_unknown_fields=True)


def timeline_details(
    kind: int, payload: Mapping[str, Any], event: timeline_pb2.TimelineEvent
) -> None:
    """Fills `event`'s details from events.payload (the bus detail message in proto JSON, field
    names kept, as ingest stores it). The stored shapes are read field by field (json_format is
    several times slower, and this runs for every event of a timeline page); anything else
    (a JSON name, an unknown field) goes through json_format as before."""
    if kind == types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE:
        detail = bus_pb2.AttributeChangeDetail()
        json_format.ParseDict(dict(payload), detail, ignore_unknown_fields=True)
        event.attribute_change.operations.extend(
            _attribute_operation(op) for op in detail.operations
        )
        return
    try:
        if kind == types_pb2.EVENT_KIND_CUSTOM:
            _custom_details(payload, event.custom)
        elif kind in SESSION_TYPES:
            _session_details(payload, event.session)
        elif kind == types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE:
            _consent_details(payload, event.consent_change)
        elif kind == types_pb2.EVENT_KIND_INSTALLATION_UPDATE:
            _scalar_details(
                payload, event.installation_update, SCALAR_DETAIL_FIELDS["installation_update"]
            )
        elif kind == types_pb2.EVENT_KIND_CRASH:
            _scalar_details(payload, event.crash, SCALAR_DETAIL_FIELDS["crash"])
    except (KeyError, TypeError, ValueError, AttributeError):
        field = event.WhichOneof("details")
        if field is not None:
            event.ClearField(field)
        _parsed_details(kind, payload, event)
    if kind in SESSION_TYPES:
        event.session.type = SESSION_TYPES[kind]  # type: ignore[index]
        if kind == types_pb2.EVENT_KIND_SESSION_START:
            event.session.ClearField("duration")
    # The kind's details are present even when its payload set none of their fields (an
    # installation update that only says "still here"): a client reads details by kind.
    details = DETAILS_FIELD.get(kind)
    if details is not None:
        getattr(event, details).SetInParent()


def event_to_proto(view: EventView) -> timeline_pb2.TimelineEvent:
    message = timeline_pb2.TimelineEvent(
        event_id=view.event_id,
        kind=TIMELINE_KINDS.get(view.kind, 0),  # type: ignore[call-overload]
        installation_id=view.installation_id,
        session_id=view.session_id,
        platform=view.platform,  # type: ignore[arg-type]
        imported=view.imported,
    )
    set_time(message.event_time, view.event_time)
    set_time(message.receive_time, view.receive_time)
    if view.merged_from_profile_id is not None:
        message.merged_from_profile_id = str(view.merged_from_profile_id)
    timeline_details(view.kind, view.payload, message)
    return message


def change_event_to_proto(view: IdentityChangeView) -> timeline_pb2.TimelineEvent:
    message = timeline_pb2.TimelineEvent(
        event_id=str(view.change_id),
        kind=(
            timeline_pb2.TIMELINE_EVENT_KIND_MERGE
            if view.kind == "merge"
            else timeline_pb2.TIMELINE_EVENT_KIND_SPLIT
        ),
        # A split names the installation that moved, unless an erasure redacted it (the change
        # stays in the other person's history, naming nothing of the erased one).
        installation_id=(
            view.installation_ids[0] if view.kind == "split" and view.installation_ids else ""
        ),
    )
    set_time(message.event_time, view.change_time)
    set_time(message.receive_time, view.change_time)
    message.identity_change.CopyFrom(identity_change_to_proto(view))
    return message


def timeline_item_to_proto(item: TimelineItem) -> timeline_pb2.TimelineEvent:
    if isinstance(item, EventView):
        return event_to_proto(item)
    return change_event_to_proto(item)


def ingested_to_proto(event: bus_pb2.IngestedEvent) -> timeline_pb2.TimelineEvent:
    """A live event from a ProfileChanged notice, shaped as ListEvents shows it."""
    detail_field = event.WhichOneof("detail")
    payload: dict[str, Any] = {}
    if detail_field is not None:
        payload = json_format.MessageToDict(
            getattr(event, detail_field), preserving_proto_field_name=True
        )
    return event_to_proto(
        EventView(
            event_seq=0,
            event_id=event.event_id,
            kind=event.kind,
            event_time=event.event_time.ToDatetime(UTC),
            receive_time=event.receive_time.ToDatetime(UTC),
            installation_id=event.installation_id,
            session_id=event.session_id,
            platform=event.platform,
            payload=payload,
            imported=event.imported,
        )
    )


def session_to_proto(view: SessionView) -> timeline_pb2.Session:
    message = timeline_pb2.Session(
        session_id=view.session_id,
        installation_id=view.installation_id,
        platform=view.platform,  # type: ignore[arg-type]
        timed_out=view.timed_out,
        country=view.country,
        event_count=view.event_count,
    )
    set_time(message.start_time, view.start_time)
    if view.end_time is not None:
        set_time(message.end_time, view.end_time)
    set_duration_ms(message.duration, view.duration_ms)
    return message


def day_to_proto(view: DayView) -> timeline_pb2.DayActivity:
    message = timeline_pb2.DayActivity(
        date=view.date, session_count=view.session_count, event_count=view.event_count
    )
    set_duration_ms(message.time_spent, view.time_spent_ms)
    return message


def rejected_to_proto(view: RejectedView) -> timeline_pb2.RejectedEvent:
    message = timeline_pb2.RejectedEvent(
        reason=view.reason,
        field_path=view.field_path,
        message=view.message,
        event_id=view.event_id,
        installation_id=view.installation_id,
        platform=view.platform,  # type: ignore[arg-type]
        raw_payload_json="" if view.payload is None else json.dumps(view.payload, sort_keys=True),
        profile_id="" if view.profile_id is None else str(view.profile_id),
    )
    set_time(message.receive_time, view.receive_time)
    return message


def rejected_reply_bytes(view: RejectedView) -> int:
    """What one rejected event adds to a ListRejectedEventsResponse: its message, plus at most
    6 bytes of field tag and length prefix."""
    return rejected_to_proto(view).ByteSize() + 6


def profile_row_to_proto(view: ProfileRowView) -> pb.ProfileRow:
    message = pb.ProfileRow(
        profile_id=str(view.profile_id),
        custom_id=view.custom_id,
        anonymous=not view.custom_id,
        first_name=view.first_name,
        last_name=view.last_name,
        device_model=view.device_model,
        platform=view.platform,  # type: ignore[arg-type]
        session_count=view.session_count,
        country=view.country,
        smart_segment=view.smart_segment,  # type: ignore[arg-type]
        smart_segment_flag=view.smart_segment_flag,  # type: ignore[arg-type]
        has_user_details=view.has_user_details,
        email=view.email,
        language=view.language,
    )
    if view.last_seen is not None:
        set_time(message.last_seen_time, view.last_seen)
    set_duration_ms(message.total_time_spent, view.time_spent_ms)
    return message


def _breakdown(view: BreakdownView) -> overview_pb2.Breakdown:
    return overview_pb2.Breakdown(
        top_values=[
            overview_pb2.ValueCount(value=v, count=c, platform=p)  # type: ignore[arg-type]
            for v, c, p in view.top_values
        ],
        other_count=view.other_count,
        unknown_count=view.unknown_count,
    )


def overview_to_proto(view: OverviewView) -> overview_pb2.Overview:
    message = overview_pb2.Overview(
        platform=view.platform,  # type: ignore[arg-type]
        install_count=view.install_count,
        push_token_count=view.push_token_count,
        push_opt_in_count=view.push_opt_in_count,
        push_opt_in_rate=(
            view.push_opt_in_count / view.install_count if view.install_count else 0.0
        ),
        imported_unseen_token_count=view.imported_unseen_token_count,
        identified_profile_count=view.identified_count,
        anonymous_profile_count=view.anonymous_count,
        sessionless_profile_count=view.sessionless_count,
        platforms=_breakdown(view.platforms),
        languages=_breakdown(view.languages),
        regions=_breakdown(view.regions),
        countries=_breakdown(view.countries),
        app_versions=_breakdown(view.app_versions),
    )
    set_time(message.as_of_time, view.as_of)
    for rate in view.subscription_rates:
        message.subscription_rates.add(
            channel=CHANNELS[rate.channel],
            kind=SUBSCRIPTION_KINDS[rate.kind],
            addressable_profile_count=rate.addressable,
            subscribed_profile_count=rate.subscribed,
            subscribed_rate=rate.subscribed / rate.addressable if rate.addressable else 0.0,
        )
    for channel, number in CHANNELS.items():
        message.channel_reaches.add(channel=number, reachable_profile_count=view.reach[channel])
    for segment, flags in SEGMENT_FLAGS.items():
        counts = view.smart_segments.get(segment, {})
        entry = message.smart_segments.add(segment=segment, profile_count=sum(counts.values()))
        for flag in flags:
            entry.flags.add(flag=flag, profile_count=counts.get(flag, 0))
    for segment_id, name, size in view.segment_sizes:
        message.segment_sizes.add(segment_id=str(segment_id), display_name=name, profile_count=size)
    for day in view.daily:
        day_count = message.daily.add(
            active_profile_count=day.active_count, new_profile_count=day.new_count
        )
        set_time(day_count.start_time, day.start)
    return message


def watch_item(
    profile_id: str, version: int, publish_time: datetime, **item: Any
) -> pb.WatchProfileResponse:
    """One WatchProfileResponse; `item` names the oneof field set (started=..., event=...)."""
    message = pb.WatchProfileResponse(profile_id=profile_id, version=version, **item)
    set_time(message.publish_time, publish_time)
    return message


def names_of(events: Sequence[bus_pb2.IngestedEvent]) -> list[tuple[bool, str]]:
    """The (native, name) of every attribute the events operated on, in first-seen order."""
    seen: dict[tuple[bool, str], None] = {}
    for event in events:
        if event.WhichOneof("detail") != "attribute_change":
            continue
        for operation in event.attribute_change.operations:
            converted = _attribute_operation(operation)
            seen[(converted.native, converted.name)] = None
    return list(seen)


# The key roles of the contract (profiles.common.v1.Role). The internal credential is no key:
# it has no role of the contract (ROLE_UNSPECIFIED), and no policy row lets it call GetCaller.
_ROLES = {
    "sdk": types_pb2.ROLE_SDK,
    "read": types_pb2.ROLE_READ,
    "admin": types_pb2.ROLE_ADMIN,
}


def caller_to_proto(caller: Caller) -> pb.GetCallerResponse:
    return pb.GetCallerResponse(
        project_id=str(caller.project_id),
        key_id=caller.key_id or "",
        role=_ROLES.get(caller.role, types_pb2.ROLE_UNSPECIFIED),
        display_name=caller.display_name,
    )
