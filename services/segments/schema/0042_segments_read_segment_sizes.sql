-- GetOverview's contract promised every custom segment with its size (`segment_sizes`), and
-- query never filled it: it had no read contract of sizes. This is that contract.

-- Every custom segment of a project with its size, oldest first (create_seq): the sum of the
-- segment's counter shards kept by triggers on custom_segment_members (0007), as ListSegments
-- counts it; a few rows per segment whatever the number of profiles.
CREATE FUNCTION segments_read_custom_segment_sizes(p_project_id uuid)
RETURNS TABLE(segment_id uuid, display_name text, create_seq bigint, profile_count bigint)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT g.segment_id, g.display_name, g.create_seq,
           (SELECT coalesce(sum(z.member_count), 0) FROM custom_segment_sizes z
            WHERE z.project_id = g.project_id AND z.segment_id = g.segment_id)::bigint
    FROM custom_segments g
    WHERE g.project_id = p_project_id
    ORDER BY g.create_seq
$$;
