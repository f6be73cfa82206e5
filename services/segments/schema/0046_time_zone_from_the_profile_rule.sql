-- The zone segments counts calendar days in is now what ingest's rule contract
-- ingest_read_profile_time_zone (0045) answers, read when segments handles a profile's events
-- or a merge, instead of segments' own rule (the latest time zone signal by event time, which
-- time_zone_time ordered). The stored zone is a copy of the rule's answer, so nothing orders
-- it any more.
ALTER TABLE segment_profiles DROP COLUMN time_zone_time;

-- Live profiles take the rule's answer now. Their stored smart segment states keep the days
-- counted in the old zone until their next event, merge or sweep reclassifies them, or a
-- recompute (RecomputeAll) does it at once.
UPDATE segment_profiles p
SET time_zone = ingest_read_profile_time_zone(p.project_id, p.profile_id)
WHERE p.merged_into IS NULL AND p.erase_time IS NULL
  AND p.time_zone IS DISTINCT FROM ingest_read_profile_time_zone(p.project_id, p.profile_id);
