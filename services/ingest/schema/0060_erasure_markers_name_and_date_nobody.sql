-- An erasure's markers kept more of the person than the contract lets remain (bare event IDs,
-- and a keyed hash of a custom ID). A marker of an installation's event kept the installation
-- ID in clear (a Countly device's ID is its user's custom ID once they log in, so that one
-- named the person outright), and every marker kept its receive time, copied into its event
-- time too: when the person used the device. Now a marker keeps its event ID and, for a
-- server-side event, the keyed marker of its custom ID (identity's, as before); nothing else
-- of the event.
--
-- Nothing reads a marker's installation ID: dedupe is event_keys (0024), a digest of the
-- origin and event ID computed from what a retry brings, never from the marker; the readers
-- of events take rows by profile (a marker has none), retention by time. A keyed hash would
-- keep which erased events came from one device, which no reader needs, so the column takes
-- one fixed value, 'erased:' (NULL would break events_check: one origin a row). The keyed
-- custom-ID markers stay: the erasure of a custom ID erased before finds its older markers by
-- them.
--
-- Times: a marker's event time and receive time become the erasure's time, which says nothing
-- of the person's use of a device. The event time is the partition key, so markers sit in the
-- erasure's month and retention, global or per project, removes them its period after the
-- erasure (the period runs from the erasure, no longer from the receipt). The erased events'
-- dedupe keys take the erasure's time too: a key's time is the only other copy of the receive
-- time, and a custom-ID marker's key is computed from the marker itself. Keys are pruned
-- EVENT_KEY_DAYS (35) after their time, so an erased event's retry stays a DUPLICATE until 35
-- days after the erasure (it was until 35 days after its receipt).
--
-- Identity passes the erasure's time (its clock, the DeleteProfile answer's delete_time), hence
-- a new argument: the old signature goes, so no caller can leave the old rule in place. (IF
-- EXISTS and OR REPLACE: the file runs again as it is, as its test runs it over old markers.)
DROP FUNCTION IF EXISTS ingest_apply_event_erasure(uuid, uuid[], text[], text[]);
-- Identity's erasure of the profiles' events; returns how many events were erased. Erased
-- events become bare dedupe markers: the event ID stays, and for a server-side event the
-- marker given for its custom ID (p_markers[i] for p_custom_ids[i]); an installation's event
-- keeps 'erased:' as its origin. Everything else goes. NOT NULL columns get neutral values:
-- kind and platform 0 (EVENT_KIND_UNSPECIFIED, PLATFORM_UNSPECIFIED), event time and receive
-- time the erasure's (p_erase_time), as do the events' dedupe keys: an installation's key here
-- (it stays the digest of the clear installation ID and event ID, so an SDK retrying an old
-- batch is answered DUPLICATE and stores nothing), a custom ID's by the events' trigger, which
-- replaces it by the marker's key (profiles_ingest_event_keys_follow). A custom ID erased
-- before (quarantine over, then used and erased again) already left markers with the same
-- key: those events are simply dropped, the older marker keeps deduplicating.
CREATE OR REPLACE FUNCTION ingest_apply_event_erasure(
    p_project uuid, p_profile_ids uuid[], p_custom_ids text[], p_markers text[],
    p_erase_time timestamptz
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    shadowed bigint;
    stripped bigint;
BEGIN
    UPDATE event_keys k SET receive_time = p_erase_time
    FROM events e
    WHERE e.project_id = p_project AND e.profile_id = ANY(p_profile_ids)
        AND e.installation_id IS NOT NULL
        AND k.project_id = p_project
        AND k.event_key = profiles_ingest_event_key(e.installation_id, NULL, e.event_id);
    DELETE FROM events e
    USING unnest(p_custom_ids, p_markers) AS m(custom_id, marker)
    WHERE e.project_id = p_project AND e.profile_id = ANY(p_profile_ids)
        AND e.custom_id = m.custom_id
        AND EXISTS (
            SELECT 1 FROM events o
            WHERE o.project_id = p_project AND o.custom_id = m.marker AND o.event_id = e.event_id
        );
    GET DIAGNOSTICS shadowed = ROW_COUNT;
    UPDATE events e SET
        installation_id = CASE WHEN e.installation_id IS NULL THEN NULL ELSE 'erased:' END,
        custom_id = CASE WHEN e.custom_id IS NULL THEN NULL ELSE (
            SELECT m.marker FROM unnest(p_custom_ids, p_markers) AS m(custom_id, marker)
            WHERE m.custom_id = e.custom_id
        ) END,
        profile_id = NULL, kind = ingest_read_event_kind('unspecified'), name = NULL,
        event_time = p_erase_time, receive_time = p_erase_time,
        session_id = NULL, platform = 0, payload = NULL, imported = false
    WHERE e.project_id = p_project AND e.profile_id = ANY(p_profile_ids);
    GET DIAGNOSTICS stripped = ROW_COUNT;
    RETURN shadowed + stripped;
END $$;

-- The markers erasures left before, rewritten to the rule above (set-based, once), with this
-- migration's time for the erasure's, which is not known: their keys' times first (a marker's
-- clear installation ID still computes its key), then the markers. Markers are the rows
-- without a profile: `profile_id IS NULL` is an index condition on events_by_profile_time, so
-- each statement reads that index, not every event. Their time only grows, so retention keeps
-- them longer than before, never shorter: at most its period after this migration.
UPDATE event_keys k SET receive_time = now()
FROM events e
WHERE e.profile_id IS NULL AND k.project_id = e.project_id
    AND k.event_key = profiles_ingest_event_key(e.installation_id, e.custom_id, e.event_id);
UPDATE events e SET
    installation_id = CASE WHEN e.installation_id IS NULL THEN NULL ELSE 'erased:' END,
    event_time = now(), receive_time = now()
WHERE e.profile_id IS NULL;

-- The export's rejected events with their message, which ListRejectedEvents shows and the
-- export left out although it may echo what the person sent (a name or key in quotes). The
-- column goes last, so the others keep their places; a function's result columns cannot change
-- in place, hence DROP and CREATE.
DROP FUNCTION ingest_read_export_rejected_events(uuid, uuid[], text[], text[]);
-- Rejected events have no profile: those of the profile's installations and custom IDs.
CREATE FUNCTION ingest_read_export_rejected_events(
    p_project uuid, p_profile_ids uuid[], p_installation_ids text[], p_custom_ids text[]
) RETURNS TABLE (event_id text, reason text, field_path text, receive_time timestamptz,
                 payload jsonb, message text)
LANGUAGE sql STABLE AS $$
    SELECT r.event_id, r.reason, r.field_path, r.receive_time, r.payload, r.message
    FROM rejected_events r
    WHERE r.project_id = p_project
        AND (r.profile_id = ANY(p_profile_ids)
             OR (r.profile_id IS NULL AND r.installation_id = ANY(p_installation_ids))
             OR r.custom_id = ANY(p_custom_ids))
    ORDER BY r.receive_time, r.rejected_seq
$$;
