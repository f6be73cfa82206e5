-- Ingest's read contracts: what other services may read of ingest's tables (query's views and
-- projection, segments' custom segment filters and funnels). Each is a plain projection of one
-- table, so the planner inlines it and the table's indexes (events_by_profile_time,
-- events_custom_by_name, sessions_by_profile_time, the primary keys...) serve it as before; a
-- reader names the contract, never the table. Read-only by contract (docs/read-contracts.md).

-- Accepted events. kind and platform are the numbers of profiles.common.v1.EventKind and
-- Platform; name is the lower-case name of a custom event (kind 1); payload is the proto JSON
-- of the event's detail message, NULL (and profile_id NULL) only on the bare dedupe markers an
-- erasure leaves. event_seq orders events by arrival within a project. Never a push token or
-- an IP address.
CREATE VIEW ingest_read_events AS
    SELECT project_id, event_seq, event_id, installation_id, profile_id, kind, name, event_time,
           receive_time, session_id, platform, payload, imported
    FROM events;

-- Rejected events, for ListRejectedEvents (payload as sent, minus any client IP; NULL for
-- ERASED ones). rejected_seq orders them by arrival within a project.
CREATE VIEW ingest_read_rejected_events AS
    SELECT project_id, rejected_seq, receive_time, reason, field_path, message, event_id,
           installation_id, payload
    FROM rejected_events;

-- Per-profile event totals (0008): one row per profile with at least one event; crash_count
-- counts those of kind CRASH (8).
CREATE VIEW ingest_read_profile_event_counts AS
    SELECT project_id, profile_id, event_count, crash_count
    FROM profile_event_counts;

-- A profile's current native and custom attributes by event time. value is
-- {"type": ..., "value": ...} (value_type its type), NULL after an unset (the row stays as a
-- tombstone: readers skip value IS NULL); update_time is the latest event time applied.
CREATE VIEW ingest_read_profile_attributes AS
    SELECT project_id, profile_id, native, name, value, value_type, update_time
    FROM profile_attributes;

-- The latest explicit subscription change per channel and kind, by event time; no row: no
-- recorded change.
CREATE VIEW ingest_read_profile_subscriptions AS
    SELECT project_id, profile_id, channel, kind, subscribed, change_time
    FROM profile_subscriptions;

-- What ingest knows of an installation (platform number, app and OS versions, device,
-- language, time zone, first and last seen). The push token itself is not part of the
-- contract: push_token_present says whether one is stored. An imported installation folded
-- into the SDK installation that sent its token has reintegrated_into set: history, not an
-- installation to count.
CREATE VIEW ingest_read_installation_details AS
    SELECT project_id, installation_id, platform, app_version, os_version, device_model,
           push_token IS NOT NULL AS push_token_present, push_opt_in, language, timezone,
           uninstalled, first_seen, last_seen, imported, reintegrated_into
    FROM installation_details;

-- One row per session: `closed` whether it still counts as live (ended by its end event, or
-- closed by the idle sweep: ended false), duration the end's once ended, else the longest seen;
-- country ISO 3166-1 alpha-2 (never an IP).
CREATE VIEW ingest_read_sessions AS
    SELECT project_id, installation_id, session_id, profile_id, platform, country, start_time,
           last_activity_time, end_time, duration, event_count, started, ended, closed
    FROM sessions;
