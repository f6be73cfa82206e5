"""What the `profiles` command decides and says when something is off: a data directory without
a suite, a server that does not answer, a key of the wrong role, a stopped suite, taken ports,
a service that stopped serving. No suite runs here; servers that must not answer are ports
nobody listens on."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest

import shared.logging
from profiles_cli.cli import build_parser, call_failed, run, suite_addresses, suite_state
from profiles_cli.preflight import prepare_data_dir, redact
from profiles_cli.suite import (
    SERVER_DOWN,
    SERVER_UNCHECKED,
    ServerRecord,
    server_health,
    server_url,
)
from profiles_cli.up import SUITE, taken_ports, taken_ports_advice
from shared.ports import free_ports
from shared.settings import SETTINGS, Settings


@pytest.fixture(autouse=True)
def fresh_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PROFILES_* of the machine running the tests; the session's logging left as it is
    (the admin commands configure it for a process of their own)."""
    monkeypatch.setattr(shared.logging, "configure_logging", lambda *_, **__: None)
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    for name in ("ingest", "identity", "segments", "query"):
        monkeypatch.delenv(f"PROFILES_{name.upper()}_ADDRESS", raising=False)


def suite_data(directory: Path, *, keys: bool = False) -> Path:
    """A directory that looks like one a `profiles up` ran on (and is not running on now)."""
    (directory / "postgres").mkdir(parents=True)
    (directory / "postgres" / "PG_VERSION").write_text("16\n")
    if keys:
        (directory / "keys.json").write_text('{"sdk": "s", "read": "r", "admin": "a"}\n')
    return directory


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    errors = capsys.readouterr().err
    assert "Traceback" not in errors
    [line] = errors.strip().splitlines()
    return line


@pytest.mark.parametrize(
    "command",
    [
        ["project", "create", "typo"],
        ["project", "list"],
        ["keys", "create", "--project", "shop", "--role", "admin"],
        ["keys", "list"],
        ["keys", "revoke", "key-id"],
        ["settings", "get", "--project", "shop"],
    ],
)
def test_an_admin_command_on_a_directory_without_a_suite_refuses_and_creates_nothing(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo"

    assert run([*command, "--data-dir", str(typo)]) != 0

    line = one_line(capsys)
    assert f"no data directory at {typo}" in line
    assert f"`profiles up --data-dir {typo}` creates one" in line
    assert not typo.exists()


def test_the_refusal_suggests_the_suite_directory_the_name_was_close_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = suite_data(tmp_path / "profiles-data")
    (tmp_path / "empty").mkdir()

    assert run(["project", "create", "shop", "--data-dir", str(tmp_path / "profiles-dta")]) != 0

    assert f"did you mean --data-dir {real}?" in one_line(capsys)
    assert run(["keys", "list", "--data-dir", str(tmp_path / "empty")]) != 0
    assert f"no database in {tmp_path / 'empty'}" in one_line(capsys)


def test_the_hint_after_creating_a_project_keeps_the_data_dir_given() -> None:
    from profiles_cli.cli import _where

    args = build_parser().parse_args(["project", "create", "shop", "--data-dir", "/srv/p"])
    assert _where(args) == " --data-dir /srv/p"
    assert _where(build_parser().parse_args(["project", "create", "shop"])) == ""


def test_a_file_or_an_uncreatable_path_as_data_dir_is_one_line_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for path in (a_file, a_file / "below"):
        with pytest.raises(Exception, match="--data-dir") as refused:
            prepare_data_dir(path)
        assert str(path) in str(refused.value)
    for command in (["project", "list"], ["keys"], ["demo"]):
        assert run([*command, "--data-dir", str(a_file)]) != 0
        assert "--data-dir" in one_line(capsys)


def test_an_unreachable_database_url_is_one_line_naming_the_flag_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    [nowhere] = free_ports(1)
    url = f"postgresql://me:secret@127.0.0.1:{nowhere}/profiles"

    assert run(["project", "list", "--database-url", url]) != 0

    line = one_line(capsys)
    assert f"PostgreSQL at postgresql://me:***@127.0.0.1:{nowhere}/profiles is unreachable" in line
    assert "--database-url" in line
    assert "secret" not in line
    assert run(["keys", "list", "--database-url", "mysql://x"]) != 0
    assert "--database-url" in one_line(capsys)
    assert redact("redis://127.0.0.1:1/0") == "redis://127.0.0.1:1/0"


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_a_key_of_the_wrong_role_is_told_which_role_it_needs_and_how_to_get_it() -> None:
    denied = rpc_error(grpc.StatusCode.PERMISSION_DENIED, "role read may not call ImportEvents")

    line = call_failed("profiles import", "ingest at x", denied, "--address", " --data-dir /d")

    assert "PERMISSION_DENIED" in line
    assert "needs an admin key" in line
    assert "profiles keys --data-dir /d --role admin" in line
    assert "does not know this key" not in line
    unknown = call_failed(
        "profiles import", "ingest at x", rpc_error(grpc.StatusCode.UNAUTHENTICATED, "?"), "-a"
    )
    assert "does not know this key" in unknown


@pytest.mark.parametrize("command", [["demo"], ["import", "events.jsonl"]])
def test_demo_and_import_on_a_stopped_suite_say_so_rather_than_try_the_default_ports(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = suite_data(tmp_path / "data", keys=True)
    events = tmp_path / "events.jsonl"
    events.write_text("")
    if command[0] == "import":
        command = ["import", str(events)]

    assert run([*command, "--data-dir", str(data_dir)]) != 0

    line = one_line(capsys)
    assert f"no `profiles up` runs on {data_dir}" in line
    assert f"profiles up --data-dir {data_dir}" in line
    args = build_parser().parse_args([*command, "--data-dir", str(data_dir)])
    given = suite_addresses(args, {"ingest": ("127.0.0.1:1", "--address")})
    assert given["ingest"] == "127.0.0.1:1"  # an address given needs no running suite


def test_taken_ports_get_one_command_that_moves_them_all_and_keeps_the_data_dir() -> None:
    query, edge_metrics = free_ports(2)
    settings = Settings.from_env(
        {"PROFILES_QUERY_PORT": str(query), "PROFILES_EDGE_METRICS_PORT": str(edge_metrics)}
    )
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", query))
        first.listen()
        second.bind(("127.0.0.1", edge_metrics))
        second.listen()
        taken = [t for t in taken_ports(settings) if t.port in (query, edge_metrics)]
        lines = taken_ports_advice(settings, taken, " --data-dir /srv/p")

    assert len(lines) == 3
    assert lines[0].startswith(f"query: gRPC port {query} on 127.0.0.1 is already in use")
    assert lines[1].startswith(f"edge: metrics port {edge_metrics}")
    command = lines[2].split("e.g.: ", 1)[1]
    assert command.startswith("PROFILES_QUERY_PORT=")
    assert " PROFILES_EDGE_METRICS_PORT=" in command
    assert command.endswith(" profiles up --data-dir /srv/p")
    assert sum("profiles up" in line for line in lines) == 1


def test_up_help_lists_every_port_it_uses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run(["up", "--help"])
    text = capsys.readouterr().out
    defaults = {s.env: s.default for s in SETTINGS}
    for spec in SUITE:
        assert defaults[spec.port_env] in text, spec.name
        assert defaults[spec.metrics_port_env] in text, spec.name
    assert "8340" in text
    assert "9456" in text


def test_the_status_header_agrees_with_the_services_health() -> None:
    serving = {"ingest": "SERVING", "edge": "SERVING"}
    assert suite_state("serving", serving) == "serving"
    one_down = {"ingest": "SERVING", "edge": "UNAVAILABLE"}
    assert suite_state("serving", one_down) == "not serving (edge UNAVAILABLE)"
    assert suite_state("starting", one_down) == "starting"


def test_status_checks_a_given_server_without_a_password_in_the_record() -> None:
    [nowhere] = free_ports(1)
    with_password = f"postgresql://me:secret@127.0.0.1:{nowhere}/profiles"
    recorded = ServerRecord(url=redact(with_password), embedded=False, pid=0, log="")
    assert "secret" not in recorded.url
    assert server_url(recorded, "") is None  # the record alone cannot reach it
    assert server_url(recorded, with_password) == with_password  # this command's own URL
    assert server_url(recorded, f"postgresql://me:secret@127.0.0.1:{nowhere}/other") is None
    plain = ServerRecord(url=f"redis://127.0.0.1:{nowhere}/0", embedded=False, pid=0, log="")
    assert server_url(plain, "") == plain.url

    health = asyncio.run(server_health({"postgres": recorded, "redis": plain}, {}))

    assert health["postgres"][0] == SERVER_UNCHECKED
    assert "PROFILES_DATABASE_URL" in health["postgres"][1]
    assert health["redis"][0] == SERVER_DOWN
    assert suite_state("serving", {"ingest": "SERVING"}, health) == "not serving (Redis DOWN)"


def test_an_http_health_check_of_a_port_that_speaks_no_http_says_so() -> None:
    """A gRPC port answers an HTTP request with HTTP/2 frames: no traceback, a word."""
    import socket
    import threading

    from profiles_cli.suite import _http_health

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00garbage, no status line\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert _http_health(f"127.0.0.1:{server.getsockname()[1]}", 5) == "NOT HTTP"
    finally:
        thread.join(5)
        server.close()


def test_down_returns_once_profiles_up_stopped_even_while_it_is_an_unreaped_zombie(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `profiles up` started by a harness that has not reaped it yet stays a zombie after it
    stopped: not this command's child, so it cannot be waited on; `down` is done all the same."""
    import subprocess
    import sys

    import psutil

    from profiles_cli import cli
    from profiles_cli.suite import RunRecord, write_record

    # A parent that never reaps its child: the child plays `profiles up`.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, time; c = subprocess.Popen(['sleep', '60']);"
            " print(c.pid, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        up = psutil.Process(pid)
        write_record(tmp_path, RunRecord(pid, up.create_time(), str(tmp_path), "serving", {}, {}))
        monkeypatch.setattr(cli, "DOWN_TIMEOUT_SECONDS", 10)
        assert cli.run(["down", "--data-dir", str(tmp_path)]) == 0
        assert "Stopped." in capsys.readouterr().out
        assert up.status() == psutil.STATUS_ZOMBIE
    finally:
        parent.kill()
        parent.wait()


def test_a_bind_address_that_is_not_this_machines_is_named() -> None:
    from profiles_cli.up import bind_address_problem

    assert bind_address_problem("127.0.0.1") == ""
    assert "does not resolve" in bind_address_problem("nosuchhost.invalid")
    assert "is not an address of this machine" in bind_address_problem("10.255.255.1")


def test_serve_names_a_database_it_cannot_reach_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROFILES_DATABASE_URL", "postgresql://u:secret@127.0.0.1:1/db")
    monkeypatch.setenv("PROFILES_REDIS_URL", "redis://127.0.0.1:1")
    monkeypatch.setenv("PROFILES_INGEST_METRICS_PORT", "0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("PROFILES_INGEST_PORT", str(probe.getsockname()[1]))
    assert run(["serve", "ingest"]) == 1
    error = capsys.readouterr().err
    assert "profiles serve: ingest: cannot use the database at postgresql://u:***@" in error
    assert "secret" not in error
    assert "Traceback" not in error


def test_serve_edge_names_its_taken_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("PROFILES_EDGE_PORT", str(taken.getsockname()[1]))
        assert run(["serve", "edge"]) == 1
    assert "port" in capsys.readouterr().err


def test_status_lines_its_columns_up_whatever_the_widths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A long URL (PROFILES_DATABASE_URL) or a long address (PROFILES_BIND_ADDRESS) widens its
    column on every line, rather than pushing the rest of its own line out of line."""
    import os
    import re

    import psutil

    from profiles_cli.suite import RunRecord, ServiceRecord, write_record

    nowhere = free_ports(4)

    def service(address: str) -> ServiceRecord:
        return ServiceRecord(address, 1, 0, "grpc", os.getpid(), str(tmp_path / "x.log"))

    services = {
        "ingest": service(f"127.0.0.1:{nowhere[0]}"),
        "identity": service(f"[0:0:0:0:0:0:0:1]:{nowhere[1]}"),
    }
    long_url = f"postgresql://profiles_service_account@127.0.0.1:{nowhere[2]}/profiles_production"
    servers = {
        "postgres": ServerRecord(long_url, embedded=False, pid=0, log=""),
        "redis": ServerRecord("unix:///r.sock", embedded=True, pid=0, log=str(tmp_path / "r")),
    }
    # This test's own process plays the running `profiles up`.
    me = psutil.Process()
    write_record(
        tmp_path, RunRecord(me.pid, me.create_time(), str(tmp_path), "serving", services, servers)
    )

    assert run(["status", "--data-dir", str(tmp_path)]) == 1

    _, *lines = capsys.readouterr().out.splitlines()
    *table, logs = lines
    assert [line.split()[0] for line in table] == ["ingest", "identity", "postgres", "redis"]
    cells = [re.split(r" {2,}", line.strip()) for line in table]
    assert all(len(row) == 4 for row in cells), table  # two spaces at least between columns
    assert cells[2][1] == long_url
    assert cells[3][3] == "pid 0"
    starts = set()
    for line, row in zip(table, cells, strict=True):
        at, found = 0, []
        for value in row:
            at = line.index(value, at)
            found.append(at)
            at += len(value)
        starts.add(tuple(found))
    assert len(starts) == 1, table  # every column starts at the same place on every line
    assert logs.index(str(tmp_path / "logs")) == min(starts)[1]  # its paths in the second column


@pytest.mark.parametrize(
    ("command", "subcommand"),
    [
        (["up", "--bogus"], "up"),
        (["up", "extra"], "up"),
        (["status", "--bogus"], "status"),
        (["keys", "--bogus"], "keys"),
        (["keys", "create", "--project", "p", "--role", "sdk", "--bogus"], "keys create"),
        (["dead-letters", "replay", "events", "--bogus"], "dead-letters replay"),
    ],
)
def test_a_subcommand_given_an_unknown_argument_prints_its_own_usage_and_exits_2(
    command: list[str], subcommand: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(command)

    assert exited.value.code == 2
    errors = capsys.readouterr().err
    assert errors.startswith(f"usage: profiles {subcommand} [-h]")
    assert errors.strip().endswith(
        f"profiles {subcommand}: error: unrecognized arguments: {command[-1]}"
    )


def test_import_of_a_directory_says_it_is_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.jsonl"
    assert run(["import", str(missing)]) == 2
    assert one_line(capsys) == f"profiles import: {missing}: no such file"

    assert run(["import", str(tmp_path)]) == 2  # the same code as a missing file

    line = one_line(capsys)
    assert line.startswith(f"profiles import: {tmp_path}: is a directory")
    assert "no such file" not in line


def test_the_lock_file_goes_with_the_lock_and_a_late_opener_takes_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Released, the lock leaves no file behind. A command that opened the file just before
    its holder let go (and removed it) must not hold the removed file's lock while another one
    holds the new file's: it locks the file at the path."""
    import fcntl

    from profiles_cli import suite
    from profiles_cli.suite import LOCK_FILE, release_lock, take_lock

    first = take_lock(tmp_path)
    assert first is not None
    assert take_lock(tmp_path) is None
    release_lock(first)
    assert not (tmp_path / LOCK_FILE).exists()

    holder = take_lock(tmp_path)
    real_flock = fcntl.flock
    calls = 0

    def holder_lets_go_first(fd: int, operation: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # between this command's open and its flock
            release_lock(holder)
        real_flock(fd, operation)

    monkeypatch.setattr(suite.fcntl, "flock", holder_lets_go_first)
    late = take_lock(tmp_path)
    monkeypatch.setattr(suite.fcntl, "flock", real_flock)

    assert late is not None
    assert (tmp_path / LOCK_FILE).exists()
    assert take_lock(tmp_path) is None  # one holder: the late one holds the file at the path
    release_lock(late)
    again = take_lock(tmp_path)
    assert again is not None
    release_lock(again)
