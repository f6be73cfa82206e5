"""Projects (the tenants), their API keys and their settings.

A key is `prf_<key_id>_<secret>`: key_id finds the row, and only a SHA-256 of the secret is
stored. The secret has 256 bits of entropy, so a plain hash (not a slow password hash) is safe,
and verification compares digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound
from shared.project_settings import validate_setting, with_defaults

ROLES = ("sdk", "read", "admin")
KEY_PREFIX = "prf_"

INSERT_PROJECT = """
    INSERT INTO projects (project_id, name) VALUES ($1, $2)
    RETURNING project_id, name, create_time"""
SELECT_PROJECTS = "SELECT project_id, name, create_time FROM projects ORDER BY create_time, name"
SELECT_PROJECT_BY_NAME = "SELECT project_id, name, create_time FROM projects WHERE name = $1"
INSERT_KEY = """
    INSERT INTO api_keys (project_id, key_id, role, secret_sha256, display_name)
    VALUES ($1, $2, $3, $4, $5)
    RETURNING project_id, key_id, role, display_name, create_time, revoke_time"""
# Revoking keeps the row (with its time) so `keys list` can show what was revoked and when.
REVOKE_KEY = """
    UPDATE api_keys SET revoke_time = now()
    WHERE key_id = $1 AND revoke_time IS NULL
    RETURNING project_id, key_id, role, display_name, create_time, revoke_time"""
SELECT_KEYS = """
    SELECT project_id, key_id, role, display_name, create_time, revoke_time
    FROM api_keys WHERE project_id = $1 ORDER BY create_time, key_id"""
# The one lookup on the authentication path: by the unique key_id, revoked keys excluded.
SELECT_ACTIVE_KEY = """
    SELECT project_id, key_id, role, display_name, create_time, revoke_time, secret_sha256
    FROM api_keys WHERE key_id = $1 AND revoke_time IS NULL"""
SELECT_SETTINGS = "SELECT name, value FROM project_settings WHERE project_id = $1"
UPSERT_SETTING = """
    INSERT INTO project_settings (project_id, name, value) VALUES ($1, $2, $3)
    ON CONFLICT (project_id, name) DO UPDATE SET value = EXCLUDED.value, update_time = now()"""


@dataclass(frozen=True, slots=True)
class Project:
    project_id: uuid.UUID
    name: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    project_id: uuid.UUID
    key_id: str
    role: str
    display_name: str
    create_time: datetime
    revoke_time: datetime | None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new key with its plain secret, which is shown once and never stored."""

    key: ApiKey
    plain_key: str


class ProjectNameTaken(AlreadyExists):
    reason = "PROJECT_NAME_TAKEN"


class ProjectNotFound(NotFound):
    reason = "PROJECT_NOT_FOUND"


class KeyNotFound(NotFound):
    reason = "KEY_NOT_FOUND"


class InvalidRole(InvalidArgument):
    reason = "INVALID_ROLE"


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_key(plain_key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    if not plain_key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = plain_key[len(KEY_PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


def secret_matches(secret: str, stored_sha256: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_sha256)


def _key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        project_id=row["project_id"],
        key_id=row["key_id"],
        role=row["role"],
        display_name=row["display_name"],
        create_time=row["create_time"],
        revoke_time=row["revoke_time"],
    )


class TenancyRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create_project(self, name: str) -> Project:
        if not name.strip() or len(name) > 100:
            raise InvalidArgument(
                "project name must be 1 to 100 characters",
                [FieldViolation("name", "must be 1 to 100 characters")],
            )
        try:
            row = await self._pool.fetchrow(INSERT_PROJECT, uuid.uuid4(), name)
        except asyncpg.UniqueViolationError as exc:
            raise ProjectNameTaken(f"a project named {name!r} exists") from exc
        assert row is not None  # INSERT ... RETURNING always returns the row
        return Project(**dict(row))

    async def list_projects(self) -> list[Project]:
        return [Project(**dict(r)) for r in await self._pool.fetch(SELECT_PROJECTS)]

    async def get_project_by_name(self, name: str) -> Project:
        row = await self._pool.fetchrow(SELECT_PROJECT_BY_NAME, name)
        if row is None:
            raise ProjectNotFound(f"no project named {name!r}")
        return Project(**dict(row))

    async def create_key(
        self, project_id: uuid.UUID, role: str, display_name: str = ""
    ) -> IssuedKey:
        if role not in ROLES:
            raise InvalidRole(
                f"role must be one of {', '.join(ROLES)}",
                [FieldViolation("role", f"must be one of {', '.join(ROLES)}")],
            )
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        try:
            row = await self._pool.fetchrow(
                INSERT_KEY, project_id, key_id, role, hash_secret(secret), display_name
            )
        except asyncpg.ForeignKeyViolationError as exc:
            raise ProjectNotFound(f"no project {project_id}") from exc
        assert row is not None  # INSERT ... RETURNING always returns the row
        return IssuedKey(key=_key(row), plain_key=f"{KEY_PREFIX}{key_id}_{secret}")

    async def revoke_key(self, key_id: str) -> ApiKey:
        row = await self._pool.fetchrow(REVOKE_KEY, key_id)
        if row is None:
            raise KeyNotFound(f"no active key {key_id!r}")
        return _key(row)

    async def list_keys(self, project_id: uuid.UUID) -> list[ApiKey]:
        return [_key(r) for r in await self._pool.fetch(SELECT_KEYS, project_id)]

    async def find_active_key(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        row = await self._pool.fetchrow(SELECT_ACTIVE_KEY, key_id)
        if row is None:
            return None
        return _key(row), bytes(row["secret_sha256"])

    async def get_settings(self, project_id: uuid.UUID) -> dict[str, Any]:
        rows = await self._pool.fetch(SELECT_SETTINGS, project_id)
        return with_defaults({r["name"]: r["value"] for r in rows})

    async def set_setting(self, project_id: uuid.UUID, name: str, value: Any) -> None:
        validate_setting(name, value)
        try:
            await self._pool.execute(UPSERT_SETTING, project_id, name, value)
        except asyncpg.ForeignKeyViolationError as exc:
            raise ProjectNotFound(f"no project {project_id}") from exc
