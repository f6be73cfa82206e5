-- The users table's custom ID and email prefix filters (ListProfiles custom_id_prefix,
-- email_prefix): "user-" lists the profiles whose custom ID starts with it, "ben.muller" those
-- whose email does. Tested row by row on the sort order's walk, a prefix few profiles have
-- would read the whole project's index; each column indexed in code point order (collation
-- "C", whatever the database's: a locale's order may weigh punctuation after the letters, so
-- its ranges need not be prefixes) makes the profiles starting with a text one range, [text,
-- the least text above all of them), which list_reads.py reads with the same collation. Custom
-- IDs are matched case-sensitively as stored; emails are stored lower-case and searched
-- lower-cased.
-- Anonymous profiles and those without an email are left out of the indexes (no prefix
-- matches them), which keeps them small where most profiles are anonymous.
--
-- Creating the indexes holds a write lock on query_profiles for the time it takes (this
-- migration runs in a transaction, so not CONCURRENTLY); on a large existing table, create them
-- CONCURRENTLY by hand first under these names and the IF NOT EXISTS below skips them.
CREATE INDEX IF NOT EXISTS query_profiles_by_custom_id
    ON query_profiles (project_id, custom_id COLLATE "C") WHERE custom_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS query_profiles_by_email
    ON query_profiles (project_id, email COLLATE "C") WHERE email IS NOT NULL;
