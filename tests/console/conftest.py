"""A real suite fed by the demo, the console in front of it, and a real Chromium to drive it.

Package-scoped: the services, the demo's data and the browser are started once for the browser
tests (each test gets a fresh page). Chromium is Debian's (/usr/bin/chromium, installed by
.ci/run); axe-core comes from npm (package-lock.json beside this file). Under CI (env CI set) a
missing browser or axe-core fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvicorn

from profiles.client import open_channel
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from profiles_cli.demo import run_demo
from services.console.app import build_app
from services.console.pages import LiveChecks
from shared.settings import Settings
from tests.conftest import TestProject, create_test_project, eventually, with_database
from tests.support.browser import chromium, npm_package
from tests.support.serving import served

HERE = Path(__file__).parent
DEMO_USERS = 24
# The suite's console checks an open live feed's session and key, and looks up again the people
# its segments feed could not name, sooner than in production (2 s, 5 s, 1.5 s): the tests of
# a feed ending (signed out, expired, key revoked) or naming a person wait for these checks.
LIVE_CHECKS = LiveChecks(session_seconds=0.2, key_seconds=0.5, people_retry_seconds=0.3)


@dataclass(slots=True)
class ConsoleSuite:
    url: str
    project: TestProject
    addresses: dict[str, str]
    settings: Settings


@pytest.fixture(scope="package")
async def console_suite(
    postgres_server_url: str, template_database: str, redis_url: str
) -> AsyncIterator[ConsoleSuite]:
    from profiles_cli.runner import BUILDERS
    from shared.server import start_service

    name = f"t_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_server_url)
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    database_url = with_database(postgres_server_url, name)
    project = await create_test_project(database_url)
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=f"test-{uuid.uuid4().hex[:12]}",
        internal_token=f"internal-{uuid.uuid4().hex}",
        db_pool_size=5,
        shutdown_grace_seconds=2.0,
    )
    running = []
    addresses = dict(settings.addresses)
    try:
        # identity first: ingest calls it, so it must know identity's port.
        for service in ("identity", "ingest", "segments", "query"):
            settings = settings.with_changes(addresses=addresses)
            handle = await start_service(
                service, settings, BUILDERS[service], port=0, metrics=False
            )
            running.append(handle)
            addresses[service] = handle.address
        settings = settings.with_changes(addresses=addresses)
        await run_demo(
            DEMO_USERS,
            addresses["ingest"],
            addresses["identity"],
            project.keys["sdk"],
            project.keys["admin"],
            seed=7,
            quiet=True,
        )
        await _wait_for_users_table(addresses["query"], project.keys["read"])
        async with start_console(build_app(settings, live_checks=LIVE_CHECKS)) as url:
            yield ConsoleSuite(url, project, addresses, settings)
    finally:
        for handle in reversed(running):
            await handle.stop(grace=1.0)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def start_console(app: Any) -> contextlib.AbstractAsyncContextManager[str]:
    """Serves a console app in this event loop on a free port; yields its base URL."""
    return served(uvicorn.Config(app, log_level="warning", lifespan="on"))


async def _wait_for_users_table(query_address: str, key: str) -> None:
    """The users table is a projection fed by the bus: wait until it holds the demo's users."""
    async with open_channel(query_address, key) as channel:
        stub = query_grpc.QueryServiceStub(channel)

        async def filled() -> bool:
            reply = await stub.ListProfiles(query_pb.ListProfilesRequest(page_size=500))
            return len(reply.profiles) >= DEMO_USERS // 2

        await eventually(filled, within=30)


@pytest.fixture(scope="package")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as launched:
        yield launched


@pytest.fixture(scope="package")
def axe_source() -> str:
    return npm_package(HERE, "axe-core/axe.min.js").read_text()


class FreshPages:
    """Pages for the tests, each in a new browser context of its own (no cookie, storage or
    permission passes from a test to the next), the next one opened while a test runs: opening
    one takes a few tenths of a second, which every test used to wait for."""

    def __init__(self, browser: Any) -> None:
        self._browser = browser
        self._next: asyncio.Task[Any] | None = None

    async def _open(self) -> Any:
        context = await self._browser.new_context(viewport={"width": 1280, "height": 900})
        return await context.new_page()

    async def take(self) -> Any:
        ready = self._next or asyncio.ensure_future(self._open())
        self._next = asyncio.ensure_future(self._open())
        return await ready

    async def close(self) -> None:
        if self._next is not None:
            page = await self._next
            await page.context.close()


@pytest.fixture(scope="package")
async def fresh_pages(browser: Any) -> AsyncIterator[FreshPages]:
    pages = FreshPages(browser)
    yield pages
    await pages.close()


@pytest.fixture
async def page(fresh_pages: FreshPages) -> AsyncIterator[Any]:
    page = await fresh_pages.take()
    yield page
    await page.context.close()
