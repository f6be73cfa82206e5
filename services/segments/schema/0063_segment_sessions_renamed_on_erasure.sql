-- An erasure that renamed another person's installation named by the erased custom ID (a
-- Countly device that switched user; identity and ingest since 0062) left that ID in clear in
-- segments' copy of the sessions: segment_sessions.session_key is 'i:', the installation ID, ':'
-- and the client session ID, and the sessions the other person had on the device kept the
-- erased custom ID there. No other segments column names an installation (states, memberships,
-- sizes and definitions name profiles and segments).
--
-- WRITE RULE (identity's DeleteProfile, in the erasure's transaction, beside its call of
-- ingest_apply_installation_rename): every session key of installation p_old_ids[i] names
-- p_new_ids[i] instead, its session ID kept, so the other person's session history (counts,
-- durations, the engagement score) stays whole. p_profile_ids are the profiles whose rows may
-- hold such keys: identity's holders of the installations, now and before, with their
-- tombstones and survivors (segments merges its rows when it handles ProfileMerged, so a row
-- can still be under a merged-away profile); the primary key leads with the profile, so each
-- is a probe of its own rows.
--
-- The new keys cannot collide: a new ID is random ('renamed:' and 32 hex digits), so no stored
-- key starts with it, and keys of one installation differ by their session IDs. The device
-- never sends under the new ID (it does not know it), so no later event looks for these rows;
-- a request under the old ID is refused during the quarantine (docs/identity.md). An event
-- handled by segments after the erasure but stored before it (still on the bus under the old
-- ID) starts a row under the old key again, as it would have before this rule.
--
-- A key is matched by its prefix ('i:', the old ID, ':'): installation and session IDs may
-- hold ':', so a key of another installation whose ID is the old one, ':' and more, held by the
-- same profiles, would be renamed too (its session counted again if that device sends more).
-- Custom-ID keys ('c:') are the erased profile's own, deleted by segments_erase_profile_rows.
CREATE FUNCTION segments_apply_installation_rename(
    p_project uuid, p_old_ids text[], p_new_ids text[], p_profile_ids uuid[]
) RETURNS void LANGUAGE sql AS $$
    UPDATE segment_sessions s
    SET session_key = 'i:' || r.new_id || ':'
        || substr(s.session_key, char_length('i:' || r.old_id || ':') + 1)
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE s.project_id = p_project AND s.profile_id = ANY(p_profile_ids)
        AND starts_with(s.session_key, 'i:' || r.old_id || ':')
$$;
