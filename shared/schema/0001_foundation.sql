-- Foundation: tenants, their keys and settings, and the transactional outbox.
-- Every tenant table's primary key starts with project_id, so the schema can be distributed
-- by project (Citus) without rewriting keys.

CREATE TABLE projects (
    project_id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    create_time timestamptz NOT NULL DEFAULT now()
);

-- Only a hash of each key's secret is stored; key_id is the public half used to find the row.
CREATE TABLE api_keys (
    project_id uuid NOT NULL REFERENCES projects ON DELETE CASCADE,
    key_id text NOT NULL,
    role text NOT NULL CHECK (role IN ('sdk', 'read', 'admin')),
    secret_sha256 bytea NOT NULL,
    display_name text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    revoke_time timestamptz,
    PRIMARY KEY (project_id, key_id)
);
CREATE UNIQUE INDEX api_keys_by_key_id ON api_keys (key_id);

CREATE TABLE project_settings (
    project_id uuid NOT NULL REFERENCES projects ON DELETE CASCADE,
    name text NOT NULL,
    value jsonb NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, name)
);

-- Bus messages written in the same transaction as the data they describe; the relay publishes
-- them to Redis after commit and deletes them, so a Redis outage delays messages, never loses
-- them. profile_id lets an erasure purge the messages of a deleted profile still waiting here.
CREATE TABLE outbox (
    project_id uuid NOT NULL,
    outbox_id bigint GENERATED ALWAYS AS IDENTITY,
    topic text NOT NULL,
    kind text NOT NULL,
    payload bytea NOT NULL,
    profile_id uuid,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, outbox_id)
);
CREATE INDEX outbox_by_id ON outbox (outbox_id);
CREATE INDEX outbox_by_profile ON outbox (project_id, profile_id) WHERE profile_id IS NOT NULL;
