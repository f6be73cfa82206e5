-- Name search on the users table (ListProfiles name_prefix): a profile matches when a word of
-- its name starts with the text. query_name_key folds a name or a searched text the same way:
-- surrounding spaces dropped, runs of spaces as one, Unicode's NFC form, lower-cased by
-- Unicode's rules (the database's own locale is "C" on the embedded server, whose lower()
-- folds ASCII only), after a leading space; NULL for no name. So the reader asks
-- strpos(search_name, key of the text) > 0: one substring test per row, no pattern to escape.
-- The folding collation is the first of PostgreSQL's own Unicode one (17 and later: the
-- embedded server, built without ICU), ICU's root locale (16, as docker-compose runs) and an
-- older ICU's name for it; the database's default (ASCII) without either.
DO $migration$
DECLARE
    folding text := (
        SELECT collname FROM pg_collation
        WHERE collname IN ('pg_c_utf8', 'unicode', 'und-x-icu')
            AND collencoding IN (-1, pg_char_to_encoding('UTF8'))
        ORDER BY array_position(ARRAY['pg_c_utf8', 'unicode', 'und-x-icu'], collname::text)
        LIMIT 1
    );
BEGIN
    EXECUTE format($function$
        CREATE FUNCTION query_name_key(name text) RETURNS text
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN ' ' || nullif(
            lower(normalize(regexp_replace(btrim(name), '\s+', ' ', 'g'), NFC) COLLATE %s), '')
    $function$, coalesce(quote_ident(folding), '"default"'));
END
$migration$;

-- search_name: the name the users table shows, "first last", as query_name_key folds it for
-- ListProfiles' name search (0044_users_table_name_search.sql says how and why). Not indexed:
-- the filter rides on the sort order's index walk like the other filters.
ALTER TABLE query_profiles ADD COLUMN search_name text COLLATE "C" GENERATED ALWAYS AS (
    query_name_key(coalesce(first_name, '') || ' ' || coalesce(last_name, ''))
) STORED;
