"""The ingest bench's breakdown names a WITH statement by what it feeds, not by its first CTE."""

from __future__ import annotations

from bench.statements import headline


def test_a_with_statement_is_named_by_its_ctes_and_the_statement_they_feed() -> None:
    query = (
        "WITH e AS ( SELECT e.*, f(x) AS k FROM unnest($1::text[]) AS e(x) ), "
        "claimed AS ( INSERT INTO event_keys SELECT k FROM e ON CONFLICT DO NOTHING "
        "RETURNING k ) INSERT INTO events (a, b) SELECT 1, 2 FROM e JOIN claimed USING (k)"
    )
    assert headline(query) == (
        "WITH e, claimed: INSERT INTO events (a, b) SELECT 1, 2 FROM e JOIN claimed USING (k)"
    )


def test_column_lists_materialization_and_plain_statements() -> None:
    assert headline("WITH RECURSIVE t( a, b) AS (SELECT 1, 2) SELECT * FROM t") == (
        "WITH t: SELECT * FROM t"
    )
    assert headline("WITH m AS MATERIALIZED (SELECT 1) DELETE FROM x USING m") == (
        "WITH m: DELETE FROM x USING m"
    )
    assert headline("SELECT profile_id FROM f($1)") == "SELECT profile_id FROM f($1)"
    assert headline("INSERT INTO t VALUES ((1))") == "INSERT INTO t VALUES ((1))"
