"""A login merging a profile while its page and the survivor's are open: the merged-away page
says where the person is now and shows none of the survivor's live items as its own; the
survivor's page shows the merge as the timeline does and offers a reload for what it changed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from playwright.async_api import expect

from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import sign_in, stored_profile, track
from tests.console.test_console_profile_gaps import identify
from tests.support.ingest import attribute_event, custom_event, op

STATUS = "#live-status"


async def test_a_login_merge_is_told_on_both_profiles_live_pages(
    page: Any, console_suite: ConsoleSuite
) -> None:
    now = datetime.now(UTC)
    tag = uuid.uuid4().hex[:8]
    custom_id = f"merge-ada-{tag}"
    phone, laptop = f"console-merge-phone-{tag}", f"console-merge-laptop-{tag}"
    await track(console_suite, attribute_event(phone, [op("set", "FIRST_NAME", "Ada")], time=now))
    await identify(console_suite, phone, custom_id)
    ada = await stored_profile(console_suite, phone, lambda p: p.summary.custom_id == custom_id)
    await track(console_suite, custom_event(laptop, name="browsed", time=now))
    anonymous = await stored_profile(console_suite, laptop)
    ada_id, anonymous_id = ada.summary.profile_id, anonymous.summary.profile_id

    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/profiles/{anonymous_id}")
    survivor = await page.context.new_page()
    await survivor.goto(console_suite.url + f"/profiles/{ada_id}")
    for tab in (page, survivor):
        await expect(tab.locator(STATUS)).to_have_text("Live updates on.", timeout=15_000)

    # The laptop logs in as Ada: its anonymous profile merges into hers.
    await identify(console_suite, laptop, custom_id)

    # The merged-away page names the survivor and links to it, and stops following.
    merged = page.locator("#merged-into")
    await expect(merged).to_contain_text("This profile was merged into Ada", timeout=15_000)
    await expect(merged.get_by_role("link", name="Ada")).to_have_attribute(
        "href", f"/profiles/{ada_id}"
    )
    await expect(page.locator(STATUS)).to_have_text(
        "Live updates stopped: this profile was merged into another."
    )

    # The survivor's page shows the merge with its profiles and installation, as the timeline
    # does after a reload, and says what a reload would show.
    entry = survivor.locator("#live-feed > li", has_text="Merge (identify)")
    await expect(entry).to_have_count(1, timeout=15_000)
    await expect(entry).to_contain_text(f"from {anonymous_id}")
    await expect(entry).to_contain_text(f"into {ada_id}")
    await expect(entry).to_contain_text(f"installations {laptop}")
    reload = survivor.locator("#reload-notice")
    await expect(reload).to_contain_text(
        f"Profile {anonymous_id[:8]} was merged into this one", timeout=15_000
    )
    await expect(reload.get_by_role("link", name="Reload this page")).to_be_visible()

    # A trait from Ada's other device reaches her page, never the merged-away one.
    await track(
        console_suite, attribute_event(phone, [op("set", "plan", "gold")], time=datetime.now(UTC))
    )
    await expect(survivor.locator("#custom-attributes")).to_contain_text("gold", timeout=15_000)
    await expect(page.locator("#custom-attributes")).not_to_contain_text("gold")
    await expect(page.locator("#live-feed > li")).to_have_count(1)
    await expect(page.locator("#live-feed > li")).to_contain_text("Merge (identify)")
