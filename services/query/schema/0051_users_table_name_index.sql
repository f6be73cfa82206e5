-- The users table's name search, indexed (ListProfiles name_prefix; the rule is 0044's). A name
-- matches when a word of it starts with the folded text: strpos(search_name, ' ' || text) > 0.
-- Tested row by row on the sort order's walk, a name that few profiles have read the whole
-- project's index (0.75 s at a million profiles); two ranges of two indexes find them instead.

-- A match is on the first word or on a later one, and the two are found apart, each by a
-- range: the first word leads sort_name (the folded name, 0044), already indexed for sorting by
-- name (query_profiles_by_name: the range from the text to query_name_prefix_end of it);
-- later words have query_name_tails. Apart, so that the planner's estimate of each follows the
-- data: a common first name sorts as one run of the name index, which an estimate over every
-- word would take for matches spread through it (and walk every name before them).

-- query_name_tails: one row per later word (second on) of each profile's search_name (0044),
-- holding the name from that word on ("ana maria lopez": "maria lopez", "lopez"), so that
-- the profiles with a later word starting with a text are one range of (project_id, tail),
-- text with spaces included ("maria lo"). Lossy on purpose, exact with the rule beside it: a
-- tail is cut to 64 characters (a btree key has a size limit; a longer text is looked up by
-- its first 64) and U+10FFFF becomes U+10FFFE in it and in the searched text, so that
-- key || U+10FFFF is above every tail starting with the key (collation "C": code point order).
-- Readers test the rule itself on the rows the range finds. Kept by the triggers below in the
-- transaction of every write of query_profiles (the projection's recounts, identity's
-- erasure hook that strips names, a merge's recount deleting the merged-away row), so a page
-- reads names and tails from one snapshot; a write that leaves the name alone (most recounts)
-- does not touch it.
CREATE TABLE query_name_tails (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    tail text COLLATE "C" NOT NULL,
    PRIMARY KEY (project_id, profile_id, tail)
);
-- The search: a range of tails, profile IDs read from the index alone. The primary key serves
-- the other side: whether one profile has a tail in the range (a page that walks its sort
-- index checks the few rows that pass the rule), and the triggers' deletes.
CREATE INDEX query_name_tails_by_tail ON query_name_tails (project_id, tail, profile_id);

-- The tails of a search_name (0044: a space, then the folded name): the text after each space
-- but the first, cut and mapped as the table says; none empty.
CREATE FUNCTION query_name_tails_of(search_name text) RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT DISTINCT left(translate(substr(search_name, i + 1), chr(1114111), chr(1114110)), 64)
        COLLATE "C"
    FROM generate_series(2, length(search_name) - 1) AS i
    WHERE substr(search_name, i, 1) = ' '
$$;

-- The lower end of the tails' range for a searched text (the upper end appends U+10FFFF):
-- folded as the names are (query_name_fold), then cut and mapped as the tails are.
CREATE FUNCTION query_name_tail_key(name_prefix text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN left(translate(query_name_fold(name_prefix), chr(1114111), chr(1114110)), 64);

-- The least text above every text starting with `prefix` in code point order (collation "C"):
-- the prefix with its last character moved to the next one (U+10FFFF ones dropped first, the
-- surrogates, which no text holds, skipped); NULL when there is none (nothing but U+10FFFF,
-- or empty): then the range has no upper end. sort_name's range for the first word is
-- [folded text, this).
CREATE FUNCTION query_name_prefix_end(prefix text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    last integer;
BEGIN
    WHILE prefix <> '' LOOP
        last := ascii(right(prefix, 1));
        prefix := left(prefix, -1);
        IF last < 1114111 THEN
            RETURN prefix || chr(CASE WHEN last = 55295 THEN 57344 ELSE last + 1 END);
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

-- Row-level and guarded by WHEN, so that a recount that leaves the name alone queues nothing.
CREATE FUNCTION query_name_tails_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        DELETE FROM query_name_tails
        WHERE project_id = OLD.project_id AND profile_id = OLD.profile_id;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.search_name IS NOT NULL THEN
        INSERT INTO query_name_tails (project_id, profile_id, tail)
        SELECT NEW.project_id, NEW.profile_id, t FROM query_name_tails_of(NEW.search_name) t;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER query_name_tails_insert AFTER INSERT ON query_profiles
    FOR EACH ROW WHEN (NEW.search_name IS NOT NULL)
    EXECUTE FUNCTION query_name_tails_apply();
CREATE TRIGGER query_name_tails_update AFTER UPDATE ON query_profiles
    FOR EACH ROW WHEN (OLD.search_name IS DISTINCT FROM NEW.search_name
                       OR OLD.project_id <> NEW.project_id OR OLD.profile_id <> NEW.profile_id)
    EXECUTE FUNCTION query_name_tails_apply();
CREATE TRIGGER query_name_tails_delete AFTER DELETE ON query_profiles
    FOR EACH ROW WHEN (OLD.search_name IS NOT NULL)
    EXECUTE FUNCTION query_name_tails_apply();

-- The names already projected; statistics at once, so that the planner weighs a name's range
-- against the sort order's walk from the first search on a large project.
INSERT INTO query_name_tails (project_id, profile_id, tail)
SELECT q.project_id, q.profile_id, t
FROM query_profiles q, query_name_tails_of(q.search_name) t
WHERE q.search_name IS NOT NULL;
ANALYZE query_name_tails;
