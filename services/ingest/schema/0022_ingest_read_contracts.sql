-- Ingest's read contracts: what other services may read of ingest's tables (query's views and
-- projection, segments' custom segment filters and funnels). A reader names the contract, never
-- the table (docs/read-contracts.md). Each is an SQL function without arguments returning a
-- plain projection of one table, read as `FROM ingest_read_events() e`: the planner inlines it
-- like a view, so the table's indexes (events_by_profile_time, events_custom_by_name,
-- sessions_by_profile_time, the primary keys...) serve the reader as before, but unlike a
-- simple view it cannot be written through, and it is not listed among the tables.
-- PARALLEL SAFE (they only read): the planner judges a query's parallel safety before it
-- inlines functions, and an undeclared function would keep every reader's query serial.

-- Accepted events. kind and platform are the numbers of profiles.common.v1.EventKind and
-- Platform; name is the lower-case name of a custom event (kind 1); payload is the proto JSON
-- of the event's detail message, NULL (and profile_id NULL) only on the bare dedupe markers an
-- erasure leaves. event_seq orders events by arrival within a project. Never a push token or
-- an IP address.
CREATE FUNCTION ingest_read_events()
RETURNS TABLE (project_id uuid, event_seq bigint, event_id text, installation_id text,
               profile_id uuid, kind smallint, name text, event_time timestamptz,
               receive_time timestamptz, session_id text, platform smallint, payload jsonb,
               imported boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, event_seq, event_id, installation_id, profile_id, kind, name, event_time,
           receive_time, session_id, platform, payload, imported
    FROM events
$$;

-- Rejected events, for ListRejectedEvents (payload as sent, minus any client IP; NULL for
-- ERASED ones). rejected_seq orders them by arrival within a project.
CREATE FUNCTION ingest_read_rejected_events()
RETURNS TABLE (project_id uuid, rejected_seq bigint, receive_time timestamptz, reason text,
               field_path text, message text, event_id text, installation_id text,
               payload jsonb)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, rejected_seq, receive_time, reason, field_path, message, event_id,
           installation_id, payload
    FROM rejected_events
$$;

-- Per-profile event totals (0008): one row per profile with at least one event; crash_count
-- counts those of kind CRASH (8).
CREATE FUNCTION ingest_read_profile_event_counts()
RETURNS TABLE (project_id uuid, profile_id uuid, event_count bigint, crash_count bigint)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, profile_id, event_count, crash_count
    FROM profile_event_counts
$$;

-- A profile's current native and custom attributes by event time. value is
-- {"type": ..., "value": ...} (value_type its type), NULL after an unset (the row stays as a
-- tombstone: readers skip value IS NULL); update_time is the latest event time applied.
CREATE FUNCTION ingest_read_profile_attributes()
RETURNS TABLE (project_id uuid, profile_id uuid, native boolean, name text, value jsonb,
               value_type text, update_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, profile_id, native, name, value, value_type, update_time
    FROM profile_attributes
$$;

-- The latest explicit subscription change per channel and kind, by event time; no row: no
-- recorded change.
CREATE FUNCTION ingest_read_profile_subscriptions()
RETURNS TABLE (project_id uuid, profile_id uuid, channel text, kind text, subscribed boolean,
               change_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, profile_id, channel, kind, subscribed, change_time
    FROM profile_subscriptions
$$;

-- What ingest knows of an installation (platform number, app and OS versions, device,
-- language, time zone, first and last seen). The push token itself is not part of the
-- contract: push_token_present says whether one is stored. An imported installation folded
-- into the SDK installation that sent its token has reintegrated_into set: history, not an
-- installation to count.
CREATE FUNCTION ingest_read_installation_details()
RETURNS TABLE (project_id uuid, installation_id text, platform smallint, app_version text,
               os_version text, device_model text, push_token_present boolean,
               push_opt_in boolean, language text, timezone text, uninstalled boolean,
               first_seen timestamptz, last_seen timestamptz, imported boolean,
               reintegrated_into text)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, installation_id, platform, app_version, os_version, device_model,
           push_token IS NOT NULL AS push_token_present, push_opt_in, language, timezone,
           uninstalled, first_seen, last_seen, imported, reintegrated_into
    FROM installation_details
$$;

-- One row per session: `closed` whether it still counts as live (ended by its end event, or
-- closed by the idle sweep: ended false), duration the end's once ended, else the longest seen;
-- country ISO 3166-1 alpha-2 (never an IP).
CREATE FUNCTION ingest_read_sessions()
RETURNS TABLE (project_id uuid, installation_id text, session_id text, profile_id uuid,
               platform smallint, country text, start_time timestamptz,
               last_activity_time timestamptz, end_time timestamptz, duration interval,
               event_count integer, started boolean, ended boolean, closed boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, installation_id, session_id, profile_id, platform, country, start_time,
           last_activity_time, end_time, duration, event_count, started, ended, closed
    FROM sessions
$$;
