-- A person's language, time zone and device outlive their last device's logout. They came only
-- from the installations a profile holds now, so a customer who logged in on a phone (the
-- phone's anonymous profile merged into theirs) and out again (Logout gave the phone a new
-- anonymous profile) held no installation any more: GetProfile showed no language and no time
-- zone, the users table no device, and the overview counted them as of unknown language.
--
-- Identity's history says which installations a profile left (identity_changes), not what they
-- were then: an installation's details move on with whoever holds it next (the next person on
-- a shared phone changes its language), and an erasure of that person deletes them. So when a
-- split moves an installation off a profile (Logout, Identify's rule 4), identity has ingest
-- keep a copy of the installation's details as they are at that moment with the profile it
-- left, in the split's own transaction (ingest_apply_installation_left): one row per profile
-- and installation, the latest departure's. Rules that read installations for a profile
-- (the language and time zone below, query's users-table device) take the installations it
-- holds first, then these.

-- The installations a profile left, each with its details as they were when it left
-- (installation_details' columns, without the push token: a token addresses the device, not
-- the person). leave_time is identity's time of the split; a later departure from the same
-- profile replaces the row. Merges move the rows to the survivor, erasures delete them (hooks
-- below); other profiles' rows about the same installation stay theirs (the person who left a
-- shared device keeps their last view of it when the next holder is erased).
CREATE TABLE profile_former_installations (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    installation_id text NOT NULL,
    leave_time timestamptz NOT NULL,
    platform smallint,
    app_version text,
    os_version text,
    device_model text,
    language text,
    timezone text,
    imported boolean NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL,
    PRIMARY KEY (project_id, profile_id, installation_id)
);

-- WRITE RULE (identity's Logout and Identify's rule 4, in the split's transaction, after the
-- installation row is locked FOR UPDATE: every batch that stored events for it while it was the
-- profile's has committed, so its details are those the profile's events left). An
-- installation ingest never saw has no details and leaves nothing; an imported one folded into
-- a device (reintegrated_into) is history, not a device, and leaves nothing either. The upsert
-- takes the newer copy unconditionally: this transaction read the details after every earlier
-- departure's.
CREATE FUNCTION ingest_apply_installation_left(
    p_project uuid, p_profile uuid, p_installation_id text, p_leave_time timestamptz
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO profile_former_installations AS f (project_id, profile_id, installation_id,
        leave_time, platform, app_version, os_version, device_model, language, timezone,
        imported, first_seen, last_seen)
    SELECT p_project, p_profile, d.installation_id, p_leave_time, d.platform, d.app_version,
           d.os_version, d.device_model, d.language, d.timezone, d.imported, d.first_seen,
           d.last_seen
    FROM installation_details d
    WHERE d.project_id = p_project AND d.installation_id = p_installation_id
      AND d.reintegrated_into IS NULL
    ON CONFLICT (project_id, profile_id, installation_id) DO UPDATE SET
        leave_time = EXCLUDED.leave_time, platform = EXCLUDED.platform,
        app_version = EXCLUDED.app_version, os_version = EXCLUDED.os_version,
        device_model = EXCLUDED.device_model, language = EXCLUDED.language,
        timezone = EXCLUDED.timezone, imported = EXCLUDED.imported,
        first_seen = EXCLUDED.first_seen, last_seen = EXCLUDED.last_seen
$$;

-- Merge: the source's rows go to the survivor; when both left the same installation, the later
-- departure's copy stays (then the later seen, for two departures at one time).
CREATE FUNCTION ingest_merge_former_installations(p_project uuid, p_source uuid, p_target uuid)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO profile_former_installations AS f (project_id, profile_id, installation_id,
        leave_time, platform, app_version, os_version, device_model, language, timezone,
        imported, first_seen, last_seen)
    SELECT p_project, p_target, s.installation_id, s.leave_time, s.platform, s.app_version,
           s.os_version, s.device_model, s.language, s.timezone, s.imported, s.first_seen,
           s.last_seen
    FROM profile_former_installations s
    WHERE s.project_id = p_project AND s.profile_id = p_source
    ON CONFLICT (project_id, profile_id, installation_id) DO UPDATE SET
        leave_time = EXCLUDED.leave_time, platform = EXCLUDED.platform,
        app_version = EXCLUDED.app_version, os_version = EXCLUDED.os_version,
        device_model = EXCLUDED.device_model, language = EXCLUDED.language,
        timezone = EXCLUDED.timezone, imported = EXCLUDED.imported,
        first_seen = EXCLUDED.first_seen, last_seen = EXCLUDED.last_seen
    WHERE (EXCLUDED.leave_time, EXCLUDED.last_seen) > (f.leave_time, f.last_seen);
    DELETE FROM profile_former_installations
    WHERE project_id = p_project AND profile_id = p_source;
$$;

-- Erasure: the erased profiles' own rows (the profile and its tombstones).
CREATE FUNCTION ingest_erase_former_installations(
    p_project uuid, p_profile_ids uuid[], p_installation_ids text[], p_custom_ids text[]
) RETURNS void LANGUAGE sql AS $$
    DELETE FROM profile_former_installations
    WHERE project_id = p_project AND profile_id = ANY(p_profile_ids)
$$;

INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES
    ('merge', 'ingest', 'ingest_merge_former_installations', 37),
    ('erase', 'ingest', 'ingest_erase_former_installations', 30);

-- READ CONTRACT (query's users-table device, identity's ExportProfile): the installations each
-- profile left, as they were when it left; a plain projection, read by the primary key's
-- (project, profile) prefix.
CREATE FUNCTION ingest_read_profile_former_installations()
RETURNS TABLE (project_id uuid, profile_id uuid, installation_id text, leave_time timestamptz,
               platform smallint, app_version text, os_version text, device_model text,
               language text, timezone text, imported boolean, first_seen timestamptz,
               last_seen timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, profile_id, installation_id, leave_time, platform, app_version,
           os_version, device_model, language, timezone, imported, first_seen, last_seen
    FROM profile_former_installations
$$;

-- A profile's language, one rule for every reader (query restated it twice, in Python for the
-- profile view and in SQL for the users table and the overview): its `language` attribute as
-- the replay left it, else the language of its most recently seen installation that reported
-- one (ties: the smallest installation ID), else that of the most recently seen installation it
-- left that had reported one, as it was when it left. NULL when none.
--
-- A rule contract (arguments) of one row, read in FROM (`LEFT JOIN LATERAL
-- ingest_read_profile_language($1, p.profile_id) l ON true`, or a scalar subquery over it):
-- there PostgreSQL inlines it into the reader's statement, as three subplans per profile (the
-- attribute by the primary key of profile_attributes, the profile's installations by
-- identity's (project, profile) index each joined to its details by primary key, its former
-- installations by their primary key's prefix), where a scalar SQL function holding subqueries
-- is never inlined and costs a function call per row (reading it for 100,000 profiles without
-- rows: 1.1 s as such a function, 0.28 s inlined, PostgreSQL 15).
CREATE FUNCTION ingest_read_profile_language(p_project uuid, p_profile uuid)
RETURNS TABLE (language text)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(
        (SELECT a.value ->> 'value' FROM profile_attributes a
         WHERE a.project_id = p_project AND a.profile_id = p_profile AND a.native
           AND a.name = 'language' AND a.value IS NOT NULL),
        (SELECT d.language FROM identity_read_installations() i
         JOIN installation_details d
             ON d.project_id = i.project_id AND d.installation_id = i.installation_id
         WHERE i.project_id = p_project AND i.profile_id = p_profile AND d.language IS NOT NULL
         ORDER BY d.last_seen DESC NULLS LAST, i.installation_id
         LIMIT 1),
        (SELECT f.language FROM profile_former_installations f
         WHERE f.project_id = p_project AND f.profile_id = p_profile AND f.language IS NOT NULL
         ORDER BY f.last_seen DESC, f.installation_id
         LIMIT 1))
$$;

-- A profile's time zone, one rule for every reader (0045: query's profile view and activity
-- days, segments' engagement and smart segment days): its `timezone` attribute as the replay
-- left it, else the zone of its most recently seen installation that reported one (ties: the
-- smallest installation ID), else, the last resort the language has too, that of the most
-- recently seen installation it left that had reported one, as it was when it left. Still a
-- scalar function, as its readers call it (run as a function call per row: a scalar SQL
-- function holding subqueries is not inlined).
CREATE OR REPLACE FUNCTION ingest_read_profile_time_zone(p_project uuid, p_profile uuid)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(
        (SELECT a.value ->> 'value' FROM profile_attributes a
         WHERE a.project_id = p_project AND a.profile_id = p_profile AND a.native
           AND a.name = 'timezone' AND a.value IS NOT NULL),
        (SELECT d.timezone FROM identity_read_installations() i
         JOIN installation_details d
             ON d.project_id = i.project_id AND d.installation_id = i.installation_id
         WHERE i.project_id = p_project AND i.profile_id = p_profile AND d.timezone IS NOT NULL
         ORDER BY d.last_seen DESC NULLS LAST, i.installation_id
         LIMIT 1),
        (SELECT f.timezone FROM profile_former_installations f
         WHERE f.project_id = p_project AND f.profile_id = p_profile AND f.timezone IS NOT NULL
         ORDER BY f.last_seen DESC, f.installation_id
         LIMIT 1))
$$;
