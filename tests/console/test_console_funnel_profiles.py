"""A funnel's counts open the people they count: each step's "reached" figure lists who reached
the step and each drop-off figure who dropped off before the next step (ListFunnelProfiles),
named as the users table names them, a page at a time, with a CSV of the whole list."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2
from playwright.async_api import expect

from profiles.client import open_channel
from profiles.segments.v1 import funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import sign_in, track
from tests.support.ingest import attribute_event, custom_event, op

# Past the list's page of 50: the drop-off after step 1 takes two pages.
EXTRA_PEOPLE = 50


async def create_funnel(suite: ConsoleSuite, name: str, steps: list[str]) -> str:
    async with open_channel(suite.addresses["segments"], suite.project.keys["admin"]) as channel:
        reply = await segments_grpc.SegmentsServiceStub(channel).CreateFunnel(
            segments_pb.CreateFunnelRequest(
                display_name=name,
                steps=[funnels_pb2.FunnelStep(event_name=n) for n in steps],
                conversion_window=duration_pb2.Duration(seconds=86_400),
            )
        )
    return reply.funnel.funnel_id


async def names_listed(page: Any) -> list[str]:
    return await page.locator("table.funnel-people tbody td.name a").all_inner_texts()


async def serious_violations(page: Any, axe_source: str) -> list[str]:
    """axe-core's serious and critical findings on the page (as test_console_pages checks
    every page)."""
    await page.evaluate(axe_source)
    found: list[str] = await page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
        ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))"
    )
    return found


async def test_each_funnel_count_opens_the_people_it_counts(
    page: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    opened, carted, paid = (f"{x}_{tag}" for x in ("fpopen", "fpcart", "fppay"))
    funnel_id = await create_funnel(console_suite, f"Shop {tag}", [opened, carted, paid])
    now = datetime.now(UTC)
    events = []
    # Ada pays, Ben stops at the cart, Cy only opens; the others open, anonymous.
    for first_name, steps in (("Ada", 3), ("Ben", 2), ("Cy", 1)):
        installation = f"fp-{first_name}-{tag}"
        events.append(
            attribute_event(
                installation,
                [op("set", "FIRST_NAME", first_name), op("set", "LAST_NAME", tag)],
                time=now - timedelta(minutes=10),
            )
        )
        for k, name in enumerate((opened, carted, paid)[:steps]):
            events.append(
                custom_event(installation, name=name, time=now - timedelta(minutes=5 - k))
            )
    for k in range(EXTRA_PEOPLE):
        events.append(
            custom_event(f"fp-extra{k}-{tag}", name=opened, time=now - timedelta(minutes=5))
        )
    await track(console_suite, *events)
    await sign_in(page, console_suite, land=False)
    figures = page.locator("table.funnel-figures", has=page.locator(f"text={opened}"))
    total = 3 + EXTRA_PEOPLE

    async def counted() -> bool:  # the funnel reads events, stored as ingest answers
        await page.goto(console_suite.url + "/segments")
        cells = await figures.locator("tbody tr td:nth-child(3)").all_inner_texts()
        return cells == [str(total), "2", "1"]

    await eventually(counted, within=30)
    rows = figures.locator("tbody tr")

    # Step 2's count: Ada and Ben, by their names (the users table lags by the bus).
    await rows.nth(1).locator("td").nth(2).get_by_role("link").click()
    await expect(page).to_have_url(re.compile(rf"/funnels/{funnel_id}/profiles\?step=2"))
    await expect(page.get_by_role("heading", level=1)).to_have_text(
        f"“Shop {tag}”: who reached step 2"
    )

    async def named() -> bool:
        listed = sorted(await names_listed(page))
        if listed == [f"Ada {tag}", f"Ben {tag}"]:
            return True
        await page.reload()
        return False

    await eventually(named, within=30)
    await expect(page.locator("#shown")).to_have_text("Profiles 1 to 2 of 2")
    assert await serious_violations(page, axe_source) == []
    # Who stopped at the cart, from the tab beside it.
    await page.get_by_role("link", name="Dropped off after step 2").click()
    await expect(page.locator("table.funnel-people tbody td.name a")).to_have_text([f"Ben {tag}"])
    ben = page.locator("table.funnel-people tbody tr").first
    await expect(ben.locator("td").nth(2)).to_contain_text("open until")
    # Nobody drops off after the last step: the page says so and lists who reached it.
    await page.goto(console_suite.url + f"/funnels/{funnel_id}/profiles?step=3&people=dropped")
    await expect(page.locator(".notice")).to_contain_text("Nobody drops off after the last step")
    await expect(page.locator("table.funnel-people tbody td.name a")).to_have_text([f"Ada {tag}"])

    # Step 2's drop-off figure: who opened and did not reach the cart, on two pages.
    await page.goto(console_suite.url + "/segments")
    await rows.nth(1).locator("td").nth(5).get_by_role("link").click()
    await expect(page).to_have_url(re.compile(r"step=1&people=dropped"))
    await expect(page.get_by_role("heading", level=1)).to_have_text(
        f"“Shop {tag}”: who dropped off after step 1"
    )
    dropped = total - 2
    await expect(page.locator("#shown")).to_have_text(f"Profiles 1 to 50 of {dropped}")
    ids = page.locator("table.funnel-people tbody td.name a")
    first_page = [h.split("/")[-1] for h in await ids.evaluate_all("as => as.map(a => a.href)")]
    await page.get_by_role("link", name="Next page").click()
    await expect(page.locator("#shown")).to_have_text(f"Profile 51 of {dropped}")
    second_page = [h.split("/")[-1] for h in await ids.evaluate_all("as => as.map(a => a.href)")]
    listed = first_page + second_page
    assert len(set(listed)) == dropped
    assert listed == sorted(listed, key=uuid.UUID)
    await page.get_by_role("link", name="Previous page").click()
    await expect(page.locator("#shown")).to_have_text(f"Profiles 1 to 50 of {dropped}")

    # The whole list as CSV: every page, Cy named.
    href = await page.get_by_role("link", name="Download as CSV").get_attribute("href")
    reply = await page.request.get(console_suite.url + href)
    assert reply.status == 200
    table = list(csv.DictReader(io.StringIO(await reply.text())))
    assert sorted(r["profile_id"] for r in table) == sorted(listed)
    assert [r["first_name"] for r in table if r["last_name"] == tag] == ["Cy"]
    assert all(r["step_complete_time_utc"].endswith("Z") for r in table)

    # A step the funnel has not: said, and step 1 shown.
    await page.goto(console_suite.url + f"/funnels/{funnel_id}/profiles?step=9")
    await expect(page.locator(".notice")).to_have_text(
        "No step “9” in this funnel: showing step 1."
    )
    await expect(page.locator("#shown")).to_have_text(f"Profiles 1 to 50 of {total}")
