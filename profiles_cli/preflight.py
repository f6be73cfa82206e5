"""What a command checks before it touches anything: that its data directory can be used and,
for the admin commands, already holds a suite's data; that the PostgreSQL and Redis it was
pointed at answer; that a port a server would listen on is free. Each problem is one line that
names the flag (or variable) to fix, raised as a domain error, so `profiles` prints it and exits
non-zero instead of a traceback.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from shared.errors import FailedPrecondition

# How long an unreachable server may take to say so before the command gives up on it.
REACH_TIMEOUT_SECONDS = 5.0


class NoSuiteData(FailedPrecondition):
    reason = "NO_SUITE_DATA"


class UnusableDataDir(FailedPrecondition):
    reason = "DATA_DIR_UNUSABLE"


class Unreachable(FailedPrecondition):
    reason = "UNREACHABLE"


def holds_suite(path: Path) -> bool:
    """True when path is the data directory of a suite (its embedded PostgreSQL was set up)."""
    try:
        return (path / "postgres" / "PG_VERSION").is_file()
    except OSError:
        return False


def require_suite_data(path: Path, known: tuple[Path, ...] = ()) -> None:
    """Raises unless path already holds a suite's data: an admin command on any other directory
    would create a brand-new database there (a typo'd --data-dir). `known` are directories to
    suggest besides the ones next to path (the default data directory, PROFILES_DATA_DIR)."""
    if holds_suite(path):
        return
    if path.exists() and not path.is_dir():
        raise UnusableDataDir(f"--data-dir {path} is a file, not a data directory")
    what = "no database in" if path.is_dir() else "no data directory at"
    guess = similar_suite_dir(path, known)
    hint = f"; did you mean --data-dir {guess}?" if guess is not None else ";"
    raise NoSuiteData(f"{what} {path}{hint} `profiles up --data-dir {path}` creates one")


def similar_suite_dir(path: Path, known: tuple[Path, ...] = ()) -> Path | None:
    """A data directory holding a suite that path was probably meant to be: a neighbour with a
    similar name, else one of `known`."""
    try:
        neighbours = [p for p in path.parent.iterdir() if p != path and p.is_dir()]
    except OSError:
        neighbours = []
    by_name = {p.name: p for p in neighbours}
    for name in difflib.get_close_matches(path.name, list(by_name), n=5, cutoff=0.6):
        if holds_suite(by_name[name]):
            return by_name[name]
    return next((p for p in known if p != path and holds_suite(p)), None)


def usual_data_dirs() -> tuple[Path, ...]:
    """Where a suite's data usually is: PROFILES_DATA_DIR, then the default."""
    from shared.settings import Settings

    from_env = os.environ.get("PROFILES_DATA_DIR")
    default = Settings().data_dir
    return (Path(from_env).expanduser().absolute(), default) if from_env else (default,)


def prepare_data_dir(path: Path) -> None:
    """Creates the data directory (owner-only) if it is missing; raises UnusableDataDir, naming
    the flag, when it cannot be (a file, a path nobody may write)."""
    if path.exists() and not path.is_dir():
        raise UnusableDataDir(
            f"--data-dir {path} is a file, not a directory; give a directory"
            " (--data-dir or PROFILES_DATA_DIR)"
        )
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UnusableDataDir(
            f"cannot create --data-dir {path}: {exc.strerror}; give a directory you may write"
            " (--data-dir or PROFILES_DATA_DIR)"
        ) from exc


def unusable(path: Path, exc: OSError) -> UnusableDataDir:
    """The one line for a data directory this command may not use (`exc` says why)."""
    return UnusableDataDir(
        f"cannot use --data-dir {path}: {exc.strerror or exc}; give a directory you may write"
        " (--data-dir or PROFILES_DATA_DIR)"
    )


def redact(url: str) -> str:
    """url without its password, fit to print."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        credentials, _, hosts = parts.netloc.rpartition("@")
        user = credentials.split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
    except ValueError:
        return url


async def check_postgres(url: str) -> None:
    """Raises Unreachable unless PostgreSQL at url accepts a connection and answers a query."""
    why = await postgres_problem(url)
    if why is not None:
        raise Unreachable(
            f"PostgreSQL at {redact(url)} is unreachable: {why}; check --database-url"
            " (or PROFILES_DATABASE_URL)"
        )


async def check_redis(url: str) -> None:
    """Raises Unreachable unless Redis at url answers PING."""
    why = await redis_problem(url)
    if why is not None:
        raise Unreachable(
            f"Redis at {redact(url)} is unreachable: {why}; check --redis-url"
            " (or PROFILES_REDIS_URL)"
        )


async def postgres_problem(url: str) -> str | None:
    """None when PostgreSQL at url accepts a connection and answers `SELECT 1`; else why not
    (one line, without the URL)."""
    import asyncpg

    try:
        connection = await asyncpg.connect(url, timeout=REACH_TIMEOUT_SECONDS)
        try:
            await connection.fetchval("SELECT 1", timeout=REACH_TIMEOUT_SECONDS)
        finally:
            await connection.close()
    except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return _why(exc)
    return None


async def redis_problem(url: str) -> str | None:
    """None when Redis at url answers PING; else why not (one line, without the URL)."""
    from redis.exceptions import RedisError

    from shared.redis_client import connect

    try:
        client = connect(
            url,
            socket_connect_timeout=REACH_TIMEOUT_SECONDS,
            socket_timeout=REACH_TIMEOUT_SECONDS,
        )
        try:
            async with asyncio.timeout(2 * REACH_TIMEOUT_SECONDS):
                await client.ping()
        finally:
            await client.aclose()
    except (OSError, ValueError, RedisError) as exc:
        return _why(exc)
    return None


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.removesuffix(".")


def port_is_free(host: str, port: int) -> bool:
    """True if a server could listen on host:port now (SO_REUSEADDR, as gRPC binds)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return False
    return True
