-- Identity's read contracts: what other services may read of identity's tables (query's views
-- and projection, segments' custom segment filters and funnel counts). A reader names the
-- contract, never the table, so identity may reshape its tables as long as these keep their
-- meaning (docs/read-contracts.md). Each is an SQL function without arguments returning a plain
-- projection of one table, read as `FROM identity_read_profiles() p`: the planner inlines it
-- like a view, so every index of the table serves the reader as before, but unlike a simple
-- view it cannot be written through, and it is not listed among the tables.
-- PARALLEL SAFE (they only read): the planner judges a query's parallel safety before it
-- inlines functions, and an undeclared function would keep every reader's query serial.

-- Every profile, live or merged away (an erased one has no row). A live profile has
-- merged_into NULL; a tombstone points at its survivor in one hop (merges flatten chains).
-- custom_id is set on identified live profiles only; `version` rises in every transaction that
-- changes what a profile view shows (read-your-writes).
CREATE FUNCTION identity_read_profiles()
RETURNS TABLE (project_id uuid, profile_id uuid, custom_id text, merged_into uuid,
               version bigint, create_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, profile_id, custom_id, merged_into, version, create_time
    FROM profiles
$$;

-- Which live profile each installation belongs to now (profile_id is never a tombstone), and
-- when identity first heard of it.
CREATE FUNCTION identity_read_installations()
RETURNS TABLE (project_id uuid, installation_id text, profile_id uuid, create_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, installation_id, profile_id, create_time
    FROM installations
$$;

-- Every merge ('merge') and split ('split') with its cause; source and target as in 0003
-- (merge: merged away -> survivor; split: the profile the installations left -> joined).
-- Rows are never updated and outlive the tombstones they name.
CREATE FUNCTION identity_read_identity_changes()
RETURNS TABLE (project_id uuid, change_id uuid, kind text, cause text, source_profile_id uuid,
               target_profile_id uuid, installation_ids text[], alias_custom_id text,
               change_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, change_id, kind, cause, source_profile_id, target_profile_id,
           installation_ids, alias_custom_id, change_time
    FROM identity_changes
$$;

-- Custom IDs of identified profiles an operator merged away: each still resolves to the
-- survivor (target_profile_id). A custom ID is here or on a live profile, never both.
CREATE FUNCTION identity_read_custom_id_aliases()
RETURNS TABLE (project_id uuid, custom_id text, target_profile_id uuid)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, custom_id, target_profile_id
    FROM custom_id_aliases
$$;
