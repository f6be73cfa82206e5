-- ListEventNames' counts, kept by query instead of counted per call. Counted live from ingest's
-- events_custom_by_project_name (0065), a page read every stored event of the names it listed:
-- a name with a hundred million events cost a hundred million index entries per call, and the
-- console asks for a page on every segment and funnel form. Kept here, a page reads one row per
-- name listed, whatever the names' events.
--
-- Query's rollup consumer folds each EventsIngested into the counts, one set-based statement
-- per delivered message (services/query/rollup_writes.py, FOLD_EVENT_NAMES), in the
-- transaction of the message's recount and under its locks (one per profile it names), so the
-- counts lag ingest by the bus lag, as the overview's do. What they count: every custom event
-- stored since the project began, less those of erased profiles. Events retention removed
-- still count (retention never touches what was derived from the events: docs/partitions.md),
-- the last seen time too.
--
-- Exactly once. A message is folded at most once: its batch_id (a UUID ingest draws per
-- stored batch, the same in every delivery, redelivery and relay of that message) is recorded
-- in query_event_name_batches by the statement that folds it, in the same transaction, and a
-- delivery whose batch is recorded already folds nothing. A crash before the commit leaves
-- neither the marker nor the counts; a lost ack after it redelivers a message that finds its
-- marker. Markers are kept for the bus retention (PROFILES_BUS_RETENTION_HOURS) and one day
-- more, then removed by the folds of the same project: an entry is trimmed from the stream,
-- and from its dead-letter stream, once older than the retention, so no delivery of it can come
-- later (a message re-published by an outbox relay that stopped between its XADD and its
-- commit for longer than that is the one case left: it would be folded twice).
--
-- Erasure. Erased events no longer count, as when the names were counted from the events: the
-- counts are also kept per profile (query_profile_event_names, under the profile the event was
-- stored for), and when query handles ProfileDeleted (or its erasure sweep finds an erased
-- profile it still holds rows of), the rows of the erased profile and of its tombstones are
-- deleted and their counts taken from their names. A message of an erased profile folded after
-- that skips its events (identity_read_erased_profiles, read after the profile's lock is held;
-- ProfileDeleted's recount takes the same lock). A merge moves nothing here: the survivor's
-- erasure names its tombstones. The last seen time of a name the erased profile held the latest
-- event of goes back to the latest of the events left (ingest's index above, one probe per
-- month partition; where retention removed every one of them, the latest kept per profile).
--
-- query_event_names_backfilled: the backfill below counts every custom event stored when this
-- migration runs, and messages published before it but not yet handled by query's consumer
-- group then would fold the same events again. The backfill keeps the keys of each project's
-- custom events received within an hour of its latest one (the messages a running consumer can
-- still owe), and a fold skips an event whose key it finds there. A consumer group further
-- behind than that at the upgrade counts the older part of its backlog twice. Nothing else
-- writes the table.
CREATE TABLE query_event_names (
    project_id uuid NOT NULL,
    name text COLLATE "C" NOT NULL,
    event_count bigint NOT NULL,
    last_seen_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, name)
);
COMMENT ON TABLE query_event_names IS
    'Per project and custom event name (code point order): the events counted and the latest '
    'event time; ListEventNames pages its primary key.';

CREATE TABLE query_profile_event_names (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    name text COLLATE "C" NOT NULL,
    event_count bigint NOT NULL,
    last_seen_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, profile_id, name)
);
COMMENT ON TABLE query_profile_event_names IS
    'query_event_names per profile the events were stored for: what an erasure takes away.';

CREATE TABLE query_event_name_batches (
    project_id uuid NOT NULL,
    batch_id uuid NOT NULL,
    fold_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, batch_id)
);
-- The folds remove their project's expired markers by this index.
CREATE INDEX query_event_name_batches_by_time ON query_event_name_batches (project_id, fold_time);

-- A set of keys: two events of one batch may share one (the same event ID for two custom IDs,
-- the same name and time), and a fold then skips both, which the backfill counted both.
CREATE TABLE query_event_names_backfilled (
    project_id uuid NOT NULL,
    receive_time timestamptz NOT NULL,
    event_id text NOT NULL,
    name text NOT NULL,
    event_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, receive_time, event_id, name, event_time)
);

-- The backfill, in one statement (one snapshot for the counts and the keys): every stored
-- custom event (kind 1, EventKind EVENT_KIND_CUSTOM) under the profile it belongs to now, a
-- survivor's for merged events, which its erasure covers as well. Two passes over the custom
-- events (the counts, then the keys of the last hour); minutes at hundreds of millions of
-- events, under this migration's lock.
WITH counted AS (
    SELECT e.project_id, e.profile_id, e.name, count(*) AS event_count,
           max(e.event_time) AS last_seen_time, max(e.receive_time) AS receive_time
    FROM ingest_read_events() e
    WHERE e.kind = 1 AND e.profile_id IS NOT NULL AND e.name IS NOT NULL
    GROUP BY e.project_id, e.profile_id, e.name
),
per_profile AS (
    INSERT INTO query_profile_event_names (project_id, profile_id, name, event_count,
                                           last_seen_time)
    SELECT c.project_id, c.profile_id, c.name, c.event_count, c.last_seen_time FROM counted c
),
per_name AS (
    INSERT INTO query_event_names (project_id, name, event_count, last_seen_time)
    SELECT c.project_id, c.name, sum(c.event_count), max(c.last_seen_time)
    FROM counted c
    GROUP BY c.project_id, c.name
),
latest AS (
    SELECT c.project_id, max(c.receive_time) AS receive_time FROM counted c GROUP BY c.project_id
)
INSERT INTO query_event_names_backfilled (project_id, receive_time, event_id, name, event_time)
SELECT DISTINCT e.project_id, e.receive_time, e.event_id, e.name, e.event_time
FROM ingest_read_events() e
JOIN latest l ON l.project_id = e.project_id
WHERE e.kind = 1 AND e.profile_id IS NOT NULL AND e.name IS NOT NULL
    AND e.receive_time >= l.receive_time - interval '1 hour';
