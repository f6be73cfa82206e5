"""Scratch databases for the schema tests: built from the migrations or the schema files."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import asyncpg

from shared.schema_catalog import Attribution, apply_in_steps
from tests.conftest import with_database


@asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[asyncpg.Connection]:
    name = f"s_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(with_database(server_url, name))
        try:
            yield conn
        finally:
            await conn.close()
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def built_from(server_url: str, steps: Iterable[tuple[str, str]]) -> Attribution:
    async with scratch_database(server_url) as conn:
        return await apply_in_steps(conn, steps)
