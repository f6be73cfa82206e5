-- The zone segments counts calendar days in is now what ingest's rule contract
-- ingest_read_profile_time_zone (0045) answers, read when segments handles a profile's events
-- or a merge, instead of segments' own rule (the latest time zone signal by event time, which
-- time_zone_time ordered). The stored zone is a copy of the rule's answer, so nothing orders
-- it any more.
ALTER TABLE segment_profiles DROP COLUMN time_zone_time;

-- A stored zone is refreshed at the profile's next event or merge (segments checks the rule's
-- answer against the names the suite accepts, shared/time_zones.py, before storing it); until
-- then it keeps the one the old rule chose.
