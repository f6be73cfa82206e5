"""Fixtures shared by the API tests: identity, and ingest with identity on a frozen clock (a
module that needs another clock or build defines its own)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.clock import FrozenClock
from tests.conftest import TestProject
from tests.support.identity import Identity
from tests.support.ingest import NOW, Ingest, ingest_client, start_ingest


@pytest.fixture
async def identity(start_services: Any, project: TestProject) -> Identity:
    """A real channel to an identity service started for this test, with the test's project."""
    return Identity((await start_services("identity"))["identity"].channel, project)


@pytest.fixture
async def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
async def ingest(
    start_services: Any,
    settings_for_test: Any,
    project: TestProject,
    database_url: str,
    clock: FrozenClock,
) -> Ingest:
    """A real channel to ingest (and the identity it resolves through) started for this test."""
    channel = await start_ingest(start_services, settings_for_test, clock=clock)
    return ingest_client(channel, project, database_url)
