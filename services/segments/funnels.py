"""Funnels without I/O: a funnel's steps (an event name, optionally a condition on one of the
event's attributes), their stored JSON, and the best attempt of one profile (best_attempt).

The same best-attempt rule runs in SQL for the profile view (segments_read_funnel_progress,
services/segments/schema) and for the per-step counts (filter_sql.funnel_counts_sql);
tests/integration/test_segments_funnel_progress.py and test_segments_funnel_counts.py compare
each with best_attempt on random histories.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from services.segments.filters import (
    ETAG_LENGTH,
    AttributeTest,
    filter_from_json,
    filter_to_json,
)

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
