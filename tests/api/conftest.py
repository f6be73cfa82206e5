"""Fixtures shared by the API tests of identity."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import TestProject
from tests.support.identity import Identity


@pytest.fixture
async def identity(start_services: Any, project: TestProject) -> Identity:
    """A real channel to an identity service started for this test, with the test's project."""
    return Identity((await start_services("identity"))["identity"].channel, project)
