-- Identity's per-batch contracts (0019, 0026) reach each key's row by a primary-key probe of
-- its own, whatever the statistics say. PostgreSQL keeps a SQL function's plan for the life of
-- the connection, and the estimate of `project_id = $1` is the table's rows over its projects:
-- planned while a project's tables were young (or for any project above the table's average),
-- 0026's join of the batch's keys to `profiles` or `installations` became a merge join over
-- every row of the project, sorted once a call (measured in ingest's bench, issue 19,
-- docs/benchmarks.md: 4 to 6 ms a batch at 5,000 profiles, for 50 keys as for 500, growing
-- with the project). Turning join methods off did not help: the planner then scanned the
-- project in key order and tested the batch against each row. A LATERAL subquery that locks
-- its row cannot be flattened into a join, so each key is looked up on its own, in the keys'
-- order: the same rows, the same lock order (the key's), the same meaning. And sequential
-- scans are off for these functions: analyzed while a table held a page or two, the planner
-- made each lookup a sequential scan (cheaper than an index on such a table) and kept that
-- plan as the table grew, one scan of the whole table per key
-- (tests/integration/test_contract_plans.py, "analyzed_young"); with them off, the primary key
-- with both columns is the cheapest path left.

-- What identity resolves installations to (its own read for every batch with installations
-- its cache does not know, and the read contract below): each installation's profile, link
-- version and whether the profile is identified. A prepared `installation_id = ANY($2)` kept,
-- from a table analyzed while it held 100 rows, a plan with a sequential scan per key: 313,100
-- rows read for 500 keys once the project held 3,100 (tests/integration/test_contract_plans.py).
CREATE FUNCTION identity_read_installation_resolutions(p_project uuid, p_installation_ids text[])
RETURNS TABLE (installation_id text, profile_id uuid, link_version bigint, identified boolean)
LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    SELECT i.installation_id, i.profile_id, i.link_version, p.identified
    FROM (SELECT DISTINCT k.id FROM unnest(p_installation_ids) AS k(id)) k
    -- OFFSET 0 keeps each subquery a probe of its own (not flattened into a join).
    CROSS JOIN LATERAL (
        SELECT i.installation_id, i.profile_id, i.link_version FROM installations i
        WHERE i.project_id = p_project AND i.installation_id = k.id
        OFFSET 0
    ) i
    LEFT JOIN LATERAL (
        SELECT p.custom_id IS NOT NULL AS identified FROM profiles p
        WHERE p.project_id = p_project AND p.profile_id = i.profile_id
        OFFSET 0
    ) p ON true
$$;

-- (plpgsql: in a schema file this function comes first, and its body names the one above.)
CREATE OR REPLACE FUNCTION identity_read_installation_profiles(p_project uuid,
                                                               p_installation_ids text[])
RETURNS TABLE (installation_id text, profile_id uuid, identified boolean)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT r.installation_id, r.profile_id, r.identified
    FROM identity_read_installation_resolutions(p_project, p_installation_ids) r;
END $$;

CREATE OR REPLACE FUNCTION identity_read_installation_links(p_project uuid,
                                                            p_installation_ids text[])
RETURNS TABLE (installation_id text, profile_id uuid) LANGUAGE sql
SET enable_seqscan = off AS $$
    SELECT i.installation_id, i.profile_id
    FROM (SELECT DISTINCT k.id FROM unnest(p_installation_ids) AS k(id) ORDER BY k.id) k
    CROSS JOIN LATERAL (
        SELECT i.installation_id, i.profile_id FROM installations i
        WHERE i.project_id = p_project AND i.installation_id = k.id
        FOR SHARE OF i
    ) i
    ORDER BY k.id
$$;

CREATE OR REPLACE FUNCTION identity_apply_profile_locks(p_project uuid, p_profile_ids uuid[])
RETURNS TABLE (profile_id uuid, live_profile_id uuid) LANGUAGE sql
SET enable_seqscan = off AS $$
    SELECT p.profile_id, coalesce(p.merged_into, p.profile_id)
    FROM (SELECT DISTINCT k.id FROM unnest(p_profile_ids) AS k(id) ORDER BY k.id) k
    CROSS JOIN LATERAL (
        SELECT p.profile_id, p.merged_into FROM profiles p
        WHERE p.project_id = p_project AND p.profile_id = k.id
        FOR NO KEY UPDATE OF p
    ) p
    ORDER BY k.id
$$;

-- The bump locks its rows with the function above (same order), then is written as an upsert
-- of the rows just locked: ON CONFLICT reaches each
-- row through the primary key (its arbiter), which an UPDATE joined to the locked rows does not
-- promise (its planner hashed the project's rows). The rows are locked by this transaction, so
-- each one conflicts: nothing is ever inserted. DO UPDATE updates the latest version of the
-- row, as the UPDATE did.
CREATE OR REPLACE FUNCTION identity_apply_profile_versions(p_project uuid, p_profile_ids uuid[])
RETURNS TABLE (profile_id uuid, version bigint) LANGUAGE sql
SET enable_seqscan = off AS $$
    WITH locked AS (
        SELECT l.profile_id FROM identity_apply_profile_locks(p_project, p_profile_ids) l
    )
    INSERT INTO profiles AS p (project_id, profile_id)
    SELECT p_project, locked.profile_id FROM locked ORDER BY locked.profile_id
    ON CONFLICT ON CONSTRAINT profiles_pkey DO UPDATE
        SET version = p.version + 1, update_time = now()
    RETURNING p.profile_id, p.version
$$;
