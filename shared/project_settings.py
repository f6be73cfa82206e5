"""Per-project settings: their names, types, defaults and limits, in one registry.

Stored in `project_settings` as JSON; a project that never set one gets the default here.
`profiles settings get|set` and every service read them through this registry, so a typo in a
name or a value of the wrong type is refused when it is set, not discovered when it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True, slots=True)
class ProjectSetting:
    name: str
    default: Any
    description: str
    check: Callable[[Any], str | None]  # returns why the value is refused, or None


def _int_between(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"must be a whole number from {low} to {high}"
        return None

    return check


def _zero_or_between(low: int, high: int) -> Callable[[Any], str | None]:
    between = _int_between(low, high)

    def check(value: Any) -> str | None:
        if value == 0 and not isinstance(value, bool):
            return None
        return (
            None if between(value) is None else f"must be 0 or a whole number from {low} to {high}"
        )

    return check


def _string_list(max_items: int, max_length: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, list) or len(value) > max_items:
            return f"must be a list of at most {max_items} strings"
        if any(not isinstance(v, str) or not 0 < len(v) <= max_length for v in value):
            return f"each item must be a non-empty string of at most {max_length} characters"
        return None

    return check


PROJECT_SETTINGS: dict[str, ProjectSetting] = {
    s.name: s
    for s in (
        ProjectSetting(
            "identity.quarantine_days",
            30,
            "days an erased custom ID stays refused (Identify and events naming it)",
            _int_between(0, 3650),
        ),
        ProjectSetting(
            "identity.extra_junk_custom_ids",
            [],
            "custom IDs refused on top of the built-in junk list (matched case-insensitively)",
            _string_list(1000, 512),
        ),
        ProjectSetting(
            "events.retention_days",
            0,
            "days a project keeps its events (a background sweep removes older ones; profile"
            " totals, first seen, sessions and segment state stay); 0 keeps them forever, else"
            " at least 90, since funnel windows reach 90 days",
            _zero_or_between(90, 36_500),
        ),
        ProjectSetting(
            "segments.new_days",
            7,
            "a profile is New while its first session is less than this many days ago",
            _int_between(1, 365),
        ),
        ProjectSetting(
            "segments.active_window_days",
            14,
            "window in which active days decide Engaged versus Dormant",
            _int_between(1, 365),
        ),
        ProjectSetting(
            "segments.engaged_min_active_days",
            2,
            "active days within the window that make a profile Engaged",
            _int_between(1, 365),
        ),
        ProjectSetting(
            "segments.risky_after_days",
            7,
            "an Engaged profile whose last session is this many days old is flagged Risky",
            _int_between(1, 365),
        ),
        ProjectSetting(
            "segments.change_retention_days",
            30,
            "days the segment change stream keeps entries for WatchSegmentChanges",
            _int_between(1, 365),
        ),
    )
}


class UnknownSetting(InvalidArgument):
    reason = "UNKNOWN_SETTING"


class InvalidSettingValue(InvalidArgument):
    reason = "INVALID_SETTING_VALUE"


def validate_setting(name: str, value: Any) -> None:
    setting = PROJECT_SETTINGS.get(name)
    if setting is None:
        known = ", ".join(sorted(PROJECT_SETTINGS))
        raise UnknownSetting(
            f"unknown setting {name!r}; known: {known}",
            [FieldViolation("name", "unknown setting", UnknownSetting.reason)],
        )
    problem = setting.check(value)
    if problem is not None:
        raise InvalidSettingValue(
            f"{name} {problem}", [FieldViolation("value", problem, InvalidSettingValue.reason)]
        )


def with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """Every known setting, with the stored value where the project set one."""
    return {name: stored.get(name, s.default) for name, s in PROJECT_SETTINGS.items()}
