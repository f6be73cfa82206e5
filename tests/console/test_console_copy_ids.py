"""Copy buttons beside a profile's IDs (an operator's audit against Batch, Countly, PostHog and
Segment: an ID pasted into a support ticket or a grpcurl call was selected by hand, a custom ID
cut by its ellipsis). The profile ID, the custom ID and each installation ID get one: a
progressive enhancement, the ID staying text to select, the button there only with a script
and the Clipboard API, "Copied" said in a status region a screen reader hears."""

from __future__ import annotations

import os
from typing import Any

from playwright.async_api import expect

from tests.console.conftest import ConsoleSuite
from tests.console.test_console_definitions_edit import accessible
from tests.console.test_console_pages import identified_profile, sign_in

SHOTS = os.environ.get("PROFILES_CONSOLE_TEST_SHOTS", "")
# A Copy button's status region: the element after it.
FOLLOWING_STATUS = "xpath=following-sibling::*[1][contains(@class, 'copy-status')]"


async def new_page(browser: Any, **options: Any) -> Any:
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, **options)
    return await context.new_page()


async def test_each_id_of_a_profile_has_a_copy_button_that_says_copied(
    browser: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    profile = await identified_profile(console_suite)
    summary = profile.summary
    installation = profile.installations[0].installation_id
    page = await new_page(browser, permissions=["clipboard-read", "clipboard-write"])
    try:
        await sign_in(page, console_suite, land=False)
        await page.goto(f"{console_suite.url}/profiles/{summary.profile_id}")
        # The IDs stay text, whole, beside their buttons.
        await expect(page.locator("#identity")).to_have_text(summary.custom_id)
        await expect(page.locator("#profile-id")).to_have_text(summary.profile_id)

        custom = page.get_by_role("button", name="Copy the custom ID", exact=True)
        await custom.click()
        status = page.locator("#identity ~ .copy-status")
        await expect(status).to_have_text("Copied")
        await expect(status).to_have_attribute("role", "status")
        assert await page.evaluate("navigator.clipboard.readText()") == summary.custom_id

        # By keyboard: Tab reaches the next button, Enter or Space copies.
        await custom.focus()
        await page.keyboard.press("Tab")
        profile_button = page.get_by_role("button", name="Copy the profile ID", exact=True)
        await expect(profile_button).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator("#profile-id ~ .copy-status")).to_have_text("Copied")
        assert await page.evaluate("navigator.clipboard.readText()") == summary.profile_id

        device = page.get_by_role("button", name=f"Copy the installation ID {installation}")
        await device.focus()
        await page.keyboard.press("Space")
        await expect(device.locator(FOLLOWING_STATUS)).to_have_text("Copied")
        assert await page.evaluate("navigator.clipboard.readText()") == installation
        buttons = page.get_by_role("button", name="Copy the installation ID", exact=False)
        await expect(buttons).to_have_count(len(profile.installations))
        if SHOTS:
            await page.locator("header.profile-head").screenshot(path=f"{SHOTS}/copy-ids.png")
        await accessible(page, axe_source, "profile page with copy buttons")
    finally:
        await page.context.close()


async def test_without_a_script_or_a_clipboard_there_is_no_copy_button(
    browser: Any, console_suite: ConsoleSuite
) -> None:
    summary = (await identified_profile(console_suite)).summary
    address = f"{console_suite.url}/profiles/{summary.profile_id}"

    # No script: the page as the server writes it, the IDs as text.
    page = await new_page(browser, java_script_enabled=False)
    try:
        await sign_in(page, console_suite, land=False)
        await page.goto(address)
        await expect(page.locator("#identity")).to_have_text(summary.custom_id)
        await expect(page.get_by_role("button", name="Copy", exact=False)).to_have_count(0)
    finally:
        await page.context.close()

    # No Clipboard API (plain http to another host than this one): no button either.
    page = await new_page(browser)
    try:
        await page.add_init_script("Object.defineProperty(navigator, 'clipboard', {value: null})")
        await sign_in(page, console_suite, land=False)
        await page.goto(address)
        # The script ran (it follows the profile live), and added no button.
        await expect(page.locator("#live-status")).to_have_text("Live updates on.")
        await expect(page.get_by_role("button", name="Copy", exact=False)).to_have_count(0)
    finally:
        await page.context.close()

    # A clipboard that refuses: the status says so, and how to copy instead.
    page = await new_page(browser)
    try:
        await page.add_init_script(
            "navigator.clipboard.writeText = () => Promise.reject(new Error('denied'))"
        )
        await sign_in(page, console_suite, land=False)
        await page.goto(address)
        await page.get_by_role("button", name="Copy the custom ID").click()
        await expect(page.locator("#identity ~ .copy-status")).to_have_text(
            "Not copied: select the text to copy it"
        )
    finally:
        await page.context.close()
