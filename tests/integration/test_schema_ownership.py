"""Ownership of the schema, checked: the SQL twin of the import-linter contracts.

Each owner's SQL — the SQL string constants of its Python modules (services/<owner>/**.py,
shared/**.py) and its own schema objects as they stand after every migration (function bodies,
view definitions, triggers; read from the catalog, not from the migration history) — may use
its own tables, views and functions, shared's tables, and another owner's objects only when that
owner PUBLISHED them: a read contract `<owner>_read_*` or a write rule `<owner>_apply_*`
(docs/schema.md). Anything else of another owner is a cross-owner use and fails here.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.schema_catalog import (
    FUNCTION,
    TABLE,
    TRIGGER,
    VIEW,
    Attribution,
    apply_in_steps,
    migration_steps,
)
from tests.support.schema import scratch_database

ROOT = Path(__file__).resolve().parents[2]
SERVICE_OWNERS = ("identity", "ingest", "segments", "query")
PUBLISHED = re.compile(r"^(identity|ingest|segments|query)_(read|apply)_\w+$")

# Uses of another owner's objects that are not published contracts, as (service, object): none
# since every service reads the others through their read contracts. Kept as the one place an
# exception would have to be written down, in review, rather than slipped in.
KNOWN_CROSS_OWNER_USES: frozenset[tuple[str, str]] = frozenset()

# An SQL statement in a Python string: upper-case keywords, as every service writes them.
_SQL = re.compile(r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|CREATE|WITH)\b")
_LITERAL = re.compile(r"'(?:[^']|'')*'")
_LINE_COMMENT = re.compile(r"--[^\n]*")
# A name given by AS (keywords are upper-case in every service's SQL, names lower-case).
_ALIAS = re.compile(r"\bAS\s+[a-z_][a-z0-9_]*\b")
_IDENTIFIER = re.compile(r"(?<![\w.$])[a-z_][a-z0-9_]*(?![\w])")


@dataclass(frozen=True, slots=True)
class Statement:
    owner: str
    where: str
    sql: str


def identifiers(sql: str) -> set[str]:
    """The lower-case words of `sql` outside string literals and comments, except the names
    that `AS` gives (a column called `installations` is not identity's table)."""
    text = _LITERAL.sub("''", _LINE_COMMENT.sub("", sql))
    return set(_IDENTIFIER.findall(_ALIAS.sub("AS ?", text)))


def _string_of(node: ast.expr) -> str | None:
    """The text of a string constant, f-string (placeholders become `?`) or their `+`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "?"
            for v in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_of(node.left), _string_of(node.right)
        if left is not None and right is not None:
            return left + right
    return None


def python_statements(owner: str, package: Path) -> Iterator[Statement]:
    """Every string in the package's modules that holds an SQL statement (docstrings aside)."""
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {
            id(body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and (body := node.body)
            and isinstance(body[0], ast.Expr)
        }
        inner = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.JoinedStr | ast.BinOp)
            for child in ast.walk(node)
            if child is not node
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.expr) or id(node) in docstrings or id(node) in inner:
                continue
            text = _string_of(node)
            if text is not None and _SQL.search(text):
                where = f"{path.relative_to(package.parent.parent)}:{node.lineno}"
                yield Statement(owner, where, text)


def service_statements(root: Path) -> list[Statement]:
    """The SQL of shared's and every service's Python modules under `root`."""
    statements = list(python_statements("shared", root / "shared"))
    for owner in SERVICE_OWNERS:
        statements.extend(python_statements(owner, root / "services" / owner))
    return statements


def _bare(name: str) -> str:
    return name.split("(")[0].split(" ")[0]


def schema_statements(built: Attribution) -> list[Statement]:
    """Each owner's functions, views and triggers as the catalog holds them."""
    return [
        Statement(built.owner_of[key], f"{obj.kind} {obj.name}", obj.sql)
        for key, obj in sorted(built.catalog.objects.items())
        if obj.kind in (FUNCTION, VIEW, TRIGGER) and key in built.owner_of
    ]


def object_owners(built: Attribution) -> dict[str, str]:
    """Table, view and function name -> owner."""
    return {
        _bare(obj.name): built.owner_of[key]
        for key, obj in built.catalog.objects.items()
        if obj.kind in (TABLE, VIEW, FUNCTION) and key in built.owner_of
    }


def cross_owner_uses(
    statements: list[Statement], owners: dict[str, str]
) -> dict[tuple[str, str], list[str]]:
    """(service, object of another owner it may not use) -> where it does."""
    found: dict[tuple[str, str], list[str]] = {}
    for statement in statements:
        for name in sorted(identifiers(statement.sql)):
            owner = owners.get(name)
            if owner is None or owner in (statement.owner, "shared"):
                continue
            match = PUBLISHED.match(name)
            if match is not None and match[1] == owner:
                continue
            found.setdefault((statement.owner, name), []).append(statement.where)
    return found


async def built_with(server_url: str, extra: list[tuple[str, str]]) -> Attribution:
    async with scratch_database(server_url) as conn:
        return await apply_in_steps(conn, [*migration_steps(), *extra])


def report(uses: dict[tuple[str, str], list[str]]) -> str:
    return "\n".join(
        f"  {service} uses {name}: {', '.join(where[:3])}" + (" ..." if len(where) > 3 else "")
        for (service, name), where in sorted(uses.items())
    )


@pytest.fixture(scope="module")
async def built(postgres_server_url: str) -> Attribution:
    return await built_with(postgres_server_url, [])


async def test_no_service_uses_another_owners_unpublished_objects(built: Attribution) -> None:
    uses = cross_owner_uses(
        service_statements(ROOT) + schema_statements(built), object_owners(built)
    )
    new = {k: v for k, v in uses.items() if k not in KNOWN_CROSS_OWNER_USES}
    assert not new, (
        "SQL using another owner's tables or functions; read them through the owner's"
        " published <owner>_read_* contracts or <owner>_apply_* functions:\n" + report(new)
    )
    gone = sorted(KNOWN_CROSS_OWNER_USES - set(uses))
    assert not gone, f"no longer violations, remove them from KNOWN_CROSS_OWNER_USES: {gone}"


def test_the_checker_reads_the_services_sql() -> None:
    """It finds the statements the services are known to run (a checker reading nothing would
    pass everything)."""
    statements = service_statements(ROOT)
    found = {(s.owner, n) for s in statements for n in identifiers(s.sql)}
    assert {
        ("ingest", "events"),
        ("identity", "profiles"),
        ("segments", "segment_states"),
        ("query", "query_profiles"),
        ("shared", "outbox"),
    } <= found


async def test_a_planted_cross_read_in_a_module_fails(built: Attribution, tmp_path: Path) -> None:
    planted = tmp_path / "services" / "segments" / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(
        'SELECT_ALIASES = """\n'
        '    SELECT custom_id FROM custom_id_aliases WHERE project_id = $1"""\n'
        'WRITE = f"UPDATE profiles SET version = version + {1} WHERE project_id = $1"\n'
        'READ_OK = "SELECT * FROM identity_read_installation_links($1, $2::text[])"\n'
    )
    (tmp_path / "shared").mkdir()
    uses = cross_owner_uses(service_statements(tmp_path), object_owners(built))
    assert set(uses) == {("segments", "custom_id_aliases"), ("segments", "profiles")}
    assert uses[("segments", "custom_id_aliases")] == ["services/segments/planted.py:1"]


async def test_a_planted_cross_read_in_a_schema_function_fails(
    postgres_server_url: str,
) -> None:
    planted = await built_with(
        postgres_server_url,
        [
            (
                "query",
                "CREATE FUNCTION query_planted(p uuid) RETURNS bigint LANGUAGE sql AS $$"
                " SELECT count(*) FROM identity_changes WHERE project_id = p $$;"
                "CREATE VIEW query_planted_view AS SELECT project_id FROM segment_states;"
                "CREATE FUNCTION query_planted_ok(p uuid) RETURNS bigint LANGUAGE sql AS $$"
                " SELECT count(*) FROM identity_read_installation_profiles(p, ARRAY['i']) $$;",
            )
        ],
    )
    uses = cross_owner_uses(schema_statements(planted), object_owners(planted))
    planted_uses = {k: v for k, v in uses.items() if any("planted" in w for w in v)}
    assert set(planted_uses) == {("query", "identity_changes"), ("query", "segment_states")}
