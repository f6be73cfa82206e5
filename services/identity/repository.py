"""Identity's statements on its own tables for its use cases (resolve, identify, logout, merge),
and the transaction and snapshot the service opens. The rest of identity's SQL lives beside it
by concern: erasure.py (DeleteProfile, quarantine), hooks.py (other owners' declared profile
hooks), export_reader.py (ExportProfile's snapshot reads), link_listener.py (the cache's LISTEN
connection), profile_rows.py (the profile lookup they share).

Lock order, so that concurrent changes queue instead of deadlocking (a deadlock that still
happens is retried by the service): the custom ID's advisory lock, then the installation row,
then profile rows in ascending profile_id order, then the other installations of a profile
merged away (ascending installation_id), then the rows of the other tables.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, cast
from uuid import UUID, uuid4

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.identity.erasure import SELECT_HMAC_KEY, SELECT_QUARANTINED, ErasureSteps
from services.identity.errors import ConcurrentChange
from services.identity.export_reader import ExportReader
from services.identity.hooks import ProfileHooks, load_profile_hooks, run_merge_hooks
from services.identity.link_listener import LINKS_CHANNEL, NOTIFY_LINKS
from services.identity.model import (
    IdentityChange,
    InstallationLink,
    MergeMoves,
    Profile,
    Resolution,
)
from services.identity.profile_rows import SELECT_PROFILES_AND_SURVIVORS, profile_from_row
from shared.outbox import OutboxItem, enqueue_many

# Read first for every batch, outside any transaction: installations.profile_id is always a live
# profile (identity changes it in the same transaction as any merge). One primary-key probe per
# key of installations and of profiles, in identity's own function (0034), whatever plan the
# connection keeps; in the order find_installations unpacks them (it runs for every ingest
# batch with installations the cache does not know).
SELECT_INSTALLATION_LINKS = """
    SELECT installation_id, profile_id, link_version, identified
    FROM identity_read_installation_resolutions($1, $2::text[])"""

# One statement creates the installations and their profiles. The installation row is inserted
# first with ON CONFLICT DO NOTHING, so when two callers race for one new installation the
# primary key picks the winner and only the winner's profile is inserted (from RETURNING); the
# foreign key to profiles is checked at the end of the statement, when both rows exist. Callers
# pass the IDs sorted so that two overlapping batches wait for each other instead of deadlocking.
# An ID that is a quarantined custom ID (digest: its quarantine HMAC, NULL while the project has
# no secret) is skipped: Countly's SDKs send under the user's ID after a login, and an erased
# person's device would otherwise bring the custom ID back as a new installation. Only new
# installations pay for it, one primary-key probe each, in this statement.
INSERT_ANONYMOUS_INSTALLATIONS = """
    WITH linked AS (
        INSERT INTO installations (project_id, installation_id, profile_id, create_time)
        SELECT $1, k.installation_id, k.profile_id, $4
        FROM unnest($2::text[], $3::uuid[], $5::bytea[]) AS k(installation_id, profile_id, digest)
        WHERE NOT EXISTS (
            SELECT 1 FROM quarantined_custom_ids q
            WHERE q.project_id = $1 AND q.custom_id_hmac = k.digest AND q.expire_time > $4
        )
        ON CONFLICT (project_id, installation_id) DO NOTHING
        RETURNING installation_id, profile_id
    ), created AS (
        INSERT INTO profiles (project_id, profile_id, create_time, update_time)
        SELECT $1, profile_id, $4, $4 FROM linked
        RETURNING profile_id
    )
    SELECT installation_id, profile_id FROM linked"""

# A custom ID is held either by a live profile (unique index profiles_by_custom_id) or by an
# alias left by an operator merge; both are looked up by primary or unique key in one pass.
SELECT_CUSTOM_ID_HOLDERS = """
    SELECT k.custom_id, coalesce(p.profile_id, a.target_profile_id) AS profile_id
    FROM unnest($2::text[]) AS k(custom_id)
    LEFT JOIN profiles p ON p.project_id = $1 AND p.custom_id = k.custom_id
    LEFT JOIN custom_id_aliases a ON a.project_id = $1 AND a.custom_id = k.custom_id
    WHERE p.profile_id IS NOT NULL OR a.target_profile_id IS NOT NULL"""

# Transaction-scoped advisory locks, one per custom ID, taken before a custom ID is given to a
# profile or made an alias: the unique index alone cannot stop a new profile from taking a
# custom ID that a concurrent merge is turning into an alias. Two-key form in its own
# namespace (the first key), so it never meets the migration lock; a hash collision only makes
# two custom IDs queue. Callers pass the IDs sorted, so batches lock in one order.
LOCK_CUSTOM_IDS = """
    SELECT pg_advisory_xact_lock($1::int, hashtext($2::text || ':' || c))
    FROM unnest($3::text[]) AS c"""
CUSTOM_ID_LOCK_NAMESPACE = 0x1D

# Profiles for new custom IDs, under their advisory locks: skipped when the custom ID is an
# alias or quarantined (digest: its quarantine HMAC, NULL when the project has no secret yet, so
# nothing of it can be quarantined), and ON CONFLICT leaves a concurrent creation in place (the
# caller then reads it).
INSERT_IDENTIFIED_PROFILES = """
    INSERT INTO profiles (project_id, profile_id, custom_id, create_time, update_time)
    SELECT $1, k.profile_id, k.custom_id, $4, $4
    FROM unnest($2::text[], $3::uuid[], $5::bytea[]) AS k(custom_id, profile_id, digest)
    WHERE NOT EXISTS (
        SELECT 1 FROM custom_id_aliases a WHERE a.project_id = $1 AND a.custom_id = k.custom_id
    ) AND NOT EXISTS (
        SELECT 1 FROM quarantined_custom_ids q
        WHERE q.project_id = $1 AND q.custom_id_hmac = k.digest AND q.expire_time > $4
    )
    ON CONFLICT (project_id, custom_id) WHERE custom_id IS NOT NULL DO NOTHING
    RETURNING profile_id, custom_id"""

# The installation first: ingest reads it FOR SHARE when it stores events, so holding it FOR
# UPDATE makes events wait until the move commits and then land on the new profile.
LOCK_INSTALLATION = """
    SELECT installation_id, profile_id, link_version FROM installations
    WHERE project_id = $1 AND installation_id = $2
    FOR UPDATE"""

# Profiles locked in ascending profile_id order (LockRows runs above the sort), the one order
# every identity transaction uses.
LOCK_PROFILES = """
    SELECT profile_id, custom_id, merged_into, version FROM profiles
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[])
    ORDER BY profile_id
    FOR UPDATE"""

INSERT_ANONYMOUS_PROFILE = """
    INSERT INTO profiles (project_id, profile_id, create_time, update_time)
    VALUES ($1, $2, $3, $3)"""

INSERT_IDENTIFIED_PROFILE = """
    INSERT INTO profiles (project_id, profile_id, custom_id, create_time, update_time)
    VALUES ($1, $2, $3, $4, $4)"""

# Rule 1 and an operator merge into an anonymous target: the profile takes the custom ID.
SET_CUSTOM_ID = """
    UPDATE profiles SET custom_id = $3, version = version + 1, update_time = $4
    WHERE project_id = $1 AND profile_id = $2
    RETURNING version"""

# Every transaction that changes what a profile view shows raises its version (read contract in
# 0002_profiles.sql), so cached views can tell they are stale. The new versions go into the
# live notices sent after commit.
BUMP_PROFILE_VERSIONS = """
    UPDATE profiles SET version = version + 1, update_time = $3
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[])
    RETURNING profile_id, version"""

# link_version rises with every move, so a caller that cached the old link notices.
MOVE_INSTALLATION = """
    UPDATE installations SET profile_id = $3, link_version = link_version + 1
    WHERE project_id = $1 AND installation_id = $2"""

# A split (Logout, Identify's rule 4) moves an installation off a profile: ingest keeps a copy
# of its details as they are now with the profile it left (ingest's write rule, 0057), so the
# person's language, time zone and device do not vanish with their last device. Called under
# the installation's row lock, which ingest's batches take FOR SHARE: the details are those
# every event stored while it was the profile's left.
KEEP_LEFT_INSTALLATION = "SELECT ingest_apply_installation_left($1, $2, $3, $4)"

# The same locks, in the same order, taken by the move itself (one round trip instead of two
# inside the merge's transaction): LockRows runs above the sort, and the update then only
# touches rows this transaction holds already.
MOVE_INSTALLATIONS_OF_PROFILE = """
    WITH locked AS (
        SELECT installation_id FROM installations
        WHERE project_id = $1 AND profile_id = $2
        ORDER BY installation_id
        FOR UPDATE
    )
    UPDATE installations i SET profile_id = $3, link_version = i.link_version + 1
    FROM locked
    WHERE i.project_id = $1 AND i.installation_id = locked.installation_id
    RETURNING i.installation_id"""

# The source becomes a tombstone; its custom ID goes in the same update (a tombstone has none,
# by a CHECK), before the caller gives it to the target or makes it an alias. Chains resolve in
# one hop: the source's own tombstones and its aliases now point at the target directly. One
# statement, one round trip: the three updates touch disjoint rows (the source is not one of
# its own tombstones), and a data-modifying CTE runs whether or not it is read.
MARK_MERGED = """
    WITH tombstone AS (
        UPDATE profiles
        SET merged_into = $3, custom_id = NULL, version = version + 1, update_time = $4
        WHERE project_id = $1 AND profile_id = $2
        RETURNING version
    ), redirected AS (
        UPDATE profiles SET merged_into = $3, update_time = $4
        WHERE project_id = $1 AND merged_into = $2
        RETURNING profile_id
    ), aliases AS (
        UPDATE custom_id_aliases SET target_profile_id = $3
        WHERE project_id = $1 AND target_profile_id = $2
    )
    SELECT (SELECT version FROM tombstone) AS source_version,
        coalesce((SELECT array_agg(profile_id ORDER BY profile_id) FROM redirected), '{}')
            AS redirected_profile_ids"""

INSERT_ALIAS = """
    INSERT INTO custom_id_aliases (project_id, custom_id, target_profile_id, change_id, create_time)
    VALUES ($1, $2, $3, $4, $5)"""

INSERT_CHANGE = """
    INSERT INTO identity_changes (project_id, change_id, kind, cause, source_profile_id,
        target_profile_id, installation_ids, alias_custom_id, change_time)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"""

# Answers younger than the cutoff ($4) count; older ones are as good as absent.
SELECT_REQUEST = """
    SELECT fingerprint, answer FROM identity_requests
    WHERE project_id = $1 AND rpc = $2 AND request_id = $3 AND create_time > $4"""

# Written in the change's transaction. A concurrent twin of the same request waits on the
# primary key and then finds a fresh answer: the update is skipped, nothing is returned, and
# the twin's transaction is retried, which then reads this answer. An expired answer is
# overwritten.
SAVE_REQUEST = """
    INSERT INTO identity_requests (project_id, rpc, request_id, fingerprint, answer, create_time)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (project_id, rpc, request_id) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, answer = EXCLUDED.answer,
            create_time = EXCLUDED.create_time
        WHERE identity_requests.create_time <= $7
    RETURNING 1"""

# Lost races: PostgreSQL's deadlock detector, serialization failures, and unique violations of
# the keys two identity transactions may race for (a new installation, custom ID, alias or
# request answer). The transaction rolled back entirely, so the service may retry it. Any other
# unique violation is a bug (say, an owner's merge hook that moves rows onto a key the target
# holds already) and must not pass for a race: it stays an error (INTERNAL, logged).
RACE_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.LockNotAvailableError,
)
RACED_UNIQUE_KEYS = frozenset(
    {
        "installations_pkey",
        "profiles_by_custom_id",
        "custom_id_aliases_pkey",
        "identity_requests_pkey",
    }
)


def _connection(conn: PoolConnectionProxy[asyncpg.Record]) -> asyncpg.Connection:
    """A pooled connection typed as the Connection it stands for (it forwards every call)."""
    return cast(asyncpg.Connection, conn)


class IdentityRepository:
    """Reads without a transaction, and opens the transactions of the service's use cases."""

    def __init__(self, pool: asyncpg.Pool, hooks: ProfileHooks) -> None:
        self._pool = pool
        self._hooks = hooks

    @classmethod
    async def connect(cls, pool: asyncpg.Pool) -> IdentityRepository:
        async with pool.acquire() as conn:
            hooks = await load_profile_hooks(_connection(conn))
        return cls(pool, hooks)

    @property
    def profile_hooks(self) -> ProfileHooks:
        return self._hooks

    async def find_installations(
        self, project_id: UUID, installation_ids: Sequence[str]
    ) -> dict[str, Resolution]:
        """The known ones of `installation_ids`, each with its current profile."""
        rows = await self._pool.fetch(SELECT_INSTALLATION_LINKS, project_id, installation_ids)
        # Records unpacked by position: a lookup by column name costs a dict probe per field
        # and per row, on ResolveProfiles' hot path.
        return {
            installation_id: Resolution(profile_id, False, False, identified, link_version)
            for installation_id, profile_id, link_version, identified in rows
        }

    async def find_custom_id_holders(
        self, project_id: UUID, custom_ids: Sequence[str]
    ) -> dict[str, UUID]:
        rows = await self._pool.fetch(SELECT_CUSTOM_ID_HOLDERS, project_id, custom_ids)
        return {r["custom_id"]: r["profile_id"] for r in rows}

    async def find_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, Profile]:
        """Each requested ID that exists, mapped to its live profile (itself or its survivor)."""
        rows = await self._pool.fetch(SELECT_PROFILES_AND_SURVIVORS, project_id, profile_ids)
        return {r["requested_id"]: profile_from_row(r) for r in rows}

    async def find_hmac_key(self, project_id: UUID) -> bytes | None:
        value = await self._pool.fetchval(SELECT_HMAC_KEY, project_id)
        return None if value is None else bytes(value)

    async def find_quarantined(
        self, project_id: UUID, digests: Sequence[bytes], now: datetime
    ) -> set[bytes]:
        """The digests whose quarantine has not ended at `now`."""
        rows = await self._pool.fetch(SELECT_QUARANTINED, project_id, list(digests), now)
        return {bytes(r["custom_id_hmac"]) for r in rows}

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[ExportReader]:
        """A read-only REPEATABLE READ transaction: every read sees one consistent state."""
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield ExportReader(_connection(conn))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[IdentityTransaction]:
        """One short READ COMMITTED transaction; a lost race surfaces as ConcurrentChange after
        the rollback, never as a driver error."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield IdentityTransaction(_connection(conn), self._hooks)
        except RACE_ERRORS as exc:
            raise ConcurrentChange(
                "a concurrent change to the same profiles won; nothing was changed, retry"
            ) from exc
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name not in RACED_UNIQUE_KEYS:
                raise
            raise ConcurrentChange(
                "a concurrent change created the same key; nothing was changed, retry"
            ) from exc


class IdentityTransaction(ErasureSteps):
    """The statements of one open transaction."""

    def __init__(self, conn: asyncpg.Connection, hooks: ProfileHooks) -> None:
        self._conn = conn
        self._hooks = hooks

    async def create_installations(
        self,
        project_id: UUID,
        installation_ids: Sequence[str],
        now: datetime,
        digest_of: Callable[[str], bytes | None],
    ) -> dict[str, UUID]:
        """Creates the installations not yet known, each on a new anonymous profile, except
        those whose ID is a quarantined custom ID (`digest_of` gives each one's quarantine
        HMAC); returns those this call created. IDs known or created concurrently are left
        alone."""
        ordered = sorted(set(installation_ids))
        new_profile_ids = [uuid4() for _ in ordered]
        digests = [digest_of(i) for i in ordered]
        rows = await self._conn.fetch(
            INSERT_ANONYMOUS_INSTALLATIONS, project_id, ordered, new_profile_ids, now, digests
        )
        return {r["installation_id"]: r["profile_id"] for r in rows}

    async def lock_custom_ids(self, project_id: UUID, custom_ids: Sequence[str]) -> None:
        await self._conn.execute(
            LOCK_CUSTOM_IDS, CUSTOM_ID_LOCK_NAMESPACE, str(project_id), sorted(set(custom_ids))
        )

    async def create_identified_profiles(
        self,
        project_id: UUID,
        custom_ids: Sequence[str],
        now: datetime,
        digest_of: Callable[[str], bytes | None],
    ) -> dict[str, UUID]:
        """Creates profiles for the custom IDs nobody holds and not quarantined (the caller
        holds their locks; `digest_of` gives each one's quarantine HMAC); returns those
        created."""
        ordered = sorted(set(custom_ids))
        new_profile_ids = [uuid4() for _ in ordered]
        digests = [digest_of(c) for c in ordered]
        rows = await self._conn.fetch(
            INSERT_IDENTIFIED_PROFILES, project_id, ordered, new_profile_ids, now, digests
        )
        return {r["custom_id"]: r["profile_id"] for r in rows}

    async def find_custom_id_holder(self, project_id: UUID, custom_id: str) -> UUID | None:
        row = await self._conn.fetchrow(SELECT_CUSTOM_ID_HOLDERS, project_id, [custom_id])
        return None if row is None else row["profile_id"]

    async def lock_installation(
        self, project_id: UUID, installation_id: str
    ) -> InstallationLink | None:
        row = await self._conn.fetchrow(LOCK_INSTALLATION, project_id, installation_id)
        if row is None:
            return None
        return InstallationLink(row["installation_id"], row["profile_id"], row["link_version"])

    async def lock_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, Profile]:
        rows = await self._conn.fetch(LOCK_PROFILES, project_id, sorted(set(profile_ids)))
        return {r["profile_id"]: profile_from_row(r) for r in rows}

    async def find_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, Profile]:
        """Each requested ID that exists, mapped to its live profile (itself or its survivor);
        not locked."""
        rows = await self._conn.fetch(SELECT_PROFILES_AND_SURVIVORS, project_id, profile_ids)
        return {r["requested_id"]: profile_from_row(r) for r in rows}

    async def create_anonymous_profile(self, project_id: UUID, now: datetime) -> UUID:
        profile_id = uuid4()
        await self._conn.execute(INSERT_ANONYMOUS_PROFILE, project_id, profile_id, now)
        return profile_id

    async def create_identified_profile(
        self, project_id: UUID, custom_id: str, now: datetime
    ) -> UUID:
        """Only under the custom ID's advisory lock, after checking nobody holds it."""
        profile_id = uuid4()
        await self._conn.execute(INSERT_IDENTIFIED_PROFILE, project_id, profile_id, custom_id, now)
        return profile_id

    async def set_custom_id(
        self, project_id: UUID, profile_id: UUID, custom_id: str, now: datetime
    ) -> int:
        """Gives the (locked) profile the custom ID; returns its new version."""
        version = await self._conn.fetchval(SET_CUSTOM_ID, project_id, profile_id, custom_id, now)
        return int(version)

    async def bump_versions(
        self, project_id: UUID, profile_ids: Sequence[UUID], now: datetime
    ) -> dict[UUID, int]:
        """Raises the profiles' versions; returns the new version of each."""
        rows = await self._conn.fetch(BUMP_PROFILE_VERSIONS, project_id, list(profile_ids), now)
        return {r["profile_id"]: r["version"] for r in rows}

    async def announce_link_change(self, project_id: UUID, payload: str) -> None:
        """Queues the change's notification to every replica; sent when the transaction
        commits, dropped if it rolls back."""
        await self._conn.execute(NOTIFY_LINKS, LINKS_CHANNEL, payload)

    async def move_installation(
        self, project_id: UUID, installation_id: str, profile_id: UUID
    ) -> None:
        await self._conn.execute(MOVE_INSTALLATION, project_id, installation_id, profile_id)

    async def keep_left_installation(
        self, project_id: UUID, installation_id: str, left_profile_id: UUID, now: datetime
    ) -> None:
        """Has ingest keep the (locked) installation's details, as they are now, with the
        profile a split moved it off."""
        await self._conn.execute(
            KEEP_LEFT_INSTALLATION, project_id, left_profile_id, installation_id, now
        )

    async def merge(
        self, project_id: UUID, source: UUID, target: UUID, now: datetime
    ) -> MergeMoves:
        """Moves everything of `source` to `target` and leaves `source` a tombstone; both must be
        locked already. Returns the installations moved, the tombstones redirected and the
        tombstone's version. The caller handles custom IDs (alias or inheritance) and records
        the change."""
        moved = await self._conn.fetch(MOVE_INSTALLATIONS_OF_PROFILE, project_id, source, target)
        await run_merge_hooks(self._conn, self._hooks, project_id, source, target)
        marked = await self._conn.fetchrow(MARK_MERGED, project_id, source, target, now)
        assert marked is not None  # a SELECT of scalar subqueries always returns a row
        return MergeMoves(
            installation_ids=tuple(sorted(r["installation_id"] for r in moved)),
            redirected_profile_ids=tuple(marked["redirected_profile_ids"]),
            source_version=int(marked["source_version"]),
        )

    async def add_alias(
        self, project_id: UUID, custom_id: str, target: UUID, change_id: UUID, now: datetime
    ) -> None:
        await self._conn.execute(INSERT_ALIAS, project_id, custom_id, target, change_id, now)

    async def record_change(self, project_id: UUID, change: IdentityChange) -> None:
        await self._conn.execute(
            INSERT_CHANGE,
            project_id,
            change.change_id,
            change.kind.value,
            change.cause.value,
            change.source_profile_id,
            change.target_profile_id,
            list(change.installation_ids),
            change.alias_custom_id,
            change.change_time,
        )

    async def find_answer(
        self, project_id: UUID, rpc: str, request_id: str, not_before: datetime
    ) -> tuple[str, dict[str, Any]] | None:
        row = await self._conn.fetchrow(SELECT_REQUEST, project_id, rpc, request_id, not_before)
        return None if row is None else (row["fingerprint"], row["answer"])

    async def save_answer(
        self,
        project_id: UUID,
        rpc: str,
        request_id: str,
        fingerprint: str,
        answer: dict[str, Any],
        now: datetime,
        not_before: datetime,
    ) -> None:
        saved = await self._conn.fetchval(
            SAVE_REQUEST, project_id, rpc, request_id, fingerprint, answer, now, not_before
        )
        if saved is None:
            raise ConcurrentChange("the same request is being answered concurrently; retry")

    async def enqueue(self, items: Sequence[OutboxItem]) -> None:
        await enqueue_many(self._conn, items)
