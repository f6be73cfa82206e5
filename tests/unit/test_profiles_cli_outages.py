"""What `profiles status` says of an embedded server that does not answer, by what its process
does (gone: `profiles up` starts it again; stopped or hung: it does not), and how the command
ends when the reader of its output is gone. No suite runs here: this test's own process plays
the running `profiles up`, a sleeping process with the Redis socket in its command line plays
the embedded Redis, and nothing listens on that socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import shared.logging
from profiles_cli.cli import EXIT_OUTPUT_CLOSED, run
from profiles_cli.datadir import DataDir
from profiles_cli.suite import RunRecord, ServerRecord, ServiceRecord, write_record
from shared.embedded import EmbeddedRedis
from shared.ports import free_ports
from shared.settings import SETTINGS


@pytest.fixture(autouse=True)
def fresh_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PROFILES_* of the machine running the tests; the session's logging left alone."""
    monkeypatch.setattr(shared.logging, "configure_logging", lambda *_, **__: None)
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)


def record_a_suite(data_dir: Path) -> Path:
    """A record naming this process as the running `profiles up`, with one service nobody
    serves and an embedded Redis; returns that Redis's socket path."""
    socket_path = EmbeddedRedis(DataDir(data_dir).redis).socket_path
    [nowhere] = free_ports(1)
    services = {
        "ingest": ServiceRecord(f"127.0.0.1:{nowhere}", nowhere, 0, "grpc", os.getpid(), "x.log")
    }
    log = str(data_dir / "redis" / "redis.log")
    servers = {"redis": ServerRecord(f"unix://{socket_path}", True, 0, log)}
    me = psutil.Process()
    write_record(
        data_dir,
        RunRecord(me.pid, me.create_time(), str(data_dir), "serving", services, servers),
    )
    return socket_path


@pytest.fixture
def fake_redis(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process the data directory's pid file names as its Redis (its command line holds the
    socket, as redis-server's does), which answers nothing."""
    socket_path = record_a_suite(tmp_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", str(socket_path)]
    )
    (socket_path.parent / "redis.pid").write_text(f"{process.pid}\n")
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def redis_advice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert run(["status", "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "Redis DOWN" in captured.out.splitlines()[0]
    [line] = [line for line in captured.err.splitlines() if "Redis does not answer" in line]
    return line


def test_status_tells_a_hung_a_stopped_and_a_gone_embedded_server_apart(
    tmp_path: Path, fake_redis: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    flag = f"--data-dir {tmp_path}"
    hung = redis_advice(tmp_path, capsys)
    assert f"though its process (pid {fake_redis.pid}) runs" in hung
    assert "`profiles up` restarts only a server whose process ended" in hung
    assert f"`profiles down {flag}` and `profiles up {flag}`" in hung

    os.kill(fake_redis.pid, signal.SIGSTOP)
    stopped_by_now(fake_redis.pid)
    stopped = redis_advice(tmp_path, capsys)
    assert f"its process (pid {fake_redis.pid}) is stopped" in stopped
    assert f"`kill -CONT {fake_redis.pid}`" in stopped

    fake_redis.kill()
    fake_redis.wait()
    gone = redis_advice(tmp_path, capsys)
    assert "its process is gone, and `profiles up` starts it again by itself" in gone
    for advice in (hung, stopped):
        assert "starts it again by itself" not in advice


def stopped_by_now(pid: int) -> None:
    """Waits until the kernel has stopped pid: SIGSTOP takes effect once the process is
    scheduled, which on a busy machine is not at once."""
    deadline = time.monotonic() + 30
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, "SIGSTOP did not stop the process"
        time.sleep(0.01)


@pytest.mark.parametrize("buffered", [True, False])
def test_status_into_a_closed_pipe_ends_quietly_as_unix_tools_do(
    tmp_path: Path, buffered: bool
) -> None:
    """`profiles status | head -1`: head is gone before status writes (a pipe whose reading
    end is closed: every write fails), buffered output or not (PYTHONUNBUFFERED)."""
    record_a_suite(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    for command in (["status"], ["--help"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            ended = subprocess.run(
                [sys.executable, "-m", "profiles_cli.cli", *command, "--data-dir", str(tmp_path)],
                stdout=write_end,
                stderr=subprocess.PIPE,
                env=env,
                timeout=60,
                check=False,
            )
        finally:
            os.close(write_end)
        errors = ended.stderr.decode()
        assert "Traceback" not in errors
        assert "BrokenPipe" not in errors
        assert "Exception ignored" not in errors
        assert ended.returncode in (0, EXIT_OUTPUT_CLOSED), errors
        if command == ["status"]:
            assert ended.returncode == EXIT_OUTPUT_CLOSED
