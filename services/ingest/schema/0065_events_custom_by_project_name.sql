-- Query's ListEventNames lists a project's custom event names in name order, each with how many
-- stored events carry it and the latest event time among them. No index served it: the custom
-- events' index leads with the profile (events_custom_by_name: project, profile, name, time),
-- so the project's names were only found by reading every custom event of the project and
-- sorting them (a hash of all of them, whatever the page asked for).
--
-- events_custom_by_project_name holds each custom event's name and time by project: a page of
-- names is a walk of the index in name order (merged across the month partitions), grouped,
-- that stops at the page's last name; counts and latest times come from the index alone
-- (index-only: name, time and project are its columns, the kind is its predicate). The cost is
-- the events of the names a page lists, not the project's other events: a page whose names
-- carry a million events still reads a million index entries (68,000 entries were 743 buffers
-- and 32 ms on 2 cores, docs/query.md). A kept aggregate per name would read one row per name; it is
-- not here because it would be a row every batch of a common name updates (one lock for all of
-- ingest's writers of that name), and retention and erasures would have to keep it exact.
--
-- The name is compared in code point order (COLLATE "C"), whatever the database's locale: a
-- prefix is one range of the index ('ab' to 'ab' || U+007F: names are ASCII letters, digits
-- and underscores), where a locale's order may weigh the underscore after the letters and
-- break the range. Readers write `name COLLATE "C"` so that the index serves them.
--
-- Ingest pays one more index entry per custom event it stores (project, a name of at most 30
-- bytes, a time). Only custom events (kind = 1, EventKind EVENT_KIND_CUSTOM: a literal, as
-- for events_custom_by_name) are in it; erasure markers (kind 0) never are.
--
-- Creating the index holds a write lock on events for the time it takes (this migration runs
-- in a transaction, so not CONCURRENTLY); on a large existing table, create it CONCURRENTLY on
-- each partition by hand first under this name and the IF NOT EXISTS below skips it.
CREATE INDEX IF NOT EXISTS events_custom_by_project_name
    ON events (project_id, name COLLATE "C", event_time) WHERE kind = 1;
COMMENT ON INDEX events_custom_by_project_name IS
    'Custom events (kind 1) by project, name (code point order) and time: query''s '
    'ListEventNames, a page of names with their counts and latest times, index-only.';
