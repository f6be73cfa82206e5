"""What query reads, as plain frozen dataclasses: rows of the other services' tables shaped for a
view. No rules live here (query owns none); the servicer turns them into protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar
from uuid import UUID


@dataclass(frozen=True, slots=True)
class InstallationView:
    installation_id: str
    platform: int
    app_version: str
    os_version: str
    device_model: str
    push_token_present: bool
    push_opt_in: bool
    language: str
    timezone: str
    first_seen: datetime
    last_seen: datetime | None
    uninstalled: bool
    imported: bool


@dataclass(frozen=True, slots=True)
class AttributeView:
    native: bool
    name: str
    value: dict[str, Any]  # {"type": "string|number|bool|timestamp|url|string_list", "value": ...}
    update_time: datetime


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    channel: str  # email, sms, push
    kind: str  # marketing, transactional
    subscribed: bool
    change_time: datetime


@dataclass(frozen=True, slots=True)
class CrashView:
    event_id: str
    installation_id: str
    crash_time: datetime
    name: str
    reason: str
    fatal: bool


@dataclass(frozen=True, slots=True)
class IdentityChangeView:
    change_id: UUID
    kind: str  # merge, split
    cause: str  # identify, logout, operator_merge, token_reintegration, identify_switch
    change_time: datetime
    source_profile_id: UUID
    target_profile_id: UUID
    installation_ids: tuple[str, ...]
    alias_custom_id: str


@dataclass(frozen=True, slots=True)
class SmartSegmentView:
    segment: int
    flag: int
    next_transition_time: datetime | None


@dataclass(frozen=True, slots=True)
class EngagementView:
    score1: float  # average session minutes, capped at 2
    score2: int  # sessions, capped at 20
    score3: int  # active days, capped at 7
    window_end_time: datetime

    @property
    def score(self) -> float:
        return self.score1 * self.score2 * self.score3

    @property
    def percentage(self) -> float:
        return round(self.score / 280 * 100, 2)


@dataclass(frozen=True, slots=True)
class CountersView:
    event_count: int
    crash_count: int
    session_count: int
    total_time_ms: int
    # Over the closed sessions only (ended, or closed by ingest's idle sweep), all time.
    average_session_ms: int
    last_crash: CrashView | None


@dataclass(frozen=True, slots=True)
class SegmentMembershipView:
    segment_id: UUID
    display_name: str
    enter_time: datetime


@dataclass(frozen=True, slots=True)
class FunnelStepView:
    step_number: int  # from 1
    event_name: str
    complete_time: datetime | None  # None: not completed in the best attempt


@dataclass(frozen=True, slots=True)
class FunnelProgressView:
    funnel_id: UUID
    display_name: str
    steps: tuple[FunnelStepView, ...]

    @property
    def completed_step_count(self) -> int:
        return sum(1 for s in self.steps if s.complete_time is not None)


@dataclass(frozen=True, slots=True)
class ProfileView:
    profile_id: UUID
    custom_id: str
    version: int
    first_seen: datetime | None
    last_seen: datetime | None
    last_session_country: str
    # By ingest's rules (ingest_read_profile_language, ingest_read_profile_time_zone): the
    # attribute, else the most recently seen installation's that reported one, else that of
    # the most recently seen installation the profile left, as it was then; "" when none.
    language: str
    time_zone: str
    installations: tuple[InstallationView, ...]
    attributes: tuple[AttributeView, ...]
    subscriptions: tuple[SubscriptionView, ...]
    counters: CountersView
    identity_changes: tuple[IdentityChangeView, ...]
    smart_segment: SmartSegmentView | None
    engagement: EngagementView | None = None
    segment_memberships: tuple[SegmentMembershipView, ...] = ()
    funnels: tuple[FunnelProgressView, ...] = ()


@dataclass(frozen=True, slots=True)
class Resolved:
    """The live profile a lookup found; `resolved_from` is the merged-away ID looked up."""

    profile_id: UUID
    resolved_from: UUID | None = None


@dataclass(frozen=True, slots=True)
class EventView:
    event_seq: int
    event_id: str
    kind: int  # profiles.common.v1.EventKind
    event_time: datetime
    receive_time: datetime
    installation_id: str
    session_id: str
    platform: int
    payload: dict[str, Any]
    imported: bool
    merged_from_profile_id: UUID | None = None


TimelineItem = EventView | IdentityChangeView
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class UsersTableFilters:
    """The users table's filters (ListProfiles), 0 or empty when not asked for."""

    identity_filter: int = 0  # ProfileIdentityFilter
    platform: int = 0
    country: str = ""
    smart_segment: int = 0
    smart_segment_flag: int = 0
    name_prefix: str = ""  # spaces normalized
    segment_id: UUID | None = None
    language: str = ""  # lower case
    reachable_channel: int = 0  # Channel
    profile_id_prefix: str = ""  # 1 to 32 lower-case hex digits, no dashes
    custom_id_prefix: str = ""  # as given (custom IDs are case-sensitive)
    email_prefix: str = ""  # lower case, as emails are stored


@dataclass(frozen=True, slots=True)
class ReasonCounts:
    """Rejected events by reason, most frequent first; `at_least` when the count stopped at
    its limit."""

    counts: tuple[tuple[str, int], ...]
    at_least: bool


@dataclass(frozen=True, slots=True)
class EventNameView:
    """One custom event name of a project with its stored events' count and latest event time
    (ListEventNames)."""

    name: str
    event_count: int
    last_seen_time: datetime


@dataclass(frozen=True, slots=True)
class TotalSize:
    """How many items a list's filters match, counted up to a limit: `at_least` when the
    count stopped there."""

    count: int
    at_least: bool


@dataclass(frozen=True, slots=True)
class SessionView:
    session_id: str
    installation_id: str
    platform: int
    start_time: datetime
    end_time: datetime | None
    duration_ms: int
    timed_out: bool
    country: str
    event_count: int


@dataclass(frozen=True, slots=True)
class DayView:
    date: str
    session_count: int
    event_count: int
    time_spent_ms: int


@dataclass(frozen=True, slots=True)
class RejectedView:
    receive_time: datetime
    reason: str
    field_path: str
    message: str
    event_id: str
    installation_id: str
    platform: int
    payload: dict[str, Any] | None
    # The profile it arrived for (or the survivor of a merge since); None when none recorded.
    profile_id: UUID | None = None


@dataclass(frozen=True, slots=True)
class ProfileRowView:
    profile_id: UUID
    custom_id: str
    first_name: str
    last_name: str
    device_model: str
    platform: int
    session_count: int
    last_seen: datetime | None
    time_spent_ms: int
    country: str
    smart_segment: int
    smart_segment_flag: int
    has_user_details: bool = False  # a name, an email or a phone (query_profiles.has_details)
    email: str = ""
    language: str = ""  # ISO 639-1, lower case; ingest's rule (query_profiles.language)


@dataclass(frozen=True, slots=True)
class BreakdownView:
    top_values: tuple[tuple[str, int, int], ...]  # (value, count, platform)
    other_count: int
    unknown_count: int


@dataclass(frozen=True, slots=True)
class SubscriptionRateView:
    channel: str
    kind: str
    addressable: int
    subscribed: int


@dataclass(frozen=True, slots=True)
class DayCountView:
    start: datetime  # the day's midnight UTC
    active_count: int
    new_count: int


@dataclass(frozen=True, slots=True)
class OverviewView:
    platform: int
    as_of: datetime
    install_count: int
    push_token_count: int
    push_opt_in_count: int
    imported_unseen_token_count: int
    subscription_rates: tuple[SubscriptionRateView, ...]
    reach: dict[str, int]  # channel -> reachable profiles
    identified_count: int
    anonymous_count: int
    sessionless_count: int
    smart_segments: dict[int, dict[int, int]]  # segment -> flag -> profiles (flag 0: none)
    platforms: BreakdownView
    languages: BreakdownView
    regions: BreakdownView
    countries: BreakdownView
    app_versions: BreakdownView
    segment_sizes: tuple[tuple[UUID, str, int], ...] = field(default=())
    daily: tuple[DayCountView, ...] = field(default=())  # oldest first
