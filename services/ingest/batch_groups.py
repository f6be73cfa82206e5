"""What one storing transaction is given and what it did, how a batch is split by write
partition, and how the attempts of concurrent batches become one transaction's (group_commit.py)
and its outcome theirs again.

Events are known by their index in their batch. A group numbers its batches' events one after
the other (each batch's indexes moved by the sizes of the batches before it), stores them as
one batch, and gives each batch back the outcome of its own events at their own indexes. Two
batches of a group may carry the same event (a retry racing the original): the first is stored,
the later answered DUPLICATE, as two transactions would have answered them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from uuid import UUID

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest.identity_client import OriginKey
from services.ingest.validation import RejectedEvent, ValidEvent, renumbered


def origin_of(event: ValidEvent) -> OriginKey:
    if event.custom_id is not None:
        return OriginKey(True, event.custom_id)
    assert event.installation_id is not None
    return OriginKey(False, event.installation_id)


def first_occurrences(events: Sequence[ValidEvent]) -> tuple[list[ValidEvent], list[int]]:
    """The first event of each (origin, event_id), and the indexes of later repeats: within a
    batch, and across the batches of a group."""
    seen: set[tuple[OriginKey, str]] = set()
    first: list[ValidEvent] = []
    repeats: list[int] = []
    for event in events:
        key = (origin_of(event), event.event_id)
        if key in seen:
            repeats.append(event.index)
        else:
            seen.add(key)
            first.append(event)
    return first, repeats


@dataclass(frozen=True, slots=True)
class StoreAttempt:
    """One batch's events to store in one transaction: the first occurrence of each of its
    events, their origins' profiles, the events it rejected, and the request's events by index."""

    receive_time: datetime
    events: Sequence[ValidEvent]
    profiles: Mapping[OriginKey, UUID]
    rejected: Sequence[RejectedEvent]
    by_index: Mapping[int, pb.Event]

    @property
    def size(self) -> int:
        """What the attempt weighs in a group: its events, and at least one."""
        return max(1, len(self.events))


@dataclass(slots=True)
class Stored:
    """What one transaction did."""

    accepted: dict[int, UUID] = field(default_factory=dict)  # index -> profile
    duplicates: set[int] = field(default_factory=set)
    orphans: list[ValidEvent] = field(default_factory=list)
    late_rejections: list[RejectedEvent] = field(default_factory=list)
    versions: dict[UUID, int] = field(default_factory=dict)  # touched profile -> version
    session_countries: dict[tuple[str, str], str] = field(default_factory=dict)
    ingested: list[bus_pb2.IngestedEvent] = field(default_factory=list)
    # (SDK installation, imported installation holding its push token) to fold after commit.
    reintegrations: list[tuple[str, str]] = field(default_factory=list)
    # Session starts of the sessions ingest derived (session_derivation), published first.
    derived_starts: list[bus_pb2.IngestedEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Group:
    """Several batches' attempts as one (`attempt`), and where each batch's events start."""

    attempt: StoreAttempt
    offsets: Sequence[int]
    parts: Sequence[StoreAttempt]
    repeats: frozenset[int]  # events another batch of the group carried first


def combine(parts: Sequence[StoreAttempt]) -> Group:
    """The attempts of a group as one attempt (newest receive time: the group is stored after
    every batch of it arrived)."""
    offsets: list[int] = []
    profiles: dict[OriginKey, UUID] = {}
    rejected: list[RejectedEvent] = []
    by_index: dict[int, pb.Event] = {}
    numbered: list[ValidEvent] = []
    offset = 0
    for part in parts:
        offsets.append(offset)
        numbered.extend(e if offset == 0 else renumbered(e, e.index + offset) for e in part.events)
        # Each batch resolved its origins on its own; any of their answers is a profile the
        # origin had, and the insert follows a merge's tombstone or finds an erased one gone.
        profiles.update(part.profiles)
        rejected.extend(part.rejected)
        by_index.update((index + offset, e) for index, e in part.by_index.items())
        offset += max(part.by_index, default=-1) + 1
    events, repeats = first_occurrences(numbered)
    attempt = StoreAttempt(max(p.receive_time for p in parts), events, profiles, rejected, by_index)
    return Group(attempt, offsets, parts, frozenset(repeats))


def split(stored: Stored, group: Group) -> list[Stored]:
    """Each batch's outcome of the group's one transaction, at its own indexes. The notices,
    outbox and versions were the group's (sent once); an imported installation's folding goes
    with the batch whose session start found it, which then waits for it as it did alone."""
    outcomes = [Stored() for _ in group.parts]

    def part_of(index: int) -> tuple[Stored, int]:
        number = bisect_right(group.offsets, index) - 1
        return outcomes[number], group.offsets[number]

    for index, profile_id in stored.accepted.items():
        outcome, offset = part_of(index)
        outcome.accepted[index - offset] = profile_id
    for index in stored.duplicates | group.repeats:
        outcome, offset = part_of(index)
        outcome.duplicates.add(index - offset)
    for event in stored.orphans:
        outcome, offset = part_of(event.index)
        outcome.orphans.append(renumbered(event, event.index - offset))
    for rejection in stored.late_rejections:
        outcome, offset = part_of(rejection.index)
        outcome.late_rejections.append(replace(rejection, index=rejection.index - offset))
    folded: set[tuple[str, str]] = set()
    for outcome, part in zip(outcomes, group.parts, strict=True):
        starters = {
            e.installation_id
            for e in part.events
            if e.kind == types_pb2.EVENT_KIND_SESSION_START and e.installation_id
        }
        for pair in stored.reintegrations:
            if pair[0] in starters and pair not in folded:
                folded.add(pair)
                outcome.reintegrations.append(pair)
    # None is expected here (only a session start finds one); the first batch folds any other.
    outcomes[0].reintegrations.extend(p for p in stored.reintegrations if p not in folded)
    return outcomes


def partition_of(profile_id: UUID, partitions: int) -> int:
    """The writer partition of a profile's events: every event of one profile goes to one."""
    return profile_id.int % partitions


def partitioned(attempt: StoreAttempt, partitions: int) -> list[tuple[int, StoreAttempt]]:
    """A batch's attempt as one attempt per partition that holds some of its events (by the
    profile each origin resolved to), in partition order. The batch's rejected events go with
    the first, and a batch with no event to store is one attempt, for them."""
    events_of: dict[int, list[ValidEvent]] = {}
    for event in attempt.events:
        number = partition_of(attempt.profiles[origin_of(event)], partitions)
        events_of.setdefault(number, []).append(event)
    if not events_of:
        return [(0, attempt)]
    parts: list[tuple[int, StoreAttempt]] = []
    for number in sorted(events_of):
        rejected = attempt.rejected if not parts else ()
        parts.append((number, replace(attempt, events=events_of[number], rejected=rejected)))
    return parts


def merged(outcomes: Sequence[Stored]) -> Stored:
    """One batch's outcome from those of its partitions' transactions (their events are
    disjoint)."""
    whole = Stored()
    for outcome in outcomes:
        whole.accepted.update(outcome.accepted)
        whole.duplicates.update(outcome.duplicates)
        whole.orphans.extend(outcome.orphans)
        whole.late_rejections.extend(outcome.late_rejections)
        whole.reintegrations.extend(outcome.reintegrations)
    whole.orphans.sort(key=lambda e: e.index)
    whole.late_rejections.sort(key=lambda r: r.index)
    return whole
