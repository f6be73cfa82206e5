-- The attribute fold (0033) rewrites the operations it replayed by their address (`ctid`).
-- Planned while `attribute_operations` was young, that join became a hash join over a
-- sequential scan of the whole table, every project's operations, once a call (seen in
-- ingest's bench, issue 19: 4,142 rows read to rewrite 10), and PostgreSQL keeps a SQL
-- function's plan for the life of the connection while the table grows. With sequential scans
-- off for this function, the only way left to reach the rows is a TID probe per row rewritten
-- (its other statements already probe by primary key).
ALTER FUNCTION profiles_ingest_fold_attributes(uuid, uuid[], boolean[], text[], timestamptz[],
                                               text[], text[], smallint[])
    SET enable_seqscan = off;
