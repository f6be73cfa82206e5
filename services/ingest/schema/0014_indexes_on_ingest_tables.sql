-- Indexes on ingest's tables are ingest's, whoever reads through them: ingest pays for them on
-- every write and decides when a table's indexes change. Two were created by their readers'
-- migrations before the schema had owners; from here on they are ingest's (its schema.sql
-- lists them), and their comments say which read each one serves.
--
-- 0006 (query) created query_attributes_by_native_value on profile_attributes for GetProfile's
-- lookup by email or phone: renamed to ingest's naming. Renaming an index only changes the
-- catalog (no rebuild, a brief lock).
ALTER INDEX query_attributes_by_native_value RENAME TO profile_attributes_by_native_value;
COMMENT ON INDEX profile_attributes_by_native_value IS
    'A native attribute by value (emails lower-case, phones E.164): GetProfile''s lookup by '
    'email or phone (query) is a key lookup instead of a scan of the project''s attributes.';

-- 0009 (segments) created events_custom_by_name on events for funnel progress: the name is
-- already ingest's style, so only its purpose is recorded.
COMMENT ON INDEX events_custom_by_name IS
    'Custom events (kind 1) by profile, name and time: a funnel step''s occurrences in time '
    'order (segments'' funnel progress), index-only when the step has no condition.';
