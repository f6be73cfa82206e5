"""The overview's rollups without I/O: which counters a profile's or an installation's facts
add to, and how the counters move when the facts are recounted; and the custom events a
message adds to ListEventNames' counts (NamedEvents).

A counter is keyed by (platform, metric, value): platform 0 holds the whole project, platform P
the profiles with an installation of P (profile metrics) or the installations of P
(installation metrics). Recounting one profile or installation moves each counter by
(keys of the new facts) - (keys of the stored facts), so a repeated recount moves nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

ALL_PLATFORMS = 0
CHANNELS = ("email", "sms", "push")
SUBSCRIPTION_KINDS = ("marketing", "transactional")

CounterKey = tuple[int, str, str]  # (platform, metric, value)

# Profile metrics.
PROFILES = "profiles"
IDENTIFIED = "identified"
SESSIONLESS = "sessionless"
ADDRESSABLE = "addressable"  # value: "channel:kind"
SUBSCRIBED = "subscribed"  # value: "channel:kind"
REACHABLE = "reachable"  # value: channel
LANGUAGE = "language"  # value: the code, "" when unknown
REGION = "region"
COUNTRY = "country"
# Daily metrics (query_day_counts, 0066), value: the UTC day "YYYY-MM-DD". Active: profiles
# that started a session that day (on a platform: a session on it); new: profiles whose first
# event happened that day (on a platform: profiles with an installation of it).
ACTIVE_DAY = "active_day"
NEW_DAY = "new_day"
DAY_METRICS = frozenset({ACTIVE_DAY, NEW_DAY})
# Installation metrics.
INSTALLS = "installs"
PUSH_TOKENS = "push_tokens"
PUSH_OPT_INS = "push_opt_ins"
IMPORTED_UNSEEN = "imported_unseen"
LIVE_PLATFORM = "live_platform"  # value: the Platform number, "0" when unknown
APP_VERSION = "app_version"  # value: "platform:version", "" when unknown


@dataclass(frozen=True, slots=True)
class ProfileFacts:
    """What the overview counts of one live profile, and its users-table columns."""

    identified: bool
    has_email: bool
    has_phone: bool
    has_token: bool
    push_reachable: bool
    subscribed: frozenset[str]  # "channel:kind" pairs subscribed now
    language: str
    region: str
    country: str
    platforms: frozenset[int]
    has_session: bool
    # "platform:YYYY-MM-DD" for each platform and UTC day the profile started a session on, over
    # the last 100 days as of the recount (the trend shows at most 90).
    session_days: frozenset[str] = frozenset()
    # The UTC day "YYYY-MM-DD" of the profile's first event; "" when it has none.
    first_seen_day: str = ""

    def counter_keys(self) -> list[CounterKey]:
        address = {"email": self.has_email, "sms": self.has_phone, "push": self.has_token}
        metrics: list[tuple[str, str]] = [(PROFILES, "")]
        if self.identified:
            metrics.append((IDENTIFIED, ""))
        if not self.has_session:
            metrics.append((SESSIONLESS, ""))
        for channel in CHANNELS:
            if not address[channel]:
                continue
            for kind in SUBSCRIPTION_KINDS:
                pair = f"{channel}:{kind}"
                metrics.append((ADDRESSABLE, pair))
                if pair in self.subscribed:
                    metrics.append((SUBSCRIBED, pair))
        if self.has_email and "email:marketing" in self.subscribed:
            metrics.append((REACHABLE, "email"))
        if self.has_phone and "sms:marketing" in self.subscribed:
            metrics.append((REACHABLE, "sms"))
        if self.push_reachable:
            metrics.append((REACHABLE, "push"))
        metrics.extend(((LANGUAGE, self.language), (REGION, self.region), (COUNTRY, self.country)))
        platforms = {ALL_PLATFORMS, *self.platforms}
        keys = [(p, metric, value) for p in sorted(platforms) for metric, value in metrics]
        return keys + self.day_keys()

    def day_keys(self) -> list[CounterKey]:
        """The daily counters the profile adds to: once per day it was active (whatever the
        number of sessions and platforms), once per platform it was active on that day, and its
        first seen day on every platform it holds."""
        days: set[CounterKey] = set()
        for entry in self.session_days:
            platform, _, day = entry.partition(":")
            days.add((ALL_PLATFORMS, ACTIVE_DAY, day))
            if int(platform) != ALL_PLATFORMS:
                days.add((int(platform), ACTIVE_DAY, day))
        if self.first_seen_day:
            for p in {ALL_PLATFORMS, *self.platforms}:
                days.add((p, NEW_DAY, self.first_seen_day))
        return sorted(days)


@dataclass(frozen=True, slots=True)
class InstallationFacts:
    """What the overview counts of one installation."""

    platform: int  # 0: never seen by ingest
    app_version: str
    uninstalled: bool
    has_token: bool
    push_opt_in: bool
    imported: bool

    def counter_keys(self) -> list[CounterKey]:
        metrics: list[tuple[str, str]] = [(INSTALLS, "")]
        if self.has_token:
            metrics.append((PUSH_TOKENS, ""))
        if self.push_opt_in:
            metrics.append((PUSH_OPT_INS, ""))
        if self.imported and self.has_token:
            metrics.append((IMPORTED_UNSEEN, ""))
        if not self.uninstalled:
            metrics.append((LIVE_PLATFORM, str(self.platform)))
            known = self.app_version and self.platform
            metrics.append((APP_VERSION, f"{self.platform}:{self.app_version}" if known else ""))
        platforms = {ALL_PLATFORMS, self.platform}
        return [(p, metric, value) for p in sorted(platforms) for metric, value in metrics]


def counter_changes(
    old: Iterable[ProfileFacts | InstallationFacts | None],
    new: Iterable[ProfileFacts | InstallationFacts | None],
) -> list[tuple[CounterKey, int]]:
    """How each counter moves when facts `old` are replaced by `new` (None: no row), sorted by
    key so concurrent writers lock counter rows in one order; counters that do not move are
    left out."""
    delta: Counter[CounterKey] = Counter()
    for facts in new:
        if facts is not None:
            delta.update(facts.counter_keys())
    for facts in old:
        if facts is not None:
            delta.subtract(facts.counter_keys())
    return sorted((key, n) for key, n in delta.items() if n)


@dataclass(frozen=True, slots=True)
class NamedEvent:
    """A stored custom event as ListEventNames counts it: the profile it was stored for, its
    name and event time, and what identifies it (receive time, event ID)."""

    profile_id: UUID
    name: str
    event_time: datetime
    receive_time: datetime
    event_id: str


@dataclass(frozen=True, slots=True)
class NamedEvents:
    """The custom events of one EventsIngested, folded into the event name counts once per
    `batch_id` (the same in every delivery of the message); empty when it carries none."""

    batch_id: UUID
    events: tuple[NamedEvent, ...]
