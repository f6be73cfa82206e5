"""The console in a real browser, against a real suite fed by the demo."""

from __future__ import annotations

from typing import Any

from playwright.async_api import expect

from tests.console.conftest import ConsoleSuite


async def sign_in(page: Any, suite: ConsoleSuite, role: str = "read") -> None:
    await page.goto(suite.url + "/signin")
    await page.get_by_label("Project key").fill(suite.project.keys[role])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()


async def test_smoke(page: Any, console_suite: ConsoleSuite) -> None:
    await sign_in(page, console_suite)
    await page.goto(console_suite.url + "/users")
    await expect(page.locator("table.users tbody tr").first).to_be_visible()
    print(await page.content())
