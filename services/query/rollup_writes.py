"""Query's projection writes (RollupWrites): the facts of profiles and installations recounted
from the owners' read contracts when the bus says they changed, stored in query_profiles and
query_installations (0006), and the query_counters they move; and the custom event name counts
(0067) the events stream adds to and erasures take from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime
from uuid import UUID

import asyncpg

from profiles.common.v1 import types_pb2
from services.query.rollup import (
    DAY_METRICS,
    CounterKey,
    InstallationFacts,
    NamedEvents,
    ProfileFacts,
)
from services.query.rows import text_or_empty

# -- the rollups (query's projection, 0006) ---------------------------------------------------

# The facts of live profiles, recounted from identity's and ingest's read contracts; each
# lateral read is one profile's rows by its index. {where} narrows it to the profiles a message
# touched, or to nothing more for a rebuild of the whole project. Last seen is the last event
# time ingest keeps beside the profile's totals (a primary-key read, and exact after retention
# removed the events: a recount then gives the same answer). Imported installations folded
# into an SDK installation are left out, as in INSTALLATION_FACTS below: they give a profile no
# platform, token or device. The device is the most recently seen SDK installation: an imported
# one not yet picked up by a device comes last whatever its last_seen (its import time).
# Installation details without a known platform (profiles.common.v1.Platform) give none. A
# profile holding no installation keeps the device it left last (the most recently seen of
# ingest's copies, as each was when it left: 0057), so a logged-out customer's row still shows
# it; platforms (the per-platform counts) are those of the installations it holds. The
# language is ingest's rule (ingest_read_profile_language), the one GetProfile shows.
# The daily trend's facts (0066) come from the same two reads: the days the profile started a
# session on, per platform, from 99 days before the recount's UTC day ({now}: its parameter) on,
# and its first event time.
PLATFORM_UNSPECIFIED = types_pb2.PLATFORM_UNSPECIFIED

PROFILE_FACTS = (
    """
    SELECT p.profile_id, p.custom_id IS NOT NULL AS identified, p.custom_id,
           coalesce(a.has_email, false) AS has_email,
           coalesce(a.has_phone, false) AS has_phone,
           coalesce(inst.has_token, false) AS has_token,
           coalesce(inst.push_reachable, false) AS push_reachable,
           coalesce(sub.subscribed, '{{}}') AS subscribed,
           lang.language,
           a.region, ss.country,
           coalesce(inst.platforms, '{{}}') AS platforms,
           a.first_name, a.last_name, coalesce(a.has_details, false) AS has_details,
           coalesce(inst.device_model, former.device_model) AS device_model,
           coalesce(inst.device_platform, former.platform, 0) AS device_platform,
           ls.last_seen, coalesce(ss.session_count, 0) AS session_count,
           coalesce(ss.time_spent_ms, 0) AS time_spent_ms, a.email,
           ls.first_seen, coalesce(ss.session_days, '{{}}') AS session_days
    FROM identity_read_profiles() p
    LEFT JOIN LATERAL (
        SELECT bool_or(a.name = 'email') AS has_email,
               bool_or(a.name = 'phone') AS has_phone,
               max(a.value ->> 'value') FILTER (WHERE a.name = 'region') AS region,
               max(a.value ->> 'value') FILTER (WHERE a.name = 'first_name') AS first_name,
               max(a.value ->> 'value') FILTER (WHERE a.name = 'last_name') AS last_name,
               max(a.value ->> 'value') FILTER (WHERE a.name = 'email') AS email,
               bool_or(a.name IN ('first_name', 'last_name', 'email', 'phone')) AS has_details
        FROM ingest_read_profile_attributes() a
        WHERE a.project_id = p.project_id AND a.profile_id = p.profile_id AND a.native
          AND a.value IS NOT NULL
    ) a ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS held, bool_or(d.push_token_present) AS has_token,
               bool_or(d.push_token_present AND d.push_opt_in) AS push_reachable,
               array_agg(DISTINCT d.platform) FILTER (WHERE d.platform > """
    + str(PLATFORM_UNSPECIFIED)
    + """) AS platforms,
               (array_agg(d.device_model
                          ORDER BY d.imported, d.last_seen DESC, i.installation_id))[1]
                   AS device_model,
               (array_agg(d.platform ORDER BY d.imported, d.last_seen DESC, i.installation_id))[1]
                   AS device_platform
        FROM identity_read_installations() i
        JOIN ingest_read_installation_details() d
            ON d.project_id = i.project_id AND d.installation_id = i.installation_id
        WHERE i.project_id = p.project_id AND i.profile_id = p.profile_id
          AND d.reintegrated_into IS NULL
    ) inst ON true
    -- Read only for a profile without an installation (a one-time filter on inst.held).
    LEFT JOIN LATERAL (
        SELECT f.device_model, f.platform
        FROM ingest_read_profile_former_installations() f
        WHERE f.project_id = p.project_id AND f.profile_id = p.profile_id AND inst.held = 0
        ORDER BY f.imported, f.last_seen DESC, f.installation_id
        LIMIT 1
    ) former ON true
    LEFT JOIN LATERAL ingest_read_profile_language(p.project_id, p.profile_id) lang ON true
    LEFT JOIN LATERAL (
        SELECT array_agg(s.channel || ':' || s.kind ORDER BY s.channel, s.kind) AS subscribed
        FROM ingest_read_profile_subscriptions() s
        WHERE s.project_id = p.project_id AND s.profile_id = p.profile_id AND s.subscribed
    ) sub ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS session_count,
               coalesce(sum(extract(epoch FROM s.duration) * 1000), 0)::bigint AS time_spent_ms,
               (array_agg(s.country ORDER BY s.start_time DESC)
                    FILTER (WHERE coalesce(s.country, '') <> ''))[1] AS country,
               array_agg(DISTINCT s.platform || ':'
                                  || to_char(s.start_time AT TIME ZONE 'UTC', 'YYYY-MM-DD'))
                   FILTER (WHERE s.start_time >= (date_trunc('day', {now} AT TIME ZONE 'UTC')
                                                  - interval '99 days') AT TIME ZONE 'UTC')
                   AS session_days
        FROM ingest_read_sessions() s
        WHERE s.project_id = p.project_id AND s.profile_id = p.profile_id
    ) ss ON true
    LEFT JOIN LATERAL (
        SELECT c.last_event_time AS last_seen, c.first_event_time AS first_seen
        FROM ingest_read_profile_event_counts() c
        WHERE c.project_id = p.project_id AND c.profile_id = p.profile_id
    ) ls ON true
    WHERE p.project_id = $1 AND p.merged_into IS NULL {where}"""
)

PROFILE_FACT_COLUMNS = """identified, custom_id, has_email, has_phone, has_token,
    push_reachable, subscribed, language, region, country, platforms, first_name, last_name,
    has_details, device_model, device_platform, last_seen, session_count, time_spent_ms, email,
    first_seen, session_days"""


def _set_from_excluded(columns: str) -> str:
    """`a = EXCLUDED.a, b = EXCLUDED.b` for an upsert, derived from the column list so the two
    can never drift apart."""
    return ", ".join(f"{c} = EXCLUDED.{c}" for c in (c.strip() for c in columns.split(",")))


# Concurrent recounts of one profile or installation (replicas, redeliveries) take turns, so
# each diffs against the facts the previous one stored. Keys are locked in one order.
LOCK_FACTS = """
    SELECT pg_advisory_xact_lock(hashtextextended($1::text || ':' || k, 0))
    FROM unnest($2::text[]) AS k ORDER BY k"""

SELECT_STORED_PROFILES = f"""
    SELECT profile_id, {PROFILE_FACT_COLUMNS}
    FROM query_profiles
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"""

# Recounts the touched profiles and stores the result in one statement: live ones are upserted,
# the others (merged away, erased) deleted. Returns the recounted facts.
RECOUNT_PROFILES = f"""
    WITH f AS ({PROFILE_FACTS.format(where="AND p.profile_id = ANY($2::uuid[])", now="$3")}),
    gone AS (
        DELETE FROM query_profiles q
        WHERE q.project_id = $1 AND q.profile_id = ANY($2::uuid[])
          AND NOT EXISTS (SELECT 1 FROM f WHERE f.profile_id = q.profile_id)
    ),
    up AS (
        INSERT INTO query_profiles (project_id, profile_id, {PROFILE_FACT_COLUMNS}, update_time)
        SELECT $1, f.*, $3 FROM f
        ORDER BY f.profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            {_set_from_excluded(PROFILE_FACT_COLUMNS)}, update_time = EXCLUDED.update_time
    )
    SELECT * FROM f"""

# A rebuild of one project's profile facts (bench, operators): the same recount over all of it.
REBUILD_PROFILES = f"""
    INSERT INTO query_profiles (project_id, profile_id, {PROFILE_FACT_COLUMNS}, update_time)
    SELECT $1, f.*, $2 FROM ({PROFILE_FACTS.format(where="", now="$2")}) f"""

# An installation known to identity but never seen by ingest has no details: platform 0. An
# imported installation folded into the SDK installation that sent its token
# (reintegrated_into) is history, not an installation: it has no facts, so a recount deletes
# its row and takes it out of the counters, and the device counts once, as itself.
INSTALLATION_FACTS = """
    SELECT i.installation_id, coalesce(d.platform, 0)::smallint AS platform, d.app_version,
           coalesce(d.uninstalled, false) AS uninstalled,
           coalesce(d.push_token_present, false) AS has_token,
           coalesce(d.push_opt_in, false) AS push_opt_in,
           coalesce(d.imported, false) AS imported
    FROM identity_read_installations() i
    LEFT JOIN ingest_read_installation_details() d
        ON d.project_id = i.project_id AND d.installation_id = i.installation_id
    WHERE i.project_id = $1 AND d.reintegrated_into IS NULL {where}"""

INSTALLATION_FACT_COLUMNS = "platform, app_version, uninstalled, has_token, push_opt_in, imported"

SELECT_STORED_INSTALLATIONS = f"""
    SELECT installation_key AS installation_id, {INSTALLATION_FACT_COLUMNS}
    FROM query_installations
    WHERE project_id = $1 AND installation_key = ANY($2::text[])"""

RECOUNT_INSTALLATIONS = f"""
    WITH f AS ({INSTALLATION_FACTS.format(where="AND i.installation_id = ANY($2::text[])")}),
    gone AS (
        DELETE FROM query_installations q
        WHERE q.project_id = $1 AND q.installation_key = ANY($2::text[])
          AND NOT EXISTS (SELECT 1 FROM f WHERE f.installation_id = q.installation_key)
    ),
    up AS (
        INSERT INTO query_installations (project_id, installation_key,
                                         {INSTALLATION_FACT_COLUMNS})
        SELECT $1, f.* FROM f
        ORDER BY f.installation_id
        ON CONFLICT (project_id, installation_key) DO UPDATE SET
            {_set_from_excluded(INSTALLATION_FACT_COLUMNS)}
    )
    SELECT * FROM f"""

REBUILD_INSTALLATIONS = f"""
    INSERT INTO query_installations (project_id, installation_key, {INSTALLATION_FACT_COLUMNS})
    SELECT $1, f.* FROM ({INSTALLATION_FACTS.format(where="")}) f"""

# Counters move by deltas, in key order (the caller sorts them) so two writers never wait on
# each other's rows in opposite orders.
MOVE_COUNTERS = """
    INSERT INTO query_counters AS c (project_id, platform, metric, value, count)
    SELECT $1, k.* FROM unnest($2::smallint[], $3::text[], $4::text[], $5::bigint[])
        AS k(platform, metric, value, count)
    ON CONFLICT (project_id, platform, metric, value) DO UPDATE
        SET count = c.count + EXCLUDED.count"""

# The daily counters (0066) move the same way; values are days.
MOVE_DAY_COUNTS = """
    INSERT INTO query_day_counts AS c (project_id, platform, day, metric, count)
    SELECT $1, k.* FROM unnest($2::smallint[], $3::date[], $4::text[], $5::bigint[])
        AS k(platform, day, metric, count)
    ON CONFLICT (project_id, platform, day, metric) DO UPDATE
        SET count = c.count + EXCLUDED.count"""

# -- the custom event names (ListEventNames' counts, 0067) --------------------------------------

CUSTOM = types_pb2.EVENT_KIND_CUSTOM

# One EventsIngested folded into the counts, once: the marker of its batch ($2) is inserted
# first, and only a delivery that inserted it adds anything (a redelivery, or a second relay of
# the message, finds it and folds nothing); the project's markers older than $4 go (the bus
# has trimmed their messages). The events 0067's backfill counted already are skipped (its
# keys, probed only for events received up to its latest key: none once the upgrade's backlog
# is handled). The batch's events are counted per profile and name, and the profiles identity
# erased are left out (the caller holds each profile's recount lock, which ProfileDeleted's
# purge takes too, so the purge comes wholly before or after this statement). Both probes are
# LATERAL subqueries with a LIMIT, so each stays an index probe (a semi-join may be planned as a
# read of the project's whole set). Then the counts per name; rows are upserted in key order
# (names in code point order, as every writer of query_event_names locks them), one statement
# for the whole message.
FOLD_EVENT_NAMES = """
    WITH marker AS (
        INSERT INTO query_event_name_batches (project_id, batch_id, fold_time)
        VALUES ($1, $2, $3)
        ON CONFLICT (project_id, batch_id) DO NOTHING
        RETURNING batch_id
    ),
    expired AS (
        DELETE FROM query_event_name_batches WHERE project_id = $1 AND fold_time < $4
    ),
    named AS (
        SELECT e.profile_id, e.name COLLATE "C" AS name, e.event_time
        FROM unnest($5::uuid[], $6::text[], $7::timestamptz[], $8::timestamptz[], $9::text[])
            AS e(profile_id, name, event_time, receive_time, event_id)
        LEFT JOIN LATERAL (
            SELECT true AS counted FROM query_event_names_backfilled b
            WHERE e.receive_time <= (SELECT max(h.receive_time) FROM query_event_names_backfilled h
                                     WHERE h.project_id = $1)
              AND b.project_id = $1 AND b.receive_time = e.receive_time
              AND b.event_id = e.event_id AND b.name = e.name AND b.event_time = e.event_time
            LIMIT 1
        ) k ON true
        WHERE EXISTS (SELECT 1 FROM marker) AND k.counted IS NULL
    ),
    grouped AS (
        SELECT n.profile_id, n.name, count(*) AS event_count, max(n.event_time) AS last_seen_time
        FROM named n
        GROUP BY n.profile_id, n.name
    ),
    folded AS (
        SELECT g.profile_id, g.name, g.event_count, g.last_seen_time
        FROM grouped g
        LEFT JOIN LATERAL (
            SELECT true AS erased FROM identity_read_erased_profiles() x
            WHERE x.project_id = $1 AND x.profile_id = g.profile_id
            LIMIT 1
        ) x ON true
        WHERE x.erased IS NULL
    ),
    per_profile AS (
        INSERT INTO query_profile_event_names AS p (project_id, profile_id, name, event_count,
                                                    last_seen_time)
        SELECT $1, f.profile_id, f.name, f.event_count, f.last_seen_time
        FROM folded f
        ORDER BY f.profile_id, f.name
        ON CONFLICT (project_id, profile_id, name) DO UPDATE SET
            event_count = p.event_count + EXCLUDED.event_count,
            last_seen_time = greatest(p.last_seen_time, EXCLUDED.last_seen_time)
    )
    INSERT INTO query_event_names AS n (project_id, name, event_count, last_seen_time)
    SELECT $1, f.name, sum(f.event_count), max(f.last_seen_time)
    FROM folded f
    GROUP BY f.name
    ORDER BY f.name
    ON CONFLICT (project_id, name) DO UPDATE SET
        event_count = n.event_count + EXCLUDED.event_count,
        last_seen_time = greatest(n.last_seen_time, EXCLUDED.last_seen_time)"""

# An erasure's part (ProfileDeleted, the erasure sweep): the per-profile rows of those of the
# touched profiles identity erased (a probe of its record per profile) are deleted, and what
# they held is returned per name, to be taken from the names' counts.
PURGE_ERASED_PROFILE_EVENT_NAMES = """
    WITH erased AS (
        SELECT t.profile_id
        FROM unnest($2::uuid[]) AS t(profile_id)
        JOIN LATERAL (
            SELECT true AS found FROM identity_read_erased_profiles() x
            WHERE x.project_id = $1 AND x.profile_id = t.profile_id
            LIMIT 1
        ) x ON true
    ),
    gone AS (
        DELETE FROM query_profile_event_names q
        USING erased r
        WHERE q.project_id = $1 AND q.profile_id = r.profile_id
        RETURNING q.name, q.event_count, q.last_seen_time
    )
    SELECT g.name, sum(g.event_count)::bigint AS removed, max(g.last_seen_time) AS last_seen_time
    FROM gone g
    GROUP BY g.name
    ORDER BY g.name"""

# The names' rows locked in code point order, as the folds lock them, before they are lowered.
LOCK_EVENT_NAMES = """
    SELECT 1 FROM query_event_names
    WHERE project_id = $1 AND name = ANY($2::text[])
    ORDER BY name
    FOR UPDATE"""

# Each name loses the erased events ($3 per name). Its last seen time stays unless the erased
# rows held it ($4: their latest); then it is the latest custom event of the name ingest still
# stores (events_custom_by_project_name, 0065: one backward probe per month partition; events
# stored but not yet folded are at most the fold's own times), else, when retention removed
# all of them, the latest the per-profile rows keep (a walk of the project's rows: a rare case).
LOWER_EVENT_NAMES = f"""
    UPDATE query_event_names n SET
        event_count = n.event_count - r.removed,
        last_seen_time = CASE
            WHEN r.last_seen_time < n.last_seen_time THEN n.last_seen_time
            ELSE coalesce(
                (SELECT max(e.event_time) FROM ingest_read_events() e
                 WHERE e.project_id = $1 AND e.kind = {CUSTOM} AND e.name COLLATE "C" = r.name),
                (SELECT max(p.last_seen_time) FROM query_profile_event_names p
                 WHERE p.project_id = $1 AND p.name = r.name),
                n.last_seen_time)
            END
    FROM unnest($2::text[], $3::bigint[], $4::timestamptz[]) AS r(name, removed, last_seen_time)
    WHERE n.project_id = $1 AND n.name = r.name"""

# A name no counted event carries any more is not listed.
DROP_EMPTY_EVENT_NAMES = """
    DELETE FROM query_event_names
    WHERE project_id = $1 AND name = ANY($2::text[]) AND event_count <= 0"""

# A rebuild of one project's counts (bench, operators) from the custom events stored now, as
# 0067's backfill counts them: events retention removed are not counted again.
REBUILD_EVENT_NAMES = f"""
    WITH counted AS (
        SELECT e.profile_id, e.name, count(*) AS event_count, max(e.event_time) AS last_seen_time
        FROM ingest_read_events() e
        WHERE e.project_id = $1 AND e.kind = {CUSTOM} AND e.profile_id IS NOT NULL
          AND e.name IS NOT NULL
        GROUP BY e.profile_id, e.name
    ),
    per_profile AS (
        INSERT INTO query_profile_event_names (project_id, profile_id, name, event_count,
                                               last_seen_time)
        SELECT $1, c.profile_id, c.name, c.event_count, c.last_seen_time FROM counted c
    )
    INSERT INTO query_event_names (project_id, name, event_count, last_seen_time)
    SELECT $1, c.name, sum(c.event_count), max(c.last_seen_time)
    FROM counted c
    GROUP BY c.name"""

DELETE_PROJECT_ROLLUPS = (
    "DELETE FROM query_profiles WHERE project_id = $1",
    "DELETE FROM query_installations WHERE project_id = $1",
    "DELETE FROM query_counters WHERE project_id = $1",
    "DELETE FROM query_day_counts WHERE project_id = $1",
    "DELETE FROM query_event_names WHERE project_id = $1",
    "DELETE FROM query_profile_event_names WHERE project_id = $1",
)
SELECT_ALL_PROFILE_FACTS = f"""
    SELECT profile_id, {PROFILE_FACT_COLUMNS} FROM query_profiles WHERE project_id = $1"""
SELECT_ALL_INSTALLATION_FACTS = f"""
    SELECT installation_key AS installation_id, {INSTALLATION_FACT_COLUMNS}
    FROM query_installations WHERE project_id = $1"""


def _profile_facts(r: asyncpg.Record) -> ProfileFacts:
    return ProfileFacts(
        identified=r["identified"],
        has_email=r["has_email"],
        has_phone=r["has_phone"],
        has_token=r["has_token"],
        push_reachable=r["push_reachable"],
        subscribed=frozenset(r["subscribed"]),
        language=text_or_empty(r["language"]),
        region=text_or_empty(r["region"]),
        country=text_or_empty(r["country"]),
        platforms=frozenset(r["platforms"]),
        has_session=r["session_count"] > 0,
        session_days=frozenset(r["session_days"]),
        first_seen_day=r["first_seen"].astimezone(UTC).date().isoformat()
        if r["first_seen"]
        else "",
    )


def _installation_facts(r: asyncpg.Record) -> InstallationFacts:
    return InstallationFacts(
        platform=r["platform"],
        app_version=text_or_empty(r["app_version"]),
        uninstalled=r["uninstalled"],
        has_token=r["has_token"],
        push_opt_in=r["push_opt_in"],
        imported=r["imported"],
    )


class RollupWrites:
    """The projection's statements, in one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def lock(self, project_id: UUID, keys: Sequence[str]) -> None:
        await self._conn.execute(LOCK_FACTS, str(project_id), sorted(set(keys)))

    async def stored_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, ProfileFacts]:
        rows = await self._conn.fetch(SELECT_STORED_PROFILES, project_id, list(profile_ids))
        return {r["profile_id"]: _profile_facts(r) for r in rows}

    async def recount_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID], now: datetime
    ) -> dict[UUID, ProfileFacts]:
        """Recounts and stores the facts of the profiles; the live ones' facts are returned."""
        rows = await self._conn.fetch(RECOUNT_PROFILES, project_id, list(profile_ids), now)
        return {r["profile_id"]: _profile_facts(r) for r in rows}

    async def stored_installations(
        self, project_id: UUID, installation_ids: Sequence[str]
    ) -> dict[str, InstallationFacts]:
        rows = await self._conn.fetch(
            SELECT_STORED_INSTALLATIONS, project_id, list(installation_ids)
        )
        return {r["installation_id"]: _installation_facts(r) for r in rows}

    async def recount_installations(
        self, project_id: UUID, installation_ids: Sequence[str]
    ) -> dict[str, InstallationFacts]:
        rows = await self._conn.fetch(RECOUNT_INSTALLATIONS, project_id, list(installation_ids))
        return {r["installation_id"]: _installation_facts(r) for r in rows}

    async def move_counters(
        self, project_id: UUID, changes: Sequence[tuple[CounterKey, int]]
    ) -> None:
        counters = [(k, n) for k, n in changes if k[1] not in DAY_METRICS]
        days = [(k, n) for k, n in changes if k[1] in DAY_METRICS]
        if counters:
            await self._conn.execute(
                MOVE_COUNTERS,
                project_id,
                [k[0] for k, _ in counters],
                [k[1] for k, _ in counters],
                [k[2] for k, _ in counters],
                [n for _, n in counters],
            )
        if days:
            await self._conn.execute(
                MOVE_DAY_COUNTS,
                project_id,
                [k[0] for k, _ in days],
                [date.fromisoformat(k[2]) for k, _ in days],
                [k[1] for k, _ in days],
                [n for _, n in days],
            )

    async def fold_event_names(
        self, project_id: UUID, names: NamedEvents, now: datetime, keep_after: datetime
    ) -> int:
        """Adds the message's custom events to the event name counts unless its batch was
        folded before; removes the project's batch markers older than `keep_after`. Returns
        how many names' counts moved (0 for a batch folded before)."""
        events = names.events
        status = await self._conn.execute(
            FOLD_EVENT_NAMES,
            project_id,
            names.batch_id,
            now,
            keep_after,
            [e.profile_id for e in events],
            [e.name for e in events],
            [e.event_time for e in events],
            [e.receive_time for e in events],
            [e.event_id for e in events],
        )
        return int(status.rsplit(" ", 1)[-1])

    async def purge_erased_event_names(self, project_id: UUID, profile_ids: Sequence[UUID]) -> int:
        """Takes the events of those of `profile_ids` identity erased out of the event name
        counts (a name left with none is no longer listed); returns how many names moved."""
        rows = await self._conn.fetch(
            PURGE_ERASED_PROFILE_EVENT_NAMES, project_id, list(profile_ids)
        )
        if not rows:
            return 0
        names = [r["name"] for r in rows]
        await self._conn.execute(LOCK_EVENT_NAMES, project_id, names)
        await self._conn.execute(
            LOWER_EVENT_NAMES,
            project_id,
            names,
            [r["removed"] for r in rows],
            [r["last_seen_time"] for r in rows],
        )
        await self._conn.execute(DROP_EMPTY_EVENT_NAMES, project_id, names)
        return len(names)

    async def rebuild(self, project_id: UUID, now: datetime) -> None:
        """Recounts every profile and installation of the project and its counters, and its
        event name counts from the events stored now."""
        for statement in DELETE_PROJECT_ROLLUPS:
            await self._conn.execute(statement, project_id)
        await self._conn.execute(REBUILD_PROFILES, project_id, now)
        await self._conn.execute(REBUILD_INSTALLATIONS, project_id)
        await self._conn.execute(REBUILD_EVENT_NAMES, project_id)
        totals: Counter[CounterKey] = Counter()
        for statement, facts_of in (
            (SELECT_ALL_PROFILE_FACTS, _profile_facts),
            (SELECT_ALL_INSTALLATION_FACTS, _installation_facts),
        ):
            async for r in self._conn.cursor(statement, project_id, prefetch=10_000):
                totals.update(facts_of(r).counter_keys())
        await self.move_counters(project_id, sorted(totals.items()))
