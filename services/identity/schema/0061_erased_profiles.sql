-- Identity's record of erasures, so that an erasure is complete even where its ProfileDeleted
-- message never arrived: segments and query purge what they kept of a profile when they handle
-- ProfileDeleted from the bus, and a consumer group stopped longer than the bus retention
-- (PROFILES_BUS_RETENTION_HOURS) never reads it. Each of them also sweeps this record (on start,
-- then every PROFILES_ERASURE_SWEEP_MINUTES) and purges the profiles it still keeps rows of,
-- with the same code as its ProfileDeleted handler.
--
-- One row per erased profile ID: the live profile DeleteProfile erased and each of its
-- tombstones (merged-away IDs), the IDs ProfileDeleted names. Only the random profile ID and the
-- erasure's time: no custom ID, installation, attribute or event; nothing else in any table
-- names the ID any more (segments keeps the same ID with its own erasure mark). Rows are never
-- updated and are kept: a consumer may come back after any time. They go with their project.
--
-- erase_position is the erasing transaction's ID (xid8, never wraps), the order readers walk
-- the record in: every transaction with an ID below pg_snapshot_xmin(pg_current_snapshot())
-- has ended, so a reader that read every row from position W on (each statement after it took
-- that xmin) has seen every erasure below the xmin and may next read from it, rereading only
-- the few rows at or above it. A sequence would not do: its numbers are handed out before
-- commit, and a row committing after a higher one was read would be passed over.
CREATE TABLE erased_profiles (
    project_id uuid NOT NULL REFERENCES projects (project_id) ON DELETE CASCADE,
    profile_id uuid NOT NULL,
    erase_time timestamptz NOT NULL,
    erase_position xid8 NOT NULL,
    PRIMARY KEY (project_id, profile_id)
);
-- The sweeps' walk: the rows from a position on, in order.
CREATE INDEX erased_profiles_by_position
    ON erased_profiles (erase_position, project_id, profile_id);

-- Only an erasure deletes profile rows (services/identity/erasure.py: DELETE_PROFILES, one
-- statement for the profile and its tombstones), so the record is written here, in the
-- erasure's own transaction: an erasure and its record commit together or not at all, and no
-- code path can erase without leaving one. The rows a project's deletion cascades to are left
-- out: the project is gone (not visible to this statement any more), and its record with it.
CREATE FUNCTION identity_record_erased_profiles() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO erased_profiles (project_id, profile_id, erase_time, erase_position)
    SELECT o.project_id, o.profile_id, now(), pg_current_xact_id()
    FROM erased_rows o
    WHERE EXISTS (SELECT 1 FROM projects p WHERE p.project_id = o.project_id)
    ON CONFLICT (project_id, profile_id) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER profiles_erased AFTER DELETE ON profiles
    REFERENCING OLD TABLE AS erased_rows
    FOR EACH STATEMENT EXECUTE FUNCTION identity_record_erased_profiles();

-- READ CONTRACT (segments and query: their erasure sweeps). Every profile ID identity erased
-- (a live profile and each of its tombstones), with the erasure's time and position: the
-- erasing transaction's ID, the order to walk the record in. A reader keeps a watermark W and
-- reads `erase_position >= W` in (erase_position, project_id, profile_id) order; its next W is
-- pg_snapshot_xmin(pg_current_snapshot()) taken before that read: every erasure below it had
-- committed (or never will), so none is passed over. Rows are never updated or removed (but
-- with their project). Erasures before 0061 are not in it.
CREATE FUNCTION identity_read_erased_profiles()
RETURNS TABLE (project_id uuid, profile_id uuid, erase_time timestamptz, erase_position xid8)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, profile_id, erase_time, erase_position
    FROM erased_profiles
$$;
