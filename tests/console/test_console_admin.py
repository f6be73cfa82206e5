"""The console's admin actions in a real browser against a real suite: erasing a profile,
defining and deleting segments and funnels; and the users table's CSV export."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from playwright.async_api import expect

from profiles.client import open_channel
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from services.console import pages
from services.console.app import build_app
from services.console.backend import Backend
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite, start_console
from tests.console.test_console_pages import (
    query,
    sign_in,
    stored_profile,
    stored_profile_by_custom_id,
    track,
)
from tests.support.ingest import attribute_event, custom_event, op


async def new_identified_profile(suite: ConsoleSuite, prefix: str) -> tuple[str, str]:
    """A new profile known by a custom ID (a server-side event); its custom ID and profile ID
    once query has it."""
    custom_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    await track(
        suite, custom_event(None, custom_id=custom_id, name="purchase", time=datetime.now(UTC))
    )
    return custom_id, await stored_profile_by_custom_id(suite, custom_id)


async def test_an_admin_erases_a_profile_after_typing_its_custom_id(
    page: Any, console_suite: ConsoleSuite
) -> None:
    custom_id, profile_id = await new_identified_profile(console_suite, "erase-me")
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    # The export stays beside the new action.
    await expect(page.get_by_role("link", name="Export (GDPR)")).to_be_visible()
    await page.get_by_role("link", name="Delete this profile").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Delete {custom_id}?")
    await expect(page.locator("main")).to_contain_text("cannot be undone")
    box = page.get_by_label(f"To confirm, type {custom_id}")
    # A wrong word erases nothing and says so beside the box, which keeps its description.
    await box.fill(custom_id.upper())
    await page.get_by_role("button", name="Delete this profile permanently").click()
    await expect(page.locator("#confirmation-error")).to_contain_text("nothing was erased")
    await expect(page.get_by_label(f"To confirm, type {custom_id}")).to_have_attribute(
        "aria-invalid", "true"
    )
    view = await query(
        console_suite, "GetProfile", query_pb.GetProfileRequest(profile_id=profile_id)
    )
    assert view.profile.summary.custom_id == custom_id

    await page.get_by_label(f"To confirm, type {custom_id}").fill(custom_id)
    await page.get_by_role("button", name="Delete this profile permanently").click()
    await expect(page.get_by_role("heading", name="Profile erased")).to_be_visible()
    await expect(page.locator("#erased")).to_contain_text(custom_id)
    await expect(page.locator("main")).to_contain_text("1 event erased")
    await expect(page.locator("main")).to_contain_text("its custom ID is blocked until")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await query(console_suite, "GetProfile", query_pb.GetProfileRequest(profile_id=profile_id))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    await expect(page.get_by_role("heading", name="No such profile")).to_be_visible()


async def test_a_read_key_never_sees_the_erasure_and_is_refused_if_it_posts(
    page: Any, console_suite: ConsoleSuite
) -> None:
    _, profile_id = await new_identified_profile(console_suite, "keep-me")
    await sign_in(page, console_suite, "read", land=False)
    await page.goto(console_suite.url + f"/profiles/{profile_id}")
    await expect(page.get_by_role("heading", level=1)).to_be_visible()
    await expect(page.get_by_role("link", name="Delete this profile")).to_have_count(0)
    form = await page.request.get(console_suite.url + f"/profiles/{profile_id}/delete")
    assert form.status == 403
    # The read session's own CSRF token, so only the role refuses it.
    token = await page.locator("form.signout input[name=csrf_token]").input_value()
    posted = await page.request.post(
        console_suite.url + f"/profiles/{profile_id}/delete",
        form={"csrf_token": token, "confirmation": "delete", "request_id": str(uuid.uuid4())},
        max_redirects=0,
    )
    assert posted.status == 403
    await query(console_suite, "GetProfile", query_pb.GetProfileRequest(profile_id=profile_id))


async def test_a_forged_erasure_form_erases_nothing(page: Any, console_suite: ConsoleSuite) -> None:
    custom_id, profile_id = await new_identified_profile(console_suite, "forged")
    await sign_in(page, console_suite, "admin", land=False)
    posted = await page.request.post(
        console_suite.url + f"/profiles/{profile_id}/delete",
        form={"csrf_token": "guessed", "confirmation": custom_id},
        max_redirects=0,
    )
    assert posted.status == 403
    assert "nothing was erased" in await posted.text()
    await query(console_suite, "GetProfile", query_pb.GetProfileRequest(profile_id=profile_id))


async def segments_call(suite: ConsoleSuite, method: str, request: Any) -> Any:
    async with open_channel(suite.addresses["segments"], suite.project.keys["read"]) as channel:
        return await getattr(segments_grpc.SegmentsServiceStub(channel), method)(request)


async def profiles_with_plan(suite: ConsoleSuite, plan: str, count: int) -> list[str]:
    """`count` new Android profiles whose custom attribute `console_plan` is `plan`; their
    installation IDs once the users table lists them."""
    installations = [f"console-plan-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    now = datetime.now(UTC)
    await track(
        suite,
        *[attribute_event(i, [op("set", "console_plan", plan)], time=now) for i in installations],
    )

    async def listed() -> bool:
        for installation in installations:
            try:
                await query(
                    suite, "GetProfile", query_pb.GetProfileRequest(installation_id=installation)
                )
            except grpc.aio.AioRpcError:
                return False
        return True

    await eventually(listed, within=15)
    return installations


async def test_an_admin_builds_a_segment_sees_its_members_and_deletes_it(
    page: Any, console_suite: ConsoleSuite
) -> None:
    plan = f"Gold{uuid.uuid4().hex[:6]}"
    await profiles_with_plan(console_suite, plan, 2)
    name = f"Gold plan on Android {uuid.uuid4().hex[:6]}"
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/segments")
    await page.get_by_role("link", name="New segment").click()
    await expect(page.get_by_role("heading", name="New segment")).to_be_visible()
    await page.get_by_label("Name", exact=True).fill(name)
    await page.locator("#c0-kind").select_option("attribute")
    await page.locator("#c0-attribute").select_option("custom")
    await page.locator("#c0-custom_name").fill("console_plan")
    await page.locator("#c0-operator").select_option("equals")
    await page.locator("#c0-value").fill(plan.lower())
    await page.locator("#c0-ignore_case").check()
    # A second condition: the page comes back with what was typed, and one more row.
    await page.get_by_role("button", name="Add a condition").click()
    await expect(page.locator("#c0-value")).to_have_value(plan.lower())
    await expect(page.locator("#c0-ignore_case")).to_be_checked()
    await page.locator("#c1-kind").select_option("platform")
    # The script shows the chosen kind's boxes only.
    await expect(page.locator("#c1-custom_name")).to_be_hidden()
    await page.get_by_role("group", name="Condition 2").get_by_label("Android").check()
    await page.get_by_role("radio", name="every condition (AND)").check()
    await page.get_by_role("button", name="Create segment").click()

    created = page.locator("#created")
    await expect(created).to_contain_text(f"Segment “{name}” created: 2 profiles match it now.")
    row = page.locator("tr[id^='segment-']", has_text=name)
    await expect(row.locator("td.num")).to_have_text("2")
    await expect(row).to_contain_text("platform is Android")
    await created.get_by_role("link", name="2 profiles").click()
    await expect(page.locator("#shown")).to_contain_text("of 2")
    await expect(page.locator("table.users tbody tr")).to_have_count(2)

    await page.goto(console_suite.url + "/segments")
    await page.get_by_role("link", name=f"Delete the segment {name}").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Delete the segment “{name}”?")
    await expect(page.locator("main")).to_contain_text("2 members")
    segment_id = page.url.split("/segments/")[1].split("/")[0]
    await page.get_by_role("button", name="Delete the segment").click()
    await expect(page.locator("#deleted")).to_have_text("The segment was deleted.")
    await expect(page.locator("tr[id^='segment-']", has_text=name)).to_have_count(0)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await segments_call(
            console_suite, "GetSegment", segments_pb.GetSegmentRequest(segment_id=segment_id)
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_refused_segment_condition_is_told_beside_its_box_with_the_input_kept(
    page: Any, console_suite: ConsoleSuite
) -> None:
    name = f"Refused {uuid.uuid4().hex[:6]}"
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/segments/new")
    await page.get_by_label("Name", exact=True).fill(name)
    await page.locator("#c0-custom_name").fill("not a name!")
    await page.locator("#c0-value").fill("gold")
    await page.get_by_role("button", name="Add a condition").click()
    await page.locator("#c1-kind").select_option("event_count")
    await page.locator("#c1-event_name").fill("purchase")
    await page.locator("#c1-count_days").fill("400")  # the contract allows 1 to 365
    await page.get_by_role("button", name="Create segment").click()

    # The service's refusals, each beside its box, in the form's words; the input kept.
    box = page.locator("#c0-custom_name")
    await expect(box).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#c0-custom_name-error")).to_have_text(
        "An attribute name is 1 to 30 letters, digits or underscores, such as plan."
    )
    await expect(box).to_have_value("not a name!")
    await expect(page.locator("#c1-count_days-error")).to_have_text(
        "A number of days from 1 to 365."
    )
    await expect(page.locator("#c1-count_days")).to_have_value("400")
    await expect(page.locator("#c1-event_name")).to_have_value("purchase")
    await expect(page.get_by_label("Name", exact=True)).to_have_value(name)
    await expect(page.locator("#form-error")).to_contain_text("2 boxes need a change")

    # A value that is not of its type is refused before asking, beside the value box.
    await page.locator("#c0-custom_name").fill("plan")
    await page.locator("#c0-value_type").select_option("number")
    await page.locator("#c0-value").fill("abc")
    await page.locator("#c1-count_days").fill("30")
    await page.get_by_role("button", name="Create segment").click()
    await expect(page.locator("#c0-value-error")).to_contain_text("“abc” is not a number")
    await expect(page.locator("#c0-custom_name")).not_to_have_attribute("aria-invalid", "true")
    reply = await segments_call(
        console_suite, "ListSegments", segments_pb.ListSegmentsRequest(page_size=200)
    )
    assert name not in [s.display_name for s in reply.segments]


async def test_a_read_key_cannot_define_or_delete_segments_and_funnels(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, "read", land=False)
    await page.goto(console_suite.url + "/segments")
    await expect(page.get_by_role("heading", name="Custom segments")).to_be_visible()
    await expect(page.get_by_role("link", name="New segment")).to_have_count(0)
    await expect(page.get_by_role("link", name="New funnel")).to_have_count(0)
    await expect(page.get_by_role("link", name=re.compile("^Delete the"))).to_have_count(0)
    token = await page.locator("form.signout input[name=csrf_token]").input_value()
    for path in ("/segments/new", "/funnels/new"):
        assert (await page.request.get(console_suite.url + path)).status == 403
        posted = await page.request.post(
            console_suite.url + path,
            form={"csrf_token": token, "name": "nope", "action": "create"},
            max_redirects=0,
        )
        assert posted.status == 403, path
    ident = str(uuid.uuid4())
    for path in (f"/segments/{ident}/delete", f"/funnels/{ident}/delete"):
        posted = await page.request.post(
            console_suite.url + path, form={"csrf_token": token}, max_redirects=0
        )
        assert posted.status == 403, path


async def test_an_admin_builds_a_funnel_with_a_step_condition_and_deletes_it(
    page: Any, console_suite: ConsoleSuite
) -> None:
    suffix = uuid.uuid4().hex[:8]
    viewed, bought = f"cview_{suffix}", f"cbuy_{suffix}"
    now = datetime.now(UTC)
    big, small = (f"console-funnel-{uuid.uuid4().hex[:8]}" for _ in range(2))
    await track(
        console_suite,
        custom_event(big, name=viewed, time=now - timedelta(minutes=3)),
        custom_event(big, name=bought, time=now - timedelta(minutes=2), amount=30),
        custom_event(small, name=viewed, time=now - timedelta(minutes=3)),
        custom_event(small, name=bought, time=now - timedelta(minutes=2), amount=5),
    )
    name = f"Big buyers {suffix}"
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/segments")
    await page.get_by_role("link", name="New funnel").click()
    await page.get_by_label("Name", exact=True).fill(name)
    await page.locator("#s0-event_name").fill(viewed)
    await page.locator("#s1-event_name").fill(bought)
    await page.locator("#s1-attribute_name").fill("amount")
    await page.locator("#s1-operator").select_option("greater_than")
    await page.locator("#s1-value_type").select_option("number")
    await page.locator("#s1-value").fill("20")
    await page.get_by_label("Length").fill("1")
    await page.get_by_label("Unit").select_option("days")
    await page.get_by_role("button", name="Create funnel").click()
    await expect(page.locator("#created")).to_contain_text(f"Funnel “{name}” created")

    table = page.locator("table.funnel-figures", has=page.locator(f"text={viewed}"))
    await expect(table.locator("tbody tr").nth(1).locator("td").nth(1)).to_have_text(
        f"{bought} where amount is more than 20"
    )

    async def counted() -> bool:  # the events reach the funnel through the bus
        await page.goto(console_suite.url + "/segments")
        return await table.locator("tbody tr td:nth-child(3)").all_inner_texts() == ["2", "1"]

    await eventually(counted, within=30)

    await page.get_by_role("link", name=f"Delete the funnel {name}").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Delete the funnel “{name}”?")
    await page.get_by_role("button", name="Delete the funnel").click()
    await expect(page.locator("#deleted")).to_have_text("The funnel was deleted.")
    await expect(page.get_by_role("heading", name=name)).to_have_count(0)
    reply = await segments_call(
        console_suite, "ListFunnels", segments_pb.ListFunnelsRequest(page_size=200)
    )
    assert name not in [f.display_name for f in reply.funnels]


async def test_a_refused_funnel_step_is_told_beside_its_box_with_the_input_kept(
    page: Any, console_suite: ConsoleSuite
) -> None:
    name = f"Refused funnel {uuid.uuid4().hex[:6]}"
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/funnels/new")
    await page.get_by_label("Name", exact=True).fill(name)
    await page.locator("#s0-event_name").fill("view_item")
    await page.get_by_role("button", name="Add a step").click()
    await page.locator("#s1-event_name").fill("¡¿!")  # no letter or digit: no event has it
    await page.locator("#s2-event_name").fill("purchase")
    await page.get_by_label("Length").fill("200")
    await page.get_by_label("Unit").select_option("days")  # past the contract's 90 days
    await page.get_by_role("button", name="Create funnel").click()

    await expect(page.locator("#s1-event_name-error")).to_have_text(
        "An event name is 1 to 30 letters, digits or underscores, such as purchase."
    )
    await expect(page.locator("#s1-event_name")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#s1-event_name")).to_have_value("¡¿!")
    await expect(page.locator("#window-error")).to_have_text(
        "A conversion window from 1 minute to 90 days."
    )
    await expect(page.locator("#s0-event_name")).not_to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#s2-event_name")).to_have_value("purchase")
    await expect(page.get_by_label("Length")).to_have_value("200")
    reply = await segments_call(
        console_suite, "ListFunnels", segments_pb.ListFunnelsRequest(page_size=200)
    )
    assert name not in [f.display_name for f in reply.funnels]


async def test_an_admin_previews_a_segment_keeps_the_form_and_then_creates_it(
    page: Any, console_suite: ConsoleSuite
) -> None:
    plan = f"Silver{uuid.uuid4().hex[:6]}"
    await profiles_with_plan(console_suite, plan, 3)
    name = f"Silver preview {uuid.uuid4().hex[:6]}"
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/segments/new")
    await page.get_by_label("Name", exact=True).fill(name)
    await page.locator("#c0-custom_name").fill("console_plan")
    await page.locator("#c0-value").fill(plan)
    await page.get_by_role("button", name="Preview").click()

    await expect(page.locator("#preview")).to_contain_text("Preview: 3 profiles match now.")
    await expect(page.get_by_label("Name", exact=True)).to_have_value(name)
    await expect(page.locator("#c0-custom_name")).to_have_value("console_plan")
    await expect(page.locator("#c0-value")).to_have_value(plan)
    reply = await segments_call(
        console_suite, "ListSegments", segments_pb.ListSegmentsRequest(page_size=200)
    )
    assert name not in [s.display_name for s in reply.segments]

    # A refusal of a preview is told as a creation's, beside its box, with the input kept.
    await page.locator("#c0-custom_name").fill("not a name!")
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#c0-custom_name-error")).to_have_text(
        "An attribute name is 1 to 30 letters, digits or underscores, such as plan."
    )
    await expect(page.locator("#c0-custom_name")).to_have_value("not a name!")
    await expect(page.locator("#form-error")).to_contain_text("1 box needs a change")
    await expect(page.locator("#preview")).to_have_count(0)

    # Narrowed to one of them: the preview follows what is typed; then the segment is created.
    await page.locator("#c0-custom_name").fill("console_plan")
    await page.get_by_role("button", name="Add a condition").click()
    await page.locator("#c1-kind").select_option("attribute")
    await page.locator("#c1-custom_name").fill("console_plan")
    await page.locator("#c1-operator").select_option("exists")
    await page.locator("#c1-negate").check()
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#preview")).to_contain_text("Preview: 0 profiles match now.")
    await page.locator("#c1-negate").uncheck()
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#preview")).to_contain_text("Preview: 3 profiles match now.")
    await page.get_by_role("button", name="Create segment").click()
    await expect(page.locator("#created")).to_contain_text(
        f"Segment “{name}” created: 3 profiles match it now."
    )
    reply = await segments_call(
        console_suite, "ListSegments", segments_pb.ListSegmentsRequest(page_size=200)
    )
    assert [s.display_name for s in reply.segments].count(name) == 1


async def test_an_admin_previews_a_funnel_s_step_counts_and_its_delete_page_gets_it_alone(
    page: Any, console_suite: ConsoleSuite, monkeypatch: pytest.MonkeyPatch
) -> None:
    suffix = uuid.uuid4().hex[:8]
    viewed, bought = f"pview_{suffix}", f"pbuy_{suffix}"
    now = datetime.now(UTC)
    both, half = (f"console-preview-{uuid.uuid4().hex[:8]}" for _ in range(2))
    await track(
        console_suite,
        custom_event(both, name=viewed, time=now - timedelta(minutes=3)),
        custom_event(both, name=bought, time=now - timedelta(minutes=2)),
        custom_event(half, name=viewed, time=now - timedelta(minutes=3)),
    )
    name = f"Preview funnel {suffix}"
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/funnels/new")
    await page.get_by_label("Name", exact=True).fill(name)
    await page.locator("#s0-event_name").fill(viewed)
    await page.locator("#s1-event_name").fill(bought)
    await page.get_by_label("Length").fill("1")
    await page.get_by_label("Unit").select_option("hours")
    preview = page.locator("#preview table.funnel-figures")

    async def counted() -> bool:  # the events reach the funnel through the bus
        await page.get_by_role("button", name="Preview").click()
        await expect(preview).to_be_visible()
        return await preview.locator("tbody tr td:nth-child(3)").all_inner_texts() == ["2", "1"]

    await eventually(counted, within=30)
    await expect(preview.locator("tbody tr").nth(1).locator("td").nth(1)).to_have_text(bought)
    await expect(preview.locator("tbody tr").nth(1).locator("td").nth(3)).to_have_text("50.0 %")
    await expect(page.locator("#s1-event_name")).to_have_value(bought)
    await expect(page.get_by_label("Length")).to_have_value("1")
    reply = await segments_call(
        console_suite, "ListFunnels", segments_pb.ListFunnelsRequest(page_size=200)
    )
    assert name not in [f.display_name for f in reply.funnels]

    await page.get_by_role("button", name="Create funnel").click()
    await expect(page.locator("#created")).to_contain_text(f"Funnel “{name}” created")
    # A preview of a name now taken is refused beside the name box, as a creation is.
    await page.goto(console_suite.url + "/funnels/new")
    await page.get_by_label("Name", exact=True).fill(name.upper())
    await page.locator("#s0-event_name").fill(viewed)
    await page.locator("#s1-event_name").fill(bought)
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#name-error")).to_have_text(
        "Another funnel already has this name (names are compared ignoring case)."
    )
    await expect(page.locator("#preview")).to_have_count(0)

    # The delete confirmation reads the one funnel with GetFunnel, not a scan of ListFunnels.
    called: list[str] = []
    call = Backend.call

    async def recording(self: Backend, key: str, service: str, method: str, request: Any) -> Any:
        called.append(method)
        return await call(self, key, service, method, request)

    monkeypatch.setattr(Backend, "call", recording)
    await page.goto(console_suite.url + "/segments")
    called.clear()
    await page.get_by_role("link", name=f"Delete the funnel {name}").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Delete the funnel “{name}”?")
    await expect(page.locator("#delete-what")).to_contain_text(f"{viewed} → {bought}")
    # (The segments page's live table may still be checking its segments: ListSegments.)
    assert [m for m in called if "Funnel" in m] == ["GetFunnel"]
    await page.get_by_role("button", name="Delete the funnel").click()
    await expect(page.locator("#deleted")).to_have_text("The funnel was deleted.")
    # A funnel gone, or an ID that is not one, is a page of its own, not an error.
    for ident in (str(uuid.uuid4()), "not-a-funnel"):
        answer = await page.request.get(console_suite.url + f"/funnels/{ident}/delete")
        assert answer.status == 404, ident


async def test_the_users_table_downloads_as_csv_with_its_filter_and_sort_every_page_to_a_cap(
    page: Any, console_suite: ConsoleSuite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Profiles in a language no other test uses, named as a spreadsheet would run them.
    names = ["=HYPERLINK(1)", "+33612345678", "-minus", "@SUM(A1)", "Ana", "Bea", "Cy"]
    now = datetime.now(UTC)
    await track(
        console_suite,
        *[
            attribute_event(
                f"console-csv-{uuid.uuid4().hex[:10]}",
                [op("set", "FIRST_NAME", name), op("set", "LANGUAGE", "kw")],
                time=now - timedelta(seconds=n),
            )
            for n, name in enumerate(names)
        ],
    )

    async def listed() -> bool:
        request = query_pb.ListProfilesRequest(language="kw", include_total_size=True)
        return (await query(console_suite, "ListProfiles", request)).total_size == len(names)

    await eventually(listed, within=30)
    await sign_in(page, console_suite, "read", land=False)  # a read key is enough
    await page.goto(console_suite.url + "/users?language=kw&sort=sessions&order=asc")
    shown = [
        (await link.get_attribute("href") or "").removeprefix("/profiles/")
        for link in await page.locator("table.users td.name a").all()
    ]
    assert len(shown) == len(names)
    csv_link = page.get_by_role("link", name="Download as CSV")
    await expect(page.locator("#csv-meaning")).to_have_text(
        "Every page of these filters and sort, at most the first 10,000 rows."
    )

    async def download() -> list[dict[str, str]]:
        async with page.expect_download() as waiting:
            await csv_link.click()
        saved = await (await waiting.value).path()
        text = await asyncio.to_thread(Path(saved).read_text, encoding="utf-8")
        return list(csv.DictReader(io.StringIO(text)))

    # Pages of 2 rows and a cap of 5: the download follows the cursors and stops at the cap.
    monkeypatch.setattr(pages, "CSV_PAGE_SIZE", 2)
    monkeypatch.setattr(pages, "CSV_ROW_CAP", 5)
    rows = await download()
    assert [row["profile_id"] for row in rows] == shown[:5]
    monkeypatch.setattr(pages, "CSV_ROW_CAP", 10_000)
    rows = await download()
    assert [row["profile_id"] for row in rows] == shown
    first_names = sorted(row["first_name"] for row in rows)
    assert first_names == sorted(
        ["'=HYPERLINK(1)", "'+33612345678", "'-minus", "'@SUM(A1)", "Ana", "Bea", "Cy"]
    )
    assert {row["anonymous"] for row in rows} == {"yes"}


async def test_a_refused_csv_filter_is_a_page_not_a_broken_download(
    page: Any, console_suite: ConsoleSuite
) -> None:
    await sign_in(page, console_suite, "read", land=False)
    refused = await page.request.get(console_suite.url + "/users.csv?name=" + "x" * 140)
    assert refused.status == 400
    assert "text/html" in refused.headers["content-type"]


async def test_an_erasure_confirmed_for_one_person_never_erases_whom_they_merged_into(
    page: Any, console_suite: ConsoleSuite
) -> None:
    # "delete" is typed for an anonymous visitor; between the console's check of whom it erases
    # and its DeleteProfile, the visitor is merged into an identified person (a login). That
    # person, whose custom ID nobody typed, must not be erased.
    suite = console_suite
    visitor = await new_anonymous_profile(suite)
    custom_id, survivor = await new_identified_profile(suite, "bystander")
    app = build_app(suite.settings)
    async with start_console(app) as url:
        backend = app._app.state.console.backend
        original = backend.call

        async def merged_just_before_the_erasure(
            key: str, service: str, method: str, request: Any
        ) -> Any:
            if method == "DeleteProfile":
                async with open_channel(
                    suite.addresses["identity"], suite.project.keys["admin"]
                ) as channel:
                    await identity_grpc.IdentityServiceStub(channel).MergeProfiles(
                        identity_pb.MergeProfilesRequest(
                            source_profile_id=visitor,
                            target_profile_id=survivor,
                            request_id=str(uuid.uuid4()),
                        )
                    )
            return await original(key, service, method, request)

        backend.call = merged_just_before_the_erasure
        local = ConsoleSuite(url, suite.project, suite.addresses, suite.settings)
        await sign_in(page, local, "admin", land=False)
        await page.goto(url + f"/profiles/{visitor}/delete")
        await page.get_by_label("To confirm, type delete").fill("delete")
        await page.get_by_role("button", name="Delete this profile permanently").click()
        await expect(page.locator("#confirmation-error")).to_contain_text("nothing was erased")
        # The page now shows whom the ID leads to, with that person's word to type.
        await expect(page.get_by_label(f"To confirm, type {custom_id}")).to_be_visible()
    view = await query(suite, "GetProfile", query_pb.GetProfileRequest(profile_id=survivor))
    assert view.profile.summary.custom_id == custom_id


async def new_anonymous_profile(suite: ConsoleSuite) -> str:
    """A new anonymous profile (one installation's event); its profile ID once query has it."""
    device = f"dev-{uuid.uuid4().hex[:8]}"
    await track(suite, custom_event(device, name="visit", time=datetime.now(UTC)))
    return str((await stored_profile(suite, device, within=15)).summary.profile_id)
