"""Funnels without I/O: a funnel's steps (an event name, optionally a condition on one of the
event's attributes), their stored JSON, and the best attempt of one profile (best_attempt).

The same best-attempt rule runs in SQL for the profile view (segments_read_funnel_progress,
services/segments/schema), for the per-step counts (filter_sql.funnel_counts_sql) and for the
profiles behind them (filter_sql.funnel_profiles_sql, ListFunnelProfiles);
tests/integration/test_segments_funnel_progress.py and test_segments_funnel_counts.py compare
the first two with best_attempt on random histories, tests/api/test_segments_funnel_profiles.py
the listing with a model of the rule and with the counts.

A listing's page token (FunnelProfilesPosition) is written and checked here: what it lists, the
rule it lists by, the moment it is exact as of, and the last profile of its page.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any
from uuid import UUID

from services.segments.errors import PageInvalid, StepInvalid
from services.segments.filters import (
    ETAG_LENGTH,
    AttributeTest,
    filter_from_json,
    filter_to_json,
)
from shared.errors import FieldViolation

# --- funnels -------------------------------------------------------------------------------

MAX_FUNNELS_PER_PROJECT = 50
MIN_FUNNEL_STEPS = 2
MAX_FUNNEL_STEPS = 10
MIN_CONVERSION_WINDOW = timedelta(minutes=1)
MAX_CONVERSION_WINDOW = timedelta(days=90)
# A window is stored in milliseconds (funnels.conversion_window_ms).
CONVERSION_WINDOW_PRECISION = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class FunnelStep:
    event_name: str  # lower-case
    condition: AttributeTest | None = None  # native False: an event attribute


def steps_to_json(steps: Sequence[FunnelStep]) -> list[dict[str, Any]]:
    return [
        {
            "event_name": s.event_name,
            "condition": None if s.condition is None else filter_to_json(s.condition),
        }
        for s in steps
    ]


def steps_from_json(data: Sequence[Mapping[str, Any]]) -> tuple[FunnelStep, ...]:
    steps = []
    for item in data:
        condition = None if item["condition"] is None else filter_from_json(item["condition"])
        assert condition is None or isinstance(condition, AttributeTest)
        steps.append(FunnelStep(item["event_name"], condition))
    return tuple(steps)


@dataclass(frozen=True, slots=True)
class FunnelDefinition:
    display_name: str
    description: str
    steps: tuple[FunnelStep, ...]
    conversion_window: timedelta
    request_id: UUID | None = None

    @property
    def fingerprint(self) -> str:
        body = [
            self.display_name,
            self.description,
            steps_to_json(self.steps),
            self.conversion_window // timedelta(milliseconds=1),
        ]
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Funnel:
    funnel_id: UUID
    display_name: str
    description: str
    steps: tuple[FunnelStep, ...]
    conversion_window: timedelta
    create_time: datetime
    reached_profile_counts: tuple[int, ...] = ()

    @property
    def etag(self) -> str:
        """A fingerprint of the definition (AIP-154), as CustomSegment.etag: equal etags,
        equal definitions; the counts do not change it."""
        definition = FunnelDefinition(
            self.display_name, self.description, self.steps, self.conversion_window
        )
        return definition.fingerprint[:ETAG_LENGTH]


# The fields UpdateFunnel may change, by their names in the contract's Funnel.
FUNNEL_UPDATABLE = ("display_name", "description", "steps", "conversion_window")


@dataclass(frozen=True, slots=True)
class FunnelUpdate:
    """What UpdateFunnel asks for: the new value of each field it changes (None: kept), and
    the etag the funnel must still have (None: any, the last writer wins)."""

    funnel_id: UUID
    display_name: str | None = None
    description: str | None = None
    steps: tuple[FunnelStep, ...] | None = None
    conversion_window: timedelta | None = None  # kept to the millisecond, as a creation's
    etag: str | None = None

    def applied_to(self, funnel: Funnel) -> Funnel:
        """The funnel with this update's fields, without counts (they follow the definition)."""
        return replace(
            funnel,
            display_name=funnel.display_name if self.display_name is None else self.display_name,
            description=funnel.description if self.description is None else self.description,
            steps=funnel.steps if self.steps is None else self.steps,
            conversion_window=(
                funnel.conversion_window
                if self.conversion_window is None
                else self.conversion_window
            ),
            reached_profile_counts=(),
        )


@dataclass(frozen=True, slots=True)
class FunnelAttempt:
    """A profile's best attempt: the time of each completed step (empty: step 1 never
    happened), and when its conversion window closes."""

    step_times: tuple[datetime, ...]
    step_count: int
    conversion_window: timedelta

    @property
    def start_time(self) -> datetime | None:
        return self.step_times[0] if self.step_times else None

    @property
    def deadline_time(self) -> datetime | None:
        start = self.start_time
        return None if start is None else start + self.conversion_window

    @property
    def converted(self) -> bool:
        return len(self.step_times) == self.step_count


def best_attempt(
    occurrences: Sequence[Sequence[datetime]], conversion_window: timedelta
) -> FunnelAttempt:
    """The best attempt through a funnel of len(occurrences) steps, from the times each step's
    event happened (any order, duplicates allowed).

    An attempt starts at an occurrence of step 1; each later step is the first occurrence
    strictly after the previous step and strictly before start + window (taking the earliest
    never loses a later step). The best attempt completes the most steps; the earliest start
    wins a tie.
    """
    ordered = [sorted(times) for times in occurrences]
    best: tuple[datetime, ...] = ()
    if not ordered:
        return FunnelAttempt(best, 0, conversion_window)
    for start in ordered[0]:
        deadline = start + conversion_window
        times = [start]
        for step in ordered[1:]:
            index = bisect.bisect_right(step, times[-1])
            if index == len(step) or step[index] >= deadline:
                break
            times.append(step[index])
        if len(times) > len(best):
            best = tuple(times)
            if len(best) == len(ordered):
                break  # starts are ascending: no later attempt can beat a full one
    return FunnelAttempt(best, len(ordered), conversion_window)


# --- the profiles behind a step (ListFunnelProfiles) -----------------------------------------


class FunnelProfileSelection(IntEnum):
    """Which profiles of a step a listing returns; the numbers of the contract's
    FunnelProfileSelection."""

    REACHED = 1  # the step's count
    DROPPED = 2  # reached the step and not the next: the step's count minus the next one's


@dataclass(frozen=True, slots=True)
class FunnelProfilesQuery:
    """What a listing asks for: one step (numbered from 1) of one funnel, and which profiles."""

    funnel_id: UUID
    step_number: int
    selection: FunnelProfileSelection


@dataclass(frozen=True, slots=True)
class FunnelStepProfile:
    """One profile at a step: when its best attempt completed the step, and when that attempt
    started (its step 1)."""

    profile_id: UUID
    complete_time: datetime
    attempt_start_time: datetime


def check_step(funnel: Funnel, query: FunnelProfilesQuery) -> None:
    """Raises StepInvalid unless the funnel has the step and, for a drop-off, a step after it
    (nobody drops off after the last step: whoever reached it converted)."""
    count = len(funnel.steps)
    if query.step_number > count:
        why = f"must be 1 to {count}: the funnel has {count} steps"
    elif query.selection == FunnelProfileSelection.DROPPED and query.step_number == count:
        why = (
            "is the funnel's last step, which nobody drops off after (whoever reached it"
            " converted): list the profiles that reached it instead"
        )
    else:
        return
    raise StepInvalid(
        f"step_number {why}", [FieldViolation("step_number", why, StepInvalid.reason)]
    )


def rule_fingerprint(funnel: Funnel) -> str:
    """A fingerprint of what decides who is at which step (the steps and the window), not of
    the name or description: a listing goes on across a rename, not across a rule change."""
    body = [steps_to_json(funnel.steps), funnel.conversion_window // timedelta(milliseconds=1)]
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:RULE_FINGERPRINT_LENGTH]


RULE_FINGERPRINT_LENGTH = 16  # hex digits: 8 bytes in a token
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The last microsecond a datetime holds, counted from the epoch: a token's moment is checked
# against it before it becomes a datetime.
MAX_MICROSECONDS = (datetime.max.replace(tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
# A page token's bytes: version, funnel ID, step number, selection, rule fingerprint, moment
# (microseconds since the epoch), last profile ID. Packed rather than JSON: 68 characters, so
# that the console's pages keep a trail of them in their URL.
TOKEN_LAYOUT = struct.Struct(">B16sBB8sq16s")
TOKEN_VERSION = 1
TOKEN_LENGTH = len(base64.urlsafe_b64encode(bytes(TOKEN_LAYOUT.size)).rstrip(b"="))


@dataclass(frozen=True, slots=True)
class FunnelProfilesPosition:
    """Where a listing stands, as its page token carries it: the query it answers, the rule
    (rule_fingerprint) and the moment (`as_of`) it lists by, and the last profile listed."""

    query: FunnelProfilesQuery
    rule: str
    as_of: datetime
    after: UUID


def encode_funnel_profiles_token(position: FunnelProfilesPosition) -> str:
    raw = TOKEN_LAYOUT.pack(
        TOKEN_VERSION,
        position.query.funnel_id.bytes,
        position.query.step_number,
        int(position.query.selection),
        bytes.fromhex(position.rule),
        (position.as_of - EPOCH) // timedelta(microseconds=1),
        position.after.bytes,
    )
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_funnel_profiles_token(token: str) -> FunnelProfilesPosition | None:
    """The position a page token names; None for no token (the first page). Raises PageInvalid
    for anything but a token encode_funnel_profiles_token wrote (a client may send anything:
    each value is checked here, once, before it is used)."""
    if not token:
        return None
    if len(token) != TOKEN_LENGTH:
        raise _token_invalid()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, funnel, step, selection, rule, moment, after = TOKEN_LAYOUT.unpack(raw)
    except (binascii.Error, ValueError, struct.error):
        raise _token_invalid() from None
    if (
        version != TOKEN_VERSION
        or not 1 <= step <= MAX_FUNNEL_STEPS
        or selection not in FunnelProfileSelection._value2member_map_
        or not 0 <= moment <= MAX_MICROSECONDS
    ):
        raise _token_invalid()
    return FunnelProfilesPosition(
        FunnelProfilesQuery(UUID(bytes=funnel), step, FunnelProfileSelection(selection)),
        rule.hex(),
        EPOCH + timedelta(microseconds=moment),
        UUID(bytes=after),
    )


def check_position(position: FunnelProfilesPosition, query: FunnelProfilesQuery) -> None:
    """Raises PageInvalid when the token was issued for another funnel, step or selection
    (AIP-158: a token continues the listing it came from)."""
    if position.query != query:
        why = "was issued for another funnel_id, step_number or selection"
        raise PageInvalid(
            f"page_token {why}", [FieldViolation("page_token", why, PageInvalid.reason)]
        )


def _token_invalid() -> PageInvalid:
    why = "is not a page token of this RPC"
    return PageInvalid(f"page_token {why}", [FieldViolation("page_token", why, PageInvalid.reason)])
