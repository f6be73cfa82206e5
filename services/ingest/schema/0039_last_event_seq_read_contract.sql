-- The newest event_seq handed out, as a read contract: the bound a timeline's first page fixes
-- for its later pages (query's SELECT_TIMELINE_PAGE). Query read it as max(event_seq) of the
-- project's events, which on partitioned events is one index probe and three relations to open
-- and lock per partition (the primary key's, of every month, the DEFAULT partition and the months
-- ahead), on every first page: about a tenth of the statement's database time at the query
-- bench's size (4 partitions), and it grows with the months retention keeps. The sequence is
-- one relation whatever the partitions.
--
-- The two bounds admit the same events on later pages: events committed after the first page
-- had their numbers handed out after it, so they are above either bound, except those of a batch
-- already numbered but not yet committed when the first page was read. Under max(event_seq) such
-- a batch showed up on later pages when its numbers were below a committed one's; under the
-- sequence, always. Either way it is an event arriving during the paging, as it would on a
-- refreshed first page, and keyset paging still never repeats or skips one.

-- The identity sequence of events has the name PostgreSQL gave it when 0024 created the
-- partitioned table beside the old one (events_event_seq_seq1); named for what it is before the
-- contract names it.
DO $$
DECLARE
    current_name text := pg_get_serial_sequence('events', 'event_seq');
BEGIN
    IF current_name <> 'public.events_event_seq' THEN
        EXECUTE format('ALTER SEQUENCE %s RENAME TO events_event_seq', current_name);
    END IF;
END
$$;

-- The newest event_seq handed out in any project (0 before the first event): every event stored
-- after this was read has a larger one. A plain projection of the sequence, inlined like the
-- other contracts. Until the sequence hands out a number, last_value is the next one: 1 on a new
-- database, and the stored maximum plus one after 0024 restarted it beside the moved events.
CREATE FUNCTION ingest_read_last_event_seq()
RETURNS TABLE (last_event_seq bigint)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM events_event_seq
$$;
