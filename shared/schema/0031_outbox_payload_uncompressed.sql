-- An outbox row's payload is written once, read once by the relay and deleted: it is not kept,
-- so compressing it saves no storage worth its CPU. An ingest batch's EventsIngested is about
-- 100 kB, and pglz compressed it inside the outbox insert on every batch (issue 19's profile:
-- about 3% of PostgreSQL's CPU under the ingest bench, most of the outbox line's 2 ms a batch).
-- EXTERNAL keeps large payloads out of line, uncompressed. Rows already stored keep their form.
ALTER TABLE outbox ALTER COLUMN payload SET STORAGE EXTERNAL;
