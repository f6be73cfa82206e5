-- Identity's own tables, beside profiles and installations (0002): the history of merges and
-- splits, custom ID aliases, answers kept for retried requests, quarantined custom IDs.
-- None of them has a `profile_id` column on purpose: identity's generic "move every row of a
-- profile" step (services/identity/repository.py, move_profile_rows) updates `profile_id` in
-- every other table, and these must be handled by identity's own rules instead.

-- Every merge and split, so an operator can always answer "why is this device on this
-- profile?". Rows are never updated; they outlive the tombstones they mention.
CREATE TABLE identity_changes (
    project_id uuid NOT NULL REFERENCES projects ON DELETE CASCADE,
    change_id uuid NOT NULL,
    kind text NOT NULL CHECK (kind IN ('merge', 'split')),
    cause text NOT NULL CHECK (
        cause IN ('identify', 'logout', 'operator_merge', 'token_reintegration', 'identify_switch')
    ),
    -- Merge: the profile merged away. Split: the profile the installation left.
    source_profile_id uuid NOT NULL,
    -- Merge: the survivor. Split: the profile the installation joined.
    target_profile_id uuid NOT NULL,
    installation_ids text[] NOT NULL DEFAULT '{}',
    alias_custom_id text,
    change_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, change_id)
);
-- A profile's history is the changes naming it on either side, oldest first.
CREATE INDEX identity_changes_by_source ON identity_changes (project_id, source_profile_id, change_time);
CREATE INDEX identity_changes_by_target ON identity_changes (project_id, target_profile_id, change_time);

-- Custom IDs of identified profiles merged away by an operator (MergeProfiles with
-- allow_custom_id_conflict): each still resolves to the survivor. A custom ID is either on a
-- live profile (profiles.custom_id) or here, never both: both writers hold the same advisory
-- lock on the custom ID.
CREATE TABLE custom_id_aliases (
    project_id uuid NOT NULL,
    custom_id text NOT NULL CHECK (char_length(custom_id) BETWEEN 1 AND 512),
    target_profile_id uuid NOT NULL,
    change_id uuid NOT NULL,
    create_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, custom_id),
    FOREIGN KEY (project_id, target_profile_id) REFERENCES profiles (project_id, profile_id)
);
CREATE INDEX custom_id_aliases_by_target ON custom_id_aliases (project_id, target_profile_id);

-- The first answer of Identify, Logout, MergeProfiles and DeleteProfile per request_id, written
-- in the transaction of the change, so a retry returns it and changes nothing. `fingerprint`
-- is the request's other fields: the same request_id with different fields is refused.
-- Answers older than 24 hours are ignored and overwritten.
CREATE TABLE identity_requests (
    project_id uuid NOT NULL,
    rpc text NOT NULL,
    request_id text NOT NULL CHECK (char_length(request_id) BETWEEN 1 AND 64),
    fingerprint text NOT NULL,
    answer jsonb NOT NULL,
    create_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, rpc, request_id)
);
CREATE INDEX identity_requests_by_time ON identity_requests (create_time);

-- Custom IDs of erased profiles, refused until expire_time. Only a keyed hash (HMAC-SHA256) of
-- the custom ID is kept, linked to nothing else; expired rows are ignored, and purged by the
-- project's next erasure.
CREATE TABLE quarantined_custom_ids (
    project_id uuid NOT NULL,
    custom_id_hmac bytea NOT NULL,
    expire_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, custom_id_hmac)
);

-- Each project's secret for keyed hashes of custom IDs (quarantine entries, erased events'
-- dedupe markers), 32 random bytes made by identity on the project's first erasure and never
-- changed (a new one would unquarantine every erased custom ID). Never logged or exported.
CREATE TABLE custom_id_hmac_keys (
    project_id uuid NOT NULL REFERENCES projects ON DELETE CASCADE,
    hmac_key bytea NOT NULL CHECK (octet_length(hmac_key) = 32),
    create_time timestamptz NOT NULL,
    PRIMARY KEY (project_id)
);
