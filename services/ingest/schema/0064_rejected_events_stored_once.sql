-- A retried batch stored its rejected events again on every attempt: the good events of a
-- retry are duplicates (event_keys, 0024), but each attempt added one rejected_events row per
-- refused event, differing only in receive_time (and 180 rows for 11 refused event IDs under
-- concurrent retries). SDKs retry whole batches (a lost answer, a timeout, an UNAVAILABLE), so
-- ListRejectedEvents and its reason counts grew with every retry. rejected_events is
-- partitioned by receive time, and a unique index must hold the partition key: it cannot
-- catch a retry, which arrives later.
--
-- A rejected row now has an identity: its project, its origin as stored (installation ID or
-- custom ID; none on a bare row), its event ID, its reason and its field path. A retry of
-- the same event refused for the same rule at the same place is the same rejection, stored
-- once; one refused otherwise (a reason or a field that differs: the attribute limit reached
-- since, an erasure since, identity unavailable, which keeps the row bare) is another fact and
-- another row. The message is left out: some say how far a time is from the receive time, so
-- a retry words the same refusal differently. The origin is in: event IDs are unique per
-- origin only (two devices may both send "1"), as for the events. A row without an event ID
-- has no identity and is stored per attempt, as before.
--
-- Its dedupe key lives in event_keys, beside the events' (the prefix 'r' keeps the digests
-- apart: an event's key starts with 'i' or 'c'): the batch claims the keys with
-- ON CONFLICT DO NOTHING RETURNING and stores only the rows whose key it claimed, in the same
-- statement and transaction (a concurrent retry waits on the key, then claims nothing). The
-- same table gives the keys the events' rule for free: pruned 35 days after receipt by the
-- maintenance round, never an ID in clear (an MD5 digest), 16 bytes and a BRIN entry each.
-- Only batches with rejected events pay (one digest and one key per refused event).
CREATE FUNCTION profiles_ingest_rejected_key(
    installation_id text, custom_id text, event_id text, reason text, field_path text
) RETURNS uuid LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN event_id <> '' THEN
        md5('r' || length(coalesce(installation_id, ''))::text || ':'
            || coalesce(installation_id, '')
            || length(coalesce(custom_id, ''))::text || ':' || coalesce(custom_id, '')
            || length(reason)::text || ':' || reason
            || length(field_path)::text || ':' || field_path
            || event_id)::uuid
    END
$$;

-- 0047's erasure (the rejected events by the profile they arrived for, else, for rows without
-- one, by the installation, and by custom ID), their dedupe keys now deleted with them: a
-- custom ID's key is a digest of the erased custom ID (identity.md: none is kept, an event's is
-- replaced by its marker's) and every key keeps the time the person sent the event (0060). A
-- retry after the erasure under the erased custom ID (or an installation named by it) is
-- refused ERASED and kept bare during the quarantine; under one of the erased person's own
-- installations it starts a new anonymous profile, whose refused events are then stored
-- again, as before 0064. PL/pgSQL, not SQL: its body names profiles_ingest_rejected_key, which
-- the schema file creates after it (functions apply in creation order), and a SQL function's
-- body is checked when it is created.
CREATE OR REPLACE FUNCTION ingest_erase_profile_rows(
    p_project uuid, p_profile_ids uuid[], p_installation_ids text[], p_custom_ids text[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM attribute_operations WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM profile_attributes WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM profile_event_counts WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM profile_subscriptions WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM sessions WHERE project_id = p_project AND profile_id = ANY(p_profile_ids);
    DELETE FROM installation_details
    WHERE project_id = p_project AND installation_id = ANY(p_installation_ids);
    WITH gone AS (
        DELETE FROM rejected_events
        WHERE project_id = p_project AND profile_id = ANY(p_profile_ids)
        RETURNING installation_id, custom_id, event_id, reason, field_path
    )
    DELETE FROM event_keys k USING gone g
    WHERE k.project_id = p_project
        AND k.event_key = profiles_ingest_rejected_key(g.installation_id, g.custom_id,
                                                       g.event_id, g.reason, g.field_path);
    WITH gone AS (
        DELETE FROM rejected_events
        WHERE project_id = p_project AND profile_id IS NULL
            AND installation_id = ANY(p_installation_ids)
        RETURNING installation_id, custom_id, event_id, reason, field_path
    )
    DELETE FROM event_keys k USING gone g
    WHERE k.project_id = p_project
        AND k.event_key = profiles_ingest_rejected_key(g.installation_id, g.custom_id,
                                                       g.event_id, g.reason, g.field_path);
    WITH gone AS (
        DELETE FROM rejected_events WHERE project_id = p_project AND custom_id = ANY(p_custom_ids)
        RETURNING installation_id, custom_id, event_id, reason, field_path
    )
    DELETE FROM event_keys k USING gone g
    WHERE k.project_id = p_project
        AND k.event_key = profiles_ingest_rejected_key(g.installation_id, g.custom_id,
                                                       g.event_id, g.reason, g.field_path);
END $$;

-- 0062's rename, the rejected events' dedupe keys renamed too.
--
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
-- ERASED row.) The rejected events' keys (0064) move the same way, computed from the rejected
-- rows under their old ID. The events' own triggers have nothing to do: the profile, kind and
-- time of no event change, and a profile's last crash keeps its row, renamed below.
--
-- Origins ('i:' and the installation ID) order attribute operations and consent changes of
-- one event time and event ID; renaming one could reorder two such ties from different
-- installations with the same event ID, which one device's SDK never sends twice.
CREATE OR REPLACE FUNCTION ingest_apply_installation_rename(
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
    UPDATE event_keys k
    SET event_key = profiles_ingest_rejected_key(r.new_id, x.custom_id, x.event_id, x.reason,
                                                 x.field_path)
    FROM rejected_events x
    JOIN unnest(p_old_ids, p_new_ids) AS r(old_id, new_id) ON x.installation_id = r.old_id
    WHERE x.project_id = p_project AND x.event_id <> ''
        AND k.project_id = p_project
        AND k.event_key = profiles_ingest_rejected_key(r.old_id, x.custom_id, x.event_id,
                                                       x.reason, x.field_path);
    -- A rejected event's payload is the event as sent, its installation ID included.
    UPDATE rejected_events x SET installation_id = r.new_id,
        payload = CASE WHEN x.payload ->> 'installation_id' = r.old_id
                       THEN jsonb_set(x.payload, '{installation_id}', to_jsonb(r.new_id))
                       ELSE x.payload END
    FROM unnest(p_old_ids, p_new_ids) AS r(old_id, new_id)
    WHERE x.project_id = p_project AND x.installation_id = r.old_id;
END $$;
