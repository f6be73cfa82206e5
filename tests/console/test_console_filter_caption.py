"""The users table says what it is filtered by: its caption names every filter (a segment by its
name), and the count of matches shows above the table as well as under it."""

from __future__ import annotations

import uuid
from typing import Any

from playwright.async_api import expect

from profiles.segments.v1 import segments_service_pb2 as segments_pb
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_definitions_edit import admin_call, new_segment, plan_is
from tests.console.test_console_pages import sign_in


async def test_the_users_caption_names_every_filter_and_the_count_heads_the_table(
    page: Any, console_suite: ConsoleSuite
) -> None:
    name = f"Gold plan {uuid.uuid4().hex[:6]}"
    segment = await new_segment(console_suite, name, plan_is("gold"))
    try:
        await sign_in(page, console_suite, land=False)
        caption, top, bottom = (
            page.locator("#users-caption"),
            page.locator("#shown-top"),
            page.locator("#shown"),
        )

        await page.goto(console_suite.url + "/users?segment=smart:3&platform=ios&country=FR")
        await expect(caption).to_have_text(
            "Profiles in the smart segment “Engaged”, on iOS, whose last session was in FR,"
            " sorted by last seen (descending)"
        )
        await expect(top).to_have_text(await bottom.inner_text())

        await page.goto(
            console_suite.url
            + f"/users?tab=anonymous&segment=custom:{segment.segment_id}&language=fr&reach=email"
        )
        await expect(caption).to_have_text(
            f"Anonymous profiles in the custom segment “{name}”, whose language is fr, reachable by"
            " email, sorted by last seen (descending)"
        )
        await expect(top).to_have_text(await bottom.inner_text())
    finally:
        await admin_call(
            console_suite,
            "DeleteSegment",
            segments_pb.DeleteSegmentRequest(segment_id=segment.segment_id),
        )
