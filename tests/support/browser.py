"""Debian's Chromium driven by Playwright, for the tests that need a real browser (the console's
pages, the browser SDKs against the edge). .ci/run installs the package; under CI (env CI set) a
missing browser or npm package fails the test instead of skipping it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("PROFILES_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def missing(what: str) -> None:
    """Fails under CI, skips elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI")
    pytest.skip(f"{what} is not available")


def npm_package(folder: Path, relative: str) -> Path:
    """A file of the npm packages locked in `folder` (package-lock.json), installed with `npm ci`
    when missing."""
    path = folder / "node_modules" / relative
    if not path.exists() and shutil.which("npm"):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=folder, check=False)
    if not path.exists():
        missing(f"{relative} (npm ci in {folder})")
    return path


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium (Playwright's Browser)."""
    if not CHROMIUM.exists():  # noqa: ASYNC240 - once per browser, before any traffic
        missing(f"Chromium at {CHROMIUM}")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()
