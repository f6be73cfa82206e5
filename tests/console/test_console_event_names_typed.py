"""The segment and funnel forms take an event name as an SDK sends it ("Product Viewed") and
store it as the edge stores that event (product_viewed)."""

from __future__ import annotations

import uuid
from typing import Any

from playwright.async_api import expect

from profiles.segments.v1 import segments_service_pb2 as segments_pb
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_admin import segments_call
from tests.console.test_console_definitions_edit import admin_call
from tests.console.test_console_pages import sign_in


async def test_event_names_typed_as_sdks_send_them_are_stored_as_the_edge_stores_them(
    page: Any, console_suite: ConsoleSuite
) -> None:
    suffix = uuid.uuid4().hex[:6]
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/funnels/new")
    await page.get_by_label("Name", exact=True).fill(f"Typed funnel {suffix}")
    await page.locator("#s0-event_name").fill("Product Viewed")
    await page.locator("#s1-event_name").fill("Order Completed")
    await page.get_by_role("button", name="Create funnel").click()
    await expect(page.locator("#created")).to_contain_text("created")

    await page.goto(console_suite.url + "/segments/new")
    await page.get_by_label("Name", exact=True).fill(f"Typed segment {suffix}")
    await page.locator("#c0-kind").select_option("event_count")
    await page.locator("#c0-event_name").fill("$Product Viewed")
    await page.get_by_role("button", name="Create segment").click()
    await expect(page.locator("#created")).to_contain_text("created")

    funnels = await segments_call(
        console_suite, "ListFunnels", segments_pb.ListFunnelsRequest(page_size=200)
    )
    funnel = next(f for f in funnels.funnels if f.display_name == f"Typed funnel {suffix}")
    segments = await segments_call(
        console_suite, "ListSegments", segments_pb.ListSegmentsRequest(page_size=200)
    )
    segment = next(s for s in segments.segments if s.display_name == f"Typed segment {suffix}")
    try:
        assert [s.event_name for s in funnel.steps] == ["product_viewed", "order_completed"]
        condition = segment.filter.group.children[0].condition
        assert condition.event_count.event_name == "product_viewed"
    finally:
        await admin_call(
            console_suite,
            "DeleteFunnel",
            segments_pb.DeleteFunnelRequest(funnel_id=funnel.funnel_id),
        )
        await admin_call(
            console_suite,
            "DeleteSegment",
            segments_pb.DeleteSegmentRequest(segment_id=segment.segment_id),
        )
