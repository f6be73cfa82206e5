"""The asyncpg pool and the versioned migrations every service applies at start-up.

Each owner keeps its schema next to its code: the suite's own tables (projects, keys, settings,
the outbox) in shared/schema, each service's tables, functions and triggers in
services/<owner>/schema. A migration is a `NNNN_name.sql` file in its owner's folder; the version
numbers are one global sequence across all owners (1..N, no gaps, no repeats), because owners'
objects depend on each other's (identity's profiles reference shared's projects, ingest's events
reference identity's profiles), and every process applies all of them in that order. They run
under a session-level advisory lock (so several processes starting at once apply each file
exactly once), each in its own transaction, and are recorded with a checksum: an applied file that
was edited afterwards stops start-up instead of leaving the schema in an unknown state. Moving a
file between owners' folders changes nothing for a database that already applied it (the version,
name and content are what is recorded).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from shared.errors import raised_from

log = structlog.get_logger(__name__)

# shared/ and services/ are sibling packages, in a checkout as in site-packages. The runner finds
# the owners' folders by that layout, not by importing the services (shared knows no service).
SHARED_SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
SERVICES_DIR = Path(__file__).resolve().parent.parent / "services"
# Any constant works as long as nothing else in the database uses it; this is "profiles" in ASCII.
MIGRATION_LOCK_ID = 0x70726F66696C6573

CREATE_MIGRATIONS_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version integer PRIMARY KEY,
        name text NOT NULL,
        checksum text NOT NULL,
        apply_time timestamptz NOT NULL DEFAULT now()
    )"""
SELECT_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
INSERT_APPLIED = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Each owner's readable current schema (shared/schema_catalog.py), beside its migrations: the
# runner never applies it.
SCHEMA_FILE_NAME = "schema.sql"


class MigrationError(RuntimeError):
    """The database's recorded migrations do not match the files shipped with this version."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def schema_directories() -> list[Path]:
    """Every owner's migration folder: shared's, then each service's that has one."""
    return [SHARED_SCHEMA_DIR, *sorted(p for p in SERVICES_DIR.glob("*/schema") if p.is_dir())]


def migration_paths(directories: Path | Sequence[Path] | None = None) -> list[Path]:
    """The migration files of the given folders (default: every owner's), in version order."""
    if directories is None:
        directories = schema_directories()
    elif isinstance(directories, Path):
        directories = [directories]
    paths = [
        path
        for directory in directories
        for path in directory.glob("*.sql")
        if path.name != SCHEMA_FILE_NAME
    ]
    for path in paths:
        if _FILE_NAME.match(path.name) is None:
            raise MigrationError(f"migration file name not NNNN_name.sql: {path}")
    return sorted(paths, key=lambda path: (path.name, str(path)))


def load_migrations(directories: Path | Sequence[Path] | None = None) -> list[Migration]:
    migrations = []
    for path in migration_paths(directories):
        match = _FILE_NAME.match(path.name)
        assert match is not None  # checked by migration_paths
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(
            "migration versions must be 1..N across all owners, without gaps or repeats:"
            f" {versions}"
        )
    return migrations


async def migrate(database_url: str, directories: Path | Sequence[Path] | None = None) -> list[int]:
    """Applies the migrations not yet applied (of every owner's folder unless folders are given);
    returns their versions. Safe to run concurrently."""
    migrations = load_migrations(directories)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await conn.execute(CREATE_MIGRATIONS_TABLE)
            applied = {r["version"]: r for r in await conn.fetch(SELECT_APPLIED)}
            newly_applied = []
            for migration in migrations:
                recorded = applied.get(migration.version)
                if recorded is not None:
                    if recorded["checksum"] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version}_{migration.name} was edited after it"
                            " was applied; add a new migration instead"
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        INSERT_APPLIED, migration.version, migration.name, migration.checksum
                    )
                newly_applied.append(migration.version)
                log.info("migration_applied", version=migration.version, name=migration.name)
            unknown = set(applied) - {m.version for m in migrations}
            if unknown:
                raise MigrationError(f"database has migrations this version lacks: {unknown}")
            return newly_applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()


def _json_encoder() -> Callable[[Any], str]:
    """json.dumps with its default options, minus the per-call set-up: json.dumps builds a new
    C encoder for every value (and a dict to detect cycles in it), which was a third of
    encoding an event's small payload, and asyncpg encodes every element of a jsonb[] argument
    (a batch's payloads) on its own. The same text (a unit test checks it) and the same
    TypeError for what JSON cannot hold; values are never cyclic here (no cycle check)."""
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:  # no C accelerator in this Python
        return json.dumps
    encode = make_encoder(
        None,  # no cycle check
        json.JSONEncoder().default,  # raises TypeError, as json.dumps does
        json.encoder.encode_basestring_ascii,
        None,  # no indent
        ": ",
        ", ",
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )

    def encode_json(value: Any) -> str:
        return "".join(encode(value, 0))

    return encode_json


encode_json = _json_encoder()


# jsonb's binary wire format: a version byte, then the JSON text (json's binary format is the
# text alone).
JSONB_FORMAT_VERSION = b"\x01"


def _encode_jsonb(value: Any) -> bytes:
    return JSONB_FORMAT_VERSION + encode_json(value).encode()


def _decode_jsonb(data: bytes) -> Any:
    return json.loads(data[1:])


def _encode_json_bytes(value: Any) -> bytes:
    return encode_json(value).encode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary, not text: with a text codec for its elements asyncpg sends a jsonb[] argument (a
    # batch's payloads) as one array literal, every payload quoted and escaped in Python and
    # parsed back by array_in and jsonb_in on the server (issue 19's profile: 2.7% of
    # PostgreSQL's CPU in the bind message's text input functions); binary arrays carry each
    # payload's text as it is.
    await conn.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec(
        "json", encoder=_encode_json_bytes, decoder=json.loads, schema="pg_catalog", format="binary"
    )


async def _release_connection(conn: asyncpg.Connection) -> None:
    """Nothing beyond what asyncpg does itself on release (roll back an open transaction, drop
    the connection's Python listeners). Its default adds a reset query (advisory unlock, CLOSE
    ALL, UNLISTEN *, RESET ALL): one more round trip per pooled call (in the query bench it
    cost each GetProfile about 60 us of PostgreSQL CPU and 20 us of the service's), for session
    state no service leaves on a pooled connection: advisory locks are transaction-scoped,
    cursors live inside transactions, nothing SETs a session variable, and LISTENers either
    hold a dedicated connection or UNLISTEN before releasing (OutboxRelay)."""


async def create_pool(database_url: str, *, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections decode json/jsonb to Python values."""
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=max_size,
        init=_init_connection,
        reset=_release_connection,
    )
    assert pool is not None
    return pool


# Errors that say the database, or the way to it, is gone for now rather than that the request
# is wrong: a terminated backend, a server shutting down or refusing connections, a full server,
# a socket reset, the pool closing during shutdown. A retry (elsewhere, or later) may succeed.
# Where asyncpg's modules are (its connect code raises the socket's own errors).
ASYNCPG_PATH = os.path.dirname(asyncpg.__file__) + os.sep
_LOST = (
    asyncpg.PostgresConnectionError,  # class 08, including ConnectionDoesNotExistError
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    ConnectionError,
)


def _raised_in_asyncpg(exc: BaseException) -> bool:
    """True if a frame of `exc`'s traceback is asyncpg's (its connection code raised it)."""
    frame = exc.__traceback__
    while frame is not None:
        if ASYNCPG_PATH in frame.tb_frame.f_code.co_filename:
            return True
        frame = frame.tb_next
    return False


def connection_lost(exc: BaseException) -> bool:
    """True if `exc`, or what it was raised from, is a lost or refused database connection."""
    return raised_from(exc, _lost)


def _lost(exc: BaseException) -> bool:
    if isinstance(exc, _LOST):
        return True
    # Connecting to a server that is down fails with whatever the socket answers: a Unix socket
    # the server removed on shutdown (FileNotFoundError), a host name that no longer resolves
    # (socket.gaierror). Such errors are the database's only when asyncpg raised them; the
    # same error from other code is a bug.
    if isinstance(exc, OSError) and _raised_in_asyncpg(exc):
        return True
    # asyncpg spells a closed connection or pool only in the message of an InterfaceError.
    return isinstance(exc, asyncpg.InterfaceError) and (
        "is closed" in str(exc) or "is closing" in str(exc)
    )
