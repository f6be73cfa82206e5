-- The rejected events' read contract names the profile each arrived for (0047's profile_id),
-- for ListRejectedEvents' profile filter: an operator reading one profile sees which of that
-- person's events ingest refused. NULL where 0047 records none (an installation unknown when
-- it arrived, a custom ID's, rows older than 0047). The column goes last, so the others keep
-- their places; a function's result columns cannot change in place, hence DROP and CREATE.
DROP FUNCTION ingest_read_rejected_events();
-- Rejected events, for ListRejectedEvents (payload as sent, minus any client IP; NULL for
-- ERASED ones). rejected_seq orders them by arrival within a project.
CREATE FUNCTION ingest_read_rejected_events()
RETURNS TABLE (project_id uuid, rejected_seq bigint, receive_time timestamptz, reason text,
               field_path text, message text, event_id text, installation_id text,
               payload jsonb, profile_id uuid)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, rejected_seq, receive_time, reason, field_path, message, event_id,
           installation_id, payload, profile_id
    FROM rejected_events
$$;
