"""`profiles up | head`: the reader of the supervisor's lines goes away, the suite keeps
running (it stopped the whole suite: the next line raised BrokenPipeError)."""

from __future__ import annotations

import asyncio
import os

from shared.settings import SERVICE_NAMES
from tests.api.test_profiles_up import (
    START_TIMEOUT,
    Suite,
    processes_of,
    profiles_command,
    serving,
    stop,
    suite,
)

__all__ = ["suite"]  # the fixture, used by name


async def test_up_keeps_the_suite_running_when_its_output_is_closed(suite: Suite) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `head` does once it has its lines: every line written fails
    try:
        process = await asyncio.create_subprocess_exec(
            *profiles_command(), "up", env=suite.env, stdout=write_end, stderr=write_end
        )
    finally:
        os.close(write_end)
    try:
        async with asyncio.timeout(START_TIMEOUT):
            for name in SERVICE_NAMES:
                while not await serving(suite.ports[name]):
                    assert process.returncode is None, f"profiles up exited {process.returncode}"
                    await asyncio.sleep(0.2)
        assert process.returncode is None
        assert await stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert processes_of(suite.data_dir) == []
