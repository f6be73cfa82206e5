-- Query's profile hooks (shared/schema: profile_hooks). A merge leaves query_profiles
-- to query, which recounts both profiles on ProfileMerged (moving the source's facts onto the
-- survivor's key would count them twice): no merge hook. An erasure strips at once what names
-- the person (custom ID, names, device), keeping only the figures the counters are decreased
-- by when query recounts after ProfileDeleted.
CREATE FUNCTION query_erase_profile_rows(
    p_project uuid, p_profile_ids uuid[], p_installation_ids text[], p_custom_ids text[]
) RETURNS void LANGUAGE sql AS $$
    UPDATE query_profiles
    SET custom_id = NULL, first_name = NULL, last_name = NULL, device_model = NULL
    WHERE project_id = p_project AND profile_id = ANY(p_profile_ids)
$$;

INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES
    ('erase', 'query', 'query_erase_profile_rows', 10);

-- Replaced by the declared hook above (the merge one was a no-op for the catalog search).
DROP FUNCTION profiles_merge_query_profiles(uuid, uuid, uuid);
DROP FUNCTION profiles_erase_query_profiles(uuid, uuid[]);
