"""The shell commands of README.md and of every docs/*.md page run as printed.

One `profiles up` (README command 1, on a temporary data directory and free ports) serves every
test here. The documents' ```bash blocks run in order, one document after the other, each command
on its own (a variable one sets, `KEY=$(...)`, is kept for the later commands of its document,
set once as in a terminal: its command does not run again before each of them), with only this
rewriting: an address of a service on its default port (127.0.0.1:50054, localhost:9454,
127.0.0.1:8340 ...) becomes the address of that service in the running suite, and
PROFILES_DATA_DIR names the suite's data directory. ```python blocks that use the client
helper run too. A command that exits non-zero fails the test, which names it.

What runs: grpcurl, `profiles` commands (`profiles demo` among them, which feeds the suite),
`VAR=$(...)` assignments, curl when its URL is a port of a service `profiles up` runs, and
client-helper snippets. What is deliberately skipped is listed in SKIPPED with the reason, and
printed by the test (pytest -rP shows it); anything else is skipped as "not a command this test
runs", also printed, so a page can show any command without breaking this test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from profiles_cli.suite import read_record
from profiles_cli.up import SUITE
from shared.settings import SETTINGS
from tests.api.test_profiles_up import free_ports, processes_of, profiles_command
from tests.conftest import server_scratch_dir
from tests.support.bytecode import compile_project

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "Profiles is up"
START_TIMEOUT = 120.0
COMMAND_TIMEOUT = 120.0

# (reason, pattern on a command): the first that matches skips the command.
SKIPPED: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "installs packages or a virtual environment (the test runs in one already)",
        re.compile(r"^(python3? -m venv|pip3? |\. \S*activate|source \S*activate)"),
    ),
    (
        "starts the suite: this test's suite was started as README command 1 says",
        re.compile(r"(^|&& *)profiles up\b"),
    ),
    ("Docker: no Docker engine here", re.compile(r"^(docker|export PROFILES_INTERNAL_TOKEN)")),
    ("benchmarks take minutes of load", re.compile(r"^python3? -m bench")),
    (
        "tests, linters and code generators run in CI on their own",
        re.compile(r"^(pytest|ruff|mypy|lint-imports|\.ci/|python3? protos/)"),
    ),
    ("holds a placeholder to fill in", re.compile(r"<[a-z_]+>")),
)
_RUN_FIRST_WORDS = {"grpcurl", "profiles", "curl"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\$\(")
_ADDRESS = re.compile(r"\b(127\.0\.0\.1|localhost):(\d{2,5})\b")


@dataclass(frozen=True, slots=True)
class Block:
    document: str
    line: int
    language: str
    text: str


@dataclass(frozen=True, slots=True)
class RunningSuite:
    data_dir: Path
    env: dict[str, str]  # a fresh terminal's: no PROFILES_* but the data directory
    banner: str
    ports: dict[int, int]  # default port -> the running suite's port


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(path: Path) -> list[Block]:
    blocks, language, start, lines = [], "", 0, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = re.match(r"^```\s*([A-Za-z]*)\s*$", line)
        if fence and not language:
            language, start, lines = fence.group(1) or "text", number, []
        elif line.startswith("```") and language:
            blocks.append(Block(path.name, start, language, "\n".join(lines)))
            language = ""
        elif language:
            lines.append(line)
    return blocks


def commands(block: Block) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", "", block.text)
    return [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]


def skip_reason(command: str, suite_ports: set[int]) -> str | None:
    """Why this command does not run, or None when it does."""
    for reason, pattern in SKIPPED:
        if pattern.search(command):
            return reason
    first = command.split()[0]
    if first == "curl" and not any(int(p) in suite_ports for _, p in _ADDRESS.findall(command)):
        return "curl to no service of the suite"
    if first in _RUN_FIRST_WORDS or _ASSIGNMENT.match(command):
        return None
    return "not a command this test runs"


def readme_command_1() -> str:
    first_shell = next(b for b in code_blocks(ROOT / "README.md") if b.language == "bash")
    return commands(first_shell)[0]


@pytest.fixture(scope="module")
def running_suite() -> Iterator[RunningSuite]:
    compile_project()
    tmp_path = server_scratch_dir("profiles-docs-")
    data_dir = tmp_path / "data"
    fresh = {k: v for k, v in os.environ.items() if not k.startswith("PROFILES_")}
    fresh["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{fresh.get('PATH', '')}"
    fresh["PROFILES_DATA_DIR"] = str(data_dir)
    up_env = dict(fresh)
    ports = iter(free_ports(2 * len(SUITE)))
    for spec in SUITE:
        up_env[spec.port_env] = str(next(ports))
        up_env[spec.metrics_port_env] = str(next(ports))
    assert readme_command_1().endswith("profiles up")  # what the fixture runs, on free ports
    banner_path = tmp_path / "up.out"
    with banner_path.open("w") as banner_file:
        process = subprocess.Popen(
            [*profiles_command(), "up"],
            env=up_env,
            stdout=banner_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while READY_LINE not in banner_path.read_text() or "Press Ctrl-C" not in (
            banner_path.read_text()
        ):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"profiles up did not start:\n{banner_path.read_text()}")
            time.sleep(0.2)
        record = read_record(data_dir)
        assert record is not None
        defaults = {s.env: int(s.default) for s in SETTINGS if s.default.isdigit()}
        mapping = {}
        for spec in SUITE:
            service = record.services[spec.name]
            mapping[defaults[spec.port_env]] = service.port
            if service.metrics_port:
                mapping[defaults[spec.metrics_port_env]] = service.metrics_port
        yield RunningSuite(data_dir, fresh, banner_path.read_text(), mapping)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        for leftover in processes_of(tmp_path):
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        shutil.rmtree(tmp_path, ignore_errors=True)


def on_suite(text: str, suite: RunningSuite) -> str:
    """text with every default-port address moved to the running suite's port."""

    def move(match: re.Match[str]) -> str:
        port = int(match.group(2))
        return f"{match.group(1)}:{suite.ports.get(port, port)}"

    return _ADDRESS.sub(move, text)


def run_shell(script: str, suite: RunningSuite) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", script],
        env=suite.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("document", documents(), ids=lambda path: path.name)
def test_the_commands_of_every_document_run_as_printed(
    document: Path, running_suite: RunningSuite
) -> None:
    ran, skipped, failures = [], [], []
    variables: dict[str, str] = {}  # what the document's `NAME=$(...)` commands set
    for block in code_blocks(document):
        where = f"{block.document}:{block.line}"
        if block.language == "python":
            if "profiles.client" not in block.text:
                skipped.append((where, "python block without the client helper", ""))
                continue
            result = subprocess.run(
                [sys.executable, "-c", on_suite(block.text, running_suite)],
                env=running_suite.env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
            ran.append(f"{where} python client snippet")
            if result.returncode != 0:
                failures.append(f"{where} python snippet: {result.stderr[-2000:]}")
            continue
        if block.language not in ("bash", "sh", "shell"):
            continue
        suite_ports = set(running_suite.ports)
        for command in commands(block):
            reason = skip_reason(command, suite_ports)
            if reason is not None:
                skipped.append((where, reason, command))
                continue
            moved = on_suite(command, running_suite)
            known = [f"{name}={shlex.quote(value)}" for name, value in variables.items()]
            assigned = command.split("=", 1)[0] if _ASSIGNMENT.match(command) else None
            script = moved
            if assigned is not None:
                # The command as printed, then the value it set, for the later commands.
                script = f'{moved}\ncode=$?\nprintf %s "${assigned}"\nexit $code'
            result = run_shell("\n".join([*known, script]), running_suite)
            ran.append(f"{where} {command}")
            if assigned is not None and result.returncode == 0:
                variables[assigned] = result.stdout
            if result.returncode != 0:
                failures.append(
                    f"{where} `{moved}` exited {result.returncode}:\n"
                    f"{result.stdout[-1000:]}{result.stderr[-2000:]}"
                )
    print(f"{document.name}: ran {len(ran)} commands; skipped deliberately:")
    for where, reason, command in skipped:
        print(f"  {where} [{reason}] {command}")
    assert not failures, "\n\n".join(failures)
    if document.name == "README.md":
        assert len(ran) >= 10  # the parser still finds the README's commands


def test_the_commands_profiles_up_prints_on_moved_ports_work_as_printed(
    running_suite: RunningSuite,
) -> None:
    printed = running_suite.banner.split("Try it:", 1)[1].split("\n\n", 1)[0]
    tried = [line.strip() for line in printed.splitlines() if line.strip()]
    assert any("profiles demo" in line for line in tried)
    assert any(str(running_suite.ports[50054]) in line for line in tried)  # the moved port
    # A fresh terminal: not even PROFILES_DATA_DIR; the commands carry what they need.
    env = {k: v for k, v in running_suite.env.items() if k != "PROFILES_DATA_DIR"}
    for command in tried:
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, f"`{command}`: {result.stdout}{result.stderr}"


def profiles(suite: RunningSuite, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*profiles_command(), *args],
        env=suite.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def test_demo_with_a_wrong_key_says_what_it_tried_in_one_line(
    running_suite: RunningSuite,
) -> None:
    result = profiles(running_suite, "demo", "--users", "1", "--key", "prf_wrong_key")

    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()[-1:]
    assert "Traceback" not in result.stderr
    assert f"127.0.0.1:{running_suite.ports[50051]}" in line  # the address it called
    assert "UNAUTHENTICATED" in line
    assert "--key" in line  # what to do


def test_demo_against_an_address_where_nothing_listens_says_so_in_one_line(
    running_suite: RunningSuite,
) -> None:
    [nowhere] = free_ports(1)
    address = f"127.0.0.1:{nowhere}"

    result = profiles(running_suite, "demo", "--users", "1", "--ingest-address", address)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert f"ingest at {address}" in line
    assert "UNAVAILABLE" in line
    assert "profiles status" in line


def test_import_with_a_key_of_the_wrong_role_says_which_role_it_needs(
    running_suite: RunningSuite,
) -> None:
    read_key = profiles(running_suite, "keys", "--role", "read").stdout.strip()

    result = profiles(running_suite, "import", "bench/sample_events.jsonl", "--key", read_key)

    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "PERMISSION_DENIED" in line
    assert "needs an admin key" in line
    assert "profiles keys" in line
    assert "--role admin" in line


def test_health_on_an_http_port_points_at_healthz(running_suite: RunningSuite) -> None:
    edge = f"127.0.0.1:{running_suite.ports[8340]}"

    result = profiles(running_suite, "health", edge)

    assert result.returncode == 1
    assert f"curl -f http://{edge}/healthz" in result.stderr


def test_creating_a_project_hints_at_a_key_on_the_same_data_directory(
    running_suite: RunningSuite,
) -> None:
    data_dir = str(running_suite.data_dir)

    result = profiles(running_suite, "project", "create", "hint-check", "--data-dir", data_dir)

    assert result.returncode == 0, result.stderr
    assert f"profiles keys create --data-dir {data_dir} --project hint-check" in result.stdout


def test_the_cli_finds_the_suite_on_moved_ports_through_its_record(
    running_suite: RunningSuite,
) -> None:
    result = profiles(running_suite, "status")
    assert result.returncode == 0, result.stderr
    for spec in SUITE:
        default = next(int(s.default) for s in SETTINGS if s.env == spec.port_env)
        assert f"127.0.0.1:{running_suite.ports[default]}" in result.stdout


def test_skip_rules_name_their_reason() -> None:
    ports = {50054}
    assert skip_reason(readme_command_1(), ports) is not None
    assert skip_reason("grpcurl -plaintext 127.0.0.1:50054 list", ports) is None
    assert skip_reason("KEY=$(profiles keys --role read)", ports) is None
    assert skip_reason("profiles keys revoke <key_id>", ports) == "holds a placeholder to fill in"
    assert skip_reason("curl -s http://127.0.0.1:1/x", ports) == "curl to no service of the suite"
    assert shlex.split(readme_command_1())[-2:] == ["profiles", "up"]
