-- Segments' profile hooks (shared/schema: profile_hooks). Segments merges its own rows
-- when it handles ProfileMerged (so that it can announce who left and entered which segment in
-- the same transaction): it declares no merge hook. An erasure drops the profile's session
-- history at once; the stored states, memberships and the profile row stay until segments
-- handles ProfileDeleted, which announces the LEFT changes and keeps the erased ID so that
-- queued events are skipped.
CREATE FUNCTION segments_erase_profile_rows(
    p_project uuid, p_profile_ids uuid[], p_installation_ids text[], p_custom_ids text[]
) RETURNS void LANGUAGE sql AS $$
    DELETE FROM segment_sessions WHERE project_id = p_project AND profile_id = ANY(p_profile_ids)
$$;

INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES
    ('erase', 'segments', 'segments_erase_profile_rows', 10);

-- No-ops that only told identity's catalog search to leave these tables alone; undeclared
-- functions are never called now.
DROP FUNCTION profiles_merge_custom_segment_members(uuid, uuid, uuid);
DROP FUNCTION profiles_erase_custom_segment_members(uuid, uuid[]);
DROP FUNCTION profiles_merge_segment_profiles(uuid, uuid, uuid);
DROP FUNCTION profiles_merge_segment_sessions(uuid, uuid, uuid);
DROP FUNCTION profiles_merge_segment_states(uuid, uuid, uuid);
DROP FUNCTION profiles_erase_segment_profiles(uuid, uuid[]);
DROP FUNCTION profiles_erase_segment_states(uuid, uuid[]);
