-- The users table sorted by name (ListProfiles PROFILE_ORDER_BY_NAME): the name the table shows,
-- "first last", else the custom ID, lower-cased; NULL for an anonymous profile without a name,
-- which sorts last like a profile never seen. Collation "C" (code point order) so that keyset
-- paging has a largest value to start a descending walk from, whatever the database's locale.
ALTER TABLE query_profiles ADD COLUMN sort_name text COLLATE "C" GENERATED ALWAYS AS (
    lower(coalesce(
        nullif(btrim(coalesce(first_name, '') || ' ' || coalesce(last_name, '')), ''),
        custom_id
    ))
) STORED;

CREATE INDEX query_profiles_by_name ON query_profiles (project_id, sort_name, profile_id);
