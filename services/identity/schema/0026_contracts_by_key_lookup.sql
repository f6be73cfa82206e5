-- Identity's per-batch contracts (0019) look their rows up by joining the batch's keys, one
-- primary-key probe per distinct key, instead of `key = ANY(array)`. Measured in ingest's
-- bench (issue 19, docs/benchmarks.md): PostgreSQL caches the plans of SQL functions, and a
-- plan made while the table's statistics still said "a few rows per project" scanned the
-- project's rows by installations_by_profile and tested each against the whole 500-key
-- array: 2 x 25 to 40 ms per batch of 500 on 5,000 installations, growing with the project.
-- The join costs one probe per key whatever the statistics say. Same rows, same lock order
-- (the key's order), same meaning.

CREATE OR REPLACE FUNCTION identity_read_installation_profiles(p_project uuid,
                                                               p_installation_ids text[])
RETURNS TABLE (installation_id text, profile_id uuid, identified boolean)
LANGUAGE sql STABLE AS $$
    SELECT i.installation_id, i.profile_id, p.custom_id IS NOT NULL
    FROM (SELECT DISTINCT k.id FROM unnest(p_installation_ids) AS k(id)) k
    JOIN installations i ON i.project_id = p_project AND i.installation_id = k.id
    JOIN profiles p ON p.project_id = i.project_id AND p.profile_id = i.profile_id
$$;

CREATE OR REPLACE FUNCTION identity_read_installation_links(p_project uuid,
                                                            p_installation_ids text[])
RETURNS TABLE (installation_id text, profile_id uuid) LANGUAGE sql AS $$
    SELECT i.installation_id, i.profile_id
    FROM (SELECT DISTINCT k.id FROM unnest(p_installation_ids) AS k(id)) k
    JOIN installations i ON i.project_id = p_project AND i.installation_id = k.id
    ORDER BY i.installation_id
    FOR SHARE OF i
$$;

CREATE OR REPLACE FUNCTION identity_apply_profile_locks(p_project uuid, p_profile_ids uuid[])
RETURNS TABLE (profile_id uuid, live_profile_id uuid) LANGUAGE sql AS $$
    SELECT p.profile_id, coalesce(p.merged_into, p.profile_id)
    FROM (SELECT DISTINCT k.id FROM unnest(p_profile_ids) AS k(id)) k
    JOIN profiles p ON p.project_id = p_project AND p.profile_id = k.id
    ORDER BY p.profile_id
    FOR NO KEY UPDATE OF p
$$;

CREATE OR REPLACE FUNCTION identity_apply_profile_versions(p_project uuid, p_profile_ids uuid[])
RETURNS TABLE (profile_id uuid, version bigint) LANGUAGE sql AS $$
    WITH locked AS (
        SELECT l.profile_id
        FROM (SELECT DISTINCT k.id FROM unnest(p_profile_ids) AS k(id)) k
        JOIN profiles l ON l.project_id = p_project AND l.profile_id = k.id
        ORDER BY l.profile_id
        FOR NO KEY UPDATE OF l
    )
    UPDATE profiles p SET version = p.version + 1, update_time = now()
    FROM locked
    WHERE p.project_id = p_project AND p.profile_id = locked.profile_id
    RETURNING p.profile_id, p.version
$$;
