"""Each owner's schema.sql is its current schema: the migrations and the files build the same
database, and each object sits in the file of the owner whose migrations made it."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import pytest

from shared.schema_catalog import (
    OWNER_ORDER,
    Attribution,
    migration_notes,
    migration_steps,
    render,
    schema_file,
    schema_file_steps,
)
from tests.support.schema import built_from

REGENERATE = "regenerate with `python -m shared.schema_catalog --write`"


def catalog_diff(expected: Attribution, actual: Attribution) -> str:
    """A unified diff of the two schemas, object by object, in (kind, name) order."""

    def lines(built: Attribution) -> list[str]:
        return [
            line
            for key, sql in sorted(built.catalog.definitions().items())
            for line in [f"-- {key[0]} {key[1]} ({built.owner_of.get(key)})", *sql.splitlines()]
        ]

    return "\n".join(
        difflib.unified_diff(
            lines(expected), lines(actual), "migrations", "schema files", lineterm="", n=2
        )
    )


@pytest.fixture(scope="module")
async def from_migrations(postgres_server_url: str) -> Attribution:
    return await built_from(postgres_server_url, migration_steps())


async def check_schema_files(
    server_url: str, from_migrations: Attribution, steps: list[tuple[str, str]]
) -> None:
    from_files = await built_from(server_url, steps)
    definitions, file_definitions = (
        from_migrations.catalog.definitions(),
        from_files.catalog.definitions(),
    )
    assert definitions == file_definitions, (
        f"the schema files differ from what the migrations produce ({REGENERATE}):\n"
        + catalog_diff(from_migrations, from_files)
    )
    misplaced = [
        f"{kind} {name}: made by {from_migrations.owner_of.get((kind, name))}'s migrations,"
        f" in {from_files.owner_of.get((kind, name))}'s schema file"
        for kind, name in sorted(definitions)
        if from_migrations.owner_of.get((kind, name)) != from_files.owner_of.get((kind, name))
    ]
    assert not misplaced, "objects in another owner's schema file:\n" + "\n".join(misplaced)
    # An object is created by one owner's file only: a later file redefining it is caught here
    # (a second plain CREATE already fails to apply).
    assert not from_files.foreign_changes, from_files.foreign_changes


async def test_the_schema_files_describe_what_the_migrations_produce(
    postgres_server_url: str, from_migrations: Attribution
) -> None:
    """Every table (columns, types, defaults, constraints), index, function, view, trigger,
    comment and profile hook, built once by every migration and once by the owners' schema
    files applied in owner order, is the same, and each is in exactly one owner's file: the
    one whose migrations created it (an index or trigger: its table's owner)."""
    assert set(from_migrations.owner_of.values()) <= set(OWNER_ORDER)
    await check_schema_files(postgres_server_url, from_migrations, schema_file_steps())


async def test_no_owners_migration_redefines_another_owners_object(
    from_migrations: Attribution,
) -> None:
    assert from_migrations.foreign_changes == []


def test_the_schema_files_are_what_the_generator_writes(from_migrations: Attribution) -> None:
    """Comments included, so a file is regenerated, never edited by hand."""
    notes = migration_notes()
    stale = [
        owner
        for owner in OWNER_ORDER
        if schema_file(owner).read_text() != render(owner, from_migrations, notes)
    ]
    assert not stale, f"stale schema files of {stale}: {REGENERATE}"


def edited(
    steps: list[tuple[str, str]], owner: str, edit: Callable[[str], str]
) -> list[tuple[str, str]]:
    changed = [(o, edit(sql) if o == owner else sql) for o, sql in steps]
    assert changed != steps, "the edit must change the file"
    return changed


async def test_a_changed_column_in_a_schema_file_fails_with_a_diff(
    postgres_server_url: str, from_migrations: Attribution
) -> None:
    steps = edited(
        schema_file_steps(),
        "identity",
        lambda sql: sql.replace("link_version bigint NOT NULL DEFAULT 1", "link_version integer"),
    )
    with pytest.raises(AssertionError) as failed:
        await check_schema_files(postgres_server_url, from_migrations, steps)
    assert "-    link_version bigint NOT NULL DEFAULT 1," in str(failed.value)
    assert "+    link_version integer," in str(failed.value)


async def test_an_object_in_another_owners_file_fails(
    postgres_server_url: str, from_migrations: Attribution
) -> None:
    table = from_migrations.catalog.objects[("table", "quarantined_custom_ids")].sql
    steps = [
        (owner, sql.replace(table, "") + ("\n" + table if owner == "query" else ""))
        for owner, sql in schema_file_steps()
    ]
    with pytest.raises(AssertionError) as failed:
        await check_schema_files(postgres_server_url, from_migrations, steps)
    assert (
        "table quarantined_custom_ids: made by identity's migrations, in query's schema file"
        in str(failed.value)
    )
