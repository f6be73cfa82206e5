-- Profile hooks: how identity's merge and erasure reach the rows other owners keep per profile,
-- without identity knowing their tables. Each owner DECLARES its hooks here, in its own
-- migration (one row per function); identity calls exactly the declared functions, in its own
-- transaction, after locking the profiles, in (run_order, function_name) order, and nothing
-- else: a function or a table nobody declared is not touched. Identity reads this table once
-- at start-up (migrations are applied before any service starts).
--
--   kind 'merge':  function(project_id uuid, source uuid, target uuid) RETURNS void
--                  gives the target what the source had, by the owner's rules, and leaves the
--                  source nothing (or keeps what the owner handles itself from the bus).
--   kind 'erase':  function(project_id uuid, profile_ids uuid[], installation_ids text[],
--                           custom_ids text[]) RETURNS void
--                  removes what the owner keeps about the erased profiles (the live one and its
--                  tombstones), their installations and custom IDs (own and aliases).
--
-- Hooks of different owners touch disjoint tables, so their relative order does not matter;
-- run_order orders one owner's hooks. Not a tenant's data: no project_id.
CREATE TABLE profile_hooks (
    kind text NOT NULL CHECK (kind IN ('merge', 'erase')),
    owner text NOT NULL CHECK (owner IN ('identity', 'ingest', 'segments', 'query')),
    function_name text NOT NULL,
    run_order integer NOT NULL,
    PRIMARY KEY (kind, function_name)
);
