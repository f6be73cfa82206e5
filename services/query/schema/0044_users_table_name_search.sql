-- Names as the users table searches and sorts them (ListProfiles name_prefix and
-- PROFILE_ORDER_BY_NAME). query_name_fold turns a name, or a searched text, into one key:
-- surrounding spaces dropped, runs of spaces as one, accents dropped (the marks Unicode's
-- decomposition separates from their letters: "Élodie" is "elodie", and "elo" finds her), then
-- lower-cased by Unicode's rules: the database's own locale is "C" on the embedded server, whose
-- lower() folds ASCII only. The folding collation is the first of PostgreSQL's own Unicode one
-- (17 and later: the embedded server, built without ICU), ICU's root locale (16, as
-- docker-compose runs) and an older ICU's name for it; the database's default (ASCII) without
-- either.
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
        CREATE FUNCTION query_name_fold(name text) RETURNS text
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN lower(normalize(regexp_replace(
            normalize(regexp_replace(btrim(name), '\s+', ' ', 'g'), NFD),
            '[\u0300-\u036f]', '', 'g'), NFC) COLLATE %s)
    $function$, coalesce(quote_ident(folding), '"default"'));
END
$migration$;

-- search_name: the name the users table shows, "first last", folded (query_name_fold) after a
-- leading space; NULL without a name. A profile matches name_prefix when a word of its name
-- starts with the folded text: strpos(search_name, ' ' || the folded text) > 0, one substring
-- test per row and no pattern to escape. Not indexed: the filter rides on the sort order's
-- index walk like the other filters.
ALTER TABLE query_profiles ADD COLUMN search_name text COLLATE "C" GENERATED ALWAYS AS (
    ' ' || nullif(query_name_fold(coalesce(first_name, '') || ' ' || coalesce(last_name, '')), '')
) STORED;

-- sort_name (0012) folded the same way, so that "Élodie" sorts among the e's and not after
-- "Zoé", where code points put an accented or upper-case letter outside ASCII; still collation
-- "C" for keyset paging (0012). A generated column's expression cannot change in place before
-- PostgreSQL 17: the column and its index are made again.
DROP INDEX query_profiles_by_name;
ALTER TABLE query_profiles DROP COLUMN sort_name;
ALTER TABLE query_profiles ADD COLUMN sort_name text COLLATE "C" GENERATED ALWAYS AS (
    query_name_fold(coalesce(
        nullif(btrim(coalesce(first_name, '') || ' ' || coalesce(last_name, '')), ''),
        custom_id
    ))
) STORED;
CREATE INDEX query_profiles_by_name ON query_profiles (project_id, sort_name, profile_id);
