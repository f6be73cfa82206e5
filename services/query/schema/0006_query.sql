-- Query's read support and its own projection.
--
-- This index on ingest's profile_attributes changes no row and no rule; it only makes
-- GetProfile's lookup by email or phone (a native attribute value: emails are stored
-- lower-case, phones in E.164) a key lookup instead of a scan of the project's attributes.
CREATE INDEX query_attributes_by_native_value
    ON profile_attributes (project_id, name, (value ->> 'value'))
    WHERE native;

-- Query's projection, fed by the bus (consumer group `query` on the events and identity
-- streams) and written by query only. Each message names the profiles and installations it
-- touched; query recounts each of them from the source tables (identity's, ingest's) in one
-- short transaction and moves the counters by the difference between the stored facts and the
-- recounted ones. A recount is exact whatever happened before, so a redelivered or replayed
-- message changes nothing, and a late one only repeats an exact recount.

-- One row per live profile: the facts the overview counts and the columns of the users table
-- (ListProfiles). A merged-away or erased profile has no row. platforms holds the platforms of
-- its installations (uninstalled ones included): the overview on one platform counts profiles
-- with an installation of it. subscribed lists 'channel:kind' pairs subscribed now.
CREATE TABLE query_profiles (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    identified boolean NOT NULL,
    custom_id text,
    has_email boolean NOT NULL,
    has_phone boolean NOT NULL,
    has_token boolean NOT NULL,
    push_reachable boolean NOT NULL,
    subscribed text[] NOT NULL,
    language text,
    region text,
    country text,
    platforms smallint[] NOT NULL,
    first_name text,
    last_name text,
    has_details boolean NOT NULL,
    device_model text,
    device_platform smallint NOT NULL,
    last_seen timestamptz,
    session_count bigint NOT NULL,
    time_spent_ms bigint NOT NULL,
    update_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, profile_id)
);
-- The users table's sort orders: keyset paging on (value, profile_id) in both directions; a
-- profile never seen sorts last (NULLS LAST both ways is what the keyset encodes).
CREATE INDEX query_profiles_by_last_seen ON query_profiles (project_id, last_seen, profile_id);
CREATE INDEX query_profiles_by_sessions ON query_profiles (project_id, session_count, profile_id);
CREATE INDEX query_profiles_by_time_spent ON query_profiles (project_id, time_spent_ms, profile_id);

-- One row per installation known to identity: what the installation figures count. The key
-- is the installation ID, in a column named otherwise on purpose: identity's erasure deletes
-- rows by `installation_id` in every table, which would lose the facts the counters must be
-- decreased by; query deletes the row itself when it recounts after ProfileDeleted (within the
-- bus lag), and the row holds nothing about the person (platform, version, flags).
-- platform 0: never seen by ingest (no details yet). imported: an imported push token no SDK
-- has sent yet.
CREATE TABLE query_installations (
    project_id uuid NOT NULL,
    installation_key text NOT NULL,
    platform smallint NOT NULL,
    app_version text,
    uninstalled boolean NOT NULL,
    has_token boolean NOT NULL,
    push_opt_in boolean NOT NULL,
    imported boolean NOT NULL,
    PRIMARY KEY (project_id, installation_key)
);

-- The overview's counters: per project, platform (0: all) and metric, a count per value ('' for
-- metrics without values). GetOverview reads one project's and platform's rows: their number
-- depends on the distinct languages, countries, app versions..., never on the user base.
CREATE TABLE query_counters (
    project_id uuid NOT NULL,
    platform smallint NOT NULL,
    metric text NOT NULL,
    value text NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (project_id, platform, metric, value)
);

-- Identity's merge and erasure leave query_profiles to query (see services/identity,
-- discover_profile_tables): a merge must not move the source's facts onto the survivor's key,
-- and an erasure must not drop the facts the counters are decreased by. Query recounts both
-- profiles on ProfileMerged and ProfileDeleted. Until then the erasure strips what names the
-- person (custom ID, names, device), keeping only the figures the counters hold.
CREATE FUNCTION profiles_merge_query_profiles(uuid, uuid, uuid) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;
CREATE FUNCTION profiles_erase_query_profiles(p_project uuid, p_profiles uuid[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE query_profiles
    SET custom_id = NULL, first_name = NULL, last_name = NULL, device_model = NULL
    WHERE project_id = p_project AND profile_id = ANY(p_profiles)
$$;
