"""Identity's use cases: resolve, identify, logout, merge. Each owns its transaction, applies the
rules of model.py, and publishes what changed through the outbox in that same transaction; live
notices (ProfileChanged) of the profiles involved are queued after commit, best effort."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID, uuid4

import structlog

from profiles.common.v1 import bus_pb2
from services.identity import export, messages
from services.identity.cache import ResolutionCache, links_payload
from services.identity.errors import (
    ConcurrentChange,
    CustomIdErased,
    InstallationNotFound,
    KeysInvalid,
    ProfileMerged,
    ProfileNotFound,
    RequestIdReused,
)
from services.identity.model import (
    FIRST_VERSION,
    MAX_KEYS,
    Answer,
    ChangeCause,
    ChangeKind,
    DeleteResult,
    ExportChunk,
    ExportSection,
    IdentifyOutcome,
    IdentifyResult,
    IdentityChange,
    LogoutOutcome,
    LogoutResult,
    MergeResult,
    Profile,
    ProfileKey,
    Resolution,
    answer_to_json,
    check_request_id,
    choose_identify_rule,
    custom_id_problem,
    delete_result_from_json,
    event_marker,
    identify_result_from_json,
    logout_result_from_json,
    merge_result_from_json,
    plan_merge,
    quarantine_digest,
    quarantine_end,
    split_keys,
)
from services.identity.repository import IdentityRepository, IdentityTransaction
from services.identity.validation import (
    check_identify_request,
    check_logout_request,
    check_merge_request,
)
from shared.clock import Clock
from shared.errors import FieldViolation, InvalidArgument
from shared.notices import LiveNotices
from shared.tenancy import TenancyRepository

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A request_id is honoured this long (AIP-155: "within 24 hours").
ANSWER_LIFETIME = timedelta(hours=24)
# The answer kept for a Logout of an installation identity did not know (NOT_FOUND).
NO_INSTALLATION = "no_installation"
# A project's junk list is re-read at most this often; operational, so monotonic time.
SETTINGS_CACHE_SECONDS = 5.0


def fingerprint(*fields: str) -> str:
    """The request's other fields, hashed: identity_requests keeps no custom ID in clear."""
    return hashlib.sha256("\x00".join(fields).encode()).hexdigest()


def _erased() -> CustomIdErased:
    return CustomIdErased(
        "this custom ID belonged to an erased profile and is quarantined",
        metadata={"field": "custom_id"},
    )


def _erased_installation() -> CustomIdErased:
    return CustomIdErased(
        "this installation ID is the custom ID of an erased profile, quarantined",
        metadata={"field": "installation_id"},
    )


def _digest(secret: bytes | None, custom_id: str) -> bytes | None:
    return None if secret is None else quarantine_digest(secret, custom_id)


def _same_identity(locked: Profile | None, read: Profile) -> bool:
    """True when a profile read before its lock is still live with the same custom ID."""
    return (
        locked is not None
        and locked.merged_into is None
        and read.merged_into is None
        and locked.custom_id == read.custom_id
    )


class IdentityService:
    def __init__(
        self,
        repository: IdentityRepository,
        tenancy: TenancyRepository,
        clock: Clock,
        *,
        attempts: int = 8,
        notices: LiveNotices | None = None,
        cache: ResolutionCache | None = None,
    ) -> None:
        self._repository = repository
        self._cache = cache
        self._tenancy = tenancy
        self._clock = clock
        self._attempts = attempts
        self._notices = notices
        self._junk: dict[UUID, tuple[float, tuple[str, ...]]] = {}
        self._secrets: dict[UUID, bytes] = {}

    async def extra_junk_custom_ids(self, project_id: UUID) -> tuple[str, ...]:
        """The project's own junk custom IDs (setting identity.extra_junk_custom_ids)."""
        cached = self._junk.get(project_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        settings = await self._tenancy.get_settings(project_id)
        junk = tuple(settings["identity.extra_junk_custom_ids"])
        if len(self._junk) > 10_000:  # bounded: one entry per active project
            self._junk.clear()
        self._junk[project_id] = (time.monotonic() + SETTINGS_CACHE_SECONDS, junk)
        return junk

    # -- ResolveProfiles ------------------------------------------------------------------

    async def resolve(
        self, project_id: UUID, keys: Sequence[ProfileKey], *, fresh: bool = False
    ) -> list[Resolution | InvalidArgument]:
        """Each key's current profile, in order, creating profiles for new keys; an invalid key
        gets its error instead. Idempotent. `fresh` reads past the cache (another replica's
        change may not have reached it yet). Raises KeysInvalid for 0 or over 1,000 keys."""
        if not 1 <= len(keys) <= MAX_KEYS:
            why = f"must hold 1 to {MAX_KEYS} keys"
            raise KeysInvalid(f"keys {why}", [FieldViolation("keys", why, KeysInvalid.reason)])
        needs_junk = any(k.custom_id is not None for k in keys)
        junk = await self.extra_junk_custom_ids(project_id) if needs_junk else ()
        batch = split_keys(keys, junk)
        installation_ids, custom_ids = batch.installation_ids, batch.custom_ids
        by_installation = (
            await self._retrying(
                lambda: self._resolve_installations(project_id, installation_ids, fresh)
            )
            if installation_ids
            else {}
        )
        if len(installation_ids) == len(keys):  # the usual batch: valid installation IDs only
            return [by_installation[i] for i in installation_ids]
        by_custom_id = (
            await self._retrying(lambda: self._resolve_custom_ids(project_id, custom_ids))
            if custom_ids
            else {}
        )
        results: list[Resolution | InvalidArgument] = []
        for index, (installation_id, custom_id) in enumerate(keys):
            problem = batch.problems.get(index)
            if problem is not None:
                results.append(problem)
            elif installation_id is not None:
                results.append(by_installation[installation_id])
            else:
                assert custom_id is not None
                results.append(by_custom_id[custom_id])
        return results

    async def look_up(
        self, project_id: UUID, keys: Sequence[ProfileKey]
    ) -> list[Resolution | InvalidArgument]:
        """ResolveProfiles with `lookup_only`: each key's current profile, in order, read from
        the database (a cached answer could predate an erasure), creating nothing. A key nobody
        holds gets no profile, and `erased` when it is a quarantined custom ID or an unknown
        installation ID equal to one (known installations are left alone, as `resolve` leaves
        them). An invalid key gets its error. Raises KeysInvalid for 0 or over 1,000 keys."""
        if not 1 <= len(keys) <= MAX_KEYS:
            why = f"must hold 1 to {MAX_KEYS} keys"
            raise KeysInvalid(f"keys {why}", [FieldViolation("keys", why, KeysInvalid.reason)])
        needs_junk = any(k.custom_id is not None for k in keys)
        batch = split_keys(keys, await self.extra_junk_custom_ids(project_id) if needs_junk else ())
        known = (
            await self._repository.find_installations(project_id, batch.installation_ids)
            if batch.installation_ids
            else {}
        )
        unknown = [i for i in batch.installation_ids if i not in known]
        secret = await self._known_secret(project_id)
        # The same HMAC for both: an installation ID is refused when it equals an erased custom ID.
        erased = await self._quarantined(
            project_id, secret, [*unknown, *batch.custom_ids], self._clock.now()
        )
        live = [c for c in batch.custom_ids if c not in erased]
        holders = await self._repository.find_custom_id_holders(project_id, live) if live else {}
        results: list[Resolution | InvalidArgument] = []
        for index, (installation_id, custom_id) in enumerate(keys):
            problem = batch.problems.get(index)
            if problem is not None:
                results.append(problem)
            elif installation_id is not None:
                found = known.get(installation_id)
                if found is None:
                    found = Resolution(None, erased=installation_id in erased)
                results.append(found)
            else:
                assert custom_id is not None
                holder = holders.get(custom_id)
                results.append(
                    Resolution(holder, erased=custom_id in erased, identified=holder is not None)
                )
        return results

    async def resolve_installations(
        self, project_id: UUID, installation_ids: Sequence[str], *, fresh: bool = False
    ) -> list[Resolution | InvalidArgument]:
        """`resolve` for a batch of installation IDs only (what ingest sends): answered from the
        cache when every one is there, without decoding keys or validating (only valid IDs are
        ever cached); otherwise, or when `fresh`, as `resolve`."""
        cache = self._cache
        if cache is not None and not fresh and 1 <= len(installation_ids) <= MAX_KEYS:
            get, project = cache.get, project_id.int
            hits = [get(project, i) for i in installation_ids]
            if None not in hits:
                return hits  # type: ignore[return-value]  # no None left: all Resolutions
        keys = [ProfileKey(i, None) for i in installation_ids]
        return await self.resolve(project_id, keys, fresh=fresh)

    async def _resolve_installations(
        self, project_id: UUID, installation_ids: Sequence[str], fresh: bool
    ) -> dict[str, Resolution]:
        found: dict[str, Resolution] = {}
        unknown = installation_ids
        cache = self._cache
        generation = 0
        if cache is not None:
            if fresh:  # the caller found an answer untrue: what the cache holds goes
                cache.forget_installations(project_id, installation_ids)
            generation = cache.generation  # before the read: see ResolutionCache.store
            if not fresh:
                project = project_id.int
                unknown = []
                for installation_id in installation_ids:
                    hit = cache.get(project, installation_id)
                    if hit is None:
                        unknown.append(installation_id)
                    else:
                        found[installation_id] = hit
                if not unknown:
                    return found
        # Known installations (the usual case) cost one indexed read and no transaction.
        read = await self._repository.find_installations(project_id, unknown)
        if cache is not None:
            cache.store(project_id, read, generation)
        found.update(read)
        missing = sorted(set(unknown) - read.keys())
        if not missing:
            return found
        now = self._clock.now()
        # A new installation whose ID is a quarantined custom ID is refused like the custom ID
        # (erased): after a login, Countly's SDKs send under the user's ID, so an erased person's
        # device would otherwise bring it back as an installation. Read after the installations:
        # an erasure that unlinked one of them (perhaps the project's first, making its secret)
        # has committed its quarantine by then.
        secret = await self._known_secret(project_id)
        async with self._repository.transaction() as tx:
            created = await tx.create_installations(
                project_id, missing, now, lambda i: _digest(secret, i)
            )
            await tx.enqueue(
                [
                    messages.profile_created(project_id, profile_id, installation_id, False, now)
                    for installation_id, profile_id in created.items()
                ]
            )
        for installation_id, profile_id in created.items():
            found[installation_id] = Resolution(profile_id, created=True, link_version=1)
        raced = [i for i in missing if i not in created]
        if raced:  # created by a concurrent caller meanwhile, or quarantined: read again
            found.update(await self._repository.find_installations(project_id, raced))
            unfound = [i for i in raced if i not in found]
            for installation_id in await self._quarantined(project_id, secret, unfound, now):
                found[installation_id] = Resolution(None, erased=True)
        if len(found) < len(set(installation_ids)):
            raise ConcurrentChange("an installation vanished while it was being resolved")
        return found

    async def _resolve_custom_ids(
        self, project_id: UUID, custom_ids: Sequence[str]
    ) -> dict[str, Resolution]:
        now = self._clock.now()
        secret = await self._known_secret(project_id)
        found = {
            c: Resolution(None, erased=True)
            for c in await self._quarantined(project_id, secret, custom_ids, now)
        }
        live = [c for c in custom_ids if c not in found]
        if not live:
            return found
        holders = await self._repository.find_custom_id_holders(project_id, live)
        found.update({c: Resolution(p, identified=True) for c, p in holders.items()})
        missing = sorted(set(live) - found.keys())
        if not missing:
            return found
        async with self._repository.transaction() as tx:
            await tx.lock_custom_ids(project_id, missing)
            # Read under the locks: an erasure that quarantined one of them meanwhile (perhaps
            # the project's first, making its secret) has committed by now.
            secret = secret or await tx.find_hmac_key(project_id)
            created = await tx.create_identified_profiles(
                project_id, missing, now, lambda c: _digest(secret, c)
            )
            await tx.enqueue(
                [
                    messages.profile_created(project_id, profile_id, "", True, now)
                    for profile_id in created.values()
                ]
            )
        for custom_id, profile_id in created.items():
            found[custom_id] = Resolution(profile_id, created=True, identified=True)
        raced = [c for c in missing if c not in created]
        if raced:  # created concurrently, an alias appeared, or quarantined: read again
            holders = await self._repository.find_custom_id_holders(project_id, raced)
            found.update({c: Resolution(p, identified=True) for c, p in holders.items()})
            unheld = [c for c in raced if c not in holders]
            secret = secret or await self._known_secret(project_id)
            for custom_id in await self._quarantined(project_id, secret, unheld, now):
                found[custom_id] = Resolution(None, erased=True)
        if len(found) < len(set(custom_ids)):
            raise ConcurrentChange("a custom ID's profile vanished while it was being resolved")
        return found

    async def _known_secret(self, project_id: UUID) -> bytes | None:
        """The project's HMAC secret, or None before its first erasure. Kept once read: it
        never changes. Its absence is not kept, since another process may erase meanwhile."""
        secret = self._secrets.get(project_id)
        if secret is None:
            secret = await self._repository.find_hmac_key(project_id)
            if secret is not None:
                self._remember_secret(project_id, secret)
        return secret

    def _remember_secret(self, project_id: UUID, secret: bytes) -> None:
        if len(self._secrets) > 10_000:  # bounded: one entry per active project
            self._secrets.clear()
        self._secrets[project_id] = secret

    async def _quarantined(
        self, project_id: UUID, secret: bytes | None, custom_ids: Sequence[str], now: datetime
    ) -> set[str]:
        """The custom IDs whose quarantine has not ended at `now`."""
        if secret is None or not custom_ids:
            return set()
        by_digest = {quarantine_digest(secret, c): c for c in custom_ids}
        hits = await self._repository.find_quarantined(project_id, list(by_digest), now)
        return {by_digest[d] for d in hits}

    # -- Identify ------------------------------------------------------------------------

    async def identify(
        self, project_id: UUID, installation_id: str, custom_id: str, request_id: str
    ) -> IdentifyResult:
        """Applies Identify rules 1-4 in one transaction (see the proto). Retries a lost race,
        then raises ConcurrentChange (ABORTED) with nothing changed. Idempotent per request_id.
        Raises InstallationIdInvalid, CustomIdInvalid, RequestIdInvalid (with a violation per
        bad field, before any write), RequestIdReused."""
        # The project's junk list is read only for a custom ID the built-in rules accept: one
        # they refuse is refused for the same reason without it.
        extra_junk = (
            await self.extra_junk_custom_ids(project_id)
            if custom_id_problem(custom_id) is None
            else ()
        )
        check_identify_request(installation_id, custom_id, request_id, extra_junk)
        digest = fingerprint(installation_id, custom_id)
        # Checked again under the custom ID's lock; this early read only spares an erased
        # custom ID the installation's creation below.
        secret = await self._known_secret(project_id)
        if await self._quarantined(project_id, secret, [custom_id], self._clock.now()):
            raise _erased()
        # "A never-seen installation first gets an anonymous profile": committed on its own, it
        # is the state any first event would have created, so an ABORTED Identify after it
        # leaves nothing partial.
        resolved = await self._retrying(
            lambda: self._resolve_installations(project_id, [installation_id], False)
        )
        if resolved[installation_id].erased:  # a new installation named by an erased custom ID
            raise _erased_installation()
        installation_created = resolved[installation_id].created
        result = await self._retrying(
            lambda: self._identify_once(
                project_id, installation_id, custom_id, request_id, digest, installation_created
            )
        )
        log.info("identified", outcome=result.outcome.value, profile_id=str(result.profile_id))
        return result

    async def _identify_once(
        self,
        project_id: UUID,
        installation_id: str,
        custom_id: str,
        request_id: str,
        digest: str,
        installation_created: bool,
    ) -> IdentifyResult:
        now = self._clock.now()
        notices: list[bus_pb2.ProfileChanged] = []
        changed: list[UUID] = []  # profiles whose installations now resolve differently
        async with self._repository.transaction() as tx:
            stored = await self._stored_answer(tx, project_id, "Identify", request_id, digest, now)
            if stored is not None:
                return identify_result_from_json(stored)
            # Lock order: custom ID, installation, profiles (see repository.py).
            await tx.lock_custom_ids(project_id, [custom_id])
            secret = self._secrets.get(project_id) or await tx.find_hmac_key(project_id)
            if secret is not None and await tx.is_quarantined(
                project_id, quarantine_digest(secret, custom_id), now
            ):
                raise _erased()
            link = await tx.lock_installation(project_id, installation_id)
            if link is None:  # erased between the resolve and now
                raise ConcurrentChange("the installation was unlinked concurrently")
            holder_id = await tx.find_custom_id_holder(project_id, custom_id)
            wanted = [link.profile_id] if holder_id is None else [link.profile_id, holder_id]
            locked = await tx.lock_profiles(project_id, wanted)
            current = locked.get(link.profile_id)
            holder = None if holder_id is None else locked.get(holder_id)
            if (
                current is None
                or current.merged_into is not None
                or (holder_id is not None and (holder is None or holder.merged_into is not None))
            ):
                raise ConcurrentChange("a profile changed while Identify was deciding")
            outcome = choose_identify_rule(current, holder)
            if outcome is IdentifyOutcome.ALREADY_IDENTIFIED:
                result = IdentifyResult(outcome, current.profile_id)
            elif outcome is IdentifyOutcome.IDENTIFIED:
                version = await tx.set_custom_id(project_id, current.profile_id, custom_id, now)
                # Nothing moves (link_version stays), but the installations' answers now say
                # `identified`: cached ones are dropped.
                changed = [current.profile_id]
                await self._announce_links(tx, project_id, changed)
                notices.append(
                    messages.identified_notice(project_id, current.profile_id, version, now)
                )
                await tx.enqueue(
                    [
                        messages.profile_identified(
                            project_id, uuid4(), current.profile_id, installation_id, now
                        )
                    ]
                )
                result = IdentifyResult(
                    outcome, current.profile_id, profile_created=installation_created
                )
            elif outcome is IdentifyOutcome.MERGED:
                assert holder is not None
                change, notices = await self._merge(
                    tx, project_id, current.profile_id, holder.profile_id, ChangeCause.IDENTIFY, now
                )
                changed = [current.profile_id, holder.profile_id]
                result = IdentifyResult(
                    outcome,
                    holder.profile_id,
                    merged_profile_id=current.profile_id,
                    change_id=change.change_id,
                )
            else:
                result, notices = await self._switch(
                    tx, project_id, installation_id, current.profile_id, holder, custom_id, now
                )
                changed = [current.profile_id, result.profile_id]
            await self._save_answer(tx, project_id, "Identify", request_id, digest, result, now)
        self._forget(project_id, changed)
        self._announce(notices)
        return result

    async def _switch(
        self,
        tx: IdentityTransaction,
        project_id: UUID,
        installation_id: str,
        previous_id: UUID,
        holder: Profile | None,
        custom_id: str,
        now: datetime,
    ) -> tuple[IdentifyResult, list[bus_pb2.ProfileChanged]]:
        """Rule 4: the installation leaves its identified profile for the custom ID's profile,
        created if nobody holds it; nothing of the previous profile is copied, and the previous
        profile keeps the installation's details as they are now (ingest's copy). Returns the
        result and the live notices to send after commit."""
        created = holder is None
        if holder is None:
            target_id = await tx.create_identified_profile(project_id, custom_id, now)
        else:
            target_id = holder.profile_id
        await tx.move_installation(project_id, installation_id, target_id)
        await tx.keep_left_installation(project_id, installation_id, previous_id, now)
        await self._announce_links(tx, project_id, [previous_id, target_id])
        versions = await tx.bump_versions(project_id, [previous_id, target_id], now)
        change = IdentityChange(
            change_id=uuid4(),
            kind=ChangeKind.SPLIT,
            cause=ChangeCause.IDENTIFY_SWITCH,
            source_profile_id=previous_id,
            target_profile_id=target_id,
            installation_ids=(installation_id,),
            change_time=now,
        )
        await tx.record_change(project_id, change)
        items = [messages.profile_split(project_id, change, created)]
        if created:
            items.insert(0, messages.profile_created(project_id, target_id, "", True, now))
        await tx.enqueue(items)
        result = IdentifyResult(
            IdentifyOutcome.MOVED,
            target_id,
            previous_profile_id=previous_id,
            profile_created=created,
            change_id=change.change_id,
        )
        return result, messages.split_notices(project_id, change, created, versions)

    async def _merge(
        self,
        tx: IdentityTransaction,
        project_id: UUID,
        source_id: UUID,
        target_id: UUID,
        cause: ChangeCause,
        now: datetime,
        *,
        alias_custom_id: str | None = None,
        inherited_custom_id: str | None = None,
    ) -> tuple[IdentityChange, list[bus_pb2.ProfileChanged]]:
        """Merges `source` into `target` (both locked, custom IDs already locked): moves
        installations and every other table's rows, leaves a tombstone, redirects older
        tombstones and aliases, handles the source's custom ID, records and publishes.
        Returns the change and the live notices to send after commit."""
        change_id = uuid4()
        moves = await tx.merge(project_id, source_id, target_id, now)
        await self._announce_links(tx, project_id, [source_id, target_id])
        if inherited_custom_id is not None:
            target_version = await tx.set_custom_id(project_id, target_id, inherited_custom_id, now)
        else:
            versions = await tx.bump_versions(project_id, [target_id], now)
            target_version = versions.get(target_id, 0)
        if alias_custom_id is not None:
            await tx.add_alias(project_id, alias_custom_id, target_id, change_id, now)
        change = IdentityChange(
            change_id=change_id,
            kind=ChangeKind.MERGE,
            cause=cause,
            source_profile_id=source_id,
            target_profile_id=target_id,
            installation_ids=moves.installation_ids,
            change_time=now,
            alias_custom_id=alias_custom_id,
        )
        await tx.record_change(project_id, change)
        await tx.enqueue(
            [messages.profile_merged(project_id, change, moves.redirected_profile_ids)]
        )
        log.info(
            "profile_merged",
            cause=cause.value,
            source_profile_id=str(source_id),
            target_profile_id=str(target_id),
            installations=len(moves.installation_ids),
        )
        return change, messages.merge_notices(project_id, change, moves, target_version)

    # -- Logout --------------------------------------------------------------------------

    async def logout(
        self, project_id: UUID, installation_id: str, request_id: str, unless_custom_id: str = ""
    ) -> LogoutResult:
        """Moves an installation on an identified profile to a brand-new anonymous profile; on
        an anonymous profile, or on the profile holding `unless_custom_id` (when given), changes
        nothing. Idempotent per request_id. Raises InstallationNotFound, InstallationIdInvalid,
        RequestIdInvalid, CustomIdInvalid, ConcurrentChange."""
        check_logout_request(installation_id, request_id, unless_custom_id)
        # Without `unless_custom_id`, the digest of the requests stored before it existed.
        digest = fingerprint(installation_id, *([unless_custom_id] if unless_custom_id else []))
        result = await self._retrying(
            lambda: self._logout_once(
                project_id, installation_id, request_id, digest, unless_custom_id
            )
        )
        if result is None:
            raise InstallationNotFound(
                "no such installation in this project", metadata={"field": "installation_id"}
            )
        log.info("logged_out", outcome=result.outcome.value, profile_id=str(result.profile_id))
        return result

    async def _logout_once(
        self,
        project_id: UUID,
        installation_id: str,
        request_id: str,
        digest: str,
        unless_custom_id: str,
    ) -> LogoutResult | None:
        """The Logout in one transaction; None: no such installation, an answer kept for the
        request ID like any other. A retry must get it again, not log out the installation
        created since: a Countly device's first session logs its ID out before it exists,
        then logs it in; the same request resent would split the user's new device off."""
        now = self._clock.now()
        notices: list[bus_pb2.ProfileChanged] = []
        changed: list[UUID] = []
        async with self._repository.transaction() as tx:
            stored = await self._stored_answer(tx, project_id, "Logout", request_id, digest, now)
            if stored is not None:
                return None if stored.get(NO_INSTALLATION) else logout_result_from_json(stored)
            link = await tx.lock_installation(project_id, installation_id)
            if link is None:
                if request_id:
                    await tx.save_answer(
                        project_id,
                        "Logout",
                        request_id,
                        digest,
                        {NO_INSTALLATION: True},
                        now,
                        now - ANSWER_LIFETIME,
                    )
                return None
            current = (await tx.lock_profiles(project_id, [link.profile_id])).get(link.profile_id)
            if current is None or current.merged_into is not None:
                raise ConcurrentChange("the installation's profile changed during Logout")
            # `unless_custom_id` keeps the profile holding it, as its custom ID or as an alias
            # an operator's merge left (the merged-away account's devices still send under it).
            kept = bool(unless_custom_id) and (
                current.custom_id == unless_custom_id
                or await tx.find_custom_id_holder(project_id, unless_custom_id)
                == current.profile_id
            )
            if not current.identified or kept:
                result = LogoutResult(LogoutOutcome.UNCHANGED, current.profile_id)
            else:
                # Always a new profile, never an earlier anonymous one: the person who logs
                # in next on this device must not inherit someone else's anonymous history.
                new_id = await tx.create_anonymous_profile(project_id, now)
                await tx.move_installation(project_id, installation_id, new_id)
                await tx.keep_left_installation(
                    project_id, installation_id, current.profile_id, now
                )
                changed = [current.profile_id, new_id]
                await self._announce_links(tx, project_id, changed)
                versions = await tx.bump_versions(project_id, [current.profile_id], now)
                change = IdentityChange(
                    change_id=uuid4(),
                    kind=ChangeKind.SPLIT,
                    cause=ChangeCause.LOGOUT,
                    source_profile_id=current.profile_id,
                    target_profile_id=new_id,
                    installation_ids=(installation_id,),
                    change_time=now,
                )
                await tx.record_change(project_id, change)
                await tx.enqueue(
                    [
                        messages.profile_created(project_id, new_id, installation_id, False, now),
                        messages.profile_split(project_id, change, True),
                    ]
                )
                result = LogoutResult(
                    LogoutOutcome.NEW_ANONYMOUS_PROFILE,
                    new_id,
                    previous_profile_id=current.profile_id,
                    change_id=change.change_id,
                )
                notices = messages.split_notices(
                    project_id, change, True, {**versions, new_id: FIRST_VERSION}
                )
            await self._save_answer(tx, project_id, "Logout", request_id, digest, result, now)
        self._forget(project_id, changed)
        self._announce(notices)
        return result

    # -- MergeProfiles -------------------------------------------------------------------

    async def merge_profiles(
        self,
        project_id: UUID,
        source_id: UUID,
        target_id: UUID,
        allow_custom_id_conflict: bool,
        request_id: str,
        *,
        cause: ChangeCause = ChangeCause.OPERATOR_MERGE,
        exact: bool = False,
    ) -> MergeResult:
        """An explicit merge of `source_id` into `target_id` (merged-away IDs resolve to their
        survivor first; with `exact` they raise ProfileMerged instead: the caller confirmed
        those two profiles), recorded and published with `cause`: OPERATOR_MERGE, or
        TOKEN_REINTEGRATION when ingest folds an imported installation. Idempotent per
        request_id (a stored answer wins over `exact`: that merge made its source a
        tombstone). Raises MergeIntoItself, ProfileNotFound, ProfileMerged, CustomIdConflict,
        RequestIdInvalid, ConcurrentChange."""
        check_merge_request(source_id, target_id, request_id)
        digest = fingerprint(str(source_id), str(target_id), str(allow_custom_id_conflict))
        return await self._retrying(
            lambda: self._merge_once(
                project_id,
                source_id,
                target_id,
                allow_custom_id_conflict,
                request_id,
                digest,
                cause,
                exact,
            )
        )

    async def _merge_once(
        self,
        project_id: UUID,
        source_id: UUID,
        target_id: UUID,
        allow_custom_id_conflict: bool,
        request_id: str,
        digest: str,
        cause: ChangeCause,
        exact: bool,
    ) -> MergeResult:
        now = self._clock.now()
        notices: list[bus_pb2.ProfileChanged] = []
        changed: list[UUID] = []
        async with self._repository.transaction() as tx:
            stored = await self._stored_answer(
                tx, project_id, "MergeProfiles", request_id, digest, now
            )
            if stored is not None:
                return merge_result_from_json(stored)
            found = await tx.find_profiles(project_id, [source_id, target_id])
            named = (("source_profile_id", source_id), ("target_profile_id", target_id))
            for field, wanted in named:
                if wanted not in found:
                    raise ProfileNotFound(
                        f"no profile {wanted} in this project", metadata={"field": field}
                    )
            if exact:
                # Live now; the locks below re-read both and retry if either was merged
                # meanwhile, so the retry refuses it here: no merge can slip in between.
                for field, wanted in named:
                    survivor = found[wanted].profile_id
                    if survivor != wanted:
                        # The same request, sent twice at once (a double-clicked form), may have
                        # merged it after this transaction looked for its answer: that answer,
                        # committed with the merge, is this one's too.
                        again = await self._stored_answer(
                            tx, project_id, "MergeProfiles", request_id, digest, now
                        )
                        if again is not None:
                            return merge_result_from_json(again)
                        raise ProfileMerged(
                            f"profile {wanted} was merged into {survivor}; nothing was merged",
                            metadata={"field": field, "survivor": str(survivor)},
                        )
            source, target = found[source_id], found[target_id]
            if source.profile_id == target.profile_id:
                result = MergeResult(target.profile_id, source.profile_id, already_merged=True)
            else:
                # The custom ID's lock comes first, as everywhere; then the profiles, re-read
                # under their locks: anything moved meanwhile means retry.
                if source.custom_id is not None:
                    await tx.lock_custom_ids(project_id, [source.custom_id])
                locked = await tx.lock_profiles(project_id, [source.profile_id, target.profile_id])
                if not (
                    _same_identity(locked.get(source.profile_id), source)
                    and _same_identity(locked.get(target.profile_id), target)
                ):
                    raise ConcurrentChange("a profile changed while the merge was deciding")
                plan = plan_merge(source, target, allow_custom_id_conflict)
                change, notices = await self._merge(
                    tx,
                    project_id,
                    source.profile_id,
                    target.profile_id,
                    cause,
                    now,
                    alias_custom_id=plan.alias_custom_id,
                    inherited_custom_id=plan.inherited_custom_id,
                )
                changed = [source.profile_id, target.profile_id]
                result = MergeResult(
                    target.profile_id,
                    source.profile_id,
                    already_merged=False,
                    alias_custom_id=plan.alias_custom_id,
                    change_id=change.change_id,
                    merge_time=now,
                )
            await self._save_answer(
                tx, project_id, "MergeProfiles", request_id, digest, result, now
            )
        self._forget(project_id, changed)
        self._announce(notices)
        return result

    # -- DeleteProfile -------------------------------------------------------------------

    async def delete_profile(
        self, project_id: UUID, profile_id: UUID, request_id: str, *, exact: bool = False
    ) -> DeleteResult:
        """Erases a profile (a merged-away ID resolves to its survivor; with `exact` it raises
        ProfileMerged instead: the caller confirmed that profile) with its tombstones, in
        one transaction with the lock order of merges, so a racing merge either lands before
        (and is erased too) or finds the profile gone. Quarantines its custom IDs for the
        project's identity.quarantine_days. Idempotent per request_id; otherwise a second call
        raises ProfileNotFound. Raises RequestIdInvalid, RequestIdReused, ConcurrentChange."""
        check_request_id(request_id)
        digest = fingerprint(str(profile_id))
        settings = await self._tenancy.get_settings(project_id)
        quarantine_days = int(settings["identity.quarantine_days"])
        result, secret = await self._retrying(
            lambda: self._delete_once(
                project_id, profile_id, request_id, digest, quarantine_days, exact
            )
        )
        if secret is not None:  # committed now: safe to keep
            self._remember_secret(project_id, secret)
        log.info(
            "profile_deleted",
            profile_id=str(result.profile_id),
            events=result.deleted_event_count,
            installations=result.unlinked_installation_count,
            quarantined=result.custom_id_quarantined,
        )
        return result

    async def _delete_once(
        self,
        project_id: UUID,
        profile_id: UUID,
        request_id: str,
        digest: str,
        quarantine_days: int,
        exact: bool,
    ) -> tuple[DeleteResult, bytes | None]:
        now = self._clock.now()
        async with self._repository.transaction() as tx:
            stored = await self._stored_answer(
                tx, project_id, "DeleteProfile", request_id, digest, now
            )
            if stored is not None:
                return delete_result_from_json(stored), None
            found = await tx.find_profiles(project_id, [profile_id])
            if profile_id not in found:
                # As for MergeProfiles: the same request sent twice at once may have erased it
                # after this transaction looked for its answer, committed with the erasure.
                again = await self._stored_answer(
                    tx, project_id, "DeleteProfile", request_id, digest, now
                )
                if again is not None:
                    return delete_result_from_json(again), None
                raise ProfileNotFound(
                    f"no profile {profile_id} in this project", metadata={"field": "profile_id"}
                )
            profile = found[profile_id]
            if exact and profile.profile_id != profile_id:
                raise ProfileMerged(
                    f"profile {profile_id} was merged into {profile.profile_id}; nothing was"
                    " erased",
                    metadata={"field": "profile_id", "survivor": str(profile.profile_id)},
                )
            aliases = await tx.find_aliases(project_id, profile.profile_id)
            custom_ids = sorted({*aliases, *([profile.custom_id] if profile.custom_id else [])})
            # Merge lock order: custom IDs, then the profile (then, in erase(), its tombstones
            # and installations), each re-read under its lock.
            await tx.lock_custom_ids(project_id, custom_ids)
            locked = await tx.lock_profiles(project_id, [profile.profile_id])
            if not _same_identity(locked.get(profile.profile_id), profile) or (
                await tx.find_aliases(project_id, profile.profile_id) != aliases
            ):
                raise ConcurrentChange("the profile changed while its erasure was deciding")
            secret = await tx.ensure_hmac_key(project_id, now)
            erasure = await tx.erase(
                project_id,
                profile.profile_id,
                custom_ids,
                lambda custom_id: event_marker(secret, custom_id),
                now,
            )
            changed = [
                profile.profile_id,
                *erasure.tombstone_profile_ids,
                *erasure.renamed_profile_ids,  # their renamed installations resolve anew
            ]
            await self._announce_links(tx, project_id, changed)
            expire_time = quarantine_end(now, quarantine_days) if custom_ids else None
            if expire_time is not None:
                await tx.quarantine(
                    project_id,
                    [quarantine_digest(secret, c) for c in custom_ids],
                    expire_time,
                    now,
                )
            result = DeleteResult(
                profile_id=profile.profile_id,
                custom_id_quarantined=expire_time is not None,
                quarantine_expire_time=expire_time,
                deleted_event_count=erasure.event_count,
                unlinked_installation_count=len(erasure.installation_ids),
                delete_time=now,
            )
            await tx.enqueue([messages.profile_deleted(project_id, result, erasure)])
            await self._save_answer(
                tx, project_id, "DeleteProfile", request_id, digest, result, now
            )
        self._forget(project_id, changed)
        self._announce([messages.deleted_notice(project_id, result)])
        return result, secret

    # -- ExportProfile -------------------------------------------------------------------

    async def export_profile(
        self, project_id: UUID, profile_id: UUID
    ) -> AsyncIterator[ExportChunk]:
        """Everything stored about a profile (a merged-away ID resolves to its survivor) as JSON
        chunks, section by section, from one snapshot. No side effects. Raises ProfileNotFound
        before the first chunk."""
        now = self._clock.now()
        async with self._repository.snapshot() as reader:
            found = await reader.find_profiles(project_id, [profile_id])
            row = (
                None
                if profile_id not in found
                else await reader.profile(project_id, found[profile_id].profile_id)
            )
            if row is None:
                raise ProfileNotFound(
                    f"no profile {profile_id} in this project", metadata={"field": "profile_id"}
                )
            live: UUID = row["profile_id"]
            custom_ids = [
                *([row["custom_id"]] if row["custom_id"] else []),
                *row["alias_custom_ids"],
            ]
            former = await reader.former_installations(project_id, live)
            yield export.object_chunk(
                ExportSection.PROFILE, export.profile_record(row, now, former)
            )
            attributes = await reader.attributes(project_id, live)
            yield export.object_chunk(
                ExportSection.ATTRIBUTES, export.attributes_record(attributes)
            )
            subscriptions = await reader.subscriptions(project_id, live)
            async for chunk in export.array_chunks(
                ExportSection.SUBSCRIPTIONS, [export.subscription_record(r) for r in subscriptions]
            ):
                yield chunk
            installations = await reader.installations(project_id, live)
            async for chunk in export.array_chunks(
                ExportSection.INSTALLATIONS, [export.installation_record(r) for r in installations]
            ):
                yield chunk
            changes = await reader.changes(project_id, [live, *row["merged_profile_ids"]])
            async for chunk in export.array_chunks(
                ExportSection.IDENTITY_HISTORY, [export.history_record(c) for c in changes]
            ):
                yield chunk
            sessions = await reader.sessions(project_id, live)
            async for chunk in export.array_chunks(
                ExportSection.SESSIONS, [export.session_record(r) for r in sessions]
            ):
                yield chunk
            events = (export.event_record(r) async for r in reader.events(project_id, live))
            async for chunk in export.array_chunks(ExportSection.EVENTS, events):
                yield chunk
            rejected = await reader.rejected_events(
                project_id,
                [live, *row["merged_profile_ids"]],
                [r["installation_id"] for r in installations],
                custom_ids,
            )
            async for chunk in export.array_chunks(
                ExportSection.REJECTED_EVENTS, [export.rejected_event_record(r) for r in rejected]
            ):
                yield chunk
            # Segments' data, in the same snapshot; what time alone changes is as of `now`.
            custom = await reader.custom_segments(project_id, live)
            smart = await reader.smart_segments(project_id, live, now)
            yield export.object_chunk(ExportSection.SEGMENTS, export.segments_record(custom, smart))
            engagement = await reader.engagement(project_id, live, now)
            yield export.object_chunk(
                ExportSection.ENGAGEMENT, export.engagement_record(engagement)
            )
            progress = await reader.funnel_progress(project_id, live, now)
            async for chunk in export.array_chunks(
                ExportSection.FUNNEL_PROGRESS, export.funnel_progress_records(progress)
            ):
                yield chunk
        log.info("profile_exported", profile_id=str(live))

    # -- retries and answers --------------------------------------------------------------

    async def _announce_links(
        self, tx: IdentityTransaction, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> None:
        """In the change's transaction: every replica drops the cached answers of these
        profiles' installations when it commits (cache.py)."""
        await tx.announce_link_change(project_id, links_payload(project_id, profile_ids))

    def _forget(self, project_id: UUID, profile_ids: Sequence[UUID]) -> None:
        """After commit, before the RPC returns: this replica's cache drops them at once,
        without waiting for its own notification."""
        if self._cache is not None and profile_ids:
            self._cache.invalidate_profiles(project_id, profile_ids)

    def _announce(self, notices: Sequence[bus_pb2.ProfileChanged]) -> None:
        """Queues live notices once their transaction has committed; never waits, never
        fails (a full queue drops and counts them: watchers may miss notices)."""
        if self._notices is not None and notices:
            self._notices.offer(notices)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Runs `attempt` (one whole transaction) again after a lost race, with a short random
        pause so the racers do not collide again; the last ConcurrentChange goes through."""
        for number in range(1, self._attempts + 1):
            try:
                return await attempt()
            except ConcurrentChange as exc:
                if number == self._attempts:
                    log.warning("identity_race_lost", attempts=number)
                    raise
                cause = type(exc.__cause__).__name__
                log.info("identity_race_retried", attempt=number, cause=cause)
                await asyncio.sleep(random.uniform(0, 0.005 * 2**number))
        raise AssertionError("unreachable")

    async def _stored_answer(
        self,
        tx: IdentityTransaction,
        project_id: UUID,
        rpc: str,
        request_id: str,
        digest: str,
        now: datetime,
    ) -> dict[str, Any] | None:
        if not request_id:
            return None
        stored = await tx.find_answer(project_id, rpc, request_id, now - ANSWER_LIFETIME)
        if stored is None:
            return None
        if stored[0] != digest:
            raise RequestIdReused(
                "this request_id was used for another request",
                [
                    FieldViolation(
                        "request_id", "was used with other fields", RequestIdReused.reason
                    )
                ],
            )
        return stored[1]

    async def _save_answer(
        self,
        tx: IdentityTransaction,
        project_id: UUID,
        rpc: str,
        request_id: str,
        digest: str,
        result: Answer,
        now: datetime,
    ) -> None:
        if request_id:
            await tx.save_answer(
                project_id,
                rpc,
                request_id,
                digest,
                answer_to_json(result),
                now,
                now - ANSWER_LIFETIME,
            )
