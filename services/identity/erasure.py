"""DeleteProfile's statements: the erasure of a profile with its tombstones, the quarantine
of its custom IDs, and the project's secret for keyed hashes. Mixed into the identity
transaction (repository.IdentityTransaction), whose connection and hooks it uses."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from uuid import UUID

import asyncpg

from services.identity.errors import ConcurrentChange
from services.identity.hooks import ProfileHooks
from services.identity.model import ERASED_SIDE, Erasure, renamed_installation_id

# The erased profile's installations, and those of other profiles whose ID is one of its custom
# IDs ($3; renamed below), locked in installation_id order (as a merge moves them), so an event
# being stored for any of them finishes or waits.
LOCK_INSTALLATIONS_OF_PROFILE = """
    SELECT installation_id, profile_id FROM installations
    WHERE project_id = $1 AND (profile_id = $2 OR installation_id = ANY($3::text[]))
    ORDER BY installation_id
    FOR UPDATE"""

# -- DeleteProfile ---------------------------------------------------------------------------
# The tombstones of the profile being erased, locked after it: only a transaction holding the
# survivor's lock redirects or creates its tombstones, so this cannot deadlock with a merge.
LOCK_TOMBSTONES = """
    SELECT profile_id FROM profiles
    WHERE project_id = $1 AND merged_into = $2
    ORDER BY profile_id
    FOR UPDATE"""

SELECT_ALIASES = """
    SELECT custom_id FROM custom_id_aliases
    WHERE project_id = $1 AND target_profile_id = $2
    ORDER BY custom_id"""

# The custom IDs on the erased profiles' server-side events (their own and their aliases'), to
# be replaced by keyed markers; then ingest turns the events into bare dedupe markers (its rule,
# in ingest_apply_event_erasure, 0060: the event ID and the custom ID's keyed marker stay, the
# erasure's time replaces the event's times) and says how many it erased.
SELECT_EVENT_CUSTOM_IDS = "SELECT custom_id FROM ingest_read_event_custom_ids($1, $2::uuid[])"
ERASE_EVENTS = """
    SELECT ingest_apply_event_erasure($1, $2::uuid[], $3::text[], $4::text[], $5::timestamptz)"""

# Messages still waiting in the outbox that name the erased profiles (identity's own, and any
# producer's that set profile_id). Batched EventsIngested rows carry none: see erase() below.
DELETE_OUTBOX_ROWS = """
    DELETE FROM outbox WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"""

# The person's own changes (both sides erased, now or before) go. A change between them and
# another profile is that profile's history too (the logout that left a shared device to the
# erased person): it stays, its erased side the nil UUID, without the installations and the
# alias it names, until the other side is erased too.
DELETE_CHANGES = f"""
    DELETE FROM identity_changes
    WHERE project_id = $1
        AND (source_profile_id = ANY($2::uuid[]) OR target_profile_id = ANY($2::uuid[]))
        AND (source_profile_id = ANY($2::uuid[]) OR source_profile_id = '{ERASED_SIDE}'::uuid)
        AND (target_profile_id = ANY($2::uuid[]) OR target_profile_id = '{ERASED_SIDE}'::uuid)"""
REDACT_CHANGES = f"""
    UPDATE identity_changes
    SET source_profile_id = CASE WHEN source_profile_id = ANY($2::uuid[])
                                 THEN '{ERASED_SIDE}'::uuid ELSE source_profile_id END,
        target_profile_id = CASE WHEN target_profile_id = ANY($2::uuid[])
                                 THEN '{ERASED_SIDE}'::uuid ELSE target_profile_id END,
        installation_ids = '{{}}', alias_custom_id = NULL
    WHERE project_id = $1
        AND (source_profile_id = ANY($2::uuid[]) OR target_profile_id = ANY($2::uuid[]))"""

# Kept answers of Identify, Logout and merges that name an erased profile: a retry then runs
# again instead of handing out an erased ID. Answers live 24 hours, so the scan is short.
DELETE_ANSWERS = """
    DELETE FROM identity_requests
    WHERE project_id = $1 AND answer::text LIKE ANY($2::text[])"""

DELETE_ALIASES = """
    DELETE FROM custom_id_aliases WHERE project_id = $1 AND target_profile_id = ANY($2::uuid[])"""

DELETE_INSTALLATIONS = """
    DELETE FROM installations WHERE project_id = $1 AND profile_id = $2
    RETURNING installation_id"""

DELETE_PROFILES = """
    DELETE FROM profiles WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"""

# -- Another person's installation named by an erased custom ID --------------------------------
# A Countly device's ID is its user's custom ID once they log in; when the device then switched
# to another user (a device ID change with merge to the other user's ID, or a logout and
# someone else's login under the same device ID), that installation belongs to the other
# person. Erasing the first person renames it (a new random ID) wherever it is named, after
# everything of the erased profiles went: the other person keeps their history and device
# details, and nothing names the erased custom ID. A request under the old ID is then a new
# installation, refused during the quarantine (ResolveProfiles answers `erased`).
#
# The profiles whose rows may name it ($3: its holders now, the profiles that left it, as
# ingest keeps them, through its read contract) and, from them, every profile the installation
# passed through: the other side of each recorded move of it (identity_changes naming it, both
# ways: moves are recorded under the profile IDs of their time) and, since a merge moves a
# profile's events and history to its survivor, the tombstones of each and the survivor of
# each. Indexed probes; the set is as small as the installation's history. Moves whose side
# was erased no longer name installations (REDACT_CHANGES): the path stops there, and what lay
# beyond it is reached through ingest's rows of the profiles that left the installation.
SELECT_FORMER_HOLDERS = """
    SELECT DISTINCT profile_id FROM ingest_read_profile_former_installations()
    WHERE project_id = $1 AND installation_id = ANY($2::text[])"""
SELECT_RENAME_PROFILES = """
    WITH RECURSIVE passed(profile_id) AS (
        SELECT unnest($3::uuid[])
        UNION
        SELECT n.profile_id
        FROM passed p
        CROSS JOIN LATERAL (
            SELECT c.source_profile_id FROM identity_changes c
            WHERE c.project_id = $1 AND c.target_profile_id = p.profile_id
                AND c.installation_ids && $2::text[]
            UNION ALL
            SELECT c.target_profile_id FROM identity_changes c
            WHERE c.project_id = $1 AND c.source_profile_id = p.profile_id
                AND c.installation_ids && $2::text[]
            UNION ALL
            SELECT t.profile_id FROM profiles t
            WHERE t.project_id = $1 AND t.merged_into = p.profile_id
            UNION ALL
            SELECT s.merged_into FROM profiles s
            WHERE s.project_id = $1 AND s.profile_id = p.profile_id AND s.merged_into IS NOT NULL
        ) n(profile_id)
    )
    SELECT p.profile_id, p.merged_into IS NULL AS live
    FROM passed x JOIN profiles p ON p.project_id = $1 AND p.profile_id = x.profile_id
    ORDER BY p.profile_id"""

# The installations get their new IDs; link_version rises, so a caller that kept the old link
# notices. The history keeps each move, under the new ID.
RENAME_INSTALLATIONS = """
    UPDATE installations i SET installation_id = r.new_id, link_version = i.link_version + 1
    FROM unnest($2::text[], $3::text[]) AS r(old_id, new_id)
    WHERE i.project_id = $1 AND i.installation_id = r.old_id"""
RENAME_IN_CHANGES = """
    UPDATE identity_changes c
    SET installation_ids = ARRAY(
        SELECT coalesce(r.new_id, u.id)
        FROM unnest(c.installation_ids) WITH ORDINALITY AS u(id, n)
        LEFT JOIN unnest($3::text[], $4::text[]) AS r(old_id, new_id) ON r.old_id = u.id
        ORDER BY u.n)
    WHERE c.project_id = $1
        AND (c.source_profile_id = ANY($2::uuid[]) OR c.target_profile_id = ANY($2::uuid[]))
        AND c.installation_ids && $3::text[]"""
# Ingest's rows (its write rule, 0062), by the live profiles holding them and by installation.
RENAME_IN_INGEST = """
    SELECT ingest_apply_installation_rename($1, $2::text[], $3::text[], $4::uuid[])"""
# Segments' session keys (its write rule, 0063), by every profile the installation passed
# through: segments moves its rows when it handles a merge, so some may be under a tombstone.
RENAME_IN_SEGMENTS = """
    SELECT segments_apply_installation_rename($1, $2::text[], $3::text[], $4::uuid[])"""
# The live profiles' views change (their installations): their versions rise, under their
# locks (profile_id order), taken before any of their rows is renamed. A merge that took one
# of them meanwhile has moved its rows elsewhere: it is no longer live once locked, and the
# erasure runs again (the caller compares what comes back).
BUMP_RENAMED_PROFILES = """
    WITH locked AS (
        SELECT profile_id FROM profiles
        WHERE project_id = $1 AND profile_id = ANY($2::uuid[]) AND merged_into IS NULL
        ORDER BY profile_id
        FOR UPDATE
    )
    UPDATE profiles p SET version = p.version + 1, update_time = $3
    FROM locked
    WHERE p.project_id = $1 AND p.profile_id = locked.profile_id
    RETURNING p.profile_id"""

# The project's secret for keyed hashes, created on first use; a concurrent creator waits on
# the primary key and then keeps the first one (read again by SELECT_HMAC_KEY).
SELECT_HMAC_KEY = "SELECT hmac_key FROM custom_id_hmac_keys WHERE project_id = $1"
INSERT_HMAC_KEY = """
    INSERT INTO custom_id_hmac_keys (project_id, hmac_key, create_time) VALUES ($1, $2, $3)
    ON CONFLICT (project_id) DO NOTHING"""

# A custom ID erased twice keeps the later end.
UPSERT_QUARANTINE = """
    INSERT INTO quarantined_custom_ids (project_id, custom_id_hmac, expire_time)
    SELECT $1, h, $3 FROM unnest($2::bytea[]) AS h
    ON CONFLICT (project_id, custom_id_hmac) DO UPDATE
        SET expire_time = greatest(quarantined_custom_ids.expire_time, EXCLUDED.expire_time)"""

PURGE_EXPIRED_QUARANTINE = """
    DELETE FROM quarantined_custom_ids WHERE project_id = $1 AND expire_time <= $2"""

SELECT_QUARANTINED = """
    SELECT custom_id_hmac FROM quarantined_custom_ids
    WHERE project_id = $1 AND custom_id_hmac = ANY($2::bytea[]) AND expire_time > $3"""


class ErasureSteps:
    """The erasure's statements on the connection of an open identity transaction."""

    _conn: asyncpg.Connection
    _hooks: ProfileHooks

    async def find_hmac_key(self, project_id: UUID) -> bytes | None:
        value = await self._conn.fetchval(SELECT_HMAC_KEY, project_id)
        return None if value is None else bytes(value)

    async def ensure_hmac_key(self, project_id: UUID, now: datetime) -> bytes:
        """The project's secret, made now (32 random bytes) if it has none yet."""
        await self._conn.execute(INSERT_HMAC_KEY, project_id, secrets.token_bytes(32), now)
        value = await self._conn.fetchval(SELECT_HMAC_KEY, project_id)
        return bytes(value)

    async def is_quarantined(self, project_id: UUID, digest: bytes, now: datetime) -> bool:
        rows = await self._conn.fetch(SELECT_QUARANTINED, project_id, [digest], now)
        return bool(rows)

    async def find_aliases(self, project_id: UUID, profile_id: UUID) -> list[str]:
        rows = await self._conn.fetch(SELECT_ALIASES, project_id, profile_id)
        return [r["custom_id"] for r in rows]

    async def erase(
        self,
        project_id: UUID,
        profile_id: UUID,
        custom_ids: Sequence[str],
        marker_of: Callable[[str], str],
        now: datetime,
    ) -> Erasure:
        """Erases a live profile (locked already, its custom IDs' locks held) with its
        tombstones: locks their rows and its installations, turns their events into bare dedupe
        markers (`marker_of` gives a custom ID's marker; `now`, the erasure's time, replaces
        their times, so none tells when the person used a device), runs every owner's declared
        erase hook (their rows by profile, installation and custom ID), deletes their history,
        aliases, kept answers and waiting outbox rows, then the installations and the
        profiles; last, renames other profiles' installations whose ID is one of `custom_ids`
        (locked with the profile's own, in one statement) wherever they are named.

        Bus entries already published cannot be removed per profile (EventsIngested batches
        mix profiles, and their outbox rows carry no profile_id): consumers skip erased profiles
        (bus.proto), and ProfileDeleted tells them to purge what they kept."""
        tombstones = [
            r["profile_id"] for r in await self._conn.fetch(LOCK_TOMBSTONES, project_id, profile_id)
        ]
        ids = [profile_id, *tombstones]
        installation_rows = await self._conn.fetch(
            LOCK_INSTALLATIONS_OF_PROFILE, project_id, profile_id, list(custom_ids)
        )
        installation_ids = [
            r["installation_id"] for r in installation_rows if r["profile_id"] == profile_id
        ]
        others = [r for r in installation_rows if r["profile_id"] != profile_id]
        event_custom_ids = [
            r["custom_id"] for r in await self._conn.fetch(SELECT_EVENT_CUSTOM_IDS, project_id, ids)
        ]
        markers = [marker_of(c) for c in event_custom_ids]
        event_count = await self._conn.fetchval(
            ERASE_EVENTS, project_id, ids, event_custom_ids, markers, now
        )
        named_custom_ids = sorted({*custom_ids, *event_custom_ids})
        for statement in self._hooks.erase:
            await self._conn.execute(statement, project_id, ids, installation_ids, named_custom_ids)
        await self._conn.execute(DELETE_OUTBOX_ROWS, project_id, ids)
        await self._conn.execute(DELETE_CHANGES, project_id, ids)
        await self._conn.execute(REDACT_CHANGES, project_id, ids)
        await self._conn.execute(DELETE_ANSWERS, project_id, [f"%{i}%" for i in ids])
        await self._conn.execute(DELETE_ALIASES, project_id, ids)
        await self._conn.execute(DELETE_INSTALLATIONS, project_id, profile_id)
        await self._conn.execute(DELETE_PROFILES, project_id, ids)
        renamed: list[tuple[str, str]] = []
        renamed_profile_ids: list[UUID] = []
        if others:
            renamed = [(r["installation_id"], renamed_installation_id()) for r in others]
            renamed_profile_ids = await self._rename_installations(
                project_id, renamed, [r["profile_id"] for r in others], now
            )
        return Erasure(
            tombstone_profile_ids=tuple(sorted(tombstones)),
            installation_ids=tuple(installation_ids),
            event_count=int(event_count),
            renamed_installations=tuple(renamed),
            renamed_profile_ids=tuple(renamed_profile_ids),
        )

    async def _rename_installations(
        self,
        project_id: UUID,
        renamed: Sequence[tuple[str, str]],
        holders: Sequence[UUID],
        now: datetime,
    ) -> list[UUID]:
        """Renames other profiles' installations (locked; `holders`, their profiles) whose old
        IDs are erased custom IDs, in identity's tables, ingest's and segments'; returns the live
        profiles whose rows named them (their versions raised)."""
        old_ids = [old for old, _ in renamed]
        new_ids = [new for _, new in renamed]
        former = [
            r["profile_id"]
            for r in await self._conn.fetch(SELECT_FORMER_HOLDERS, project_id, old_ids)
        ]
        passed = await self._conn.fetch(
            SELECT_RENAME_PROFILES, project_id, old_ids, sorted({*holders, *former})
        )
        live = [r["profile_id"] for r in passed if r["live"]]
        bumped = await self._conn.fetch(BUMP_RENAMED_PROFILES, project_id, live, now)
        if len(bumped) != len(live):
            raise ConcurrentChange("a profile holding a renamed installation was merged")
        await self._conn.execute(RENAME_INSTALLATIONS, project_id, old_ids, new_ids)
        await self._conn.execute(
            RENAME_IN_CHANGES, project_id, [r["profile_id"] for r in passed], old_ids, new_ids
        )
        await self._conn.execute(RENAME_IN_INGEST, project_id, old_ids, new_ids, live)
        await self._conn.execute(
            RENAME_IN_SEGMENTS, project_id, old_ids, new_ids, [r["profile_id"] for r in passed]
        )
        return live

    async def quarantine(
        self, project_id: UUID, digests: Sequence[bytes], expire_time: datetime, now: datetime
    ) -> None:
        await self._conn.execute(PURGE_EXPIRED_QUARANTINE, project_id, now)
        await self._conn.execute(UPSERT_QUARANTINE, project_id, list(digests), expire_time)
