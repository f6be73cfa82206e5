"""Ingest's use case: validate a batch, resolve its origins, store it in one transaction.

Order of work for one batch (TrackEvents, one StreamEvents batch, ImportEvents):
1. validate every event (pure; invalid ones become rejections with a reason and a field path);
2. resolve the installations and custom IDs not known yet with one ResolveProfiles call,
   outside any transaction;
3. one short transaction: insert the events (taking each installation's profile under a share
   lock), bump the touched profiles' versions, apply attribute, subscription and installation
   changes by event time, keep the rejected events, enqueue one EventsIngested in the outbox;
4. answer one result per event, in order. Everything is committed before the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Sequence
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
from services.ingest.errors import IdentityUnavailable, StorageUnavailable
from services.ingest.identity_client import Identified, Merged, OriginKey, Resolution
from services.ingest.model import Rejection
from services.ingest.repository import (
    ClosedSession,
    IngestRepository,
    InsertedEvent,
    OperationRow,
    TransactionConflict,
)
from services.ingest.session_derivation import derive_sessions
from services.ingest.validation import (
    BatchValidator,
    RejectedEvent,
    ValidEvent,
    ValidToken,
    ingested_event,
    reject,
    timestamp_of,
    validate_request,
    validate_token,
    validate_token_request,
    with_country,
)
from shared.clock import Clock
from shared.notices import LiveNotices
from shared.outbox import OutboxItem, enqueue_many
from shared.topics import EVENTS, IDENTITY

log = structlog.get_logger(__name__)

REJECTED_EVENTS = Counter(
    "profiles_ingest_rejected_events_total", "Events rejected by ingest, by reason.", ["reason"]
)
STORED_EVENTS = Counter(
    "profiles_ingest_events_total", "Events answered by ingest, by outcome.", ["outcome"]
)

# How often a transaction that lost a race (deadlock, serialization) is tried again, and how
# often events whose installation vanished (erased) since resolution are resolved again.
MAX_TRANSACTION_ATTEMPTS = 3
MAX_RESOLVE_ROUNDS = 3
KNOWN_ORIGINS_CAPACITY = 100_000

Outcome = Literal["accepted", "duplicate", "rejected"]


class Resolver(Protocol):
    """Identity, as ingest calls it (identity_client.IdentityClient)."""

    async def resolve(
        self, project_id: UUID, keys: Sequence[OriginKey], *, fresh: bool = False
    ) -> list[Resolution]: ...

    async def identify(
        self, project_id: UUID, installation_id: str, custom_id: str, request_id: str
    ) -> Identified: ...

    async def merge_profiles(
        self, project_id: UUID, source_id: UUID, target_id: UUID, request_id: str
    ) -> Merged: ...


class Countries(Protocol):
    async def countries(self, ips: Sequence[str]) -> list[str]: ...


# What a ProfileChanged says beside EVENTS, by the kind of the events stored.
CHANGE_KINDS = {
    types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE: bus_pb2.PROFILE_CHANGE_KIND_ATTRIBUTES,
    types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE: bus_pb2.PROFILE_CHANGE_KIND_SUBSCRIPTIONS,
    types_pb2.EVENT_KIND_INSTALLATION_UPDATE: bus_pb2.PROFILE_CHANGE_KIND_INSTALLATIONS,
}
SWEEP_BATCH_SIZE = 500
# Identify calls in flight at once for one ImportTokens request (tokens with a custom ID).
IDENTIFY_CONCURRENCY = 8
# Identity's reason for a quarantined custom ID; a token naming one is rejected as ERASED.
CUSTOM_ID_ERASED = "CUSTOM_ID_ERASED"


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


TokenOutcome = Literal["imported", "already_known", "rejected"]


@dataclass(frozen=True, slots=True)
class TokenResult:
    index: int
    outcome: TokenOutcome
    installation_id: str = ""
    profile_id: UUID | None = None
    rejection: Rejection | None = None


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


def origin_of(event: ValidEvent) -> OriginKey:
    if event.custom_id is not None:
        return OriginKey(True, event.custom_id)
    assert event.installation_id is not None
    return OriginKey(False, event.installation_id)


@dataclass(slots=True)
class _Stored:
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
    ) -> None:
        self._repository = repository
        self._resolver = resolver
        self._clock = clock
        self._known = known or KnownOrigins()
        self._countries = countries
        self._notices = notices

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
        (retrying the same batch is safe: event IDs deduplicate). Idempotent per event.
        """
        validate_request(len(events), request_bytes)
        receive_time = self._clock.now()
        by_index = {i: e for i, e in enumerate(events)}
        results: dict[int, EventResult] = {}
        rejected: list[RejectedEvent] = []
        valid: list[ValidEvent] = []
        check = BatchValidator(send_time, receive_time, imported=imported).check
        for index, event in enumerate(events):
            checked = check(index, event)
            if isinstance(checked, ValidEvent):
                valid.append(checked)
            else:
                rejected.append(checked)
                results[index] = _rejected_result(checked, event)

        valid = await self._resolve_countries(valid)
        reintegrations: list[tuple[str, str]] = []
        for round_ in range(MAX_RESOLVE_ROUNDS):
            # After a round found installations gone, resolve past identity's cache: another
            # identity replica may not have heard of the erasure yet.
            profiles, refused = await self._resolve(project_id, valid, by_index, fresh=round_ > 0)
            rejected.extend(refused)
            refused_indexes = {r.index for r in refused}
            candidates, in_batch_duplicates = self._first_occurrences(
                [e for e in valid if e.index not in refused_indexes]
            )
            for index in in_batch_duplicates:
                results[index] = EventResult(index, by_index[index].event_id, "duplicate")
            stored = await self._store_with_retries(
                project_id, receive_time, imported, candidates, profiles, rejected, by_index
            )
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
            valid = stored.orphans
        else:
            raise StorageUnavailable("the batch's installations kept vanishing; retry it")
        if reintegrations:
            await self._reintegrate(project_id, reintegrations)
        batch = BatchResult([results[i] for i in range(len(events))])
        outcomes: tuple[Outcome, ...] = ("accepted", "duplicate", "rejected")
        for outcome in outcomes:
            STORED_EVENTS.labels(outcome).inc(batch.count(outcome))
        return batch

    async def import_tokens(
        self, project_id: UUID, tokens: Sequence[pb.ImportedToken]
    ) -> list[TokenResult]:
        """Creates one imported installation per new push token, on a new anonymous profile
        (identity's ResolveProfiles) or, for a token with a custom ID, on that custom ID's
        identified profile, created if new (identity's Identify); publishes
        InstallationsImported. A token an installation of the platform already holds is
        ALREADY_KNOWN and changes nothing; a custom ID identity refuses rejects its token alone
        (CUSTOM_ID_INVALID, ERASED). Raises BatchInvalid for no tokens or over 1,000,
        IdentityUnavailable or StorageUnavailable when nothing could be stored (a retry is
        safe). Idempotent."""
        validate_token_request(len(tokens))
        results: dict[int, TokenResult] = {}
        valid: list[ValidToken] = []
        for index, raw in enumerate(tokens):
            checked = validate_token(index, raw)
            if isinstance(checked, ValidToken):
                valid.append(checked)
            else:
                results[index] = TokenResult(index, "rejected", rejection=checked)
        holders = await self._repository.token_holders(
            project_id, sorted({(t.platform, t.push_token) for t in valid})
        )
        new: dict[str, ValidToken] = {}
        for token in valid:
            held = holders.get((token.platform, token.push_token))
            if held is not None:
                results[token.index] = TokenResult(token.index, "already_known", *held)
            else:
                new.setdefault(token.installation_id, token)
        profiles = await self._link_imported(project_id, new, results)
        if profiles:
            now = self._clock.now()
            linked = sorted(profiles)
            async with self._repository.transaction() as conn:
                inserted = await self._repository.insert_imported_installations(
                    conn,
                    project_id,
                    [(i, new[i].platform, new[i].push_token, new[i].push_opt_in) for i in linked],
                    now,
                )
                message = bus_pb2.InstallationsImported(project_id=str(project_id))
                message.import_time.FromDatetime(now)
                for installation_id in sorted(inserted):
                    message.installations.add(
                        installation_id=installation_id,
                        profile_id=str(profiles[installation_id]),
                        platform=new[installation_id].platform,
                        push_opt_in=new[installation_id].push_opt_in,
                    )
                if inserted:
                    await enqueue_many(conn, [OutboxItem(project_id, IDENTITY, message)])
            first_of = {t.index for t in new.values()}
            for token in valid:
                if token.index in results:
                    continue
                installation_id = token.installation_id
                if installation_id not in profiles:  # its first occurrence was refused
                    results[token.index] = replace(
                        results[new[installation_id].index], index=token.index
                    )
                    continue
                imported = installation_id in inserted and token.index in first_of
                results[token.index] = TokenResult(
                    token.index,
                    "imported" if imported else "already_known",
                    installation_id,
                    profiles[installation_id],
                )
            log.info("tokens_imported", imported=len(inserted), tokens=len(tokens))
        for token in valid:  # a repeat of a token identity refused gets the same answer
            if token.index not in results:
                results[token.index] = replace(
                    results[new[token.installation_id].index], index=token.index
                )
        return [results[i] for i in range(len(tokens))]

    async def _link_imported(
        self, project_id: UUID, new: dict[str, ValidToken], results: dict[int, TokenResult]
    ) -> dict[str, UUID]:
        """The profile of each new imported installation: anonymous ones through one
        ResolveProfiles call, those with a custom ID through Identify (a few at a time). A
        refused custom ID puts its token's rejection in `results` and leaves it out."""
        profiles: dict[str, UUID] = {}
        anonymous = sorted(i for i, t in new.items() if t.custom_id is None)
        if anonymous:
            keys = [OriginKey(False, installation_id) for installation_id in anonymous]
            answers = await self._resolver.resolve(project_id, keys)
            for key, answer in zip(keys, answers, strict=True):
                if answer.profile_id is None:  # cannot happen for IDs ingest derives
                    raise IdentityUnavailable("identity refused an imported installation")
                profiles[key.value] = answer.profile_id
        identified = sorted((i, t) for i, t in new.items() if t.custom_id is not None)
        if not identified:
            return profiles
        limit = asyncio.Semaphore(IDENTIFY_CONCURRENCY)

        async def link(installation_id: str, token: ValidToken) -> None:
            assert token.custom_id is not None
            request_id = "import-token:" + _digest(installation_id, token.custom_id)
            async with limit:
                answer = await self._resolver.identify(
                    project_id, installation_id, token.custom_id, request_id
                )
            if answer.profile_id is not None:
                profiles[installation_id] = answer.profile_id
                return
            rejection = (
                Rejection(model.ERASED, "custom_id", "the custom ID was erased")
                if answer.reason == CUSTOM_ID_ERASED
                else Rejection(
                    model.CUSTOM_ID_INVALID, "custom_id", answer.message or "refused by identity"
                )
            )
            results[token.index] = TokenResult(token.index, "rejected", rejection=rejection)

        try:
            async with asyncio.TaskGroup() as group:
                for installation_id, token in identified:
                    group.create_task(link(installation_id, token))
        except* IdentityUnavailable as failed:
            raise failed.exceptions[0] from None
        return profiles

    async def _reintegrate(self, project_id: UUID, pairs: Sequence[tuple[str, str]]) -> None:
        """Folds each imported installation into the SDK installation that just sent a session
        with its push token (after the batch committed; nothing remote inside a transaction).
        A failure is logged and left for that installation's next session."""
        for installation_id, imported_id in pairs:
            try:
                await self._reintegrate_one(project_id, installation_id, imported_id)
            except (IdentityUnavailable, StorageUnavailable, TransactionConflict) as exc:
                log.warning("token_reintegration_postponed", error=type(exc).__name__)

    async def _reintegrate_one(
        self, project_id: UUID, installation_id: str, imported_id: str
    ) -> None:
        linked = await self._repository.installation_profiles(
            project_id, [installation_id, imported_id]
        )
        real = linked.get(installation_id)
        if real is None:
            return  # unlinked (erased) since the batch: its next session tries again
        profile_id = real[0]
        before = linked.get(imported_id)
        if before is not None and before[0] != profile_id:
            # Same rules as any merge, by identity: the imported profile is merged into the
            # real one's, except that an anonymous side always goes into an identified one.
            source, target = before[0], profile_id
            if before[1] and not real[1]:
                source, target = target, source
            request_id = "reintegrate:" + _digest(imported_id, str(source), str(target))
            merged = await self._resolver.merge_profiles(project_id, source, target, request_id)
            if merged.profile_id is None:
                # Two identified profiles with different custom IDs (or one gone): the profiles
                # stay apart; the token still moves to the installation that holds it now.
                log.info("token_reintegration_without_merge", reason=merged.reason)
            else:
                profile_id = merged.profile_id
        now = self._clock.now()
        async with self._repository.transaction() as conn:
            folded = await self._repository.fold_imported_installation(
                conn, project_id, imported_id, installation_id, now
            )
            if folded:
                message = bus_pb2.InstallationReintegrated(
                    project_id=str(project_id),
                    imported_installation_id=imported_id,
                    installation_id=installation_id,
                    imported_profile_id="" if before is None else str(before[0]),
                    profile_id=str(profile_id),
                    reintegrate_time=timestamp_of(now),
                )
                await enqueue_many(conn, [OutboxItem(project_id, IDENTITY, message)])
        if folded:
            log.info("token_reintegrated")

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
                elif answer.erased:
                    refused_keys[key] = Rejection(
                        model.ERASED, "custom_id", "the custom ID was erased"
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

    @staticmethod
    def _first_occurrences(events: Sequence[ValidEvent]) -> tuple[list[ValidEvent], list[int]]:
        """The first event of each (origin, event_id), and the indexes of later repeats."""
        seen: set[tuple[OriginKey, str]] = set()
        first, repeats = [], []
        for event in events:
            key = (origin_of(event), event.event_id)
            if key in seen:
                repeats.append(event.index)
            else:
                seen.add(key)
                first.append(event)
        return first, repeats

    async def _store_with_retries(
        self,
        project_id: UUID,
        receive_time: datetime,
        imported: bool,
        events: Sequence[ValidEvent],
        profiles: dict[OriginKey, UUID],
        rejected: Sequence[RejectedEvent],
        by_index: dict[int, pb.Event],
    ) -> _Stored:
        for attempt in range(1, MAX_TRANSACTION_ATTEMPTS + 1):
            try:
                async with self._repository.transaction() as conn:
                    derived = await derive_sessions(conn, project_id, events)
                    stored = await self._store(
                        conn, project_id, receive_time, imported, derived.events, profiles, by_index
                    )
                    stored.derived_starts = await derived.record(conn, project_id, stored.accepted)
                    all_rejected = [*rejected, *stored.late_rejections]
                    await self._repository.insert_rejected_events(
                        conn, project_id, receive_time, all_rejected
                    )
                    await self._enqueue(
                        conn, project_id, receive_time, imported, derived.events, stored
                    )
            except TransactionConflict:
                if attempt == MAX_TRANSACTION_ATTEMPTS:
                    raise
                log.info("ingest_transaction_conflict", attempt=attempt)
                continue
            for refusal in all_rejected:
                REJECTED_EVENTS.labels(refusal.rejection.reason).inc()
            self._announce(project_id, stored.ingested, stored.versions)
            return stored
        raise AssertionError("unreachable")

    async def _store(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        receive_time: datetime,
        imported: bool,
        events: Sequence[ValidEvent],
        profiles: dict[OriginKey, UUID],
        by_index: dict[int, pb.Event],
    ) -> _Stored:
        repo = self._repository
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
        stored = _Stored()
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
        stored.versions = await repo.bump_profile_versions(
            conn, project_id, [row.profile_id for _, row in accepted]
        )
        refused = await self._apply_attributes(conn, project_id, accepted)
        if refused:
            await repo.delete_events(
                conn, project_id, [row.event_seq for e, row in accepted if e.index in refused]
            )
            stored.late_rejections = [
                reject(index, by_index[index], rejection) for index, rejection in refused.items()
            ]
            accepted = [(e, row) for e, row in accepted if e.index not in refused]
        await repo.save_subscriptions(
            conn,
            project_id,
            [
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
        )
        stored.reintegrations = await repo.save_installations(
            conn,
            project_id,
            [
                (
                    e.installation_id,
                    e.event_time,
                    e.platform,
                    None if e.installation_values is None else dict(e.installation_values),
                )
                for e, _ in accepted
                if e.installation_id is not None
            ],
            sorted(
                {
                    e.installation_id
                    for e, _ in accepted
                    if e.kind == types_pb2.EVENT_KIND_SESSION_START and e.installation_id
                }
            ),
        )
        stored.session_countries = await repo.save_sessions(
            conn,
            project_id,
            [
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
        stored.accepted = {e.index: row.profile_id for e, row in accepted}
        return stored

    async def _apply_attributes(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        accepted: Sequence[tuple[ValidEvent, InsertedEvent]],
    ) -> dict[int, Rejection]:
        """Adds the operations of the accepted events to their profiles' attribute logs, which
        the database replays in event-time order; returns the events refused because they would
        give a profile over 50 custom attributes (those are not stored)."""
        with_operations = [(e, row) for e, row in accepted if e.operations]
        if not with_operations:
            return {}
        profile_ids = sorted({row.profile_id for _, row in with_operations})
        held = await self._repository.held_custom_attributes(conn, project_id, profile_ids)
        refused: dict[int, Rejection] = {}
        operations: list[OperationRow] = []
        for event, row in sorted(with_operations, key=lambda p: (p[0].event_time, p[0].index)):
            names = held.setdefault(row.profile_id, set())
            # Only an event that adds a custom attribute is refused, and only if the profile
            # would then hold over 50: a merge may have left more, which stay (nothing is
            # dropped) and may still be changed or unset.
            after = model.custom_attributes_after(names, event.operations)
            if after - names and len(after) > model.MAX_CUSTOM_ATTRIBUTES_PER_PROFILE:
                refused[event.index] = Rejection(
                    model.PROFILE_ATTRIBUTE_LIMIT,
                    "attribute_operations.operations",
                    "the profile already holds 50 custom attributes",
                )
                continue
            held[row.profile_id] = after
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
        await self._repository.add_attribute_operations(conn, project_id, operations)
        return refused

    async def _enqueue(
        self,
        conn: asyncpg.Connection,
        project_id: UUID,
        receive_time: datetime,
        imported: bool,
        events: Sequence[ValidEvent],
        stored: _Stored,
    ) -> None:
        if not stored.accepted:
            return
        message = bus_pb2.EventsIngested(project_id=str(project_id), batch_id=str(uuid.uuid4()))
        message.commit_time.CopyFrom(timestamp_of(self._clock.now()))
        received = timestamp_of(receive_time)
        accepted = stored.accepted
        countries = stored.session_countries
        profile_ids: dict[UUID, str] = {}
        ingested = list(stored.derived_starts)
        for event in events:
            profile_id = accepted.get(event.index)
            if profile_id is None:
                continue
            text = profile_ids.get(profile_id)
            if text is None:
                text = profile_ids[profile_id] = str(profile_id)
            one = ingested_event(event, text, received, imported=imported)
            if event.detail_field == "session" and not one.session.country:
                key = (event.installation_id or "", event.session_id or "")
                one.session.country = countries.get(key, "")
            ingested.append(one)
        message.events.extend(ingested)
        stored.ingested = ingested
        await enqueue_many(conn, [OutboxItem(project_id, EVENTS, message)])

    def _announce(
        self,
        project_id: UUID,
        events: Sequence[bus_pb2.IngestedEvent],
        versions: dict[UUID, int],
    ) -> None:
        """Queues one ProfileChanged per touched profile (after commit; never blocks)."""
        if self._notices is None or not events:
            return
        by_profile: dict[str, list[bus_pb2.IngestedEvent]] = {}
        for event in events:
            by_profile.setdefault(event.profile_id, []).append(event)
        version_of = {str(p): v for p, v in versions.items()}
        change_time = timestamp_of(self._clock.now())
        project = str(project_id)
        notices = []
        for profile_id, profile_events in by_profile.items():
            caused = {CHANGE_KINDS[e.kind] for e in profile_events if e.kind in CHANGE_KINDS}
            kinds = [bus_pb2.PROFILE_CHANGE_KIND_EVENTS, *sorted(caused)]
            notices.append(
                bus_pb2.ProfileChanged(
                    project_id=project,
                    profile_id=profile_id,
                    kinds=kinds,
                    profile_version=version_of.get(profile_id, 0),
                    events=profile_events,
                    change_time=change_time,
                )
            )
        self._notices.offer(notices)

    async def close_idle_sessions(self, batch_size: int = SWEEP_BATCH_SIZE) -> int:
        """Closes every open session idle for over 30 minutes (by the clock), at its last
        activity with the duration seen so far, and publishes a session end for each through
        the outbox (EventsIngested). Returns how many were closed. Safe to run concurrently."""
        now = self._clock.now()
        total = 0
        while True:
            async with self._repository.transaction() as conn:
                closed = await self._repository.close_idle_sessions(
                    conn, now - model.SESSION_TIMEOUT, batch_size
                )
                messages: dict[UUID, bus_pb2.EventsIngested] = {}
                for session in closed:
                    message = messages.get(session.project_id)
                    if message is None:
                        message = messages[session.project_id] = bus_pb2.EventsIngested(
                            project_id=str(session.project_id), batch_id=str(uuid.uuid4())
                        )
                        message.commit_time.FromDatetime(now)
                    message.events.append(_timeout_end(session, now))
                await enqueue_many(
                    conn, [OutboxItem(p, EVENTS, m) for p, m in sorted(messages.items())]
                )
            for project_id, message in messages.items():
                self._announce(project_id, message.events, {})
            total += len(closed)
            if len(closed) < batch_size:
                if total:
                    log.info("sessions_closed_idle", count=total)
                return total


def timeout_event_id(session_id: str) -> str:
    """The event ID of the session end ingest publishes for an idle session: the same for a
    session however often it is published, so consumers deduplicate it."""
    return "session_timeout:" + hashlib.sha256(session_id.encode()).hexdigest()[:40]


def _timeout_end(session: ClosedSession, now: datetime) -> bus_pb2.IngestedEvent:
    event = bus_pb2.IngestedEvent(
        event_id=timeout_event_id(session.session_id),
        installation_id=session.installation_id,
        profile_id=str(session.profile_id),
        platform=session.platform,  # type: ignore[arg-type]
        kind=types_pb2.EVENT_KIND_SESSION_END,
        session_id=session.session_id,
    )
    event.event_time.FromDatetime(session.end_time)
    event.receive_time.FromDatetime(now)
    event.session.duration.FromTimedelta(session.duration)
    event.session.country = session.country
    return event


def _digest(*parts: str) -> str:
    """A short stable digest for request IDs (identity keeps them at most 64 characters)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:40]


def _rejected_result(rejected: RejectedEvent, event: pb.Event) -> EventResult:
    return EventResult(rejected.index, event.event_id, "rejected", None, rejected.rejection)
