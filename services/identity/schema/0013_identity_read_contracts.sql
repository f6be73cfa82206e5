-- Identity's read contracts: what other services may read of identity's tables (query's views
-- and projection, segments' custom segment filters and funnel counts). Each is a plain
-- projection of one table, so the planner inlines it and every index of the table serves it as
-- before; a reader names the contract, never the table, so identity may reshape its tables as
-- long as these keep their meaning. Read-only by contract (docs/read-contracts.md).

-- Every profile, live or merged away (an erased one has no row). A live profile has
-- merged_into NULL; a tombstone points at its survivor in one hop (merges flatten chains).
-- custom_id is set on identified live profiles only; `version` rises in every transaction that
-- changes what a profile view shows (read-your-writes).
CREATE VIEW identity_read_profiles AS
    SELECT project_id, profile_id, custom_id, merged_into, version, create_time
    FROM profiles;

-- Which live profile each installation belongs to now (profile_id is never a tombstone), and
-- when identity first heard of it.
CREATE VIEW identity_read_installations AS
    SELECT project_id, installation_id, profile_id, create_time
    FROM installations;

-- Every merge ('merge') and split ('split') with its cause; source and target as in 0003
-- (merge: merged away -> survivor; split: the profile the installations left -> joined).
-- Rows are never updated and outlive the tombstones they name.
CREATE VIEW identity_read_identity_changes AS
    SELECT project_id, change_id, kind, cause, source_profile_id, target_profile_id,
           installation_ids, alias_custom_id, change_time
    FROM identity_changes;

-- Custom IDs of identified profiles an operator merged away: each still resolves to the
-- survivor (target_profile_id). A custom ID is here or on a live profile, never both.
CREATE VIEW identity_read_custom_id_aliases AS
    SELECT project_id, custom_id, target_profile_id
    FROM custom_id_aliases;
