-- The installations people left before 0057, filled in. Since 0057, a split (Logout,
-- Identify's rule 4) keeps a copy of the installation's details with the profile it leaves
-- (ingest_apply_installation_left); a person who left their last device before 0057 was
-- applied has no such row, so they still show no language and no time zone, the users table
-- no device, and the overview counts them as of unknown language.
--
-- Each row is the one that departure would have left, computed from what is stored. The
-- departures are identity's splits (identity_read_identity_changes(), kind 'split': the
-- installations installation_ids left source_profile_id at change_time). A row belongs to the
-- source's live survivor (a tombstone points at it in one hop), where 0057's merge hook would
-- have moved it: of two departures of one installation landing on one profile, the later
-- departure's copy, then the later seen. An erased source (no profile row) leaves nothing. A
-- (profile, installation) that has a row keeps it: 0057 wrote it at a later departure (every
-- departure since 0057 writes one, and merges move them), so the statement run again changes
-- nothing, and reads no event when no row is missing.
--
-- The details are those installation_details held at the split: the fold of the
-- installation's events received by then (receive_time <= change_time; a batch received at
-- the split's moment was stored before it), on whatever profile they are stored now, by 0040's
-- and 0043's rules: each field (app_version, os_version, device_model, language, timezone) the
-- value of the latest installation update setting it (event time, then arrival), the platform
-- the latest event's on a device platform, else the latest API event's, first_seen and
-- last_seen the span of the events' times. An installation without an event by then had no
-- details and leaves nothing. One erased since (no details now) still has the events its
-- earlier holders keep, which are those of the moment they left it: their rows are written, as
-- 0057 keeps them through the erasure. An imported installation (ImportTokens; it has no
-- events) leaves its details as imported, unless it was folded into a device since
-- (reintegrated_into), which 0057 treats as history, not a device.
--
-- Not exact where the history is no longer there. Retention removed the oldest events: the
-- fold takes what is left (a field whose last update is gone falls back to an older one or
-- NULL, the span narrows, an installation with no event left leaves nothing). An erasure
-- removed the events stored on the erased profiles (a shared device's earlier holder), and
-- redacts a split whose other side it erases (identity keeps it without its installations:
-- the departure just before a device's erasure cannot be told). An installation erased and
-- then seen again under the same ID counts its earlier holders' events too. The split's time
-- and the events' receive times come from two services' clocks, so a batch racing the split
-- may be counted on the wrong side of it; two updates of one field at the same event time are
-- ordered by arrival (event_seq), not by which batch committed last.
--
-- One statement. The events have no index by installation (0036), so the installations of the
-- missing departures are read in one pass over the events, skipped (a one-time filter) when no
-- departure is missing.
INSERT INTO profile_former_installations AS f (project_id, profile_id, installation_id,
    leave_time, platform, app_version, os_version, device_model, language, timezone, imported,
    first_seen, last_seen)
WITH departed AS MATERIALIZED (
    SELECT c.project_id, c.change_id, s.survivor AS profile_id, i.installation_id,
           c.change_time AS leave_time
    FROM identity_read_identity_changes() c
    CROSS JOIN LATERAL unnest(c.installation_ids) AS i(installation_id)
    JOIN identity_read_profiles() p
        ON p.project_id = c.project_id AND p.profile_id = c.source_profile_id
    CROSS JOIN LATERAL (SELECT coalesce(p.merged_into, p.profile_id) AS survivor) s
    WHERE c.kind = 'split'
      AND NOT EXISTS (
          SELECT FROM profile_former_installations x
          WHERE x.project_id = c.project_id AND x.profile_id = s.survivor
            AND x.installation_id = i.installation_id)
),
-- Each departure's installation's events received by then (erasure markers aside: they keep
-- nothing of the event).
received AS (
    SELECT d.project_id, d.change_id, d.installation_id, e.event_time, e.event_seq, e.kind,
           e.platform, e.payload
    FROM events e
    JOIN departed d
        ON d.project_id = e.project_id AND d.installation_id = e.installation_id
       AND e.receive_time <= d.leave_time
    WHERE e.profile_id IS NOT NULL
      AND EXISTS (SELECT FROM departed)
),
-- The platform (a device platform over API, then the latest) and the span.
seen AS (
    SELECT DISTINCT ON (r.project_id, r.change_id, r.installation_id) r.project_id,
           r.change_id, r.installation_id, r.platform,
           min(r.event_time) OVER w AS first_seen, max(r.event_time) OVER w AS last_seen
    FROM received r
    WINDOW w AS (PARTITION BY r.project_id, r.change_id, r.installation_id)
    ORDER BY r.project_id, r.change_id, r.installation_id, r.platform = 4,
             r.event_time DESC, r.event_seq DESC
),
-- Each field from the latest installation update setting it.
latest AS (
    SELECT DISTINCT ON (r.project_id, r.change_id, r.installation_id, v.key) r.project_id,
           r.change_id, r.installation_id, v.key, v.value
    FROM received r
    CROSS JOIN LATERAL jsonb_each(r.payload) AS v
    WHERE r.kind = ingest_read_event_kind('installation_update')
      AND v.key IN ('app_version', 'os_version', 'device_model', 'language', 'timezone')
    ORDER BY r.project_id, r.change_id, r.installation_id, v.key, r.event_time DESC,
             r.event_seq DESC
),
fields AS (
    SELECT l.project_id, l.change_id, l.installation_id, jsonb_object_agg(l.key, l.value) AS v
    FROM latest l
    GROUP BY l.project_id, l.change_id, l.installation_id
),
copies AS (
    SELECT d.project_id, d.profile_id, d.installation_id, d.leave_time, s.platform,
           v.v->>'app_version' AS app_version, v.v->>'os_version' AS os_version,
           v.v->>'device_model' AS device_model, v.v->>'language' AS language,
           v.v->>'timezone' AS timezone, coalesce(i.imported, false) AS imported,
           s.first_seen, s.last_seen
    FROM departed d
    JOIN seen s USING (project_id, change_id, installation_id)
    LEFT JOIN fields v USING (project_id, change_id, installation_id)
    LEFT JOIN installation_details i
        ON i.project_id = d.project_id AND i.installation_id = d.installation_id
    WHERE i.reintegrated_into IS NULL
    UNION ALL
    SELECT d.project_id, d.profile_id, d.installation_id, d.leave_time, i.platform,
           i.app_version, i.os_version, i.device_model, i.language, i.timezone, i.imported,
           i.first_seen, i.last_seen
    FROM departed d
    JOIN installation_details i
        ON i.project_id = d.project_id AND i.installation_id = d.installation_id
    WHERE i.imported
)
SELECT DISTINCT ON (c.project_id, c.profile_id, c.installation_id) c.*
FROM copies c
ORDER BY c.project_id, c.profile_id, c.installation_id, c.leave_time DESC, c.last_seen DESC
ON CONFLICT (project_id, profile_id, installation_id) DO NOTHING;
