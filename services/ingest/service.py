"""Ingest's use case: validate a batch, resolve its origins, store it in one transaction.

Order of work for one batch (TrackEvents, one StreamEvents batch, ImportEvents):
1. validate every event (pure; invalid ones become rejections with a reason and a field path);
   when some are refused, identity is asked whether the IDs they carry are erased (nothing is
   created), and those naming an erased custom ID in quarantine are kept bare, as identity's
   ERASED refusals are;
2. resolve the installations and custom IDs not known yet with one ResolveProfiles call,
   outside any transaction;
3. one short transaction: insert the events (taking each installation's profile under a share
   lock), bump the touched profiles' versions, apply attribute, subscription and installation
   changes by event time, keep the rejected events, enqueue one EventsIngested in the outbox;
4. answer one result per event, in order. Everything is committed before the answer.

Imported push tokens are tokens.py's; closing idle sessions is sweeper.py's.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal, Protocol
from uuid import UUID

import asyncpg
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest import model
from services.ingest.batch_groups import (
    StoreAttempt,
    Stored,
    combine,
    first_occurrences,
    merged,
    origin_of,
    partitioned,
    split,
)
from services.ingest.errors import IdentityUnavailable, StorageUnavailable
from services.ingest.group_commit import GroupCommit
from services.ingest.identity_client import LookupRefused, OriginKey, Resolver
from services.ingest.messages import events_ingested, serialized_profile_changes
from services.ingest.model import Rejection
from services.ingest.payloads import message_ids, without_nul
from services.ingest.repository import (
    BatchState,
    IngestRepository,
    InsertedEvent,
    OperationRow,
    TransactionConflict,
)
from services.ingest.session_derivation import derive_sessions
from services.ingest.tokens import PushTokens, TokenResult
from services.ingest.validation import (
    RejectedEvent,
    ValidEvent,
    reject,
    validate_events,
    validate_request,
    with_country,
)
from shared import contract_limits as limits
from shared.clock import Clock
from shared.convert import timestamp_of
from shared.notices import LiveNotices
from shared.outbox import OutboxItem, enqueue_many
from shared.topics import EVENTS

log = structlog.get_logger(__name__)

REJECTED_EVENTS = Counter(
    "profiles_ingest_rejected_events_total", "Events rejected by ingest, by reason.", ["reason"]
)
STORED_EVENTS = Counter(
    "profiles_ingest_events_total", "Events answered by ingest, by outcome.", ["outcome"]
)

# How often a transaction that lost a race (deadlock, serialization) is tried again, and how
# often events whose installation vanished (erased) since resolution are resolved again.
MAX_TRANSACTION_ATTEMPTS = 5
RETRY_PAUSE_S = 0.02
MAX_RESOLVE_ROUNDS = 3
KNOWN_ORIGINS_CAPACITY = 100_000
# Write partitions: a project's profiles are split into `partitions` (by profile ID; the
# setting PROFILES_INGEST_WRITE_PARTITIONS, whose default, with its writers', is in
# shared/settings.py only), and a batch's events are stored by one transaction
# per partition they fall in. Two transactions of different partitions never touch the same
# profile, so neither waits for the other's profile locks: with one queue, two concurrent
# transactions over random profiles nearly always shared some, and their locked parts ran one
# after the other, leaving a quarter of the cores idle (docs/benchmarks.md, "Write partitions").
# A batch's events of different partitions are then numbered (event_seq) and published by two
# transactions, so not in request order across profiles; within a profile they are. Two
# partitions take one writer each (`group_writers` 1: a second writer in a partition waits for
# the first's profile locks again).
# Group commit (group_commit.py) per partition: transactions a partition's events run at once
# (`group_writers`; the setting PROFILES_INGEST_GROUP_WRITERS), and the events one transaction
# takes from the batches waiting.
GROUP_MAX_EVENTS = 2_000
# Events validated between two yields to the event loop (a batch of 500 validates in about
# 20 ms of CPU: unsliced, every other batch's next statement waits for it).
VALIDATION_SLICE = 50

Outcome = Literal["accepted", "duplicate", "rejected"]


class Countries(Protocol):
    async def countries(self, ips: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class EventResult:
    index: int
    event_id: str
    outcome: Outcome
    profile_id: UUID | None = None
    rejection: Rejection | None = None


@dataclass(slots=True)
class BatchResult:
    results: list[EventResult] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)


class KnownOrigins:
    """A bounded LRU of origins known to identity: installations known to exist (their profile
    is read in the insert itself) and custom IDs with their resolved profile (a merge leaves a
    tombstone the insert follows). A stale entry costs one more resolution, never a wrong
    profile: an insert that finds no row for it is resolved again."""

    def __init__(self, capacity: int = KNOWN_ORIGINS_CAPACITY) -> None:
        self._capacity = capacity
        # Keyed by the project's UUID as an int: UUID hashes in Python, an int in C.
        self._entries: OrderedDict[tuple[int, OriginKey], UUID] = OrderedDict()

    def get(self, project_id: UUID, key: OriginKey) -> UUID | None:
        entry = (project_id.int, key)
        found = self._entries.get(entry)
        if found is not None:
            self._entries.move_to_end(entry)
        return found

    def put(self, project_id: UUID, key: OriginKey, profile_id: UUID) -> None:
        entry = (project_id.int, key)
        self._entries[entry] = profile_id
        self._entries.move_to_end(entry)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def forget(self, project_id: UUID, key: OriginKey) -> None:
        self._entries.pop((project_id.int, key), None)


class IngestService:
    def __init__(
        self,
        repository: IngestRepository,
        resolver: Resolver,
        clock: Clock,
        known: KnownOrigins | None = None,
        *,
        countries: Countries | None = None,
        notices: LiveNotices | None = None,
        group_writers: int,
        partitions: int,
    ) -> None:
        if partitions < 1:
            raise ValueError("ingest needs at least one write partition")
        self._repository = repository
        self._resolver = resolver
        self._clock = clock
        self._known = known or KnownOrigins()
        self._countries = countries
        self._notices = notices
        self._tokens = PushTokens(repository, resolver, clock)
        self._partitions = partitions
        self._groups: GroupCommit[tuple[UUID, bool, int], StoreAttempt, Stored] = GroupCommit(
            self._store_group,
            size_of=lambda attempt: attempt.size,
            writers=group_writers,
            max_size=GROUP_MAX_EVENTS,
        )

    async def ingest(
        self,
        project_id: UUID,
        events: Sequence[pb.Event],
        send_time: Timestamp | None,
        request_bytes: int,
        *,
        imported: bool = False,
    ) -> BatchResult:
        """Stores the valid events of a batch and answers one result per event, in order.

        Raises BatchInvalid for a malformed request as a whole (nothing stored),
        IdentityUnavailable or StorageUnavailable when the batch could not be committed
        (retrying the same batch is safe: event IDs deduplicate; the events of another write
        partition may be stored already, and are then answered DUPLICATE). Idempotent per
        event.
        """
        validate_request(len(events), request_bytes)
        receive_time = self._clock.now()
        by_index = {i: e for i, e in enumerate(events)}
        results: dict[int, EventResult] = {}
        valid: list[ValidEvent] = []
        rejected: list[RejectedEvent] = []
        for start in range(0, len(events), VALIDATION_SLICE):
            if start:
                # Lets other batches' transactions go on between slices: one that holds
                # profile locks waits for this loop otherwise, and so do the batches behind it.
                await asyncio.sleep(0)
            some_valid, some_rejected = validate_events(
                events,
                send_time,
                receive_time,
                imported=imported,
                indexes=range(start, min(start + VALIDATION_SLICE, len(events))),
            )
            valid.extend(some_valid)
            rejected.extend(some_rejected)
        for invalid in rejected:
            results[invalid.index] = _rejected_result(invalid, by_index[invalid.index])
        if rejected:
            # The answers stay the validation's (the client learns what was wrong with what it
            # sent); what is kept must not name an erased person.
            rejected = await self._without_erased_ids(project_id, rejected, by_index)

        valid = await self._resolve_countries(valid)
        # The installations of the batch reporting a push token (their accepted events' ones
        # take it from any other installation holding it, once the batch committed).
        token_reporters = {
            e.index: e.installation_id
            for e in valid
            if e.installation_id
            and e.installation_values
            and e.installation_values.get("push_token")
        }
        reintegrations: list[tuple[str, str]] = []
        # The events as validated, before any round's session derivation gave them a session:
        # an orphan is resolved and derived again from these (its derived session was read
        # from the profile that was erased meanwhile, whose session ID it must not carry).
        as_validated = {e.index: e for e in valid}
        for round_ in range(MAX_RESOLVE_ROUNDS):
            # After a round found installations gone, resolve past identity's cache: another
            # identity replica may not have heard of the erasure yet.
            profiles, refused = await self._resolve(project_id, valid, by_index, fresh=round_ > 0)
            rejected.extend(refused)
            refused_indexes = {r.index for r in refused}
            candidates, in_batch_duplicates = first_occurrences(
                [e for e in valid if e.index not in refused_indexes]
            )
            for index in in_batch_duplicates:
                results[index] = EventResult(index, by_index[index].event_id, "duplicate")
            # One transaction per write partition the events fall in, each shared with the
            # other batches waiting in that partition (group commit); the batch's outcome is
            # theirs together, answered once all of them are done (should one fail, the
            # others' events are committed when the batch's error is answered).
            attempt = StoreAttempt(receive_time, candidates, profiles, rejected, by_index)
            part_outcomes = await asyncio.gather(
                *(
                    self._groups.submit((project_id, imported, number), part)
                    for number, part in partitioned(attempt, self._partitions)
                ),
                return_exceptions=True,
            )
            failures = [o for o in part_outcomes if isinstance(o, BaseException)]
            if failures:
                raise failures[0]
            stored = merged([o for o in part_outcomes if isinstance(o, Stored)])
            rejected = []  # stored with the first transaction
            reintegrations.extend(stored.reintegrations)
            for index, profile_id in stored.accepted.items():
                results[index] = EventResult(
                    index, by_index[index].event_id, "accepted", profile_id
                )
            for index in stored.duplicates:
                results[index] = EventResult(index, by_index[index].event_id, "duplicate")
            for late in [*stored.late_rejections, *refused]:
                results[late.index] = _rejected_result(late, by_index[late.index])
            if not stored.orphans:
                break
            # Their installation or profile was erased since it was resolved (or the cache was
            # stale): forget it and resolve again, so identity gives them a fresh profile.
            log.info("ingest_resolving_again", events=len(stored.orphans), round=round_)
            for orphan in stored.orphans:
                self._known.forget(project_id, origin_of(orphan))
            valid = [as_validated[orphan.index] for orphan in stored.orphans]
        else:
            raise StorageUnavailable("the batch's installations kept vanishing; retry it")
        if reintegrations:
            await self._tokens.reintegrate(project_id, reintegrations)
        reporters = sorted(
            {
                installation_id
                for index, installation_id in token_reporters.items()
                if results[index].outcome == "accepted"
            }
        )
        if reporters:
            await self._tokens.move_tokens(project_id, reporters)
        batch = BatchResult([results[i] for i in range(len(events))])
        outcomes: tuple[Outcome, ...] = ("accepted", "duplicate", "rejected")
        for outcome in outcomes:
            STORED_EVENTS.labels(outcome).inc(batch.count(outcome))
        return batch

    async def import_tokens(
        self, project_id: UUID, tokens: Sequence[pb.ImportedToken]
    ) -> list[TokenResult]:
        """ImportTokens: see tokens.PushTokens.import_tokens."""
        return await self._tokens.import_tokens(project_id, tokens)

    async def _resolve_countries(self, events: list[ValidEvent]) -> list[ValidEvent]:
        """Session starts that carry a client IP get its country; the IP is dropped here."""
        with_ip = [e for e in events if e.client_ip is not None]
        if not with_ip:
            return events
        codes = [""] * len(with_ip)
        if self._countries is not None:
            codes = await self._countries.countries([e.client_ip or "" for e in with_ip])
        resolved = {e.index: with_country(e, code) for e, code in zip(with_ip, codes, strict=True)}
        return [resolved.get(e.index, e) for e in events]

    async def _without_erased_ids(
        self,
        project_id: UUID,
        rejected: Sequence[RejectedEvent],
        by_index: Mapping[int, pb.Event],
    ) -> list[RejectedEvent]:
        """The events validation refused, as they are to be kept. Identity never saw them, so
        its quarantine is asked here (ResolveProfiles looking up only: nothing is created, one
        call per 1,000 IDs, only for batches with refused events): an event carrying an erased
        custom ID still in quarantine, as its custom ID, as its installation ID (a Countly
        device ID is its user's custom ID after a login) or in an untranslated SDK message, is
        kept bare (_erased). When identity cannot answer (or refuses the lookup, a bug of
        ours), every event carrying an ID is kept bare with its own reason (_unchecked): the
        refusal is still recorded and answered, and nothing that might be an erased person's
        is kept in clear."""
        carried = {r.index: _carried_ids(r, by_index[r.index]) for r in rejected}
        keys = list(dict.fromkeys(key for ids in carried.values() for key, _ in ids))
        if not keys:
            return list(rejected)
        try:
            erased = await self._resolver.find_erased(project_id, keys)
        except (IdentityUnavailable, LookupRefused) as exc:
            # A refused lookup is an error of ours (the client logs it as one), not an outage;
            # its rows are kept bare all the same, since nobody could tell whether an ID was
            # erased, rather than failing the batch, which a retry would not mend.
            cause = "lookup_refused" if isinstance(exc, LookupRefused) else "identity_unavailable"
            log.warning("ingest_rejected_kept_bare", events=len(rejected), cause=cause)
            return [_unchecked(r) if carried[r.index] else r for r in rejected]
        kept = []
        for refused in rejected:
            where = next((path for key, path in carried[refused.index] if key in erased), None)
            kept.append(refused if where is None else _erased(refused, where))
        return kept

    async def _resolve(
        self,
        project_id: UUID,
        events: Sequence[ValidEvent],
        by_index: dict[int, pb.Event],
        *,
        fresh: bool = False,
    ) -> tuple[dict[OriginKey, UUID], list[RejectedEvent]]:
        """Profiles of the events' origins (from the cache, else one ResolveProfiles call) and
        the events identity refused (erased or invalid custom IDs)."""
        profiles: dict[OriginKey, UUID] = {}
        unknown: list[OriginKey] = []
        for event in events:
            key = origin_of(event)
            if key in profiles or key in unknown:
                continue
            cached = self._known.get(project_id, key)
            if cached is None:
                unknown.append(key)
            else:
                profiles[key] = cached
        refused_keys: dict[OriginKey, Rejection] = {}
        if unknown:
            answers = await self._resolver.resolve(project_id, unknown, fresh=fresh)
            for key, answer in zip(unknown, answers, strict=True):
                if answer.profile_id is not None:
                    profiles[key] = answer.profile_id
                    self._known.put(project_id, key, answer.profile_id)
                elif answer.erased and key.custom:
                    refused_keys[key] = Rejection(
                        model.ERASED, "custom_id", "the custom ID was erased"
                    )
                elif answer.erased:  # an installation ID that is a quarantined custom ID
                    refused_keys[key] = Rejection(
                        model.ERASED,
                        "installation_id",
                        "the installation ID is an erased custom ID",
                    )
                else:
                    fallback = (
                        model.CUSTOM_ID_INVALID if key.custom else (model.INSTALLATION_ID_INVALID)
                    )
                    path = "custom_id" if key.custom else "installation_id"
                    refused_keys[key] = Rejection(
                        answer.reason or fallback, path, answer.message or "refused by identity"
                    )
        refused = [
            reject(e.index, by_index[e.index], refused_keys[origin_of(e)])
            for e in events
            if origin_of(e) in refused_keys
        ]
        return profiles, refused

    async def _store_group(
        self, key: tuple[UUID, bool, int], attempts: Sequence[StoreAttempt]
    ) -> list[Stored | BaseException]:
        """The batches of one group (GroupCommit) in one transaction. Should it fail for any
        other reason than an outage or lost races, which every batch of it would meet alone
        too, each batch is stored alone: one batch's fault never fails the others."""
        project_id, imported, _ = key
        if len(attempts) == 1:
            return [await self._store_with_retries(project_id, imported, attempts[0])]
        group = combine(attempts)
        try:
            stored = await self._store_with_retries(project_id, imported, group.attempt)
        except (StorageUnavailable, IdentityUnavailable, TransactionConflict):
            raise
        except Exception:
            log.exception("ingest_group_failed", batches=len(attempts))
            alone: list[Stored | BaseException] = []
            for attempt in attempts:
                try:
                    alone.append(await self._store_with_retries(project_id, imported, attempt))
                except Exception as exc:
                    alone.append(exc)
            return alone
        return list(split(stored, group))

    async def _store_with_retries(
        self, project_id: UUID, imported: bool, batch: StoreAttempt
    ) -> Stored:
        receive_time, events, profiles = batch.receive_time, batch.events, batch.profiles
        rejected, by_index = batch.rejected, batch.by_index
        for attempt in range(1, MAX_TRANSACTION_ATTEMPTS + 1):
            try:
                async with self._repository.transaction() as conn:
                    # Rejected events first: what comes after the profile locks is kept short.
                    await self._repository.insert_rejected_events(
                        conn, project_id, receive_time, rejected
                    )
                    derived = await derive_sessions(conn, project_id, events)
                    stored = await self._store(
                        conn, project_id, receive_time, imported, derived.events, profiles, by_index
                    )
                    stored.derived_starts = await derived.record(conn, project_id, stored.accepted)
                    await self._repository.insert_rejected_events(
                        conn, project_id, receive_time, stored.late_rejections
                    )
                    all_rejected = [*rejected, *stored.late_rejections]
                    await self._enqueue(
                        conn, project_id, receive_time, imported, derived.events, stored
                    )
            except TransactionConflict:
                if attempt == MAX_TRANSACTION_ATTEMPTS:
                    raise
                log.info("ingest_transaction_conflict", attempt=attempt)
                # A deadlock's winner is still running: retrying at once walks into the same
                # locks again (seen as three deadlocks in a row against an erasure racing a
                # login). A short, growing, jittered pause lets it commit first, as identity's
                # retries do.
                await asyncio.sleep(random.uniform(0, RETRY_PAUSE_S * 2**attempt))
                continue
            for refusal in all_rejected:
                REJECTED_EVENTS.labels(refusal.rejection.reason).inc()
            self._announce(project_id, stored.ingested, stored.derived_starts, stored.versions)
            return stored
        raise AssertionError("unreachable")

    async def _store(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        receive_time: datetime,
        imported: bool,
        events: Sequence[ValidEvent],
        profiles: Mapping[OriginKey, UUID],
        by_index: Mapping[int, pb.Event],
    ) -> Stored:
        repo = self._repository
        await repo.defer_event_counts(conn)
        from_installations = [e for e in events if e.installation_id is not None]
        from_custom_ids = [e for e in events if e.custom_id is not None]
        # Custom-ID events first: they lock their profiles, which the version bump locks again.
        inserted: list[tuple[bool, InsertedEvent]] = [
            (True, row)
            for row in await repo.insert_custom_id_events(
                conn,
                project_id,
                receive_time,
                imported,
                from_custom_ids,
                [profiles[origin_of(e)] for e in from_custom_ids],
            )
        ]
        inserted += [
            (False, row)
            for row in await repo.insert_installation_events(
                conn, project_id, receive_time, imported, from_installations
            )
        ]
        stored = Stored()
        new_rows = {(custom, r.origin, r.event_id): r for custom, r in inserted}
        accepted: list[tuple[ValidEvent, InsertedEvent]] = []
        missing: list[ValidEvent] = []
        for event in events:
            key = origin_of(event)
            row = new_rows.get((key.custom, key.value, event.event_id))
            if row is None:
                missing.append(event)
            else:
                accepted.append((event, row))
        if missing:
            for custom in (False, True):
                group = [e for e in missing if origin_of(e).custom is custom]
                found = await repo.existing_events(
                    conn,
                    project_id,
                    [(origin_of(e).value, e.event_id) for e in group],
                    by_custom_id=custom,
                )
                for event in group:
                    if (origin_of(event).value, event.event_id) in found:
                        stored.duplicates.add(event.index)
                    else:
                        stored.orphans.append(event)
        if not accepted:
            return stored
        # The locked part: two calls (repository.LOCK_BATCH_PROFILES, APPLY_BATCH_STATE) with
        # only the attribute-limit decision between them, since concurrent batches over the
        # same profiles wait for it.
        with_operations = [(e, row) for e, row in accepted if e.operations]
        stored.versions, attributes = await repo.lock_batch_profiles(
            conn,
            project_id,
            [(row.profile_id, e.kind, e.event_time) for e, row in accepted],
            [row.profile_id for _, row in with_operations],
            [
                (
                    row.profile_id,
                    row.event_seq,
                    e.event_id,
                    e.installation_id,
                    e.event_time,
                    e.payload,  # read as the trigger reads it (profiles_ingest_crash_fields)
                )
                for e, row in accepted
                if e.kind == types_pb2.EVENT_KIND_CRASH
            ],
        )
        refused, operations = _attribute_operations(with_operations, attributes)
        if refused:
            stored.late_rejections = [
                reject(index, by_index[index], rejection) for index, rejection in refused.items()
            ]
        refused_seqs = [row.event_seq for e, row in accepted if e.index in refused]
        accepted = [(e, row) for e, row in accepted if e.index not in refused]
        state = BatchState(
            operations=operations,
            refused_event_seqs=refused_seqs,
            subscriptions=[
                (
                    row.profile_id,
                    e.subscription.channel,
                    e.subscription.kind,
                    e.subscription.subscribed,
                    e.event_time,
                    e.event_id,
                    model.event_origin(e.installation_id, e.custom_id),
                )
                for e, row in accepted
                if e.subscription is not None
            ],
            installations=[
                (
                    e.installation_id,
                    e.event_time,
                    e.platform,
                    None if e.installation_values is None else dict(e.installation_values),
                )
                for e, _ in accepted
                if e.installation_id is not None
            ],
            session_starters=sorted(
                {
                    e.installation_id
                    for e, _ in accepted
                    if e.kind == types_pb2.EVENT_KIND_SESSION_START and e.installation_id
                }
            ),
            session_events=[
                (
                    e.installation_id,
                    e.session_id,
                    row.profile_id,
                    e.platform,
                    e.kind,
                    e.event_time,
                    e.session_duration,
                    e.detail.country if e.kind == types_pb2.EVENT_KIND_SESSION_START else "",  # type: ignore[attr-defined]
                )
                for e, row in accepted
                if e.installation_id is not None and e.session_id is not None
            ],
        )
        stored.session_countries, stored.reintegrations = await repo.apply_batch_state(
            conn, project_id, state
        )
        stored.accepted = {e.index: row.profile_id for e, row in accepted}
        return stored

    async def _enqueue(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        receive_time: datetime,
        imported: bool,
        events: Sequence[ValidEvent],
        stored: Stored,
    ) -> None:
        """Enqueues one EventsIngested for the stored events, in request order, after the
        session starts ingest derived; heartbeats and ends carry their session's country."""
        if not stored.accepted:
            return
        message, stored.ingested = events_ingested(
            project_id,
            str(uuid.uuid4()),
            events,
            stored.accepted,
            receive_time,
            self._clock.now(),
            imported=imported,
            session_countries=stored.session_countries,
            derived_starts=stored.derived_starts,
        )
        await enqueue_many(conn, [OutboxItem(project_id, EVENTS, message)])

    def _announce(
        self,
        project_id: UUID,
        ingested: Sequence[bus_pb2.IngestedEvent],
        derived_starts: Sequence[bus_pb2.IngestedEvent],
        versions: dict[UUID, int],
    ) -> None:
        """Queues one ProfileChanged per touched profile (after commit; never blocks), with the
        events the batch stored: `ingested` is the batch's EventsIngested, whose first
        elements are the `derived_starts`, left out here. A derived session's start is no stored
        event (the timeline never shows it, and a late event can move the session's start
        after it was published), so a live feed that showed it would show what no reload
        does; the session reaches watchers through its events' session ID, and segments
        through the events stream, which keeps the start."""
        events = ingested[len(derived_starts) :]
        if self._notices is None or not events:
            return
        change_time = timestamp_of(self._clock.now())
        self._notices.offer(serialized_profile_changes(project_id, events, versions, change_time))


def _rejected_result(rejected: RejectedEvent, event: pb.Event) -> EventResult:
    return EventResult(rejected.index, event.event_id, "rejected", None, rejected.rejection)


def _carried_ids(rejected: RejectedEvent, event: pb.Event) -> list[tuple[OriginKey, str]]:
    """The IDs a refused event's row would keep, each with the field it is in: its origin and
    the strings of an untranslated message that may be IDs (payloads.message_ids). Each is
    looked up as the row keeps it, U+0000 replaced (validation.reject): an ID holding U+0000
    names no stored custom ID, but its stored form may, and identity refuses a whole lookup
    holding one (STRING_UNSTORABLE), which would leave every refused row of the batch bare. An
    installation ID is looked up as one (an installation identity knows is left alone, as
    ResolveProfiles leaves it); one too long for an installation, and a message's strings, as
    custom IDs, since only the quarantine can name them. None for a row already bare."""
    if rejected.rejection.reason == model.ERASED:
        return []
    ids: list[tuple[OriginKey, str]] = []
    installation_id = ""
    which = event.WhichOneof("origin")
    if which == "installation_id":
        installation_id = without_nul(event.installation_id)
        if 1 <= len(installation_id) <= limits.MAX_INSTALLATION_ID_LENGTH:
            ids.append((OriginKey(False, installation_id), "installation_id"))
        elif 1 <= len(installation_id) <= limits.MAX_CUSTOM_ID_LENGTH:
            ids.append((OriginKey(True, installation_id), "installation_id"))
    elif which == "custom_id" and 1 <= len(event.custom_id) <= limits.MAX_CUSTOM_ID_LENGTH:
        ids.append((OriginKey(True, without_nul(event.custom_id)), "custom_id"))
    ids.extend(
        (OriginKey(True, text), "untranslated.message")
        for text in map(without_nul, message_ids(event))
        if text != installation_id
    )
    return ids


# What an erased row's message says was erased, by the field it names.
_ERASED_FIELDS = {
    "installation_id": "its installation ID is",
    "custom_id": "its custom ID is",
    "untranslated.message": "its message names",
}


def _erased(rejected: RejectedEvent, where: str) -> RejectedEvent:
    """A refused event that names an erased custom ID, kept as identity's ERASED refusals are:
    its event ID, reason ERASED and the field that named the ID, and no installation ID, custom
    ID, payload or text the client chose. ERASED rather than the validation's reason: every
    bare row is then an ERASED one (what the erasure documents, what ListRejectedEvents filters
    on), and the event, had it been valid, would have been refused ERASED anyway. The
    validation's reason (a code of the contract or the gateway's UPPER_SNAKE code, never the
    client's text) stays in the message, so an operator still sees what was wrong with it."""
    return replace(
        rejected,
        installation_id="",
        custom_id="",
        raw=None,
        rejection=Rejection(
            model.ERASED,
            where,
            f"refused as {rejected.rejection.reason} before identity was asked; kept bare:"
            f" {_ERASED_FIELDS[where]} an erased custom ID",
        ),
    )


def _unchecked(rejected: RejectedEvent) -> RejectedEvent:
    """A refused event kept while identity could not say whether its IDs are erased: its reason
    (not known to be ERASED), its field path up to the first map key (a key is the client's
    text: an attribute name may be an ID), and no installation ID, custom ID or payload."""
    return replace(
        rejected,
        installation_id="",
        custom_id="",
        raw=None,
        rejection=Rejection(
            rejected.rejection.reason,
            rejected.rejection.field_path.split('["', 1)[0],
            "kept without IDs or payload: identity could not be asked whether they name an"
            " erased custom ID",
        ),
    )


def _attribute_operations(
    with_operations: Sequence[tuple[ValidEvent, InsertedEvent]],
    attributes: dict[UUID, dict[str, model.HeldAttribute]],
) -> tuple[dict[int, Rejection], list[OperationRow]]:
    """The attribute operations of the accepted events, in event-time order, for their
    profiles' logs (the database replays them), and the events refused because they would give
    a profile over 50 custom attributes (those are not stored). `attributes`: each profile's
    custom attributes now (updated here as the events are taken in order)."""
    refused: dict[int, Rejection] = {}
    operations: list[OperationRow] = []
    for event, row in sorted(with_operations, key=lambda p: (p[0].event_time, p[0].index)):
        before = attributes.setdefault(row.profile_id, {})
        # Only an event that adds a custom attribute is refused, and only if the profile would
        # then hold over 50: a merge may have left more, which stay (nothing is dropped) and
        # may still be changed or unset.
        after = model.custom_attributes_after(before, event.operations, event.event_time)
        names, held = model.held_names(before), model.held_names(after)
        if held - names and len(held) > limits.MAX_CUSTOM_ATTRIBUTES_PER_PROFILE:
            refused[event.index] = Rejection(
                model.PROFILE_ATTRIBUTE_LIMIT,
                "attribute_operations.operations",
                "the profile already holds 50 custom attributes",
            )
            continue
        attributes[row.profile_id] = after
        origin = model.event_origin(event.installation_id, event.custom_id)
        operations.extend(
            (
                row.profile_id,
                op.native,
                op.name,
                event.event_time,
                event.event_id,
                origin,
                position,
                op.kind,
                None if op.value is None else op.value.to_json(),
            )
            for position, op in enumerate(event.operations)
        )
    return refused, operations
