-- Identity's version bump (0034) upserted the rows it had just locked, so that ON CONFLICT
-- reached each by the primary key; every row conflicted, and each paid a speculative insertion's
-- index probe besides the update's. It is now an UPDATE of exactly the locked keys, as an array
-- (`profile_id = ANY`), which can only be planned as probes of the primary key with sequential
-- scans off: no join for a kept plan to turn into a scan of the project. The locks are still
-- taken first, in profile_id order, by identity_apply_profile_locks (the array's subquery runs
-- before the UPDATE reads a row), and only rows that exist are locked, so nothing is created.
CREATE OR REPLACE FUNCTION identity_apply_profile_versions(p_project uuid, p_profile_ids uuid[])
RETURNS TABLE (profile_id uuid, version bigint) LANGUAGE sql
SET enable_seqscan = off AS $$
    UPDATE profiles p SET version = p.version + 1, update_time = now()
    WHERE p.project_id = p_project
        AND p.profile_id = ANY (ARRAY(
            SELECT l.profile_id FROM identity_apply_profile_locks(p_project, p_profile_ids) l))
    RETURNING p.profile_id, p.version
$$;
