"""Every SQL statement of identity, and only SQL. Methods return model dataclasses.

Lock order, so that concurrent changes queue instead of deadlocking (a deadlock that still
happens is retried by the service): the custom ID's advisory lock, then the installation row,
then profile rows in ascending profile_id order, then the other installations of a profile
merged away (ascending installation_id), then the rows of the other tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID, uuid4

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.identity.errors import ConcurrentChange
from services.identity.model import (
    ChangeCause,
    ChangeKind,
    Erasure,
    IdentityChange,
    InstallationLink,
    MergeMoves,
    Profile,
    Resolution,
)
from shared.outbox import OutboxItem, enqueue_many

# Read first for every batch, outside any transaction: installations.profile_id is always a live
# profile (identity changes it in the same transaction as any merge), so "identified?" is one
# primary-key probe of profiles per installation. A scalar subquery, not a join: for a batch of
# hundreds of keys the planner's custom plans (the first five per connection) hash-joined a
# sequential scan of every profile of the project (17 ms at 100,000 profiles, EXPLAIN ANALYZE,
# against 3 ms for the probes). Only the four columns the answer needs, in the order
# find_installations unpacks them (it runs for every ingest batch).
SELECT_INSTALLATION_LINKS = """
    SELECT i.installation_id, i.profile_id, i.link_version,
        (SELECT p.custom_id IS NOT NULL FROM profiles p
         WHERE p.project_id = i.project_id AND p.profile_id = i.profile_id) AS identified
    FROM installations i
    WHERE i.project_id = $1 AND i.installation_id = ANY($2::text[])"""

# One statement creates the installations and their profiles. The installation row is inserted
# first with ON CONFLICT DO NOTHING, so when two callers race for one new installation the
# primary key picks the winner and only the winner's profile is inserted (from RETURNING); the
# foreign key to profiles is checked at the end of the statement, when both rows exist. Callers
# pass the IDs sorted so that two overlapping batches wait for each other instead of deadlocking.
INSERT_ANONYMOUS_INSTALLATIONS = """
    WITH linked AS (
        INSERT INTO installations (project_id, installation_id, profile_id, create_time)
        SELECT $1, k.installation_id, k.profile_id, $4
        FROM unnest($2::text[], $3::uuid[]) AS k(installation_id, profile_id)
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

# Unlocked read of profiles and, for tombstones, their survivor (one hop, as merges keep it).
SELECT_PROFILES_AND_SURVIVORS = """
    SELECT p.profile_id AS requested_id, s.profile_id, s.custom_id, s.merged_into, s.version
    FROM profiles p
    JOIN profiles s ON s.project_id = p.project_id
        AND s.profile_id = coalesce(p.merged_into, p.profile_id)
    WHERE p.project_id = $1 AND p.profile_id = ANY($2::uuid[])"""

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

# A merge moves every installation of the source, not only the caller's: each is locked first,
# in installation_id order, so an event being stored for any of them finishes or waits.
LOCK_INSTALLATIONS_OF_PROFILE = """
    SELECT installation_id FROM installations
    WHERE project_id = $1 AND profile_id = $2
    ORDER BY installation_id
    FOR UPDATE"""

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

# Tells every identity replica, at commit, which profiles' installations now resolve
# differently (cache.py): NOTIFY is transactional, so a rolled-back change announces nothing and
# a committed one is announced before any later transaction can see its effects elsewhere.
NOTIFY_LINKS = "SELECT pg_notify($1, $2)"
LINKS_CHANNEL = "profiles_identity_links"

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

# The columns that tie a row to a profile, an installation or a custom ID, in every base table of
# the schema. Read once at start-up (migrations are applied before any service starts), so
# tables added by other services (events, attributes, subscriptions, sessions, segments...) are
# moved by merges and purged by erasures without identity knowing them.
SELECT_KEYED_COLUMNS = """
    SELECT c.table_name, c.column_name
    FROM information_schema.columns c
    JOIN information_schema.tables t
        ON t.table_schema = c.table_schema AND t.table_name = c.table_name
    WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE'
        AND c.column_name IN ('project_id', 'profile_id', 'installation_id', 'custom_id')
        -- A partition (events_2026_12, events_default) is reached through its partitioned
        -- table: handled on its own, an erasure would delete events it must keep as markers.
        AND NOT EXISTS (
            SELECT 1 FROM pg_class pc JOIN pg_namespace pn ON pn.oid = pc.relnamespace
            WHERE pn.nspname = c.table_schema AND pc.relname = c.table_name AND pc.relispartition
        )
    ORDER BY c.table_name, c.column_name"""

# A table whose key includes profile_id (say, one row per profile and attribute) cannot just be
# updated: the target may have the same key. Its owner then defines a function
# `profiles_merge_<table>(project_id uuid, source uuid, target uuid)` that applies its merge
# rules; identity calls it instead of MOVE_PROFILE_ROWS, in the merge's transaction. Likewise
# `profiles_erase_<table>(project_id uuid, profile_ids uuid[])` replaces the plain DELETE of an
# erasure (for an owner that must keep or announce something); both run in identity's
# transaction.
SELECT_MERGE_FUNCTIONS = r"""
    SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = current_schema()
        AND (p.proname LIKE 'profiles\_merge\_%' OR p.proname LIKE 'profiles\_erase\_%')"""
MERGE_FUNCTION_PREFIX = "profiles_merge_"
ERASE_FUNCTION_PREFIX = "profiles_erase_"

# Format templates; names come from the catalog (SELECT_KEYED_COLUMNS) and are quoted.
MOVE_PROFILE_ROWS = """
    UPDATE {table} SET profile_id = $3 WHERE project_id = $1 AND profile_id = $2"""
CALL_MERGE_FUNCTION = "SELECT {function}($1, $2, $3)"
ERASE_PROFILE_ROWS = "DELETE FROM {table} WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"
CALL_ERASE_FUNCTION = "SELECT {function}($1, $2::uuid[])"
# Tables without profile_id but keyed by installation (installation_details) or naming a custom
# ID (rejected_events): an erasure removes the rows of the unlinked installations and of the
# erased custom IDs.
ERASE_INSTALLATION_ROWS = (
    "DELETE FROM {table} WHERE project_id = $1 AND installation_id = ANY($2::text[])"
)
ERASE_CUSTOM_ID_ROWS = "DELETE FROM {table} WHERE project_id = $1 AND custom_id = ANY($2::text[])"

# identity's own tables with a profile_id column, handled by its own statements above; the
# outbox keeps its rows' profile_id (a merge must not wait for the relay's row locks, and an
# erasure purges by tombstone IDs too).
IDENTITY_OWNED_TABLES = frozenset({"profiles", "installations", "outbox"})
# Tables an erasure handles with statements of its own (below) rather than generically: events
# become bare dedupe markers; aliases, installations and profiles go last, for their foreign keys.
ERASURE_OWN_TABLES = frozenset(
    {"profiles", "installations", "custom_id_aliases", "events", "outbox"}
)

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
# be replaced by keyed markers.
SELECT_EVENT_CUSTOM_IDS = """
    SELECT DISTINCT custom_id FROM events
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[]) AND custom_id IS NOT NULL"""

# A custom ID erased before (quarantine over, then used and erased again) already left markers
# with the same key: those events are simply dropped, the older marker keeps deduplicating.
DELETE_SHADOWED_EVENTS = """
    DELETE FROM events e
    USING unnest($3::text[], $4::text[]) AS m(custom_id, marker)
    WHERE e.project_id = $1 AND e.profile_id = ANY($2::uuid[]) AND e.custom_id = m.custom_id
        AND EXISTS (
            SELECT 1 FROM events o
            WHERE o.project_id = $1 AND o.custom_id = m.marker AND o.event_id = e.event_id
        )"""

# Erased events become bare dedupe markers: the origin (installation ID, or for a server-side
# event a keyed hash of its custom ID) and the event ID stay, so an SDK retrying an old batch is
# answered DUPLICATE and stores nothing; everything else goes. NOT NULL columns get neutral
# values: kind and platform 0 (UNSPECIFIED), event_time the receive time (kept so markers can
# be pruned by age one day).
STRIP_EVENTS = """
    UPDATE events e SET
        custom_id = CASE WHEN e.custom_id IS NULL THEN NULL ELSE (
            SELECT m.marker FROM unnest($3::text[], $4::text[]) AS m(custom_id, marker)
            WHERE m.custom_id = e.custom_id
        ) END,
        profile_id = NULL, kind = 0, name = NULL, event_time = e.receive_time,
        session_id = NULL, platform = 0, payload = NULL, imported = false
    WHERE e.project_id = $1 AND e.profile_id = ANY($2::uuid[])"""

# Messages still waiting in the outbox that name the erased profiles (identity's own, and any
# producer's that set profile_id). Batched EventsIngested rows carry none: see erase() below.
DELETE_OUTBOX_ROWS = """
    DELETE FROM outbox WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"""

DELETE_CHANGES = """
    DELETE FROM identity_changes
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

# -- ExportProfile (read in one REPEATABLE READ snapshot) ----------------------------------------
# The export reads the tables other services write under their read contracts (0004_ingest.sql):
# events, profile_attributes, profile_subscriptions, installation_details, sessions,
# rejected_events.
# First and last seen span the profile's events (the creation time when it has none yet, or
# when imported events are older).
SELECT_EXPORT_PROFILE = """
    SELECT p.profile_id, p.custom_id,
        least(p.create_time, ev.first_time) AS first_seen_time,
        coalesce(ev.last_time, p.create_time) AS last_seen_time,
        coalesce((SELECT array_agg(a.custom_id ORDER BY a.custom_id) FROM custom_id_aliases a
                  WHERE a.project_id = p.project_id AND a.target_profile_id = p.profile_id),
                 '{}') AS alias_custom_ids,
        coalesce((SELECT array_agg(t.profile_id ORDER BY t.profile_id) FROM profiles t
                  WHERE t.project_id = p.project_id AND t.merged_into = p.profile_id),
                 '{}') AS merged_profile_ids
    FROM profiles p
    CROSS JOIN LATERAL (
        SELECT min(e.event_time) AS first_time, max(e.event_time) AS last_time FROM events e
        WHERE e.project_id = p.project_id AND e.profile_id = p.profile_id
    ) ev
    WHERE p.project_id = $1 AND p.profile_id = $2"""

# Unset attributes keep a row (value NULL) so a late older set cannot revive them: not exported.
SELECT_EXPORT_ATTRIBUTES = """
    SELECT native, name, value, value_type, update_time FROM profile_attributes
    WHERE project_id = $1 AND profile_id = $2 AND value IS NOT NULL
    ORDER BY native, name"""

SELECT_EXPORT_SUBSCRIPTIONS = """
    SELECT channel, kind, subscribed, change_time FROM profile_subscriptions
    WHERE project_id = $1 AND profile_id = $2
    ORDER BY channel, kind"""

# Details as one JSON object, so columns ingest adds later (say `imported`) come along.
SELECT_EXPORT_INSTALLATIONS = """
    SELECT i.installation_id, i.create_time, to_jsonb(d) AS details
    FROM installations i
    LEFT JOIN installation_details d
        ON d.project_id = i.project_id AND d.installation_id = i.installation_id
    WHERE i.project_id = $1 AND i.profile_id = $2
    ORDER BY i.installation_id"""

# The profile's history includes that of the tombstones merged into it.
SELECT_EXPORT_CHANGES = """
    SELECT change_id, kind, cause, source_profile_id, target_profile_id, installation_ids,
        alias_custom_id, change_time
    FROM identity_changes
    WHERE project_id = $1
        AND (source_profile_id = ANY($2::uuid[]) OR target_profile_id = ANY($2::uuid[]))
    ORDER BY change_time, change_id"""

SELECT_EXPORT_SESSIONS = """
    SELECT session_id, installation_id, platform, country, start_time, end_time,
        extract(epoch FROM duration)::float8 AS duration_seconds, event_count
    FROM sessions
    WHERE project_id = $1 AND profile_id = $2
    ORDER BY start_time, installation_id, session_id"""

# Read through a cursor, a chunk at a time: a profile may hold millions of events.
SELECT_EXPORT_EVENTS = """
    SELECT event_id, installation_id, custom_id, platform, kind, session_id, event_time,
        receive_time, payload
    FROM events
    WHERE project_id = $1 AND profile_id = $2
    ORDER BY event_time, event_seq"""

# Rejected events have no profile: those of the profile's installations and custom IDs.
SELECT_EXPORT_REJECTED_EVENTS = """
    SELECT event_id, reason, field_path, receive_time, payload
    FROM rejected_events
    WHERE project_id = $1
        AND (installation_id = ANY($2::text[]) OR custom_id = ANY($3::text[]))
    ORDER BY receive_time, rejected_seq"""
SESSIONS_TABLE = "sessions"
EXPORT_FETCH_ROWS = 500

# Lost races: PostgreSQL's deadlock detector, serialization failures, and unique violations of
# the keys two identity transactions may race for (a new installation, custom ID, alias or
# request answer). The transaction rolled back entirely, so the service may retry it. Any other
# unique violation is a bug (say, a table keyed by profile_id without its profiles_merge_
# function) and must not pass for a race: it stays an error (INTERNAL, logged).
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


@dataclass(frozen=True, slots=True)
class ProfileTables:
    """The statements that move or purge a profile's rows in other tables, found at start-up."""

    statements: tuple[str, ...]
    # DELETE (or profiles_erase_ call) per table with project_id and profile_id.
    erase_by_profile: tuple[str, ...] = ()
    # DELETE per table without profile_id, by installation_id or by custom_id.
    erase_by_installation: tuple[str, ...] = ()
    erase_by_custom_id: tuple[str, ...] = ()
    # Every base table with a project_id column and one of the keyed columns.
    tables: frozenset[str] = frozenset()


async def discover_profile_tables(conn: asyncpg.Connection) -> ProfileTables:
    """Finds every table tied to profiles (project_id and profile_id), installations or custom
    IDs, and how to move (merge) or purge (erasure) their rows."""
    columns: dict[str, set[str]] = {}
    for row in await conn.fetch(SELECT_KEYED_COLUMNS):
        columns.setdefault(row["table_name"], set()).add(row["column_name"])
    functions = {r["proname"] for r in await conn.fetch(SELECT_MERGE_FUNCTIONS)}
    moves, by_profile, by_installation, by_custom_id = [], [], [], []
    for table, names in sorted(columns.items()):
        if "project_id" not in names:
            continue
        quoted = _quoted(table)
        if "profile_id" in names:
            merge_function = MERGE_FUNCTION_PREFIX + table
            if table in IDENTITY_OWNED_TABLES:
                pass
            elif merge_function in functions:
                moves.append(CALL_MERGE_FUNCTION.format(function=_quoted(merge_function)))
            else:
                moves.append(MOVE_PROFILE_ROWS.format(table=quoted))
            erase_function = ERASE_FUNCTION_PREFIX + table
            if table in ERASURE_OWN_TABLES:
                pass
            elif erase_function in functions:
                by_profile.append(CALL_ERASE_FUNCTION.format(function=_quoted(erase_function)))
            else:
                by_profile.append(ERASE_PROFILE_ROWS.format(table=quoted))
            continue
        if table in ERASURE_OWN_TABLES:
            continue
        if "installation_id" in names:
            by_installation.append(ERASE_INSTALLATION_ROWS.format(table=quoted))
        if "custom_id" in names:
            by_custom_id.append(ERASE_CUSTOM_ID_ROWS.format(table=quoted))
    return ProfileTables(
        statements=tuple(moves),
        erase_by_profile=tuple(by_profile),
        erase_by_installation=tuple(by_installation),
        erase_by_custom_id=tuple(by_custom_id),
        tables=frozenset(t for t, names in columns.items() if "project_id" in names),
    )


def _quoted(identifier: str) -> str:
    """An SQL identifier quoted like PostgreSQL's quote_ident (always quoted)."""
    return '"' + identifier.replace('"', '""') + '"'


async def move_profile_rows(
    conn: asyncpg.Connection,
    tables: ProfileTables,
    project_id: UUID,
    source: UUID,
    target: UUID,
) -> None:
    """Moves every row of `source` to `target` in every other service's table (events,
    sessions, attributes, subscriptions...), in the caller's transaction, in table-name order."""
    for statement in tables.statements:
        await conn.execute(statement, project_id, source, target)


class LinkListener:
    """A dedicated connection LISTENing on LINKS_CHANNEL (not a pooled one: a pool resets
    listeners on release, and this one is held for the life of the process)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: self._lost.set())

    @classmethod
    async def open(cls, database_url: str, on_payload: Callable[[str], None]) -> LinkListener:
        conn = await asyncpg.connect(database_url)
        listener = cls(conn)
        await conn.add_listener(LINKS_CHANNEL, lambda _c, _pid, _channel, p: on_payload(p))
        return listener

    async def lost(self) -> None:
        """Returns when the connection is gone (checked every few seconds as well, since a
        silently dropped socket triggers no termination callback until it is used)."""
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), LISTENER_CHECK_S)
            if self._conn.is_closed():
                return
            try:
                await self._conn.execute(PROBE)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                return

    async def close(self) -> None:
        await self._conn.close(timeout=5)


PROBE = "SELECT 1"
# How often the LISTEN connection is probed; a change made while it was silently dead is then
# missed for at most this long by this replica's cache.
LISTENER_CHECK_S = 5.0


def _connection(conn: PoolConnectionProxy[asyncpg.Record]) -> asyncpg.Connection:
    """A pooled connection typed as the Connection it stands for (it forwards every call)."""
    return cast(asyncpg.Connection, conn)


def _profile(row: asyncpg.Record) -> Profile:
    return Profile(
        profile_id=row["profile_id"],
        custom_id=row["custom_id"],
        merged_into=row["merged_into"],
        version=row["version"],
    )


class IdentityRepository:
    """Reads without a transaction, and opens the transactions of the service's use cases."""

    def __init__(self, pool: asyncpg.Pool, tables: ProfileTables) -> None:
        self._pool = pool
        self._tables = tables

    @classmethod
    async def connect(cls, pool: asyncpg.Pool) -> IdentityRepository:
        async with pool.acquire() as conn:
            tables = await discover_profile_tables(_connection(conn))
        return cls(pool, tables)

    @property
    def profile_tables(self) -> ProfileTables:
        return self._tables

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
        return {r["requested_id"]: _profile(r) for r in rows}

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
            yield ExportReader(_connection(conn), self._tables)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[IdentityTransaction]:
        """One short READ COMMITTED transaction; a lost race surfaces as ConcurrentChange after
        the rollback, never as a driver error."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield IdentityTransaction(_connection(conn), self._tables)
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


class IdentityTransaction:
    """The statements of one open transaction."""

    def __init__(self, conn: asyncpg.Connection, tables: ProfileTables) -> None:
        self._conn = conn
        self._tables = tables

    async def create_installations(
        self, project_id: UUID, installation_ids: Sequence[str], now: datetime
    ) -> dict[str, UUID]:
        """Creates the installations not yet known, each on a new anonymous profile; returns
        those this call created. IDs known or created concurrently are left alone."""
        ordered = sorted(set(installation_ids))
        new_profile_ids = [uuid4() for _ in ordered]
        rows = await self._conn.fetch(
            INSERT_ANONYMOUS_INSTALLATIONS, project_id, ordered, new_profile_ids, now
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
        return {r["profile_id"]: _profile(r) for r in rows}

    async def find_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, Profile]:
        """Each requested ID that exists, mapped to its live profile (itself or its survivor);
        not locked."""
        rows = await self._conn.fetch(SELECT_PROFILES_AND_SURVIVORS, project_id, profile_ids)
        return {r["requested_id"]: _profile(r) for r in rows}

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

    async def merge(
        self, project_id: UUID, source: UUID, target: UUID, now: datetime
    ) -> MergeMoves:
        """Moves everything of `source` to `target` and leaves `source` a tombstone; both must be
        locked already. Returns the installations moved, the tombstones redirected and the
        tombstone's version. The caller handles custom IDs (alias or inheritance) and records
        the change."""
        moved = await self._conn.fetch(MOVE_INSTALLATIONS_OF_PROFILE, project_id, source, target)
        await move_profile_rows(self._conn, self._tables, project_id, source, target)
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
    ) -> Erasure:
        """Erases a live profile (locked already, its custom IDs' locks held) with its
        tombstones: locks their rows and its installations, turns their events into bare dedupe
        markers (`marker_of` gives a custom ID's marker), deletes their rows in every table tied
        to them (by profile, by installation, by `custom_ids`), their history, aliases, kept
        answers and waiting outbox rows, then the installations and the profiles.

        Bus entries already published cannot be removed per profile (EventsIngested batches
        mix profiles, and their outbox rows carry no profile_id): consumers skip erased profiles
        (bus.proto), and ProfileDeleted tells them to purge what they kept."""
        tombstones = [
            r["profile_id"] for r in await self._conn.fetch(LOCK_TOMBSTONES, project_id, profile_id)
        ]
        ids = [profile_id, *tombstones]
        installation_rows = await self._conn.fetch(
            LOCK_INSTALLATIONS_OF_PROFILE, project_id, profile_id
        )
        installation_ids = [r["installation_id"] for r in installation_rows]
        event_custom_ids = [
            r["custom_id"] for r in await self._conn.fetch(SELECT_EVENT_CUSTOM_IDS, project_id, ids)
        ]
        markers = [marker_of(c) for c in event_custom_ids]
        shadowed = await self._conn.execute(
            DELETE_SHADOWED_EVENTS, project_id, ids, event_custom_ids, markers
        )
        stripped = await self._conn.execute(
            STRIP_EVENTS, project_id, ids, event_custom_ids, markers
        )
        for statement in self._tables.erase_by_profile:
            await self._conn.execute(statement, project_id, ids)
        for statement in self._tables.erase_by_installation:
            await self._conn.execute(statement, project_id, installation_ids)
        named_custom_ids = sorted({*custom_ids, *event_custom_ids})
        for statement in self._tables.erase_by_custom_id:
            await self._conn.execute(statement, project_id, named_custom_ids)
        await self._conn.execute(DELETE_OUTBOX_ROWS, project_id, ids)
        await self._conn.execute(DELETE_CHANGES, project_id, ids)
        await self._conn.execute(DELETE_ANSWERS, project_id, [f"%{i}%" for i in ids])
        await self._conn.execute(DELETE_ALIASES, project_id, ids)
        await self._conn.execute(DELETE_INSTALLATIONS, project_id, profile_id)
        await self._conn.execute(DELETE_PROFILES, project_id, ids)
        return Erasure(
            tombstone_profile_ids=tuple(sorted(tombstones)),
            installation_ids=tuple(installation_ids),
            event_count=_row_count(shadowed) + _row_count(stripped),
        )

    async def quarantine(
        self, project_id: UUID, digests: Sequence[bytes], expire_time: datetime, now: datetime
    ) -> None:
        await self._conn.execute(PURGE_EXPIRED_QUARANTINE, project_id, now)
        await self._conn.execute(UPSERT_QUARANTINE, project_id, list(digests), expire_time)


def _row_count(status: str) -> int:
    """The row count of a command status such as "UPDATE 3" or "DELETE 0"."""
    return int(status.rsplit(" ", 1)[-1])


class ExportReader:
    """The reads of one export, all in one snapshot."""

    def __init__(self, conn: asyncpg.Connection, tables: ProfileTables) -> None:
        self._conn = conn
        self._tables = tables

    async def find_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, Profile]:
        rows = await self._conn.fetch(SELECT_PROFILES_AND_SURVIVORS, project_id, profile_ids)
        return {r["requested_id"]: _profile(r) for r in rows}

    async def profile(self, project_id: UUID, profile_id: UUID) -> asyncpg.Record | None:
        return await self._conn.fetchrow(SELECT_EXPORT_PROFILE, project_id, profile_id)

    async def attributes(self, project_id: UUID, profile_id: UUID) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_ATTRIBUTES, project_id, profile_id)

    async def subscriptions(self, project_id: UUID, profile_id: UUID) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_SUBSCRIPTIONS, project_id, profile_id)

    async def installations(self, project_id: UUID, profile_id: UUID) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_INSTALLATIONS, project_id, profile_id)

    async def changes(self, project_id: UUID, profile_ids: Sequence[UUID]) -> list[IdentityChange]:
        rows = await self._conn.fetch(SELECT_EXPORT_CHANGES, project_id, list(profile_ids))
        return [
            IdentityChange(
                change_id=r["change_id"],
                kind=ChangeKind(r["kind"]),
                cause=ChangeCause(r["cause"]),
                source_profile_id=r["source_profile_id"],
                target_profile_id=r["target_profile_id"],
                installation_ids=tuple(r["installation_ids"]),
                change_time=r["change_time"],
                alias_custom_id=r["alias_custom_id"],
            )
            for r in rows
        ]

    async def sessions(self, project_id: UUID, profile_id: UUID) -> list[asyncpg.Record]:
        """The profile's sessions; none when no sessions table exists."""
        if SESSIONS_TABLE not in self._tables.tables:
            return []
        return await self._conn.fetch(SELECT_EXPORT_SESSIONS, project_id, profile_id)

    async def events(self, project_id: UUID, profile_id: UUID) -> AsyncIterator[asyncpg.Record]:
        cursor = self._conn.cursor(
            SELECT_EXPORT_EVENTS, project_id, profile_id, prefetch=EXPORT_FETCH_ROWS
        )
        async for row in cursor:
            yield row

    async def rejected_events(
        self, project_id: UUID, installation_ids: Sequence[str], custom_ids: Sequence[str]
    ) -> list[asyncpg.Record]:
        return await self._conn.fetch(
            SELECT_EXPORT_REJECTED_EVENTS, project_id, list(installation_ids), list(custom_ids)
        )
