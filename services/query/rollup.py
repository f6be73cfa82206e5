"""The overview's rollups without I/O: which counters a profile's or an installation's facts
add to, and how the counters move when the facts are recounted.

A counter is keyed by (platform, metric, value): platform 0 holds the whole project, platform P
the profiles with an installation of P (profile metrics) or the installations of P
(installation metrics). Recounting one profile or installation moves each counter by
(keys of the new facts) - (keys of the stored facts), so a repeated recount moves nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

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
        return [(p, metric, value) for p in sorted(platforms) for metric, value in metrics]


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
