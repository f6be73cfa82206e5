"""Use cases of custom segments and funnels: definitions, live sizes and per-step counts, funnel
progress, and the periodic evaluation that turns custom segment membership changes into
SegmentMembershipChanged messages (outbox, SEGMENT_CHANGES).

A segment's size is the number of its stored members (custom_segment_members, counted by
triggers into custom_segment_sizes), so reading it costs a few rows at any number of profiles.
Members change in the transaction of every event, merge and erasure of the profile, and with
what time alone changes at each evaluation of the segment by the sweep: the size is exact as
of that evaluation (filters.size_exact_as_of), and the sweep skips segments time cannot change.
Funnel counts and progress are computed at read time with the compiled SQL.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Generic, TypeVar
from uuid import UUID

import asyncpg
import structlog

from services.segments.definitions_repository import (
    DefinitionsRepository,
    DefinitionsTransaction,
    ProfileCheck,
    SegmentRef,
    StoredFunnel,
    StoredSegment,
)
from services.segments.errors import (
    ConcurrentChange,
    EtagMismatch,
    FunnelChanged,
    FunnelNotFound,
    LimitReached,
    NameTaken,
    PageInvalid,
    ProfileNotFound,
    RequestIdReused,
    SegmentNotFound,
)
from services.segments.filters import (
    MAX_SEGMENTS_PER_PROJECT,
    CustomSegment,
    SegmentDefinition,
    SegmentUpdate,
    same_filter,
    size_exact_as_of,
    sweep_due,
)
from services.segments.funnels import (
    MAX_FUNNELS_PER_PROJECT,
    Funnel,
    FunnelAttempt,
    FunnelDefinition,
    FunnelProfilesPosition,
    FunnelProfilesQuery,
    FunnelStepProfile,
    FunnelUpdate,
    best_attempt,
    check_position,
    check_step,
    encode_funnel_profiles_token,
    rule_fingerprint,
)
from services.segments.model import ChangeCause, MembershipChange
from shared.clock import Clock
from shared.errors import FieldViolation

log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# Profiles entering or leaving one segment per evaluation transaction: bounds the rows held in
# memory and the outbox rows of one commit.
EVALUATION_BATCH = 500
# Outbox rows per statement when a new segment announces its members (all in its one
# transaction): bounds one statement's arrays, whatever the segment's size.
ANNOUNCE_CHUNK = 5_000
# Times UpdateSegment starts its recomputation again after a batch lost a deadlock, before
# leaving it to the sweep.
RECOMPUTE_ATTEMPTS = 3
# A segment filled or re-evaluated by at least this many members, and by a tenth of the member
# rows PostgreSQL's statistics know of, has custom_segment_members analyzed at once: autovacuum's
# own rule (a tenth of the table changed), brought forward. Until then the planner takes a new
# segment for one member, and every reader of members by segment (query's users table filtered by
# it, the sweep's scans) plans for one row: a page of a 66,667-member segment read all of them
# with their lookups and sorted them (docs/benchmarks.md, "A large segment's creation").
# Smaller moves cannot mislead a plan by much.
STATISTICS_MIN_MEMBERS_MOVED = 1_000
STATISTICS_SHARE_MOVED = 0.1


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


# ListFunnelProfiles pages profiles, as query's lists of profiles do (50, at most 500: the
# IDs GetProfileRows names in one call).
DEFAULT_PROFILES_PAGE_SIZE = 50
MAX_PROFILES_PAGE_SIZE = 500


def page_size(
    requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    if requested < 0:
        why = "must not be negative"
        raise PageInvalid(
            f"page_size {why}", [FieldViolation("page_size", why, PageInvalid.reason)]
        )
    return default if requested == 0 else min(requested, maximum)


# Positions are create_seq values (bigint); a token names the last row of its page, so its
# position is never negative.
MAX_POSITION = 2**63 - 1
# The tokens this service writes are about 40 characters; a longer one is forged, and is refused
# before decoding so that no client sizes the work (or the nesting) of json.loads.
MAX_TOKEN_LENGTH = 200


def encode_token(kind: str, seq: int) -> str:
    raw = json.dumps({"v": 1, "k": kind, "s": seq}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(kind: str, token: str) -> int:
    """The position after which the next page starts; 0 for no token. Raises PageInvalid for
    anything but a token of `kind` as encode_token writes it (a client may send anything: the
    position is checked to be a bigint here, once, before any statement binds it)."""
    if not token:
        return 0
    body: object = None
    if len(token) <= MAX_TOKEN_LENGTH:
        try:
            body = json.loads(base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()))
        except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
            body = None
    if not isinstance(body, dict):
        raise _token_invalid()
    position = body.get("s")
    if (
        not _int_between(body.get("v"), 1, 1)
        or body.get("k") != kind
        or not _int_between(position, 0, MAX_POSITION)
    ):
        raise _token_invalid()
    assert isinstance(position, int)
    return position


def _int_between(value: object, low: int, high: int) -> bool:
    """Whether a decoded JSON value is an integer in [low, high]: JSON's true and false decode
    to Python ints and 1.0 equals 1, and neither is one."""
    return type(value) is int and low <= value <= high


def _token_invalid() -> PageInvalid:
    why = "is not a page token of this RPC"
    return PageInvalid(f"page_token {why}", [FieldViolation("page_token", why, PageInvalid.reason)])


@dataclass(frozen=True, slots=True)
class FunnelProgress:
    funnel: Funnel
    attempt: FunnelAttempt


@dataclass(frozen=True, slots=True)
class FunnelProfilesRequest:
    """A ListFunnelProfiles call once its fields are checked: the query, the page size
    (coerced) and the position its page token names (None: the first page)."""

    query: FunnelProfilesQuery
    page_size: int
    position: FunnelProfilesPosition | None


@dataclass(frozen=True, slots=True)
class FunnelProfilesPage:
    """A page of a listing: its profiles, the funnel's window (for their deadlines), the
    moment the listing is exact as of, and the next page's token (empty at the end)."""

    profiles: list[FunnelStepProfile]
    conversion_window: timedelta
    as_of: datetime
    next_page_token: str


@dataclass(frozen=True, slots=True)
class SegmentPreview:
    """What CreateSegment with validate_only answers: the segment that would be created, with
    the number of profiles matching it as of `size_time` (nothing stored)."""

    definition: SegmentDefinition
    size: int
    size_time: datetime


@dataclass(slots=True)
class Moves:
    """The profiles an evaluation announced entering and leaving a segment, so far."""

    entered: int = 0
    left: int = 0


@dataclass(frozen=True, slots=True)
class SegmentUpdated:
    """What UpdateSegment answers: the segment as stored after the update (with validate_only,
    as it would be), and how many profiles entered and left its members (would enter and
    leave)."""

    segment: CustomSegment
    entered: int
    left: int


@dataclass(frozen=True, slots=True)
class FunnelPreview:
    """What CreateFunnel with validate_only answers: the funnel that would be created, with
    its per-step counts as of now (nothing stored)."""

    definition: FunnelDefinition
    reached_profile_counts: tuple[int, ...]


def member_statistics_stale(moved: int, rows_known: float) -> bool:
    """Whether moving `moved` members (entered or left, in one creation or evaluation) leaves
    the statistics of custom_segment_members, taken over `rows_known` rows (negative: never
    analyzed), misleading enough to analyze it now."""
    return moved >= STATISTICS_MIN_MEMBERS_MOVED and moved >= STATISTICS_SHARE_MOVED * max(
        rows_known, 0.0
    )


class DefinitionsService:
    def __init__(self, repository: DefinitionsRepository, clock: Clock) -> None:
        self._repository = repository
        self._clock = clock

    # --- custom segments -----------------------------------------------------------------

    async def create_segment(
        self, project_id: UUID, definition: SegmentDefinition
    ) -> CustomSegment:
        """Stores the segment with its current members and returns it with its size. Each
        member is announced as entering it (cause DEFINITION, as the members a filter change
        brings in), in the transaction that stores it: an automation streaming entries gets a
        new segment's first members as it gets every later one, and the stream stays the
        members' exact history. Nobody else writes the segment's members before it commits
        (event transactions and the sweep do not see it yet), so the rows stored are exactly
        the entries announced, each once. Idempotent with request_id (a retry announces
        nothing more). Raises RequestIdReused, NameTaken, LimitReached."""
        now = self._clock.now()
        try:
            async with self._repository.transaction() as tx:
                await tx.lock_definitions(project_id, "segments")
                if definition.request_id is not None:
                    existing = await tx.segment_by_request_id(project_id, definition.request_id)
                    if existing is not None:
                        if existing.fingerprint != definition.fingerprint:
                            raise RequestIdReused(
                                "request_id already created a different segment",
                                metadata={"segment_id": str(existing.segment.segment_id)},
                            )
                        return self._as_of(existing.segment)
                await self._check_new_segment(tx, project_id, definition)
                segment_id = uuid.uuid4()
                members = await tx.insert_segment(project_id, segment_id, definition, now)
                entry = MembershipChange(
                    True, now, ChangeCause.DEFINITION, custom_segment_id=segment_id
                )
                for start in range(0, len(members), ANNOUNCE_CHUNK):
                    chunk = members[start : start + ANNOUNCE_CHUNK]
                    await tx.enqueue_shared_change(project_id, chunk, entry)
        except asyncpg.UniqueViolationError as exc:  # a race the advisory lock did not cover
            raise NameTaken("another segment has this display_name") from exc
        size = len(members)
        log.info("custom_segment_created", segment_id=str(segment_id), size=size)
        await self._refresh_member_statistics(size)
        return CustomSegment(
            segment_id,
            definition.display_name,
            definition.description,
            definition.filter,
            now,
            size,
            now,
        )

    async def preview_segment(
        self, project_id: UUID, definition: SegmentDefinition
    ) -> SegmentPreview:
        """The segment create_segment would create now, and its size (the count of the live
        profiles matching, the members create_segment would store), with nothing stored and
        nothing announced. Checked as create_segment checks a first call: raises NameTaken,
        LimitReached; request_id is not looked up (idempotency does not apply). Reads only, in
        one transaction without the project's definition lock, so it never waits for writers."""
        now = self._clock.now()
        async with self._repository.transaction() as tx:
            await self._check_new_segment(tx, project_id, definition)
            size = await tx.count_matching(project_id, definition.filter, now)
        log.info("custom_segment_previewed", size=size)
        return SegmentPreview(definition, size, now)

    async def _check_new_segment(
        self, tx: DefinitionsTransaction, project_id: UUID, definition: SegmentDefinition
    ) -> None:
        """What refuses a new segment beside its fields: its name taken, the project full."""
        if await tx.segment_name_taken(project_id, definition.display_name):
            raise NameTaken("another segment has this display_name")
        if await tx.count_segments(project_id) >= MAX_SEGMENTS_PER_PROJECT:
            raise LimitReached(
                f"the project has {MAX_SEGMENTS_PER_PROJECT} segments; delete one first"
            )

    def _as_of(self, segment: CustomSegment) -> CustomSegment:
        """The stored segment with the time its size is exact as of (stored: its last complete
        evaluation)."""
        size_time = size_exact_as_of(segment.filter, segment.size_time, self._clock.now())
        return replace(segment, size_time=size_time)

    async def get_segment(self, project_id: UUID, segment_id: UUID) -> CustomSegment:
        stored = await self._repository.segment(project_id, segment_id)
        if stored is None:
            raise SegmentNotFound(f"no custom segment {segment_id} in this project")
        return self._as_of(stored.segment)

    async def require_segment(self, project_id: UUID, segment_id: UUID) -> None:
        if await self._repository.segment(project_id, segment_id) is None:
            raise SegmentNotFound(f"no custom segment {segment_id} in this project")

    async def list_segments(
        self, project_id: UUID, requested_size: int, token: str
    ) -> Page[CustomSegment]:
        size = page_size(requested_size)
        after = decode_token("segments", token)
        stored = await self._repository.segments(project_id, after, size + 1)
        items = [self._as_of(s.segment) for s in stored[:size]]
        next_token = encode_token("segments", stored[size - 1].seq) if len(stored) > size else ""
        return Page(items, next_token)

    async def update_segment(self, project_id: UUID, update: SegmentUpdate) -> SegmentUpdated:
        """Changes the segment's definition. After a filter change, recomputes its members for
        the new filter before returning: the members that no longer match leave and the
        profiles that match now enter, each announced (cause DEFINITION); a profile matching
        both is not touched, nor is any member when only the name or description changed.
        The change commits first, under a lock that waits for the event transactions that
        read the old filter (see LOCK_SEGMENT_FOR_UPDATE): from then on every event is
        evaluated against the new filter, and the recomputation, which locks and checks its
        candidates again as the sweep does, never announces a profile an event just moved.
        Concurrent updates apply one after the other (the project's definition lock).
        Idempotent: the same update again changes nothing. Raises SegmentNotFound,
        EtagMismatch, NameTaken."""
        try:
            async with self._repository.transaction() as tx:
                await tx.lock_definitions(project_id, "segments")
                stored = await tx.lock_segment_for_update(project_id, update.segment_id)
                current, updated = await self._checked_segment_update(
                    tx, project_id, update, stored
                )
                refilter = not same_filter(current.filter, updated.filter)
                if updated != current:
                    await tx.update_segment(project_id, updated, refilter=refilter)
        except asyncpg.UniqueViolationError as exc:  # a race the advisory lock did not cover
            raise NameTaken("another segment has this display_name") from exc
        moves = Moves()
        if refilter:
            ref = SegmentRef(
                project_id, update.segment_id, updated.filter, current.create_time, None
            )
            await self._recompute(ref, moves)
            await self._refresh_member_statistics(moves.entered + moves.left)
        log.info(
            "custom_segment_updated",
            segment_id=str(update.segment_id),
            refilter=refilter,
            entered=moves.entered,
            left=moves.left,
        )
        segment = await self.get_segment(project_id, update.segment_id)
        return SegmentUpdated(segment, moves.entered, moves.left)

    async def _recompute(self, ref: SegmentRef, moves: Moves) -> None:
        """The members of a segment whose filter just changed, recomputed for it (cause
        DEFINITION). A batch that lost a deadlock to a merge or an event (which lock the same
        profiles) rolled back alone: the evaluation, idempotent, starts again from what is
        stored; after RECOMPUTE_ATTEMPTS the sweep finishes it (the change cleared
        evaluate_time, so the segment is due at its next run)."""
        for attempt in range(1, RECOMPUTE_ATTEMPTS + 1):
            try:
                await self._evaluate(ref, ChangeCause.DEFINITION, None, moves, wait=True)
                return
            except ConcurrentChange:
                log.info(
                    "custom_segment_recompute_retried",
                    segment_id=str(ref.segment_id),
                    attempt=attempt,
                )
        log.warning("custom_segment_recompute_left_to_sweep", segment_id=str(ref.segment_id))

    async def preview_segment_update(
        self, project_id: UUID, update: SegmentUpdate
    ) -> SegmentUpdated:
        """The segment update_segment would leave now, with the profiles that would enter and
        leave its members, with nothing stored and nothing announced. Checked as update_segment
        checks it: raises SegmentNotFound, EtagMismatch, NameTaken. Reads only, without locks,
        so it never waits for writers."""
        now = self._clock.now()
        async with self._repository.transaction() as tx:
            stored = await tx.segment(project_id, update.segment_id)
            current, updated = await self._checked_segment_update(tx, project_id, update, stored)
            if same_filter(current.filter, updated.filter):
                return SegmentUpdated(self._as_of(updated), 0, 0)
            size, entered, left = await tx.membership_diff(
                project_id, update.segment_id, updated.filter, now
            )
        log.info("custom_segment_update_previewed", size=size, entered=entered, left=left)
        return SegmentUpdated(replace(updated, size=size, size_time=now), entered, left)

    async def _checked_segment_update(
        self,
        tx: DefinitionsTransaction,
        project_id: UUID,
        update: SegmentUpdate,
        stored: StoredSegment | None,
    ) -> tuple[CustomSegment, CustomSegment]:
        """(the segment, the segment updated) once nothing refuses the update: the segment
        exists, still has the etag the caller read, and its new name is no other's."""
        if stored is None:
            raise SegmentNotFound(f"no custom segment {update.segment_id} in this project")
        current = stored.segment
        if update.etag is not None and update.etag != current.etag:
            raise EtagMismatch("the segment changed since it was read (etag); read it again")
        if update.display_name is not None and await tx.segment_name_taken_by_other(
            project_id, update.display_name, update.segment_id
        ):
            raise NameTaken("another segment has this display_name")
        return current, update.applied_to(current)

    async def delete_segment(self, project_id: UUID, segment_id: UUID, allow_missing: bool) -> None:
        """Deletes the segment and its stored members; members get no LEFT change."""
        async with self._repository.transaction() as tx:
            deleted = await tx.delete_segment(project_id, segment_id)
        if not deleted and not allow_missing:
            raise SegmentNotFound(f"no custom segment {segment_id} in this project")

    # --- evaluation ------------------------------------------------------------------------

    async def evaluate_all(
        self, cause: ChangeCause = ChangeCause.TIME, *, due_only: bool = False
    ) -> int:
        """Evaluates every custom segment of every project (with `due_only`, those model.sweep_due
        picks: a segment time alone cannot change is left alone once settled); returns the
        changes announced. A segment whose batch lost a deadlock to an event transaction (which
        locks the same profiles) is left to the next run."""
        total = 0
        now = self._clock.now()
        for ref in await self._repository.all_segments():
            if due_only and not sweep_due(ref.filter, ref.create_time, ref.evaluate_time, now):
                continue
            # No evaluation since its filter changed (update_segment clears evaluate_time): the
            # changes found finish that recomputation (its caller went away, or this runs
            # beside it), so they keep its cause.
            why = ChangeCause.DEFINITION if ref.evaluate_time is None else cause
            try:
                total += await self.evaluate(ref, why)
            except ConcurrentChange:
                log.info("custom_segment_evaluation_retried_later", segment_id=str(ref.segment_id))
        return total

    async def evaluate_project(
        self,
        project_id: UUID,
        cause: ChangeCause,
        on_segment_done: Callable[[int, int, set[UUID]], None] | None = None,
    ) -> set[UUID]:
        """Evaluates the project's segments; returns the profiles whose membership changed."""
        refs = await self._repository.all_segments(project_id)
        changed: set[UUID] = set()
        for index, ref in enumerate(refs, start=1):
            await self.evaluate(ref, cause, changed)
            if on_segment_done is not None:
                on_segment_done(index, len(refs), changed)
        return changed

    async def evaluate(
        self, ref: SegmentRef, cause: ChangeCause, changed: set[UUID] | None = None
    ) -> int:
        """Diffs the segment's live members against the stored ones, in bounded batches, and
        announces each profile that entered or left (a merged-away profile leaves with cause
        MERGE, an erased one with DELETION). Safe on several replicas: the segment row is
        locked (SKIP LOCKED) for each batch. Safe beside the event transactions, which evaluate
        their profile as they handle it: the candidates are locked as those transactions lock
        them, then checked again, so a profile an event just moved is not announced twice."""
        moves = Moves()
        await self._evaluate(ref, cause, changed, moves)
        await self._refresh_member_statistics(moves.entered + moves.left)
        return moves.entered + moves.left

    async def _refresh_member_statistics(self, moved: int) -> None:
        """Analyzes custom_segment_members when `moved` members just entered or left a segment
        in numbers its statistics would misjudge (member_statistics_stale)."""
        if moved < STATISTICS_MIN_MEMBERS_MOVED:
            return  # the common case, without reading the statistics
        if member_statistics_stale(moved, await self._repository.member_rows_known()):
            await self._repository.analyze_members()
            log.info("custom_segment_members_analyzed", moved=moved)

    async def _evaluate(
        self,
        ref: SegmentRef,
        cause: ChangeCause,
        changed: set[UUID] | None,
        moves: Moves,
        *,
        wait: bool = False,
    ) -> None:
        """evaluate, counting in `moves` the profiles announced entering and leaving (as each
        batch commits, so a later batch that fails leaves the count of those before it); with
        `wait`, a batch waits for another evaluator's batch instead of leaving the segment to
        it. Each batch reads the filter as it locks the segment, so an evaluation under way when
        the filter changes goes on with the new one."""
        while True:
            now = self._clock.now()
            async with self._repository.transaction() as tx:
                node = await tx.lock_segment(ref.project_id, ref.segment_id, wait=wait)
                if node is None:
                    return  # deleted, or (without `wait`) another replica is evaluating it
                entered = await tx.entered(
                    ref.project_id, ref.segment_id, node, now, EVALUATION_BATCH
                )
                left = await tx.left(ref.project_id, ref.segment_id, node, now, EVALUATION_BATCH)
                candidates = [*entered, *left]
                # Only a batch that found less than a batch to move ends the evaluation: it
                # alone records the time the members were exact as of (evaluate_time).
                full = len(entered) >= EVALUATION_BATCH or len(left) >= EVALUATION_BATCH
                changes: list[tuple[UUID, MembershipChange]] = []
                if candidates:
                    await tx.lock_segment_profiles(ref.project_id, candidates)
                    checks = await tx.check_profiles(
                        ref.project_id, ref.segment_id, node, candidates, now
                    )
                    changes = await _apply(
                        tx,
                        ref.project_id,
                        ref.segment_id,
                        [c for c in checks if c.matches and not c.member],
                        [c for c in checks if c.member and not c.matches],
                        now,
                        cause,
                        touch=not full,
                    )
                else:
                    await tx.apply_members(ref.project_id, ref.segment_id, [], [], now)
                await tx.enqueue_changes(ref.project_id, changes)
            entered_now = sum(1 for _, change in changes if change.entered)
            moves.entered += entered_now
            moves.left += len(changes) - entered_now
            if changed is not None:
                changed.update(p for p, _ in changes)
            if not full or not changes:
                return

    async def evaluate_profiles(
        self,
        tx: DefinitionsTransaction,
        project_id: UUID,
        profile_ids: Sequence[UUID],
        now: datetime,
        cause: ChangeCause,
    ) -> list[tuple[UUID, MembershipChange]]:
        """Evaluates every custom segment of the project for each profile, in the caller's
        transaction (which must hold the profiles' segment_profiles locks), writes the
        memberships that changed and enqueues their ENTERED/LEFT changes (outbox); returns
        them. A merged-away profile leaves with cause MERGE, an erased one with DELETION.
        Idempotent: a second run finds nothing to change."""
        segments = await tx.segments_for_profile(project_id)
        if not segments:
            return []
        nodes = [node for _, node in segments]
        changes: list[tuple[UUID, MembershipChange]] = []
        for profile_id in dict.fromkeys(profile_ids):
            members = await tx.memberships(project_id, profile_id)
            match = await tx.match_profile(project_id, profile_id, nodes, now)
            erased = match is None
            merged = match is not None and match.merged
            for index, (segment_id, _) in enumerate(segments):
                matches = match is not None and match.matches[index]
                member = segment_id in members
                if matches == member:
                    continue
                check = ProfileCheck(profile_id, erased, merged, member, matches)
                changes.extend(
                    await _apply(
                        tx,
                        project_id,
                        segment_id,
                        [check] if matches else [],
                        [] if matches else [check],
                        now,
                        cause,
                        touch=False,
                    )
                )
        await tx.enqueue_changes(project_id, changes)
        return changes

    # --- funnels ---------------------------------------------------------------------------

    async def create_funnel(self, project_id: UUID, definition: FunnelDefinition) -> Funnel:
        """Stores the funnel and returns it with its per-step counts. Idempotent with
        request_id. Raises RequestIdReused, NameTaken, LimitReached."""
        funnel = await self._store_funnel(project_id, definition)
        # Counted after the commit, on a connection of its own: counting inside the transaction
        # would wait for a second pooled connection while holding the first one and the
        # project's definition lock, and retries of the same request_id queued on that lock
        # hold every other connection: a burst of them deadlocked the pool until their deadlines.
        return await self._counted(project_id, funnel)

    async def _store_funnel(self, project_id: UUID, definition: FunnelDefinition) -> Funnel:
        """The funnel its request_id already created, or the newly stored one; uncounted.
        Uses one pooled connection only, as it holds the project's definition lock."""
        now = self._clock.now()
        try:
            async with self._repository.transaction() as tx:
                await tx.lock_definitions(project_id, "funnels")
                if definition.request_id is not None:
                    existing = await tx.funnel_by_request_id(project_id, definition.request_id)
                    if existing is not None:
                        if existing.fingerprint != definition.fingerprint:
                            raise RequestIdReused(
                                "request_id already created a different funnel",
                                metadata={"funnel_id": str(existing.funnel.funnel_id)},
                            )
                        return existing.funnel
                await self._check_new_funnel(tx, project_id, definition)
                funnel_id = uuid.uuid4()
                await tx.insert_funnel(project_id, funnel_id, definition, now)
        except asyncpg.UniqueViolationError as exc:
            raise NameTaken("another funnel has this display_name") from exc
        return Funnel(
            funnel_id,
            definition.display_name,
            definition.description,
            definition.steps,
            definition.conversion_window,
            now,
        )

    async def _check_new_funnel(
        self, tx: DefinitionsTransaction, project_id: UUID, definition: FunnelDefinition
    ) -> None:
        """What refuses a new funnel beside its fields: its name taken, the project full."""
        if await tx.funnel_name_taken(project_id, definition.display_name):
            raise NameTaken("another funnel has this display_name")
        if await tx.count_funnels(project_id) >= MAX_FUNNELS_PER_PROJECT:
            raise LimitReached(
                f"the project has {MAX_FUNNELS_PER_PROJECT} funnels; delete one first"
            )

    async def preview_funnel(self, project_id: UUID, definition: FunnelDefinition) -> FunnelPreview:
        """The funnel create_funnel would create now, with its per-step counts as of now, with
        nothing stored. Checked as create_funnel checks a first call: raises NameTaken,
        LimitReached; request_id is not looked up (idempotency does not apply)."""
        async with self._repository.transaction() as tx:
            await self._check_new_funnel(tx, project_id, definition)
        # Counted after the checks' connection went back to the pool, as create_funnel does.
        counts = await self._repository.funnel_counts(project_id, definition, self._clock.now())
        return FunnelPreview(definition, tuple(counts))

    async def update_funnel(self, project_id: UUID, update: FunnelUpdate) -> Funnel:
        """Changes the funnel's definition and returns it with its per-step counts by the new
        one. Nothing per profile is stored (counts and progress are read from events with the
        definition of the moment), so nothing else changes. Concurrent updates apply one after
        the other. Idempotent. Raises FunnelNotFound, EtagMismatch, NameTaken."""
        try:
            async with self._repository.transaction() as tx:
                await tx.lock_definitions(project_id, "funnels")
                stored = await tx.lock_funnel_for_update(project_id, update.funnel_id)
                current, updated = await self._checked_funnel_update(tx, project_id, update, stored)
                if updated != current:
                    await tx.update_funnel(project_id, updated)
        except asyncpg.UniqueViolationError as exc:
            raise NameTaken("another funnel has this display_name") from exc
        log.info("funnel_updated", funnel_id=str(update.funnel_id), changed=updated != current)
        # Counted after the commit, on a connection of its own, as create_funnel does.
        return await self._counted(project_id, updated)

    async def preview_funnel_update(self, project_id: UUID, update: FunnelUpdate) -> Funnel:
        """The funnel update_funnel would leave now, with its per-step counts as of now, with
        nothing stored. Checked as update_funnel checks it: raises FunnelNotFound,
        EtagMismatch, NameTaken."""
        async with self._repository.transaction() as tx:
            stored = await tx.funnel(project_id, update.funnel_id)
            _, updated = await self._checked_funnel_update(tx, project_id, update, stored)
        return await self._counted(project_id, updated)

    async def _checked_funnel_update(
        self,
        tx: DefinitionsTransaction,
        project_id: UUID,
        update: FunnelUpdate,
        stored: StoredFunnel | None,
    ) -> tuple[Funnel, Funnel]:
        """(the funnel, the funnel updated) once nothing refuses the update."""
        if stored is None:
            raise FunnelNotFound(f"no funnel {update.funnel_id} in this project")
        current = stored.funnel
        if update.etag is not None and update.etag != current.etag:
            raise EtagMismatch("the funnel changed since it was read (etag); read it again")
        if update.display_name is not None and await tx.funnel_name_taken_by_other(
            project_id, update.display_name, update.funnel_id
        ):
            raise NameTaken("another funnel has this display_name")
        return current, update.applied_to(current)

    async def get_funnel(self, project_id: UUID, funnel_id: UUID) -> Funnel:
        """The funnel with its per-step counts as of now. Raises FunnelNotFound."""
        stored = await self._repository.funnel(project_id, funnel_id)
        if stored is None:
            raise FunnelNotFound(f"no funnel {funnel_id} in this project")
        return await self._counted(project_id, stored.funnel)

    async def _counted(self, project_id: UUID, funnel: Funnel) -> Funnel:
        counts = await self._repository.funnel_counts(project_id, funnel, self._clock.now())
        return replace(funnel, reached_profile_counts=tuple(counts))

    async def list_funnels(self, project_id: UUID, requested_size: int, token: str) -> Page[Funnel]:
        size = page_size(requested_size)
        after = decode_token("funnels", token)
        stored = await self._repository.funnels(project_id, after, size + 1)
        items = [await self._counted(project_id, s.funnel) for s in stored[:size]]
        next_token = encode_token("funnels", stored[size - 1].seq) if len(stored) > size else ""
        return Page(items, next_token)

    async def delete_funnel(self, project_id: UUID, funnel_id: UUID, allow_missing: bool) -> None:
        async with self._repository.transaction() as tx:
            deleted = await tx.delete_funnel(project_id, funnel_id)
        if not deleted and not allow_missing:
            raise FunnelNotFound(f"no funnel {funnel_id} in this project")

    async def list_funnel_profiles(
        self, project_id: UUID, request: FunnelProfilesRequest
    ) -> FunnelProfilesPage:
        """A page of the profiles at one step of a funnel (reached, or dropped off after it),
        in profile_id order. The first page reads as of now; its token carries that moment and
        the funnel's rule, and every later page reads as of the same moment by the same rule,
        so on unchanged events the pages list exactly the step's count of GetFunnel at that
        moment. Raises FunnelNotFound, StepInvalid, PageInvalid (a token of another listing),
        FunnelChanged (the steps or window changed since the first page)."""
        query, position = request.query, request.position
        stored = await self._repository.funnel(project_id, query.funnel_id)
        if stored is None:
            raise FunnelNotFound(f"no funnel {query.funnel_id} in this project")
        funnel = stored.funnel
        check_step(funnel, query)
        rule = rule_fingerprint(funnel)
        if position is None:
            as_of, after = self._clock.now(), None
        else:
            check_position(position, query)
            if position.rule != rule:
                raise FunnelChanged(
                    "the funnel's steps or conversion window changed since the first page:"
                    " list again from the first page"
                )
            as_of, after = position.as_of, position.after
        size = request.page_size
        found = await self._repository.funnel_profiles(
            project_id, funnel, query, as_of, after, size + 1
        )
        next_token = ""
        if len(found) > size:
            last = found[size - 1].profile_id
            next_token = encode_funnel_profiles_token(
                FunnelProfilesPosition(query, rule, as_of, last)
            )
        return FunnelProfilesPage(found[:size], funnel.conversion_window, as_of, next_token)

    async def funnel_progress(
        self, project_id: UUID, profile_id: UUID, funnel_id: UUID | None
    ) -> tuple[UUID, list[FunnelProgress]]:
        """The profile's best attempt in every funnel (or one), oldest funnel first; a merged-
        away ID resolves to its survivor, whose events include the merged ones. Raises
        ProfileNotFound, FunnelNotFound."""
        live_id = await self._repository.profile_exists(project_id, profile_id)
        if live_id is None:
            raise ProfileNotFound(f"no profile {profile_id} in this project")
        if funnel_id is not None:
            stored = await self._repository.funnel(project_id, funnel_id)
            if stored is None:
                raise FunnelNotFound(f"no funnel {funnel_id} in this project")
            funnels = [stored.funnel]
        else:
            funnels = []
            after = 0
            while True:
                batch = await self._repository.funnels(project_id, after, MAX_PAGE_SIZE)
                funnels.extend(s.funnel for s in batch)
                if len(batch) < MAX_PAGE_SIZE:
                    break
                after = batch[-1].seq
        now = self._clock.now()
        progress = []
        for funnel in funnels:
            occurrences = await self._repository.funnel_occurrences(
                project_id, live_id, funnel, now
            )
            progress.append(
                FunnelProgress(funnel, best_attempt(occurrences, funnel.conversion_window))
            )
        return live_id, progress


async def _apply(
    tx: DefinitionsTransaction,
    project_id: UUID,
    segment_id: UUID,
    entering: Sequence[ProfileCheck],
    leaving: Sequence[ProfileCheck],
    now: datetime,
    cause: ChangeCause,
    *,
    touch: bool = True,
) -> list[tuple[UUID, MembershipChange]]:
    """Writes one segment's membership difference; returns the changes to announce (only the
    rows really written), leavers first."""
    entered, left = await tx.apply_members(
        project_id,
        segment_id,
        [c.profile_id for c in entering],
        [c.profile_id for c in leaving],
        now,
        touch=touch,
    )
    why = {c.profile_id: _leave_cause(c, cause) for c in leaving}
    changes = [
        (p, MembershipChange(False, now, why[p], custom_segment_id=segment_id)) for p in left
    ]
    changes.extend(_entered(segment_id, entered, now, cause))
    return changes


def _entered(
    segment_id: UUID, profile_ids: Sequence[UUID], now: datetime, cause: ChangeCause
) -> list[tuple[UUID, MembershipChange]]:
    """The ENTERED changes of profiles just written as the segment's members."""
    return [
        (p, MembershipChange(True, now, cause, custom_segment_id=segment_id)) for p in profile_ids
    ]


def _leave_cause(check: ProfileCheck, cause: ChangeCause) -> ChangeCause:
    if check.erased:
        return ChangeCause.DELETION
    if check.merged:
        return ChangeCause.MERGE
    return cause
