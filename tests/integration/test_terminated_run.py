"""A test run stopped with SIGTERM stops the servers its session started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import server_scratch_dir

ROOT = Path(__file__).resolve().parents[2]
HOLDING_TEST = """
import pathlib, time

import pytest

@pytest.fixture(scope="session")
def reraising(redis_url: str):
    yield redis_url
    # As uvicorn does with a signal it caught while serving: raised again when the server
    # ends, here in the middle of the session's teardown.
    raise KeyboardInterrupt

def test_holds_redis(reraising: str) -> None:
    pathlib.Path({marker!r}).write_text(reraising)
    time.sleep(120)
"""


def redis_servers_of(url: str) -> list[psutil.Process]:
    socket = url.removeprefix("unix://").split("?")[0]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(socket in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_a_run_stopped_with_sigterm_stops_its_embedded_redis_even_if_its_teardown_is_cut() -> None:
    scratch = server_scratch_dir("profiles-terminated-")
    marker = scratch / "url"
    (scratch / "test_hold.py").write_text(HOLDING_TEST.format(marker=str(marker)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILES_TEST_")}
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            str(scratch / "test_hold.py"),
        ],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert run.poll() is None, run.communicate()[0].decode()
            assert time.monotonic() < deadline, "the inner run never reached its test"
            time.sleep(0.05)
        url = marker.read_text()
        assert redis_servers_of(url), f"no Redis server found for {url}"
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=60)[0].decode()
        assert redis_servers_of(url) == [], output
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if marker.exists():  # a failed check leaves nothing running either
            for proc in redis_servers_of(marker.read_text()):
                proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)
