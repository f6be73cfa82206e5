-- Ingest's tables: stored events, rejected events, and the profile state events maintain.
-- Every tenant table's primary key starts with project_id. Tables that carry a profile_id
-- (events, profile_attributes, profile_subscriptions) are moved by identity's merge code;
-- installation_details follows its installation (installations.profile_id), so it has none.

-- Every accepted event. The dedupe key is the origin (installation_id, or custom_id for
-- server-side events) plus the client's event_id: two partial unique indexes, because exactly
-- one of the two origin columns is set. event_seq orders events by arrival for stable paging.
-- kind and platform are the numbers of profiles.common.v1.EventKind and Platform; payload is
-- the proto JSON (original field names) of the matching bus detail message
-- (CustomEventDetail, SessionDetail, AttributeChangeDetail, SubscriptionChange,
-- InstallationUpdateDetail, CrashDetail plus "stack_trace"); never a push token or an IP.
-- profile_id and payload are NULL only on bare dedupe markers left by an erasure.
CREATE TABLE events (
    project_id uuid NOT NULL,
    event_seq bigint GENERATED ALWAYS AS IDENTITY,
    installation_id text,
    custom_id text,
    event_id text NOT NULL CHECK (char_length(event_id) BETWEEN 1 AND 64),
    profile_id uuid,
    kind smallint NOT NULL,
    name text,
    event_time timestamptz NOT NULL,
    receive_time timestamptz NOT NULL,
    session_id text,
    platform smallint NOT NULL,
    payload jsonb,
    imported boolean NOT NULL DEFAULT false,
    PRIMARY KEY (project_id, event_seq),
    CHECK ((installation_id IS NULL) <> (custom_id IS NULL))
);
CREATE UNIQUE INDEX events_by_installation_event_id ON events (project_id, installation_id, event_id)
    WHERE installation_id IS NOT NULL;
CREATE UNIQUE INDEX events_by_custom_id_event_id ON events (project_id, custom_id, event_id)
    WHERE custom_id IS NOT NULL;
-- A profile's timeline, newest first (ties broken by arrival); also what a merge moves by.
CREATE INDEX events_by_profile_time ON events (project_id, profile_id, event_time DESC, event_seq DESC);

-- Every rejected event, for ListRejectedEvents: nothing sent to us disappears silently.
-- payload is the event as sent, in proto JSON with original field names, minus any client IP;
-- NULL (and custom_id NULL) for ERASED events, which keep nothing of the erased person.
-- field_path is relative to the event (custom.attributes["price"], event_time).
CREATE TABLE rejected_events (
    project_id uuid NOT NULL,
    rejected_seq bigint GENERATED ALWAYS AS IDENTITY,
    receive_time timestamptz NOT NULL,
    reason text NOT NULL,
    field_path text NOT NULL,
    message text NOT NULL,
    event_id text NOT NULL,
    installation_id text,
    custom_id text,
    payload jsonb,
    PRIMARY KEY (project_id, rejected_seq)
);
CREATE INDEX rejected_events_by_time ON rejected_events (project_id, receive_time DESC, rejected_seq DESC);
CREATE INDEX rejected_events_by_reason ON rejected_events (project_id, reason, receive_time DESC, rejected_seq DESC);
CREATE INDEX rejected_events_by_installation ON rejected_events (project_id, installation_id)
    WHERE installation_id IS NOT NULL;

-- A profile's native and custom attributes, following event time rather than arrival order.
-- value/value_type is the current value (NULL after an unset: the row stays as a tombstone so
-- a late older set cannot revive it). base/base_time/set_once is the latest set, set-once or
-- unset by event time; pending holds later increments, appends and removes
-- ([{"time", "kind", "operand"}], event-time order) so a late one is replayed in place:
-- value = base with pending replayed. update_time is the latest event time applied.
-- Values are {"type": "string|number|bool|timestamp|url|string_list", "value": ...}.
CREATE TABLE profile_attributes (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    native boolean NOT NULL,
    name text NOT NULL,
    value jsonb,
    value_type text,
    base jsonb,
    base_time timestamptz NOT NULL,
    set_once boolean NOT NULL DEFAULT false,
    pending jsonb NOT NULL DEFAULT '[]',
    update_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, profile_id, native, name)
);

-- Per profile, channel (email, sms, push) and kind (marketing, transactional): the latest
-- explicit change by event time. No row means no recorded change.
CREATE TABLE profile_subscriptions (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    channel text NOT NULL CHECK (channel IN ('email', 'sms', 'push')),
    kind text NOT NULL CHECK (kind IN ('marketing', 'transactional')),
    subscribed boolean NOT NULL,
    change_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, profile_id, channel, kind)
);

-- What ingest knows of an installation: each field with the event time that last set it
-- (field_times: {"app_version": "<iso time>", ...}) so a late update cannot overwrite a newer
-- one. platform is the Platform number. first_seen/last_seen span its events' times.
CREATE TABLE installation_details (
    project_id uuid NOT NULL,
    installation_id text NOT NULL,
    platform smallint,
    app_version text,
    os_version text,
    device_model text,
    push_token text,
    push_opt_in boolean,
    language text,
    timezone text,
    uninstalled boolean NOT NULL DEFAULT false,
    field_times jsonb NOT NULL DEFAULT '{}',
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL,
    PRIMARY KEY (project_id, installation_id)
);
CREATE INDEX installation_details_by_push_token ON installation_details (project_id, platform, push_token)
    WHERE push_token IS NOT NULL;
