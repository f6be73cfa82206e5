-- An erasure left the erased person's custom ID in clear where it was another person's
-- installation ID. A Countly device's ID is its user's custom ID once they log in; when that
-- device then switched to another user (a device ID change with merge from the first user's ID
-- to the second's, or a logout then a login of someone else under the same device ID), the
-- installation named by the first user's custom ID belongs to the second. Erasing the first
-- person removed their own installations, not that one: its ID stayed, in identity's
-- installations and history and here, on the second person's events, sessions, installation
-- details, former installations, last crash, attribute and consent origins, rejected events
-- and dedupe keys.
--
-- Identity now renames such an installation in the erasure's transaction (a new random ID:
-- nothing links it to the erased one) and has ingest rename its rows with this function, so
-- the other person keeps their history whole under the new ID. A later request under the old
-- ID is a new installation, refused during the custom ID's quarantine as any installation
-- named by an erased custom ID is (docs/identity.md, "The quarantine").

-- What the rename reads by installation ID: the rows of profiles that left the installation
-- (the primary key leads with the profile).
CREATE INDEX profile_former_installations_by_installation
    ON profile_former_installations (project_id, installation_id);

-- WRITE RULE (identity's DeleteProfile, in the erasure's transaction, after it locked the
-- installations FOR UPDATE under their old IDs and deleted the erased profiles' rows through
-- the erase hooks): every row that names installation p_old_ids[i] names p_new_ids[i]
-- instead. p_profile_ids are the live profiles whose rows may name them (identity's holders
-- of the installations, now and before, with their survivors): events, attribute and consent
-- origins and last crashes are read by profile, as their indexes are; installation details,
-- sessions, former installations and rejected events by installation ID. An imported
-- installation folded into one of them (reintegrated_into) is one of the holders'
-- installations (the reintegration merged it in).
--
-- The events' dedupe keys are digests of the clear installation ID and the event ID: each
-- key moves to the new ID's digest first (computed from the events under their old ID), so
-- nothing computed from the erased ID stays, and a retry under the new ID would still be a
-- DUPLICATE. (A retry under the old ID is refused during the quarantine, stored as a bare
-- ERASED row.) The events' own triggers have nothing to do: the profile, kind and time of no
-- event change, and a profile's last crash keeps its row, renamed below.
--
-- Origins ('i:' and the installation ID) order attribute operations and consent changes of
-- one event time and event ID; renaming one could reorder two such ties from different
-- installations with the same event ID, which one device's SDK never sends twice.
CREATE FUNCTION ingest_apply_installation_rename(
    p_project uuid, p_old_ids text[], p_new_ids text[], p_profile_ids uuid[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE event_keys k SET event_key = profiles_ingest_event_key(r.new_id, NULL, e.event_id)
    FROM events e
    JOIN unnest(p_old_ids, p_new_ids) AS r(old_id, new_id) ON e.installation_id = r.old_id
    WHERE e.project_id = p_project AND e.profile_id = ANY(p_profile_ids)
        AND k.project_id = p_project
        AND k.event_key = profiles_ingest_event_key(r.old_id, NULL, e.event_id);
    UPDATE events e SET installation_id = r.new_id
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE e.project_id = p_project AND e.profile_id = ANY(p_profile_ids)
        AND e.installation_id = r.old_id;
    UPDATE attribute_operations a SET origin = 'i:' || r.new_id
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE a.project_id = p_project AND a.profile_id = ANY(p_profile_ids)
        AND a.origin = 'i:' || r.old_id;
    UPDATE profile_subscriptions s SET change_origin = 'i:' || r.new_id
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE s.project_id = p_project AND s.profile_id = ANY(p_profile_ids)
        AND s.change_origin = 'i:' || r.old_id;
    UPDATE profile_last_crashes c SET installation_id = r.new_id
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE c.project_id = p_project AND c.profile_id = ANY(p_profile_ids)
        AND c.installation_id = r.old_id;
    UPDATE sessions s SET installation_id = r.new_id
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE s.project_id = p_project AND s.installation_id = r.old_id;
    UPDATE installation_details d SET installation_id = r.new_id
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE d.project_id = p_project AND d.installation_id = r.old_id;
    UPDATE installation_details d SET reintegrated_into = r.new_id
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id), identity_read_installations() i
    WHERE i.project_id = p_project AND i.profile_id = ANY(p_profile_ids)
        AND d.project_id = p_project AND d.installation_id = i.installation_id
        AND d.reintegrated_into = r.old_id;
    UPDATE profile_former_installations f SET installation_id = r.new_id
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE f.project_id = p_project AND f.installation_id = r.old_id;
    -- A rejected event's payload is the event as sent, its installation ID included.
    UPDATE rejected_events x SET installation_id = r.new_id,
        payload = CASE WHEN x.payload ->> 'installation_id' = r.old_id
                       THEN jsonb_set(x.payload, '{installation_id}', to_jsonb(r.new_id))
                       ELSE x.payload END
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE x.project_id = p_project AND x.installation_id = r.old_id;
END $$;
