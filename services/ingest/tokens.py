"""Imported push tokens: ImportTokens creates one imported installation per new token, on a
profile identity gives it; when an SDK installation later sends a session with that token, the
imported installation is folded into it (reintegration, after the batch committed)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal
from uuid import UUID

import structlog

from profiles.common.v1 import bus_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest import model
from services.ingest.errors import IdentityUnavailable, StorageUnavailable
from services.ingest.identity_client import OriginKey, Resolver
from services.ingest.model import Rejection
from services.ingest.repository import IngestRepository, TransactionConflict
from services.ingest.validation import ValidToken, validate_token, validate_token_request
from shared.clock import Clock
from shared.convert import set_timestamp, timestamp_of
from shared.outbox import OutboxItem, enqueue_many
from shared.topics import IDENTITY

log = structlog.get_logger(__name__)

# Identify calls in flight at once for one ImportTokens request (tokens with a custom ID).
IDENTIFY_CONCURRENCY = 8
# Identity's reason for a quarantined custom ID; a token naming one is rejected as ERASED.
CUSTOM_ID_ERASED = "CUSTOM_ID_ERASED"

TokenOutcome = Literal["imported", "already_known", "rejected"]


@dataclass(frozen=True, slots=True)
class TokenResult:
    index: int
    outcome: TokenOutcome
    installation_id: str = ""
    profile_id: UUID | None = None
    rejection: Rejection | None = None


class PushTokens:
    """ImportTokens and the reintegration of imported installations (IngestService's part that
    concerns push tokens)."""

    def __init__(self, repository: IngestRepository, resolver: Resolver, clock: Clock) -> None:
        self._repository = repository
        self._resolver = resolver
        self._clock = clock

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
                set_timestamp(message.import_time, now)
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

    async def reintegrate(self, project_id: UUID, pairs: Sequence[tuple[str, str]]) -> None:
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

    async def move_tokens(self, project_id: UUID, installation_ids: Sequence[str]) -> None:
        """Takes the push tokens these installations just reported from the other
        installations holding them (after the batch committed): a token names one device, and
        a newer installation of that device (after a logout and another person's login) must
        not leave the old one, the previous person's, reachable through it. Each move is
        published (PushTokenMoved) in the same transaction. A failure is logged and left for
        the next report of the token."""
        try:
            async with self._repository.transaction() as conn:
                moves = await self._repository.move_push_tokens(conn, project_id, installation_ids)
                if not moves:
                    return
                named = sorted({i for lost, kept, _ in moves for i in (lost, kept)})
                profiles = await self._repository.installation_profiles(project_id, named, conn)
                now = self._clock.now()
                items = []
                for lost, kept, time in moves:
                    lost_profile = profiles.get(lost)
                    kept_profile = profiles.get(kept)
                    message = bus_pb2.PushTokenMoved(
                        project_id=str(project_id),
                        installation_id=lost,
                        profile_id="" if lost_profile is None else str(lost_profile[0]),
                        to_installation_id=kept,
                        to_profile_id="" if kept_profile is None else str(kept_profile[0]),
                        move_time=timestamp_of(time or now),
                    )
                    profile_id = None if lost_profile is None else lost_profile[0]
                    items.append(OutboxItem(project_id, IDENTITY, message, profile_id))
                await enqueue_many(conn, items)
            log.info("push_tokens_moved", count=len(moves))
        except (StorageUnavailable, TransactionConflict) as exc:
            log.warning("push_token_move_postponed", error=type(exc).__name__)


def _digest(*parts: str) -> str:
    """A short stable digest for request IDs (identity keeps them at most 64 characters)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:40]
