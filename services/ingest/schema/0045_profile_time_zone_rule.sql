-- A profile's time zone, one rule for every reader: its `timezone` attribute as the replay left
-- it, else the time zone of its most recently seen installation that reported one (ties: the
-- smallest installation ID). Query restated it twice (the profile view's summary in Python,
-- the timeline's day counts in SQL) and segments kept a third rule of its own (the latest
-- signal by event time, attribute or installation), so an installation reporting a zone after
-- the attribute was set moved the days engagement counts in while GetProfile still showed the
-- attribute's zone. Now query reads this for both and segments stores what it answers each
-- time it handles a profile's events or a merge (docs/read-contracts.md).
--
-- A rule contract (arguments, inlined into the reader's statement): two probes, the attribute
-- by the primary key of profile_attributes and the profile's installations by identity's
-- (project, profile) index, each joined to its details by primary key.
CREATE FUNCTION ingest_read_profile_time_zone(p_project uuid, p_profile uuid)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(
        (SELECT a.value ->> 'value' FROM profile_attributes a
         WHERE a.project_id = p_project AND a.profile_id = p_profile AND a.native
           AND a.name = 'timezone' AND a.value IS NOT NULL),
        (SELECT d.timezone FROM identity_read_installations() i
         JOIN installation_details d
             ON d.project_id = i.project_id AND d.installation_id = i.installation_id
         WHERE i.project_id = p_project AND i.profile_id = p_profile AND d.timezone IS NOT NULL
         ORDER BY d.last_seen DESC NULLS LAST, i.installation_id
         LIMIT 1))
$$;
