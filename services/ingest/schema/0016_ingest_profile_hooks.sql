-- Ingest's profile hooks (shared/schema: profile_hooks), and the functions identity's
-- erasure and export use instead of reading or writing ingest's tables.

-- Merge: the source's events and sessions move to the target with a plain UPDATE (their keys
-- do not include profile_id; the triggers of profile_event_counts count the moved events on
-- the target); attributes and consent by their replay rules (0010).
CREATE FUNCTION ingest_merge_events(p_project uuid, p_source uuid, p_target uuid)
RETURNS void LANGUAGE sql AS $$
    UPDATE events SET profile_id = p_target WHERE project_id = p_project AND profile_id = p_source
$$;

CREATE FUNCTION ingest_merge_sessions(p_project uuid, p_source uuid, p_target uuid)
RETURNS void LANGUAGE sql AS $$
    UPDATE sessions SET profile_id = p_target
    WHERE project_id = p_project AND profile_id = p_source
$$;

-- Erasure: every row of the erased profiles, their installations' details and the rejected
-- events of their installations and custom IDs. The events themselves are stripped first, by
-- ingest_apply_event_erasure (below), which identity calls with the markers it computes.
CREATE FUNCTION ingest_erase_profile_rows(
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
    WHERE project_id = p_project AND installation_id = ANY(p_installation_ids);
    DELETE FROM rejected_events WHERE project_id = p_project AND custom_id = ANY(p_custom_ids);
$$;

-- Run in this order (the order identity's generic statements ran in, by table name).
INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES
    ('merge', 'ingest', 'profiles_merge_attribute_operations', 10),
    ('merge', 'ingest', 'ingest_merge_events', 30),
    ('merge', 'ingest', 'profiles_merge_profile_attributes', 40),
    ('merge', 'ingest', 'profiles_merge_profile_subscriptions', 60),
    ('merge', 'ingest', 'ingest_merge_sessions', 90),
    ('erase', 'ingest', 'ingest_erase_profile_rows', 10);

-- Only there to be found by identity's catalog search, which the declared hooks replace: the
-- merge's event UPDATE already counts the moved events on the survivor.
DROP FUNCTION profiles_merge_profile_event_counts(uuid, uuid, uuid);

-- READ CONTRACT (identity's erasure): the custom IDs on the profiles' server-side events, which
-- identity replaces by keyed markers.
CREATE FUNCTION ingest_read_event_custom_ids(p_project uuid, p_profile_ids uuid[])
RETURNS TABLE (custom_id text) LANGUAGE sql STABLE AS $$
    SELECT DISTINCT e.custom_id FROM events e
    WHERE e.project_id = p_project AND e.profile_id = ANY(p_profile_ids) AND e.custom_id IS NOT NULL
$$;

-- Identity's erasure of the profiles' events; returns how many events were erased. Erased
-- events become bare dedupe markers: the origin (installation ID, or for a server-side event
-- the marker given for its custom ID: p_markers[i] for p_custom_ids[i]) and the event ID stay,
-- so an SDK retrying an old batch is answered DUPLICATE and stores nothing; everything else
-- goes. NOT NULL columns get neutral values: kind and platform 0 (EVENT_KIND_UNSPECIFIED,
-- PLATFORM_UNSPECIFIED), event_time the receive time (kept so markers can be pruned by age one
-- day). A custom ID erased before (quarantine over, then used and erased again) already left
-- markers with the same key: those events are simply dropped, the older marker keeps
-- deduplicating.
CREATE FUNCTION ingest_apply_event_erasure(
    p_project uuid, p_profile_ids uuid[], p_custom_ids text[], p_markers text[]
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    shadowed bigint;
    stripped bigint;
BEGIN
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
        custom_id = CASE WHEN e.custom_id IS NULL THEN NULL ELSE (
            SELECT m.marker FROM unnest(p_custom_ids, p_markers) AS m(custom_id, marker)
            WHERE m.custom_id = e.custom_id
        ) END,
        profile_id = NULL, kind = 0, name = NULL, event_time = e.receive_time,
        session_id = NULL, platform = 0, payload = NULL, imported = false
    WHERE e.project_id = p_project AND e.profile_id = ANY(p_profile_ids);
    GET DIAGNOSTICS stripped = ROW_COUNT;
    RETURN shadowed + stripped;
END $$;

-- READ CONTRACTS (identity's ExportProfile, read in one REPEATABLE READ snapshot): what ingest
-- keeps about one profile, as the export shows it. Plain SQL functions of one SELECT, so the
-- planner inlines them into identity's statements (and the events are streamed by a cursor,
-- never collected).

-- The span of the profile's event times (NULLs when it has none).
CREATE FUNCTION ingest_read_export_event_span(p_project uuid, p_profile uuid)
RETURNS TABLE (first_time timestamptz, last_time timestamptz) LANGUAGE sql STABLE AS $$
    SELECT min(e.event_time), max(e.event_time) FROM events e
    WHERE e.project_id = p_project AND e.profile_id = p_profile
$$;

-- Unset attributes keep a row (value NULL) so a late older set cannot revive them: not exported.
CREATE FUNCTION ingest_read_export_attributes(p_project uuid, p_profile uuid)
RETURNS TABLE (native boolean, name text, value jsonb, value_type text, update_time timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT a.native, a.name, a.value, a.value_type, a.update_time FROM profile_attributes a
    WHERE a.project_id = p_project AND a.profile_id = p_profile AND a.value IS NOT NULL
    ORDER BY a.native, a.name
$$;

CREATE FUNCTION ingest_read_export_subscriptions(p_project uuid, p_profile uuid)
RETURNS TABLE (channel text, kind text, subscribed boolean, change_time timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT s.channel, s.kind, s.subscribed, s.change_time FROM profile_subscriptions s
    WHERE s.project_id = p_project AND s.profile_id = p_profile
    ORDER BY s.channel, s.kind
$$;

-- An installation's details as one JSON object, so columns ingest adds later come along.
CREATE FUNCTION ingest_read_export_installation_details(p_project uuid, p_installation_id text)
RETURNS TABLE (details jsonb) LANGUAGE sql STABLE AS $$
    SELECT to_jsonb(d) FROM installation_details d
    WHERE d.project_id = p_project AND d.installation_id = p_installation_id
$$;

CREATE FUNCTION ingest_read_export_sessions(p_project uuid, p_profile uuid)
RETURNS TABLE (session_id text, installation_id text, platform smallint, country text,
               start_time timestamptz, end_time timestamptz, duration_seconds float8,
               event_count integer)
LANGUAGE sql STABLE AS $$
    SELECT s.session_id, s.installation_id, s.platform, s.country, s.start_time, s.end_time,
        extract(epoch FROM s.duration)::float8, s.event_count
    FROM sessions s
    WHERE s.project_id = p_project AND s.profile_id = p_profile
    ORDER BY s.start_time, s.installation_id, s.session_id
$$;

CREATE FUNCTION ingest_read_export_events(p_project uuid, p_profile uuid)
RETURNS TABLE (event_id text, installation_id text, custom_id text, platform smallint,
               kind smallint, session_id text, event_time timestamptz,
               receive_time timestamptz, payload jsonb)
LANGUAGE sql STABLE AS $$
    SELECT e.event_id, e.installation_id, e.custom_id, e.platform, e.kind, e.session_id,
        e.event_time, e.receive_time, e.payload
    FROM events e
    WHERE e.project_id = p_project AND e.profile_id = p_profile
    ORDER BY e.event_time, e.event_seq
$$;

-- Rejected events have no profile: those of the profile's installations and custom IDs.
CREATE FUNCTION ingest_read_export_rejected_events(
    p_project uuid, p_installation_ids text[], p_custom_ids text[]
) RETURNS TABLE (event_id text, reason text, field_path text, receive_time timestamptz,
                 payload jsonb)
LANGUAGE sql STABLE AS $$
    SELECT r.event_id, r.reason, r.field_path, r.receive_time, r.payload FROM rejected_events r
    WHERE r.project_id = p_project
        AND (r.installation_id = ANY(p_installation_ids) OR r.custom_id = ANY(p_custom_ids))
    ORDER BY r.receive_time, r.rejected_seq
$$;
