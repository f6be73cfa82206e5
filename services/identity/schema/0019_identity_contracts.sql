-- What ingest needs of identity's profiles and installations in its own transactions, published
-- by identity (docs/schema.md): read contracts, and the version bump's rule. Ingest no longer
-- names identity's tables. Functions, not views: the locks ingest needs are taken here, by the
-- owner, in one order.

-- READ CONTRACT (ingest): which profile each of the installations belongs to now, and whether
-- that profile is identified. Not locked: for decisions made before a write (a reintegration
-- merge's direction, which installation holds a push token).
CREATE FUNCTION identity_read_installation_profiles(p_project uuid, p_installation_ids text[])
RETURNS TABLE (installation_id text, profile_id uuid, identified boolean)
LANGUAGE sql STABLE AS $$
    SELECT i.installation_id, i.profile_id, p.custom_id IS NOT NULL
    FROM installations i
    JOIN profiles p ON p.project_id = i.project_id AND p.profile_id = i.profile_id
    WHERE i.project_id = p_project AND i.installation_id = ANY(p_installation_ids)
$$;

-- READ CONTRACT (ingest, storing an installation's events): the installations' current
-- profiles, each installation row locked FOR SHARE (installation_id order) until the caller's
-- transaction ends. Identity moves an installation FOR UPDATE, so events stored with these
-- profiles in the same transaction never land on a profile the installation already left: an
-- event racing a merge, Identify or Logout waits and gets the installation's profile as of that
-- commit. An installation not (or no longer) known returns no row.
CREATE FUNCTION identity_read_installation_links(p_project uuid, p_installation_ids text[])
RETURNS TABLE (installation_id text, profile_id uuid) LANGUAGE sql AS $$
    SELECT i.installation_id, i.profile_id FROM installations i
    WHERE i.project_id = p_project AND i.installation_id = ANY(p_installation_ids)
    ORDER BY i.installation_id
    FOR SHARE
$$;

-- Ingest's writes that change what a profile view shows raise the profile's version (read
-- contract in 0002_profiles.sql), so cached views can tell they are stale. First, before its
-- writes, ingest locks the profiles it will bump (FOR NO KEY UPDATE, profile_id order: two
-- batches for one profile queue instead of deadlocking, and apply their state one after the
-- other) and learns each one's live profile (a tombstone's survivor, one hop); then it bumps
-- their versions, which returns each one's new version.
CREATE FUNCTION identity_apply_profile_locks(p_project uuid, p_profile_ids uuid[])
RETURNS TABLE (profile_id uuid, live_profile_id uuid) LANGUAGE sql AS $$
    SELECT p.profile_id, coalesce(p.merged_into, p.profile_id) FROM profiles p
    WHERE p.project_id = p_project AND p.profile_id = ANY(p_profile_ids)
    ORDER BY p.profile_id
    FOR NO KEY UPDATE
$$;

CREATE FUNCTION identity_apply_profile_versions(p_project uuid, p_profile_ids uuid[])
RETURNS TABLE (profile_id uuid, version bigint) LANGUAGE sql AS $$
    WITH locked AS (
        SELECT l.profile_id FROM profiles l
        WHERE l.project_id = p_project AND l.profile_id = ANY(p_profile_ids)
        ORDER BY l.profile_id
        FOR NO KEY UPDATE
    )
    UPDATE profiles p SET version = p.version + 1, update_time = now()
    FROM locked
    WHERE p.project_id = p_project AND p.profile_id = locked.profile_id
    RETURNING p.profile_id, p.version
$$;
