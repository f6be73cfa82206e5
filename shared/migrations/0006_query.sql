-- Query's read support. Query owns no data yet: it reads identity's, ingest's and segments'
-- tables through their read contracts. This index on ingest's profile_attributes changes no
-- row and no rule; it only makes GetProfile's lookup by email or phone (a native attribute
-- value: emails are stored lower-case, phones in E.164) a key lookup instead of a scan of the
-- project's attributes.
CREATE INDEX query_attributes_by_native_value
    ON profile_attributes (project_id, name, (value ->> 'value'))
    WHERE native;
