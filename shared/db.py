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
from collections.abc import Callable, Generator, Sequence
from contextvars import ContextVar
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


@dataclass(frozen=True, slots=True)
class DatabaseBounds:
    """How long a service waits on PostgreSQL before it answers UNAVAILABLE (docs/running.md).

    A server that hangs (stopped, frozen, cut off without a reset) answers nothing and closes
    nothing, so without a bound a call waits for as long as the hang lasts. The waits for a
    pooled connection are bounded everywhere; statements only while serving an RPC (see
    bound_statements): background work (migrations, partition maintenance, sweeps, bus
    handlers, the outbox relay) may legitimately run long, and has its own timeouts or none."""

    # Waiting for a pooled connection, including making a new one (the server accepts the
    # socket, then never answers). Also how long a released connection whose statement was cut
    # waits for the server to confirm the cancel before it is dropped (inside a transaction,
    # its ROLLBACK waits for that up to the statement's bound).
    acquire_s: float = 5.0
    # Each statement of a read RPC (the contract marks it free of side effects) whose client
    # set no deadline: a read takes milliseconds, and the suite's own clients give a whole
    # read 5 s (the console) or 10 s (profiles.client).
    read_statement_s: float = 10.0
    # Each statement of any other RPC whose client set no deadline: evaluating a segment or
    # funnel over every live profile takes seconds at a few hundred thousand profiles, and the
    # console gives those writes 120 s.
    write_statement_s: float = 120.0


DEFAULT_BOUNDS = DatabaseBounds()

# The bound on each statement run from this context (seconds), unless the call passes its own
# timeout: set by the server interceptor for the task serving an RPC, and so inherited by the
# tasks it starts for it (a group commit). None (background work): no bound.
_statement_timeout: ContextVar[float | None] = ContextVar(
    "profiles_statement_timeout", default=None
)


def bound_statements(seconds: float | None) -> None:
    """Bounds each statement run from now on in this context (None: no bound). A statement
    cut by the bound raises asyncpg's TimeoutError (connection_lost holds for it): asyncpg
    sends the server a cancel, and the transaction it was in rolls back."""
    _statement_timeout.set(seconds)


def _bounded(options: dict[str, Any]) -> dict[str, Any]:
    """A call's keyword options, with the context's bound as its timeout if it gives none."""
    if options.get("timeout") is None:
        options["timeout"] = _statement_timeout.get()
    return options


class BoundedConnection(asyncpg.Connection):
    """A connection whose statements take the context's bound when the call gives no timeout.

    These are the calls the services make, and what a transaction runs (BEGIN, COMMIT and
    ROLLBACK go through execute); the pool's fetch/execute come here too. Other calls (prepare,
    copy) are not bounded. A cursor's bound applies to each of its fetches."""

    __slots__ = ()

    async def execute(self, query: str, *args: Any, **options: Any) -> str:
        return await super().execute(query, *args, **_bounded(options))

    async def executemany(self, command: str, args: Any, **options: Any) -> None:
        await super().executemany(command, args, **_bounded(options))

    async def fetch(self, query: str, *args: Any, **options: Any) -> Any:
        return await super().fetch(query, *args, **_bounded(options))

    async def fetchval(self, query: str, *args: Any, **options: Any) -> Any:
        return await super().fetchval(query, *args, **_bounded(options))

    async def fetchrow(self, query: str, *args: Any, **options: Any) -> Any:
        return await super().fetchrow(query, *args, **_bounded(options))

    async def fetchmany(self, query: str, args: Any, **options: Any) -> Any:
        return await super().fetchmany(query, args, **_bounded(options))

    def cursor(self, query: str, *args: Any, **options: Any) -> Any:
        return super().cursor(query, *args, **_bounded(options))


class NoConnectionInTime(ConnectionError):
    """No pooled connection within the bound: all busy, or a server that does not answer."""


class _Acquiring(asyncpg.pool.PoolAcquireContext):
    """Pool.acquire's context (`async with` or `await`), its TimeoutError told apart: asyncpg
    raises the plain one, which the outbox relay would take for Redis's."""

    __slots__ = ()

    async def __aenter__(self) -> Any:
        try:
            return await super().__aenter__()
        except TimeoutError as exc:
            raise NoConnectionInTime(self._waited()) from exc

    def __await__(self) -> Generator[Any, None, Any]:
        try:
            return (yield from super().__await__())
        except TimeoutError as exc:
            raise NoConnectionInTime(self._waited()) from exc

    def _waited(self) -> str:
        return f"no database connection within {self.timeout} s"


class BoundedPool(asyncpg.Pool):
    """A pool whose acquire (and so its own fetch, execute...) waits at most the bound."""

    __slots__ = ("_acquire_s",)

    def __init__(self, *args: Any, acquire_s: float, **kwargs: Any) -> None:
        self._acquire_s = acquire_s
        super().__init__(*args, **kwargs)

    def acquire(self, *, timeout: float | None = None) -> Any:
        return _Acquiring(self, self._acquire_s if timeout is None else timeout)


async def create_pool(
    database_url: str, *, max_size: int = 10, bounds: DatabaseBounds = DEFAULT_BOUNDS
) -> asyncpg.Pool:
    """A pool whose connections decode json/jsonb to Python values, and whose waits are
    bounded: a connection within `bounds.acquire_s`, statements within the context's bound."""
    pool = BoundedPool(
        database_url,
        acquire_s=bounds.acquire_s,
        min_size=1,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        init=_init_connection,
        reset=_release_connection,
        loop=None,
        connection_class=BoundedConnection,
        record_class=asyncpg.Record,
    )
    await pool
    return pool


# Errors that say the database, or the way to it, is gone for now rather than that the request
# is wrong: a terminated backend, a server shutting down or refusing connections, a full server,
# a socket reset, the pool closing during shutdown, no pooled connection within the bound. A
# retry (elsewhere, or later) may succeed.
# Where asyncpg's modules are (its connect code raises the socket's own errors).
ASYNCPG_PATH = os.path.dirname(asyncpg.__file__) + os.sep
_LOST = (
    asyncpg.PostgresConnectionError,  # class 08, including ConnectionDoesNotExistError
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    ConnectionError,  # NoConnectionInTime among them
)

# The InternalClientError of an operation started on a connection whose server has just hung
# up. Between two operations PostgreSQL sends a connection one message asyncpg does not expect:
# the FATAL ErrorResponse it writes right before it closes the connection (the postmaster died,
# a shutdown, pg_terminate_backend, an idle session timeout). asyncpg's protocol then waits for
# a ReadyForQuery that never comes (its state 2, PROTOCOL_ERROR_CONSUME, in
# asyncpg/protocol/coreproto.pyx), and learns that the socket closed only on a later turn of
# the event loop; an operation started in between (a pooled connection's next statement, a
# transaction's BEGIN) fails with "cannot switch to state 12; another operation (2) is in
# progress" and asyncpg closes the connection. State "failed" is the one a closed socket
# leaves. Our own bugs do not look like this: two operations at once on one connection fail
# earlier with InterfaceError ("another operation is in progress"), and other protocol
# faults name other states; those stay INTERNAL.
_SERVER_HUNG_UP = re.compile(
    r"^cannot switch to .+; "
    r'(another operation \(2\) is in progress|protocol is in the "failed" state)$'
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
    # (socket.gaierror). A server that hangs answers nothing, and asyncpg raises TimeoutError (an
    # OSError too): a statement cut at its bound (bound_statements), a connect or a cancel the
    # server never answered. Such errors are the database's only when asyncpg raised them; the
    # same error from other code is a bug.
    if isinstance(exc, OSError) and _raised_in_asyncpg(exc):
        return True
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return _SERVER_HUNG_UP.match(str(exc)) is not None
    # asyncpg spells a closed connection or pool only in the message of an InterfaceError.
    return isinstance(exc, asyncpg.InterfaceError) and (
        "is closed" in str(exc) or "is closing" in str(exc)
    )
