-- Ingest's tables: stored events, rejected events, and the profile state events maintain.
-- Every tenant table's primary key starts with project_id. Tables that carry a profile_id
-- (events, sessions, profile_attributes, profile_subscriptions) are moved by identity's merge
-- code (the last two through the profiles_merge_* functions at the end of this file);
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
-- imported: created by ImportTokens from a previous provider's push token and not yet seen by
-- an SDK (first_seen/last_seen are then the import time). reintegrated_into: the SDK
-- installation this imported one was folded into when it sent its first session with the same
-- token (imported is then false and push_token NULL: the token belongs to the real one only);
-- such a row is history, not an installation to count.
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
    imported boolean NOT NULL DEFAULT false,
    reintegrated_into text,
    reintegrate_time timestamptz,
    PRIMARY KEY (project_id, installation_id)
);
CREATE INDEX installation_details_by_push_token ON installation_details (project_id, platform, push_token)
    WHERE push_token IS NOT NULL;

-- Per-field event-time rule of installation_details, for ingest's set-based upsert: a field
-- named in `changed` (field -> event time, as written to field_times) takes its new value when
-- it is at least as late as the time stored for it (model.apply_installation_changes).
CREATE FUNCTION profiles_ingest_field_wins(changed jsonb, stored jsonb, field text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT changed ? field
        AND (NOT stored ? field OR (changed->>field)::timestamptz >= (stored->>field)::timestamptz)
$$;

-- The merged field_times: each field keeps the later of its stored and changed times.
CREATE FUNCTION profiles_ingest_field_times(changed jsonb, stored jsonb)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT stored || coalesce(
        (SELECT jsonb_object_agg(c.key, c.value) FROM jsonb_each(changed) AS c
         WHERE profiles_ingest_field_wins(changed, stored, c.key)),
        '{}'::jsonb)
$$;

-- Sessions, maintained from session start, heartbeat and end events (and counted from every
-- event naming the session) in the transaction that stores them. Keyed by installation and the
-- client's session ID, so identity's merge moves profile_id with a plain UPDATE; server-side
-- events (custom ID origin) have no session row. Times are event times. start_time is the
-- earliest event of the session (its start, normally), last_activity_time the latest;
-- duration is the end's duration once ended, else the longest seen so far (heartbeats, or
-- last activity minus start). A session with no end is closed by ingest's sweeper 30 minutes
-- after its last activity (closed, end_time = last_activity_time, ended = false); a late end
-- still sets end_time and duration. country is ISO 3166-1 alpha-2 (never an IP). platform is
-- the Platform number. Read contract for query: one row per session; `closed` tells whether it
-- still counts as live.
CREATE TABLE sessions (
    project_id uuid NOT NULL,
    installation_id text NOT NULL,
    session_id text NOT NULL CHECK (char_length(session_id) BETWEEN 1 AND 64),
    profile_id uuid NOT NULL,
    platform smallint NOT NULL,
    country text,
    start_time timestamptz NOT NULL,
    last_activity_time timestamptz NOT NULL,
    end_time timestamptz,
    duration interval NOT NULL DEFAULT '0',
    event_count integer NOT NULL DEFAULT 0,
    started boolean NOT NULL DEFAULT false,
    ended boolean NOT NULL DEFAULT false,
    closed boolean NOT NULL DEFAULT false,
    PRIMARY KEY (project_id, installation_id, session_id)
);
-- A profile's session history, newest first (ListSessions); also what a merge moves by.
CREATE INDEX sessions_by_profile_time ON sessions (project_id, profile_id, start_time DESC);
-- What the sweeper looks for: open sessions by last activity, across projects.
CREATE INDEX sessions_open_by_activity ON sessions (last_activity_time) WHERE NOT closed;

-- Merge rules, called by identity's merge (services/identity/repository.py, move_profile_rows)
-- in its transaction, after it has locked both profiles. Each gives the target the state it
-- would hold had every event of both profiles been applied to it (services/ingest/model.py),
-- then deletes the source's rows.

-- model.replay: an attribute's current value from its base and pending operations.
CREATE FUNCTION profiles_ingest_replay(base jsonb, pending jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    current jsonb := base;
    op jsonb;
    items jsonb;
    total integer;
BEGIN
    FOR op IN SELECT p FROM jsonb_array_elements(pending) AS p LOOP
        IF op->>'kind' = 'increment' THEN
            current := jsonb_build_object('type', 'number', 'value',
                CASE WHEN current IS NOT NULL AND current->>'type' = 'number'
                     THEN (current->>'value')::float8 ELSE 0 END + (op->>'operand')::float8);
            CONTINUE;
        END IF;
        items := CASE
            WHEN current IS NULL THEN '[]'::jsonb
            WHEN current->>'type' = 'string_list' THEN current->'value'
            WHEN current->>'type' = 'string' THEN jsonb_build_array(current->'value')
            ELSE '[]'::jsonb END;
        IF op->>'kind' = 'append' THEN
            -- A list keeps its latest 25 items: the oldest make room for the new.
            items := items || (op->'operand');
            total := jsonb_array_length(items);
            IF total > 25 THEN
                SELECT jsonb_agg(x ORDER BY n) INTO items
                FROM jsonb_array_elements(items) WITH ORDINALITY AS t(x, n) WHERE n > total - 25;
            END IF;
        ELSE
            SELECT coalesce(jsonb_agg(x ORDER BY n), '[]'::jsonb) INTO items
            FROM jsonb_array_elements(items) WITH ORDINALITY AS t(x, n)
            WHERE NOT (op->'operand') @> jsonb_build_array(x);
        END IF;
        current := jsonb_build_object('type', 'string_list', 'value', items);
    END LOOP;
    RETURN current;
END $$;

-- Whose base (latest set, set-once or unset) survives, as model.apply_operation decides when
-- one is applied after the other: a set or unset beats an earlier one; the earliest set-once
-- wins; a set beats any set-once; between a set-once and an unset the later wins; a set-once
-- beats "never set" (only increments, appends, removes: base_time 1800-01-01). Ties: target.
CREATE FUNCTION profiles_ingest_source_base_wins(
    s_base jsonb, s_time timestamptz, s_once boolean,
    t_base jsonb, t_time timestamptz, t_once boolean
) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN s_once AND t_once THEN s_time < t_time
        WHEN NOT s_once AND NOT t_once THEN s_time > t_time
        WHEN s_once THEN CASE
            WHEN t_base IS NOT NULL THEN false
            WHEN t_time = '1800-01-01 00:00:00+00' THEN true
            ELSE s_time > t_time END
        ELSE CASE
            WHEN s_base IS NOT NULL THEN true
            WHEN s_time = '1800-01-01 00:00:00+00' THEN false
            ELSE s_time > t_time END
    END $$;

-- Per attribute: the winning base, the pending operations of both sides not older than it
-- (increments add up, appends and removes replay in event-time order), folded to at most 50
-- like model._fold. No attribute is dropped: the merged profile may hold over 50 custom
-- attributes, and ingest then refuses only operations that would add new ones.
CREATE FUNCTION profiles_merge_profile_attributes(p_project uuid, p_source uuid, p_target uuid)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    s profile_attributes%ROWTYPE;
    t profile_attributes%ROWTYPE;
    new_base jsonb;
    new_time timestamptz;
    new_once boolean;
    merged jsonb;
    extra integer;
    new_value jsonb;
BEGIN
    FOR s IN
        SELECT * FROM profile_attributes
        WHERE project_id = p_project AND profile_id = p_source
        ORDER BY native, name
        FOR UPDATE
    LOOP
        SELECT * INTO t FROM profile_attributes
        WHERE project_id = p_project AND profile_id = p_target AND native = s.native
            AND name = s.name
        FOR UPDATE;
        IF NOT FOUND THEN
            UPDATE profile_attributes SET profile_id = p_target
            WHERE project_id = p_project AND profile_id = p_source AND native = s.native
                AND name = s.name;
            CONTINUE;
        END IF;
        IF profiles_ingest_source_base_wins(s.base, s.base_time, s.set_once,
                                            t.base, t.base_time, t.set_once) THEN
            new_base := s.base; new_time := s.base_time; new_once := s.set_once;
        ELSE
            new_base := t.base; new_time := t.base_time; new_once := t.set_once;
        END IF;
        SELECT coalesce(jsonb_agg(p ORDER BY (p->>'time')::timestamptz, o), '[]'::jsonb)
        INTO merged
        FROM (
            SELECT p, 1 AS o FROM jsonb_array_elements(t.pending) AS p
            UNION ALL
            SELECT p, 2 AS o FROM jsonb_array_elements(s.pending) AS p
        ) AS both_sides
        WHERE (p->>'time')::timestamptz >= new_time;
        extra := jsonb_array_length(merged) - 50;
        IF extra > 0 THEN
            new_base := profiles_ingest_replay(new_base, jsonb_path_query_array(
                merged, ('$[0 to ' || (extra - 1) || ']')::jsonpath));
            new_time := (merged->(extra - 1)->>'time')::timestamptz;
            new_once := false;
            merged := jsonb_path_query_array(merged, ('$[' || extra || ' to last]')::jsonpath);
        END IF;
        new_value := profiles_ingest_replay(new_base, merged);
        UPDATE profile_attributes SET
            value = new_value, value_type = new_value->>'type', base = new_base,
            base_time = new_time, set_once = new_once, pending = merged,
            update_time = greatest(s.update_time, t.update_time)
        WHERE project_id = p_project AND profile_id = p_target AND native = s.native
            AND name = s.name;
        DELETE FROM profile_attributes
        WHERE project_id = p_project AND profile_id = p_source AND native = s.native
            AND name = s.name;
    END LOOP;
END $$;

-- Per channel and kind, the latest explicit change by event time wins (ties: the target's); a
-- side with no row has recorded no change and never overrides the other.
CREATE FUNCTION profiles_merge_profile_subscriptions(p_project uuid, p_source uuid, p_target uuid)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO profile_subscriptions (project_id, profile_id, channel, kind, subscribed,
                                       change_time)
    SELECT project_id, p_target, channel, kind, subscribed, change_time
    FROM profile_subscriptions
    WHERE project_id = p_project AND profile_id = p_source
    ORDER BY channel, kind
    ON CONFLICT (project_id, profile_id, channel, kind) DO UPDATE SET
        subscribed = EXCLUDED.subscribed, change_time = EXCLUDED.change_time
    WHERE profile_subscriptions.change_time < EXCLUDED.change_time;
    DELETE FROM profile_subscriptions WHERE project_id = p_project AND profile_id = p_source;
END $$;
