-- Rejected events name the profile their installation belonged to when they arrived. They were
-- tied to a profile only through the installation's current one, so after a logout (or an
-- identification moving the installation) a rejected event received while it was the
-- identified person's was exported with, and erased with, the anonymous profile the
-- installation moved to, and outlived the person's erasure, payload and all.
--
-- profile_id is read from identity's installation links when the row is stored; NULL for an
-- installation identity did not know yet (its first events all refused) and for rows stored
-- before this migration: those keep the old rule, by the installation's current profile. A
-- custom ID's rejected events go with the custom ID, as before. Merges move the rows to the
-- survivor like the events (hook below); splits leave them where they arrived.
ALTER TABLE rejected_events ADD COLUMN profile_id uuid;
CREATE INDEX rejected_events_by_profile ON rejected_events (project_id, profile_id)
    WHERE profile_id IS NOT NULL;

CREATE FUNCTION ingest_merge_rejected_events(p_project uuid, p_source uuid, p_target uuid)
RETURNS void LANGUAGE sql AS $$
    UPDATE rejected_events SET profile_id = p_target
    WHERE project_id = p_project AND profile_id = p_source
$$;

INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES
    ('merge', 'ingest', 'ingest_merge_rejected_events', 35);

-- 0016's erasure, the rejected events now by the profile they arrived for (else, for rows
-- without one, by the installation as before) and by custom ID.
CREATE OR REPLACE FUNCTION ingest_erase_profile_rows(
    p_project uuid, p_profile_ids uuid[], p_installation_ids text[], p_custom_ids text[]
) RETURNS void LANGUAGE sql AS $$
    DELETE FROM attribute_operations WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM profile_attributes WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM profile_event_counts WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM profile_subscriptions WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM sessions WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM installation_details
    WHERE project_id = p_project AND installation_id = ANY(p_installation_ids);
    DELETE FROM rejected_events
    WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM rejected_events
    WHERE project_id = p_project AND profile_id IS NULL
        AND installation_id = ANY(p_installation_ids);
    DELETE FROM rejected_events WHERE project_id = p_project AND custom_id = ANY(p_custom_ids);
$$;

-- The export's rejected events, by the same rule as the erasure.
DROP FUNCTION ingest_read_export_rejected_events(uuid, text[], text[]);
CREATE FUNCTION ingest_read_export_rejected_events(
    p_project uuid, p_profile_ids uuid[], p_installation_ids text[], p_custom_ids text[]
) RETURNS TABLE (event_id text, reason text, field_path text, receive_time timestamptz,
                 payload jsonb)
LANGUAGE sql STABLE AS $$
    SELECT r.event_id, r.reason, r.field_path, r.receive_time, r.payload FROM rejected_events r
    WHERE r.project_id = p_project
        AND (r.profile_id = ANY(p_profile_ids)
             OR (r.profile_id IS NULL AND r.installation_id = ANY(p_installation_ids))
             OR r.custom_id = ANY(p_custom_ids))
    ORDER BY r.receive_time, r.rejected_seq
$$;
