"""Fixtures of the bus and outbox tests beyond the session ones of tests/conftest.py
(`database_url`, `redis_url`, `redis_prefix`): a Redis of the test's own for outages, and polling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.embedded import EmbeddedRedis


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis only this test uses, so it may stop (`.stop()`) and start (`.start()`) it.

    It keeps its URL (`.url`, a Unix socket) across restarts, so clients reconnect by themselves,
    and no data (persist=False), like a Redis that lost everything.
    """
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def eventually() -> Callable[..., Any]:
    """Polls a sync or async predicate until it is true; fails after `within_s` seconds.

    A deadline, never a timing: a slow machine only makes the test take longer.
    """

    async def wait(
        predicate: Callable[[], object], *, within_s: float = 10.0, message: str = ""
    ) -> None:
        deadline = time.monotonic() + within_s
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"condition not met within {within_s} s: {message or predicate}")
            await asyncio.sleep(0.02)

    return wait
