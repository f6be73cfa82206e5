-- ignore_case folds letters by Unicode's rules, not ASCII's. Filters and funnel steps folded
-- both sides with lower(), which under the embedded server's "C" locale changes ASCII letters
-- only: "ÉCOLE" did not equal "école", and NOT_EQUALS matched it. segments_fold_case lower-cases
-- in the first Unicode collation the server has, as query's name search picks it (0044):
-- PostgreSQL's own (17 and later), else ICU's root locale, else the database's default. Case
-- only: accents stay ("école" is not "ecole").
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
        CREATE FUNCTION segments_fold_case(value text) RETURNS text
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN lower(value COLLATE %s)
    $function$, coalesce(quote_ident(folding), '"default"'));
END
$migration$;

-- The funnel steps' condition (0005), folding with segments_fold_case (the filters' SQL,
-- services/segments/filter_sql.py, does the same).
CREATE OR REPLACE FUNCTION funnel_step_value_matches(p_test jsonb, p_value jsonb)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $function$
DECLARE
    op integer := (p_test->>'operator')::integer;
    fold boolean := coalesce((p_test->>'ignore_case')::boolean, false);
    operand jsonb := CASE WHEN jsonb_typeof(p_test->'value') = 'object' THEN p_test->'value'
                          ELSE p_test->'values'->0 END;
    value_type text;
    operand_type text;
    stored text;
    items jsonb;
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) <> 'object' THEN
        RETURN false;
    END IF;
    value_type := CASE WHEN p_value ? 'string_value' THEN 'string'
                       WHEN p_value ? 'url_value' THEN 'url'
                       WHEN p_value ? 'number_value' THEN 'number'
                       WHEN p_value ? 'bool_value' THEN 'bool'
                       WHEN p_value ? 'timestamp_value' THEN 'timestamp'
                       WHEN p_value ? 'string_list_value' THEN 'string_list' END;
    IF op = 10 THEN  -- EXISTS
        RETURN value_type IS NOT NULL;
    END IF;
    operand_type := operand->>'type';
    IF value_type IS NULL OR NOT (value_type = operand_type
            OR (op = 8 AND operand_type = 'string' AND value_type = 'string_list')) THEN
        RETURN false;
    END IF;
    IF value_type = 'string_list' THEN
        items := coalesce(p_value->'string_list_value'->'values', '[]');
        IF op = 8 THEN  -- CONTAINS: one item equals the operand
            RETURN EXISTS (
                SELECT 1 FROM jsonb_array_elements_text(items) AS i(item)
                WHERE CASE WHEN fold
                           THEN segments_fold_case(i.item) = segments_fold_case(operand->>'value')
                           ELSE i.item = operand->>'value' END);
        END IF;
        IF fold THEN
            RETURN funnel_compare(segments_fold_case(items::text),
                                  segments_fold_case((operand->'value')::text), op);
        END IF;
        RETURN funnel_compare(items, operand->'value', op);
    END IF;
    stored := coalesce(p_value->>'string_value', p_value->>'url_value',
                       p_value->>'number_value', p_value->>'bool_value',
                       p_value->>'timestamp_value');
    IF value_type = 'number' THEN
        IF op = 7 THEN
            RETURN stored::float8 IN (
                SELECT (x->>'value')::float8 FROM jsonb_array_elements(p_test->'values') x);
        END IF;
        RETURN funnel_compare(stored::float8, (operand->>'value')::float8, op);
    ELSIF value_type = 'bool' THEN
        RETURN funnel_compare(stored::boolean, (operand->>'value')::boolean, op);
    ELSIF value_type = 'timestamp' THEN
        RETURN funnel_compare(stored::timestamptz, (operand->>'value')::timestamptz, op);
    END IF;
    -- string, url
    IF fold THEN
        stored := segments_fold_case(stored);
    END IF;
    IF op = 7 THEN  -- IN
        RETURN stored IN (
            SELECT CASE WHEN fold THEN segments_fold_case(x->>'value') ELSE x->>'value' END
            FROM jsonb_array_elements(p_test->'values') x);
    ELSIF op = 8 THEN
        RETURN strpos(stored, CASE WHEN fold THEN segments_fold_case(operand->>'value')
                                   ELSE operand->>'value' END) > 0;
    ELSIF op = 9 THEN
        RETURN starts_with(stored, CASE WHEN fold THEN segments_fold_case(operand->>'value')
                                        ELSE operand->>'value' END);
    END IF;
    RETURN funnel_compare(stored, CASE WHEN fold THEN segments_fold_case(operand->>'value')
                                       ELSE operand->>'value' END, op);
END $function$;
