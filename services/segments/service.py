"""Segments' use cases: record sessions, merges and erasures from the bus, classify, sweep the
transitions time causes, answer reads exact as of the clock's now, and serve the change stream.

Every write to a profile's sessions recomputes its stored classification in the same
transaction and enqueues the membership changes (outbox, SEGMENT_CHANGES) there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar
from uuid import UUID

import structlog

from services.segments.change_stream import (
    ChangeStream,
    RecordedChange,
    cursor_before,
    parse_cursor,
)
from services.segments.definitions import DefinitionsService
from services.segments.definitions_repository import DefinitionsRepository
from services.segments.errors import (
    ConcurrentChange,
    CursorExpired,
    CursorInvalid,
    ProfileNotFound,
    RecomputeInterrupted,
    StartTimeInvalid,
)
from services.segments.model import (
    ALL_PLATFORMS,
    NO_SEGMENT,
    ChangeCause,
    Distribution,
    Engagement,
    History,
    MembershipChange,
    ProfileActivity,
    RecomputePhase,
    RecomputeProgress,
    SegmentFlag,
    SmartSegment,
    SmartSegmentFacts,
    StoredState,
    Thresholds,
    advance,
    changes_between,
    classify,
    engagement,
    reclassification,
)
from services.segments.repository import ProfileRow, SegmentsRepository, SegmentsTransaction
from shared.clock import Clock
from shared.db import bound_statements
from shared.errors import FieldViolation
from shared.tenancy import TenancyRepository

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A profile ID followed through merges: our own merges flatten chains, but a merge message may
# be handled after an event of the merged profile's later survivor; a few hops cover it.
MAX_HOPS = 4
RACE_RETRIES = 3
WATCH_BATCH = 500
# How far ahead of the server's clock a watch's start_time may be (a client's clock drift).
WATCH_START_AHEAD_LIMIT_MS = 10 * 60 * 1000
# Profiles reclassified per transaction of RecomputeAll (and between two progress updates).
RECOMPUTE_BATCH = 200
# How often a RecomputeAll follower hears about progress within a phase.
PROGRESS_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which changes a watcher wants: all (every field None), one segment or one flag."""

    segment: SmartSegment | None = None
    flag: SegmentFlag | None = None
    custom_segment_id: UUID | None = None

    def matches(self, change: MembershipChange) -> bool:
        if self.segment is not None:
            return change.segment == self.segment
        if self.flag is not None:
            return change.flag == self.flag
        if self.custom_segment_id is not None:
            return change.custom_segment_id == self.custom_segment_id
        return True


@dataclass(frozen=True, slots=True)
class WatchStart:
    """Where a watch starts: after a cursor, at a time (epoch ms), or (both None) at the end."""

    after: str | None = None
    time_ms: int | None = None


class SegmentsService:
    def __init__(
        self,
        repository: SegmentsRepository,
        tenancy: TenancyRepository,
        clock: Clock,
        changes: ChangeStream,
        definitions: DefinitionsService | None = None,
        definitions_repository: DefinitionsRepository | None = None,
    ) -> None:
        self._repository = repository
        self._tenancy = tenancy
        self._clock = clock
        self._changes = changes
        self._definitions = definitions
        self._definitions_repository = definitions_repository
        self._recomputes: dict[UUID, RecomputeRun] = {}

    async def _thresholds(self, project_id: UUID) -> Thresholds:
        return Thresholds.from_settings(await self._tenancy.get_settings(project_id))

    async def _retrying(self, work: Callable[[], Awaitable[T]]) -> T:
        """Runs a transaction again when it lost a deadlock to another writer of its profiles."""
        for attempt in range(1, RACE_RETRIES + 1):
            try:
                return await work()
            except ConcurrentChange:
                if attempt == RACE_RETRIES:
                    raise
                log.info("segments_transaction_retried", attempt=attempt)
        raise AssertionError("unreachable")

    # --- writes from the bus ---------------------------------------------------------------

    async def register_profiles(self, project_id: UUID, profile_ids: Sequence[UUID]) -> None:
        """Makes the profiles known (no session yet). Idempotent."""
        async with self._repository.transaction() as tx:
            await tx.register_profiles(project_id, profile_ids)

    async def record_activity(
        self, project_id: UUID, activities: Sequence[ProfileActivity]
    ) -> None:
        """Stores what one ingested batch says about each profile and reclassifies it, one short
        transaction per profile. Idempotent: sessions are keyed, so a replay changes nothing."""
        thresholds = await self._thresholds(project_id)
        for activity in activities:

            async def work(activity: ProfileActivity = activity) -> None:
                await self._record_one(project_id, activity, thresholds)

            await self._retrying(work)

    async def _record_one(
        self, project_id: UUID, activity: ProfileActivity, thresholds: Thresholds
    ) -> None:
        now = self._clock.now()
        async with self._repository.transaction() as tx:
            row = await self._lock_live(tx, project_id, UUID(activity.profile_id))
            if row is None:
                return  # erased meanwhile: its queued events are skipped
            # Any event may move the profile's zone (a timezone attribute, an installation's zone,
            # another installation becoming the latest seen): the rule is read, not folded.
            time_zone = await self._refresh_time_zone(tx, project_id, row)
            await tx.upsert_sessions(project_id, row.profile_id, activity.sessions)
            await self._reclassify(
                tx,
                project_id,
                row.profile_id,
                time_zone,
                thresholds,
                now,
                ChangeCause.EVENT,
                activity.latest_event_time or now,
            )
            # Whatever the events' kinds (a custom event, an attribute, subscription or
            # installation change may change a custom segment's conditions as much as a
            # session), the profile's custom segments are evaluated here, after its smart
            # segment state is saved (filters read it), so their changes go out with the event.
            await self._evaluate_custom(tx, project_id, [row.profile_id], now, ChangeCause.EVENT)

    async def _refresh_time_zone(
        self, tx: SegmentsTransaction, project_id: UUID, row: ProfileRow
    ) -> str | None:
        """The locked profile's zone by ingest's rule (the one GetProfile shows), stored when it
        changed."""
        time_zone = await tx.profile_time_zone(project_id, row.profile_id)
        if time_zone != row.time_zone:
            await tx.update_time_zone(project_id, row.profile_id, time_zone)
        return time_zone

    async def _lock_live(
        self, tx: SegmentsTransaction, project_id: UUID, profile_id: UUID
    ) -> ProfileRow | None:
        """Locks the live profile of `profile_id` (registering it if new); None when erased."""
        for _ in range(MAX_HOPS):
            row = (await tx.lock_profiles(project_id, [profile_id]))[profile_id]
            if row.erase_time is not None:
                return None
            if row.merged_into is None:
                return row
            profile_id = row.merged_into
        log.warning("segments_merge_chain_too_long", profile_id=str(profile_id))
        return None

    async def _reclassify(
        self,
        tx: SegmentsTransaction,
        project_id: UUID,
        profile_id: UUID,
        time_zone: str | None,
        thresholds: Thresholds,
        now: datetime,
        cause: ChangeCause,
        change_time: datetime,
    ) -> list[MembershipChange]:
        """Recomputes the profile's stored states from its sessions and enqueues the changes of
        its all-platform classification (what time did since the last write, then `cause`);
        returns them."""
        histories = await tx.histories(project_id, profile_id, time_zone, now - thresholds.lookback)
        stored = await tx.states_for_update(project_id, profile_id)
        states, changes, gone = reclassification(
            histories, stored, thresholds, now, cause, change_time
        )
        if gone:
            # A platform, or all of them, with no session left: a recompute, or the profile's
            # only sessions on API took their device's platform (session_platform). All states
            # go, and the fresh ones are saved again.
            await tx.delete_states(project_id, [profile_id])
        await tx.save_states(project_id, profile_id, states, now)
        await tx.enqueue_changes(project_id, profile_id, changes)
        return changes

    async def merge_profiles(
        self, project_id: UUID, source_ids: Sequence[UUID], target_id: UUID
    ) -> None:
        """The survivor's history becomes the union of both; the merged-away profiles leave
        every segment (cause MERGE) and the survivor is reclassified. Idempotent."""
        thresholds = await self._thresholds(project_id)

        async def work() -> None:
            await self._merge(project_id, source_ids, target_id, thresholds)

        await self._retrying(work)

    async def _merge(
        self,
        project_id: UUID,
        source_ids: Sequence[UUID],
        target_id: UUID,
        thresholds: Thresholds,
    ) -> None:
        now = self._clock.now()
        async with self._repository.transaction() as tx:
            rows = await tx.lock_profiles(project_id, [*source_ids, target_id])
            target = rows[target_id]
            sources = [s for s in dict.fromkeys(source_ids) if s != target_id]
            if target.erase_time is not None:
                await self._erase(tx, project_id, sources, now)
                return
            if target.merged_into is not None:
                # Merged again since (messages handled out of order): merge into its survivor.
                live = await self._lock_live(tx, project_id, target.merged_into)
                if live is None:
                    await self._erase(tx, project_id, sources, now)
                    return
                target = live
            for source_id in sources:
                await self._leave_everything(tx, project_id, source_id, now, ChangeCause.MERGE)
            await tx.delete_states(project_id, sources)
            await tx.move_sessions(project_id, sources, target.profile_id)
            # Identity's merge committed before it was announced: the rule's answer is the
            # survivor's zone with the merged attributes and installations.
            time_zone = await self._refresh_time_zone(tx, project_id, target)
            await tx.mark_merged(project_id, sources, target.profile_id)
            await self._reclassify(
                tx,
                project_id,
                target.profile_id,
                time_zone,
                thresholds,
                now,
                ChangeCause.MERGE,
                now,
            )
            await self._evaluate_custom(
                tx, project_id, [*sources, target.profile_id], now, ChangeCause.MERGE
            )

    async def _leave_everything(
        self,
        tx: SegmentsTransaction,
        project_id: UUID,
        profile_id: UUID,
        now: datetime,
        cause: ChangeCause,
    ) -> None:
        stored = (await tx.states_for_update(project_id, profile_id)).get(ALL_PLATFORMS)
        if stored is None:
            return
        moved, changes = advance(stored, now)
        changes.extend(changes_between(moved.classification, NO_SEGMENT, now, cause))
        await tx.enqueue_changes(project_id, profile_id, changes)

    async def delete_profiles(self, project_id: UUID, profile_ids: Sequence[UUID]) -> None:
        """Removes every trace of the profiles but their IDs (so queued events are skipped);
        they leave every segment (cause DELETION). Idempotent."""

        async def work() -> None:
            async with self._repository.transaction() as tx:
                await tx.lock_profiles(project_id, profile_ids)
                await self._erase(tx, project_id, profile_ids, self._clock.now())

        await self._retrying(work)

    async def _erase(
        self, tx: SegmentsTransaction, project_id: UUID, profile_ids: Sequence[UUID], now: datetime
    ) -> None:
        for profile_id in profile_ids:
            await self._leave_everything(tx, project_id, profile_id, now, ChangeCause.DELETION)
        await tx.erase(project_id, profile_ids, now)
        await self._evaluate_custom(tx, project_id, profile_ids, now, ChangeCause.DELETION)

    async def _evaluate_custom(
        self,
        tx: SegmentsTransaction,
        project_id: UUID,
        profile_ids: Sequence[UUID],
        now: datetime,
        cause: ChangeCause,
    ) -> None:
        """Evaluates the locked profiles' custom segments in this transaction (their changes
        go out with it); the periodic sweep catches up on what time alone changes."""
        if self._definitions is not None:
            await self._definitions.evaluate_profiles(
                tx.definitions(), project_id, profile_ids, now, cause
            )

    async def evaluate_custom_segments(
        self, project_id: UUID, profile_ids: Sequence[UUID], cause: ChangeCause
    ) -> None:
        """Re-evaluates the profiles' custom segments now, for changes that reach segments
        without events of theirs (identity moving installations: splits, imports). An
        installation moving may move a profile's time zone (its most recently seen installation
        is another one now): the zone is read again, and a profile whose zone moved is
        reclassified in it first. Idempotent."""
        thresholds = await self._thresholds(project_id)

        async def work() -> None:
            now = self._clock.now()
            async with self._repository.transaction() as tx:
                rows = await tx.lock_profiles(project_id, profile_ids)
                for row in rows.values():
                    if row.erase_time is not None or row.merged_into is not None:
                        continue
                    time_zone = await self._refresh_time_zone(tx, project_id, row)
                    if time_zone != row.time_zone:
                        await self._reclassify(
                            tx, project_id, row.profile_id, time_zone, thresholds, now, cause, now
                        )
                await self._evaluate_custom(tx, project_id, profile_ids, now, cause)

        await self._retrying(work)

    async def sweep(self, limit: int = 500) -> int:
        """Moves stored states whose next transition has passed along their schedule, and
        enqueues those changes (cause TIME, at each transition's exact time); returns how many
        states moved. Reads are exact without it; it makes the change stream and the stored
        columns catch up. Safe to run on several replicas (SKIP LOCKED)."""
        now = self._clock.now()
        async with self._repository.transaction() as tx:
            due = await tx.due_states(now, limit)
            for item in due:
                moved, changes = advance(item.state, now)
                await tx.save_states(
                    item.project_id, item.profile_id, [(item.platform, moved)], now
                )
                if item.platform == ALL_PLATFORMS:
                    await tx.enqueue_changes(item.project_id, item.profile_id, changes)
        return len(due)

    # --- reads -----------------------------------------------------------------------------

    async def _history(
        self, project_id: UUID, profile_id: UUID, platform: int, now: datetime
    ) -> tuple[UUID, History, Thresholds]:
        resolved = await self._repository.resolve_profile(project_id, profile_id)
        if resolved is None or resolved.erased:
            raise ProfileNotFound(f"no profile {profile_id} in this project")
        thresholds = await self._thresholds(project_id)
        histories = await self._repository.histories(
            project_id, resolved.profile_id, resolved.time_zone, now - thresholds.lookback
        )
        history = histories.get(platform) or History.empty(histories[ALL_PLATFORMS].time_zone)
        return resolved.profile_id, history, thresholds

    async def get_engagement(self, project_id: UUID, profile_id: UUID) -> tuple[UUID, Engagement]:
        """The engagement score as of now; raises ProfileNotFound. A merged-away ID resolves
        to its survivor, whose ID is returned."""
        now = self._clock.now()
        live_id, history, _ = await self._history(project_id, profile_id, ALL_PLATFORMS, now)
        return live_id, engagement(history, now)

    async def get_smart_segment(
        self, project_id: UUID, profile_id: UUID, platform: int
    ) -> tuple[UUID, SmartSegmentFacts]:
        """The classification as of now from the sessions themselves (on `platform` only,
        unless 0); raises ProfileNotFound."""
        now = self._clock.now()
        live_id, history, thresholds = await self._history(project_id, profile_id, platform, now)
        return live_id, classify(history, now, thresholds)

    async def distribution(self, project_id: UUID, platform: int = ALL_PLATFORMS) -> Distribution:
        """Profiles per smart segment and flag, exact as of now, over the stored states (the
        read contract `segment_distribution`), on one platform or all."""
        now = self._clock.now()
        counts = await self._repository.distribution(project_id, platform, now)
        return Distribution(platform, now, counts)

    # --- change stream ---------------------------------------------------------------------

    async def watch_changes(
        self, project_id: UUID, wanted: WatchFilter, start: WatchStart
    ) -> AsyncIterator[list[RecordedChange]]:
        """Yields the project's changes in stream order, in batches of 1 to 500, from `start`
        until the caller stops; reads at the caller's pace. Raises CursorExpired when
        `start.after` is older than the project's retention or than the oldest retained entry,
        or is no entry of the stream (it lost its entries: Redis restarted empty, or failed over
        to a replica behind it), and CursorInvalid when it is further ahead of the server's
        clock than clocks drift (no stream on this server handed it out)."""
        settings = await self._tenancy.get_settings(project_id)
        retention_ms = int(settings["segments.change_retention_days"]) * 86_400_000
        now_ms = await self._changes.server_time_ms()
        oldest_ms = now_ms - retention_ms
        if start.after is not None:
            parsed = parse_cursor(start.after)
            assert parsed is not None  # checked by the servicer
            if parsed[0] > now_ms + WATCH_START_AHEAD_LIMIT_MS:
                # Entry IDs carry the server's time: reading after this one would wait,
                # silently, until then (a year off, or forever), as after such a start_time.
                problem = "is more than 10 minutes ahead of the server's clock"
                raise CursorInvalid(
                    f"start_after {problem}",
                    [FieldViolation("start_after", problem, CursorInvalid.reason)],
                )
            first = await self._changes.first_cursor()
            trimmed = first is not None and (parse_cursor(first) or (0, 0)) > parsed
            if parsed[0] < oldest_ms or trimmed:
                raise CursorExpired(
                    "start_after is older than the change stream's retention; "
                    "resume with start_time, accepting a gap",
                    metadata={"start_after": start.after},
                )
            # Every cursor handed out is an entry's ID, and only the oldest entries are ever
            # removed (trimmed, above). One the stream does not hold (ahead of it, or between
            # its entries) means the stream lost entries since: answered as expired, whether or
            # not a new change was appended meanwhile, so that a client resuming after an outage
            # learns of the gap instead of giving up (or waiting silently).
            if not await self._changes.holds(start.after):
                raise CursorExpired(
                    "start_after is not in the change stream any more (it lost entries, e.g. "
                    "Redis restarted empty); resume with start_time, accepting a gap",
                    metadata={"start_after": start.after},
                )
            cursor = start.after
        elif start.time_ms is not None:
            # Further ahead than clocks drift, no change can carry the time yet: the watch would
            # wait silently until then (seconds sent as milliseconds, a year off), as it would
            # after a cursor ahead of the stream.
            if start.time_ms > now_ms + WATCH_START_AHEAD_LIMIT_MS:
                problem = "is more than 10 minutes ahead of the server's clock"
                raise StartTimeInvalid(
                    f"start_time {problem}",
                    [FieldViolation("start_time", problem, StartTimeInvalid.reason)],
                )
            cursor = cursor_before(max(start.time_ms, oldest_ms))
        else:
            cursor = await self._changes.last_cursor()
        project = str(project_id)
        while True:
            cursor, changes = await self._changes.read_after(cursor, WATCH_BATCH)
            # Entries past the retention are not served even if Redis still holds them.
            wanted_changes = [
                c
                for c in changes
                if c.project_id == project
                and wanted.matches(c.change)
                and (parse_cursor(c.cursor) or (0, 0))[0] >= oldest_ms
            ]
            if wanted_changes:
                yield wanted_changes

    # --- RecomputeAll ----------------------------------------------------------------------

    async def recompute_all(self, project_id: UUID) -> AsyncIterator[RecomputeProgress]:
        """Starts the project's recomputation, or follows the one running, and yields its
        progress (each phase change, and about once a second) until DONE. The run goes on if
        the follower stops. Raises RecomputeInterrupted if the server stops it."""
        run = self._recomputes.get(project_id)
        if run is None or run.finished:
            run = self._start_recompute(project_id)
        async for progress in run.follow():
            yield progress

    def _start_recompute(self, project_id: UUID) -> RecomputeRun:
        run = RecomputeRun(uuid.uuid4(), project_id, self._clock.now())
        self._recomputes[project_id] = run
        run.task = asyncio.create_task(self._recompute(run), name=f"recompute-{project_id}")
        return run

    async def apply_threshold_changes(self) -> list[UUID]:
        """Starts the recomputation of every project whose segment thresholds (project settings)
        differ from those its stored states were last recomputed with, so that a settings
        change reaches the stored states, the distribution and the custom segments reading them
        without an operator; the changes go out with cause RECOMPUTE. A project being recomputed
        is left to the next call (the run records the thresholds it used, which may be the
        previous ones). Returns the projects started. Idempotent."""
        started = []
        for item in await self._repository.thresholds():
            if item.current == item.applied:
                continue
            run = self._recomputes.get(item.project_id)
            if run is not None and not run.finished:
                continue
            log.info(
                "segment_thresholds_changed",
                project_id=str(item.project_id),
                thresholds=item.current.to_settings(),
            )
            self._start_recompute(item.project_id)
            started.append(item.project_id)
        return started

    async def stop_recomputes(self) -> None:
        """Cancels running recomputations (server shutdown); their followers get UNAVAILABLE."""
        tasks = [r.task for r in self._recomputes.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _recompute(self, run: RecomputeRun) -> None:
        # A run outlives the RecomputeAll call that may have started it: background work, its
        # statements not held to that call's bound (shared/db.py), as when a settings change
        # starts it.
        bound_statements(None)
        try:
            await self._recompute_phases(run)
        except asyncio.CancelledError:
            run.fail(RecomputeInterrupted("the server stopped; call RecomputeAll again"))
            raise
        except Exception as exc:
            log.exception("recompute_failed", recompute_id=str(run.recompute_id))
            run.fail(exc)

    async def _recompute_phases(self, run: RecomputeRun) -> None:
        assert self._definitions is not None
        assert self._definitions_repository is not None
        project_id = run.project_id
        definitions = self._definitions_repository
        thresholds = await self._thresholds(project_id)
        total = await definitions.count_live_segment_profiles(project_id)
        # Aggregates are not stored apart from the sessions (every classification reads them
        # from segment_sessions), so there is nothing to rebuild: the phase ends at once.
        run.update(self._clock.now(), RecomputePhase.AGGREGATES, 0, total)
        run.update(self._clock.now(), RecomputePhase.AGGREGATES, total, total)
        run.update(self._clock.now(), RecomputePhase.SMART_SEGMENTS, 0, total)
        done = 0
        batch = await definitions.live_segment_profiles(project_id, UUID(int=0), RECOMPUTE_BATCH)
        if not batch:
            await self._repository.record_thresholds(project_id, thresholds, self._clock.now())
        while batch:
            # The next batch is read before this one is written, so that the last write knows
            # it is the last: it records the thresholds in its own transaction. Whoever sees
            # every stored state recomputed (the distribution, a custom segment reading smart
            # segments) then sees the record too, and a run that fails before its last batch
            # records nothing, so the next check starts another.
            following: list[UUID] = []
            if len(batch) == RECOMPUTE_BATCH:
                following = await definitions.live_segment_profiles(
                    project_id, batch[-1], RECOMPUTE_BATCH
                )

            async def work(batch: list[UUID] = batch, last: bool = not following) -> set[UUID]:
                return await self._recompute_batch(project_id, batch, thresholds, record=last)

            run.changed.update(await self._retrying(work))
            done += len(batch)
            run.update(self._clock.now(), RecomputePhase.SMART_SEGMENTS, min(done, total), total)
            batch = following
        live = await definitions.count_live_profiles(project_id)
        run.update(self._clock.now(), RecomputePhase.CUSTOM_SEGMENTS, 0, live)

        def segment_done(index: int, count: int, changed: set[UUID]) -> None:
            run.changed.update(changed)
            run.update(
                self._clock.now(), RecomputePhase.CUSTOM_SEGMENTS, live * index // count, live
            )

        # Custom segments reading smart segments follow the states here (and, should the run
        # stop before, at their next sweep evaluation: such filters depend on time).
        await self._definitions.evaluate_project(project_id, ChangeCause.RECOMPUTE, segment_done)
        run.update(self._clock.now(), RecomputePhase.CUSTOM_SEGMENTS, live, live)
        # Funnel progress is computed from events at read time; nothing is stored to redo.
        run.update(self._clock.now(), RecomputePhase.FUNNELS, live, live)
        run.update(self._clock.now(), RecomputePhase.DONE, live, live)
        log.info("recompute_done", recompute_id=str(run.recompute_id), changed=len(run.changed))

    async def _recompute_batch(
        self,
        project_id: UUID,
        profile_ids: Sequence[UUID],
        thresholds: Thresholds,
        *,
        record: bool = False,
    ) -> set[UUID]:
        """Reclassifies a batch of profiles in one transaction (the rule of _reclassify, with a
        few statements for the whole batch instead of several per profile: about 1 ms per
        profile one by one); returns those whose all-platform classification changed. With
        `record`, the same transaction records that every stored state of the project now
        follows `thresholds` (apply_threshold_changes compares)."""
        now = self._clock.now()
        async with self._repository.transaction() as tx:
            if record:
                await tx.record_thresholds(project_id, thresholds, now)
            rows = await tx.lock_profiles(project_id, profile_ids)
            live = {
                p: r.time_zone
                for p, r in rows.items()
                if r.erase_time is None and r.merged_into is None
            }
            if not live:
                return set()
            histories = await tx.histories_many(project_id, live, now - thresholds.lookback)
            stored = await tx.states_for_update_many(project_id, list(live))
            states: list[tuple[UUID, int, StoredState]] = []
            changes: list[tuple[UUID, MembershipChange]] = []
            gone: list[UUID] = []
            for profile_id in live:
                fresh, changed, stale = reclassification(
                    histories[profile_id],
                    stored[profile_id],
                    thresholds,
                    now,
                    ChangeCause.RECOMPUTE,
                    now,
                )
                states.extend((profile_id, platform, state) for platform, state in fresh)
                changes.extend((profile_id, change) for change in changed)
                if stale:
                    gone.append(profile_id)
            if gone:
                await tx.delete_states(project_id, gone)
            await tx.save_states_many(project_id, states, now)
            await tx.enqueue_changes_many(project_id, changes)
        return {p for p, _ in changes}


class RecomputeRun:
    """One project's running recomputation and its progress, followed by any number of
    callers. Keeps each phase's first and last snapshots (a dozen at most) so that a follower
    sees every phase change."""

    def __init__(self, recompute_id: UUID, project_id: UUID, start_time: datetime) -> None:
        self.recompute_id = recompute_id
        self.project_id = project_id
        self.start_time = start_time
        self.task: asyncio.Task[None] | None = None
        self.changed: set[UUID] = set()
        self.milestones: list[RecomputeProgress] = []
        self.latest: RecomputeProgress | None = None
        self.error: BaseException | None = None
        self._updated = asyncio.Event()

    @property
    def finished(self) -> bool:
        done = self.latest is not None and self.latest.phase == RecomputePhase.DONE
        return done or self.error is not None

    def update(self, now: datetime, phase: RecomputePhase, done: int, total: int) -> None:
        progress = RecomputeProgress(
            self.recompute_id, phase, done, total, len(self.changed), self.start_time, now
        )
        if self.latest is None or self.latest.phase != phase:
            # A phase change is announced with the previous phase's final count first.
            if self.latest is not None and self.latest is not self.milestones[-1]:
                self.milestones.append(self.latest)
            self.milestones.append(progress)
        self.latest = progress
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        self._updated.set()
        self._updated = asyncio.Event()

    async def follow(self) -> AsyncIterator[RecomputeProgress]:
        loop = asyncio.get_running_loop()
        seen_milestones = 0
        last_sent: RecomputeProgress | None = None
        last_time = loop.time()
        while True:
            updated = self._updated
            while seen_milestones < len(self.milestones):
                last_sent = self.milestones[seen_milestones]
                seen_milestones += 1
                last_time = loop.time()
                yield last_sent
            latest = self.latest
            if latest is not None and latest is not last_sent:
                due = latest.phase == RecomputePhase.DONE or (
                    loop.time() - last_time >= PROGRESS_INTERVAL_S
                )
                if due:
                    last_sent, last_time = latest, loop.time()
                    yield latest
            if latest is not None and latest.phase == RecomputePhase.DONE and latest is last_sent:
                return
            if self.error is not None:
                raise self.error
            wait = max(PROGRESS_INTERVAL_S - (loop.time() - last_time), 0.01)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await updated.wait()
