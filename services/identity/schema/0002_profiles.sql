-- Profiles and installations: owned and written by identity; ingest and query read them.
--
-- Read contract (query, segments, ingest): a live profile has merged_into IS NULL; a tombstone
-- points at its survivor in one hop; installations.profile_id is always a live profile.
-- `version` rises in every transaction that changes what a profile view shows, so a reader
-- holding a cached view can tell it is stale (read-your-writes).

CREATE TABLE profiles (
    project_id uuid NOT NULL REFERENCES projects ON DELETE CASCADE,
    profile_id uuid NOT NULL,
    custom_id text CHECK (char_length(custom_id) BETWEEN 1 AND 512),
    merged_into uuid,
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, profile_id),
    CHECK (merged_into IS NULL OR merged_into <> profile_id),
    CHECK (merged_into IS NULL OR custom_id IS NULL)
);
-- One live profile per custom ID: the database settles two logins racing for a new custom ID.
CREATE UNIQUE INDEX profiles_by_custom_id ON profiles (project_id, custom_id)
    WHERE custom_id IS NOT NULL;
CREATE INDEX profiles_by_survivor ON profiles (project_id, merged_into)
    WHERE merged_into IS NOT NULL;

-- Which profile each installation belongs to now. link_version rises whenever profile_id
-- changes (identify, logout, merge), so a cached resolution can be checked in the write that
-- uses it. Ingest inserts events with the profile_id read here FOR SHARE in the same statement,
-- while identity changes the link FOR UPDATE: an event racing a merge lands on the survivor.
CREATE TABLE installations (
    project_id uuid NOT NULL,
    installation_id text NOT NULL CHECK (char_length(installation_id) BETWEEN 1 AND 128),
    profile_id uuid NOT NULL,
    link_version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, installation_id),
    FOREIGN KEY (project_id, profile_id) REFERENCES profiles (project_id, profile_id)
);
CREATE INDEX installations_by_profile ON installations (project_id, profile_id);
