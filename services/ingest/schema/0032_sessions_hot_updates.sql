-- Sessions updated in place (HOT) by the events that extend them (issue 19's breakdown: the
-- sessions line, 11.2 ms a batch of 500, about one session row updated per event). Every event
-- of a session moves its last_activity_time, and that column was in two indexes (the sweeper's
-- and the session rules'), so almost every update wrote a new entry into each of the table's
-- four indexes: 106 of 405 updates a batch were HOT. Those two indexes now hold the
-- 10-minute bucket of the last activity instead, which moves once per 10 minutes of a
-- session's activity, and the table leaves room on its pages for the new versions. Both
-- readers still test last_activity_time itself; the bucket only bounds what they scan.
CREATE FUNCTION ingest_sessions_activity_bucket(activity timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_bin(interval '10 minutes', activity, TIMESTAMPTZ '2000-01-01 00:00:00+00')
$$;

-- A stored generated column: whoever writes last_activity_time (ingest's batches, the sweeper,
-- a merge) keeps its bucket right without knowing of it. Adding it rewrites the table once.
ALTER TABLE sessions ADD COLUMN activity_bucket timestamptz NOT NULL
    GENERATED ALWAYS AS (ingest_sessions_activity_bucket(last_activity_time)) STORED;

-- What the sweeper looks for: open sessions by the bucket of their last activity, across
-- projects (a session is idle since before a time only if its bucket is before it).
CREATE INDEX sessions_open_by_activity_bucket ON sessions (activity_bucket) WHERE NOT closed;
-- What the session rules read under the installation's lock: its sessions active near a time
-- (active after a time only if its bucket is at or after that time's bucket).
CREATE INDEX sessions_by_installation_activity_bucket
    ON sessions (project_id, installation_id, activity_bucket);
DROP INDEX sessions_open_by_activity;
DROP INDEX sessions_by_installation_activity;

-- Room on each page for the updated versions of its rows (new pages only; HOT needs the new
-- version on the same page).
ALTER TABLE sessions SET (fillfactor = 80);
