"""`profiles restart <service>` and what `profiles status` says of a hung server, against a real
`profiles up` (a subprocess on a temporary data directory and free ports)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator

import psutil
import pytest

from profiles_cli.up import CRASH_LIMIT
from shared.settings import SERVICE_NAMES
from tests.api.test_profiles_up import (
    STOP_TIMEOUT,
    Suite,
    check_keys_reach_the_query_service,
    processes_of,
    record_of,
    run_profiles,
    running_up,
    server_pid,
    stop,
)
from tests.api.test_profiles_up import suite as suite


@pytest.fixture
async def quick_up(suite: Suite) -> AsyncIterator[asyncio.subprocess.Process]:
    """`profiles up` whose services get one second to drain before a kill (a hung service costs
    a restart that second and KILL_AFTER_EXTRA_SECONDS)."""
    suite.env["PROFILES_SHUTDOWN_GRACE_SECONDS"] = "1"
    async with running_up(suite) as process:
        yield process


async def restart(suite: Suite, name: str) -> int:
    """Runs `profiles restart name`; returns the pid of the process that serves now."""
    before = record_of(suite)["services"][name]["pid"]
    code, out, errors = await run_profiles(suite.env, "restart", name)
    assert code == 0, out + errors
    pid = int(record_of(suite)["services"][name]["pid"])
    assert pid != before
    assert out.splitlines() == [
        f"Asked `profiles up` (pid {record_of(suite)['pid']}) to restart {name} (pid {before}) ...",
        f"Restarted {name} (pid {pid}); it serves.",
    ]
    return pid


async def test_restart_starts_a_service_again_without_counting_it_as_a_death(
    suite: Suite, quick_up: asyncio.subprocess.Process
) -> None:
    first = record_of(suite)["services"]
    others = {name: first[name]["pid"] for name in first if name != "query"}
    keys = json.loads((suite.data_dir / "keys.json").read_text())

    # As many restarts as the deaths that stop everything: none of them counts.
    for _ in range(CRASH_LIMIT):
        await restart(suite, "query")
    await check_keys_reach_the_query_service(suite.ports["query"], keys["read"])

    # A stopped (hung) service ignores SIGTERM: it is killed after the grace, then started.
    hung = int(record_of(suite)["services"]["query"]["pid"])
    os.kill(hung, signal.SIGSTOP)
    await restart(suite, "query")
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE

    assert quick_up.returncode is None
    assert {name: record_of(suite)["services"][name]["pid"] for name in others} == others
    assert await stop(quick_up) == 0
    assert quick_up.stdout is not None
    assert quick_up.stderr is not None
    printed = (await quick_up.stdout.read()).decode()
    errors = (await quick_up.stderr.read()).decode()
    assert printed.count("as `profiles restart` asked") == CRASH_LIMIT + 1
    assert "query did not stop in time; killing it" in errors
    assert "restarting it in" not in errors  # no restart of a death, with its backoff
    log = (suite.data_dir / "logs" / "query.log").read_text()
    assert log.count('"service_restart_requested"') == CRASH_LIMIT + 1
    assert '"service_exited"' not in log
    assert processes_of(suite.data_dir) == []

    code, _, errors = await run_profiles(suite.env, "restart", "query")
    assert code == 1
    assert "no `profiles up` runs on" in errors


async def test_restart_of_a_service_that_is_not_there_names_the_services(suite: Suite) -> None:
    code, _, errors = await run_profiles(suite.env, "restart", "postgres")
    assert code == 2
    assert "invalid choice: 'postgres'" in errors
    for name in (*SERVICE_NAMES, "edge", "console"):
        assert f"'{name}'" in errors


async def test_status_says_a_stopped_embedded_server_is_not_restarted_and_how_to_resume_it(
    suite: Suite, quick_up: asyncio.subprocess.Process
) -> None:
    """SIGSTOP of the embedded Redis: its process lives, so `profiles up` does not start it
    again, and `profiles status` must not promise that it will."""
    pid = server_pid(suite, "redis")
    os.kill(pid, signal.SIGSTOP)
    try:
        code, out, errors = await run_profiles(suite.env, "status")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert code == 1, out
    assert "Redis DOWN)" in out.splitlines()[0]
    [advice] = [line for line in errors.splitlines() if "Redis does not answer" in line]
    assert f"its process (pid {pid}) is stopped" in advice
    assert f"`kill -CONT {pid}`" in advice
    assert "starts it again by itself" not in advice
    assert f"profiles down --data-dir {suite.data_dir}" in advice

    async with asyncio.timeout(STOP_TIMEOUT):
        while True:
            code, _, _ = await run_profiles(suite.env, "status")
            if code == 0:
                break
            await asyncio.sleep(0.2)
    assert server_pid(suite, "redis") == pid  # the same server, resumed
