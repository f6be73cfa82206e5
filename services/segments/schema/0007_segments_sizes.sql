-- Custom segment sizes read from the maintained membership instead of a live count over every
-- profile, and the smart segment thresholds each project's stored states were computed with.

-- How many custom_segment_members rows each segment has, so GetSegment and ListSegments read a
-- few rows instead of evaluating the filter over every live profile (about 2.5 s at a million
-- profiles). Kept by the triggers below in the transaction of every statement that writes the
-- members (events, merges, erasures, the evaluation sweep, creation, deletion), so a reader's
-- snapshot sees the members and their count together. The size of a segment is the sum over its
-- shards; a transaction adds to the shard segment_state_counts_shard() gives it (0005), which no
-- other open transaction uses, so writers of one segment never queue on one counter row.
-- This supersedes the last sentence of custom_segment_members' comment in 0005: the size is now
-- the count of these rows, exact as of the segment's last evaluation (see services/segments).
CREATE TABLE custom_segment_sizes (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    shard smallint NOT NULL,
    member_count bigint NOT NULL,
    PRIMARY KEY (project_id, segment_id, shard)
);

-- Statement-level over the transition tables, like segment_states_count (0005): one upsert per
-- statement and segment, in key order, the shard taken only when there is something to add.
CREATE FUNCTION custom_segment_members_count() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO custom_segment_sizes AS c (project_id, segment_id, shard, member_count)
        SELECT d.project_id, d.segment_id, (SELECT segment_state_counts_shard()), d.n
        FROM (SELECT project_id, segment_id, count(*) AS n
              FROM new_rows GROUP BY project_id, segment_id) d
        ORDER BY d.project_id, d.segment_id
        ON CONFLICT (project_id, segment_id, shard)
        DO UPDATE SET member_count = c.member_count + EXCLUDED.member_count;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO custom_segment_sizes AS c (project_id, segment_id, shard, member_count)
        SELECT d.project_id, d.segment_id, (SELECT segment_state_counts_shard()), d.n
        FROM (SELECT project_id, segment_id, sum(n) AS n
              FROM (SELECT project_id, segment_id, 1 AS n FROM new_rows
                    UNION ALL
                    SELECT project_id, segment_id, -1 FROM old_rows) x
              GROUP BY project_id, segment_id
              HAVING sum(n) <> 0) d
        ORDER BY d.project_id, d.segment_id
        ON CONFLICT (project_id, segment_id, shard)
        DO UPDATE SET member_count = c.member_count + EXCLUDED.member_count;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO custom_segment_sizes AS c (project_id, segment_id, shard, member_count)
        SELECT d.project_id, d.segment_id, (SELECT segment_state_counts_shard()), -d.n
        FROM (SELECT project_id, segment_id, count(*) AS n
              FROM old_rows GROUP BY project_id, segment_id) d
        ORDER BY d.project_id, d.segment_id
        ON CONFLICT (project_id, segment_id, shard)
        DO UPDATE SET member_count = c.member_count + EXCLUDED.member_count;
    ELSE  -- TRUNCATE
        DELETE FROM custom_segment_sizes;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER custom_segment_members_count_insert AFTER INSERT ON custom_segment_members
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION custom_segment_members_count();
CREATE TRIGGER custom_segment_members_count_update AFTER UPDATE ON custom_segment_members
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION custom_segment_members_count();
CREATE TRIGGER custom_segment_members_count_delete AFTER DELETE ON custom_segment_members
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION custom_segment_members_count();
CREATE TRIGGER custom_segment_members_count_truncate AFTER TRUNCATE ON custom_segment_members
    FOR EACH STATEMENT EXECUTE FUNCTION custom_segment_members_count();

-- The members stored before this migration (it runs in one transaction, and the triggers above
-- lock the table against writers until it commits, so none is counted twice or missed).
INSERT INTO custom_segment_sizes (project_id, segment_id, shard, member_count)
SELECT project_id, segment_id, 0, count(*) FROM custom_segment_members
GROUP BY project_id, segment_id;

COMMENT ON COLUMN custom_segments.evaluate_time IS
    'When the last complete evaluation of the segment by the sweep (or its creation) ended: its '
    'members then matched the filter as of this moment for every profile.';

-- The smart segment thresholds (the segments.* project settings that classification reads) the
-- project's stored segment_states were last recomputed with as a whole. Segments compares them
-- with the current settings periodically and recomputes the project when they differ, so a
-- settings change reaches the stored states (and the distribution, and custom segments reading
-- them) without an operator. No row: the defaults.
CREATE TABLE segment_thresholds_applied (
    project_id uuid NOT NULL,
    thresholds jsonb NOT NULL,
    apply_time timestamptz NOT NULL,
    PRIMARY KEY (project_id)
);
