"""Editing segments and funnels in the console, in a real browser against a real suite: the
create form filled with the definition, a preview of what the change would move, the segment's
count following its new filter, a definition changed meanwhile not overwritten, a filter the
form cannot hold left as it is, and read keys refused."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from playwright.async_api import expect

from profiles.client import open_channel
from profiles.segments.v1 import filters_pb2, funnels_pb2, segments_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from services.console import definitions
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_admin import profiles_with_plan
from tests.console.test_console_pages import sign_in


async def admin_call(suite: ConsoleSuite, method: str, request: Any) -> Any:
    async with open_channel(suite.addresses["segments"], suite.project.keys["admin"]) as channel:
        return await getattr(segments_grpc.SegmentsServiceStub(channel), method)(request)


def plan_is(plan: str) -> filters_pb2.FilterNode:
    """The filter the segment form builds for "console_plan is <plan>"."""
    test = filters_pb2.AttributeCondition(
        custom_attribute="console_plan", operator=filters_pb2.OPERATOR_EQUALS
    )
    test.value.string_value = plan
    node = filters_pb2.FilterNode()
    node.group.operator = filters_pb2.GROUP_OPERATOR_AND
    node.group.children.add().condition.attribute.CopyFrom(test)
    return node


async def accessible(page: Any, axe_source: str, name: str) -> None:
    """No serious or critical axe-core finding on the page (as every page of the console)."""
    # Evaluated through the DevTools protocol: the page's CSP (rightly) refuses inline scripts.
    await page.evaluate(axe_source)
    found = await page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
        ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))"
    )
    assert found == [], f"{name}: {found}"


async def new_segment(suite: ConsoleSuite, name: str, node: filters_pb2.FilterNode) -> Any:
    reply = await admin_call(
        suite,
        "CreateSegment",
        segments_pb.CreateSegmentRequest(display_name=name, filter=node),
    )
    return reply.segment


async def test_an_admin_edits_a_segment_s_filter_and_sees_its_count_change(
    page: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    bronze, copper = f"Bronze{uuid.uuid4().hex[:6]}", f"Copper{uuid.uuid4().hex[:6]}"
    await profiles_with_plan(console_suite, bronze, 2)
    await profiles_with_plan(console_suite, copper, 3)
    name = f"Metal plan {uuid.uuid4().hex[:6]}"
    segment = await new_segment(console_suite, name, plan_is(bronze))
    assert segment.size == 2

    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/segments")
    row = page.locator("tr[id^='segment-']", has_text=name)
    await expect(row.locator("td.num")).to_have_text("2")
    await page.get_by_role("link", name=f"Edit the segment {name}").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Edit the segment “{name}”")
    # The create form, filled with the segment's definition.
    await expect(page.get_by_label("Name", exact=True)).to_have_value(name)
    await expect(page.locator("#c0-kind")).to_have_value("attribute")
    await expect(page.locator("#c0-custom_name")).to_have_value("console_plan")
    await expect(page.locator("#c0-operator")).to_have_value("equals")
    await expect(page.locator("#c0-value")).to_have_value(bronze)

    # The preview tells what saving would move, and changes nothing.
    await page.locator("#c0-value").fill(copper)
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#preview")).to_contain_text(
        "Preview: 3 profiles would match now (it has 2 members): 3 profiles would enter and"
        " 2 members would leave."
    )
    await expect(page.locator("#c0-value")).to_have_value(copper)
    await accessible(page, axe_source, "segment edit preview")
    got = await admin_call(
        console_suite, "GetSegment", segments_pb.GetSegmentRequest(segment_id=segment.segment_id)
    )
    assert (got.segment.size, got.segment.filter) == (2, plan_is(bronze))

    renamed = name + " (copper)"
    await page.get_by_label("Name", exact=True).fill(renamed)
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#edited")).to_contain_text(
        f"Segment “{renamed}” saved: 3 profiles match it now."
    )
    row = page.locator("tr[id^='segment-']", has_text=renamed)
    await expect(row.locator("td.num")).to_have_text("3")
    await expect(row).to_contain_text(f"console_plan is {copper}")
    got = await admin_call(
        console_suite, "GetSegment", segments_pb.GetSegmentRequest(segment_id=segment.segment_id)
    )
    assert (got.segment.display_name, got.segment.size) == (renamed, 3)
    assert got.segment.filter == plan_is(copper)
    # The members link lists the new members.
    await page.locator("#edited").get_by_role("link", name="3 profiles").click()
    await expect(page.locator("table.users tbody tr")).to_have_count(3)


async def test_a_segment_changed_meanwhile_is_not_overwritten(
    page: Any, console_suite: ConsoleSuite
) -> None:
    plan = f"Zinc{uuid.uuid4().hex[:6]}"
    name = f"Zinc plan {uuid.uuid4().hex[:6]}"
    segment = await new_segment(console_suite, name, plan_is(plan))
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + f"/segments/{segment.segment_id}/edit")
    await expect(page.get_by_label("Name", exact=True)).to_have_value(name)
    # Someone else renames it after the page was shown.
    theirs = name + " (theirs)"
    await admin_call(
        console_suite,
        "UpdateSegment",
        segments_pb.UpdateSegmentRequest(
            segment=segments_pb2.Segment(segment_id=segment.segment_id, display_name=theirs),
            update_mask=FieldMask(paths=["display_name"]),
        ),
    )
    await page.get_by_label("Name", exact=True).fill(name + " (mine)")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#form-error")).to_contain_text(
        "Someone changed this segment since this page was shown: nothing was saved."
    )
    await expect(page.get_by_label("Name", exact=True)).to_have_value(name + " (mine)")
    got = await admin_call(
        console_suite, "GetSegment", segments_pb.GetSegmentRequest(segment_id=segment.segment_id)
    )
    assert got.segment.display_name == theirs
    # Opened again, the page shows the current definition, and saving it works.
    await page.locator("#form-error").get_by_role("link", name="Open it again").click()
    await expect(page.get_by_label("Name", exact=True)).to_have_value(theirs)
    await page.get_by_label("Name", exact=True).fill(name + " (mine)")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#edited")).to_contain_text(f"Segment “{name} (mine)” saved")


async def test_a_filter_the_form_cannot_hold_is_kept_while_the_name_changes(
    page: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    # Nested groups: the form holds one group of conditions only.
    nested = filters_pb2.FilterNode()
    nested.group.operator = filters_pb2.GROUP_OPERATOR_OR
    nested.group.children.add().CopyFrom(plan_is("tin"))
    nested.group.children.add().CopyFrom(plan_is("lead"))
    name = f"Nested {uuid.uuid4().hex[:6]}"
    segment = await new_segment(console_suite, name, nested)
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + f"/segments/{segment.segment_id}/edit")
    await expect(page.locator("#filter-kept")).to_contain_text("console_plan is tin")
    await expect(page.locator("#c0-kind")).to_have_count(0)
    await accessible(page, axe_source, "segment edit, filter kept")
    await page.get_by_label("Description (optional)").fill("tin or lead")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#edited")).to_contain_text(f"Segment “{name}” saved")
    got = await admin_call(
        console_suite, "GetSegment", segments_pb.GetSegmentRequest(segment_id=segment.segment_id)
    )
    assert (got.segment.description, got.segment.filter) == ("tin or lead", nested)


async def test_an_admin_edits_a_funnel_s_steps_and_window(
    page: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    name = f"Steps {uuid.uuid4().hex[:6]}"
    window = Duration()
    window.FromTimedelta(timedelta(days=2))
    created = await admin_call(
        console_suite,
        "CreateFunnel",
        segments_pb.CreateFunnelRequest(
            display_name=name,
            steps=[
                funnels_pb2.FunnelStep(event_name="view"),
                funnels_pb2.FunnelStep(event_name="cart"),
            ],
            conversion_window=window,
        ),
    )
    funnel_id = created.funnel.funnel_id
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/segments")
    await page.get_by_role("link", name=f"Edit the funnel {name}").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Edit the funnel “{name}”")
    await expect(page.locator("#s0-event_name")).to_have_value("view")
    await expect(page.locator("#s1-event_name")).to_have_value("cart")
    await expect(page.locator("#window")).to_have_value("2")
    await expect(page.locator("#window_unit")).to_have_value("days")
    await page.locator("#s1-event_name").fill("purchase")
    await page.locator("#window").fill("90")
    await page.locator("#window_unit").select_option("minutes")
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#preview")).to_contain_text("would have reached each step now")
    await expect(page.locator("#preview")).to_contain_text("purchase")
    await accessible(page, axe_source, "funnel edit preview")
    got = await admin_call(
        console_suite, "GetFunnel", segments_pb.GetFunnelRequest(funnel_id=funnel_id)
    )
    assert [s.event_name for s in got.funnel.steps] == [
        "view",
        "cart",
    ]  # the preview stored nothing
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#edited")).to_contain_text(f"Funnel “{name}” saved")
    got = await admin_call(
        console_suite, "GetFunnel", segments_pb.GetFunnelRequest(funnel_id=funnel_id)
    )
    assert [s.event_name for s in got.funnel.steps] == ["view", "purchase"]
    assert got.funnel.conversion_window.ToTimedelta() == timedelta(minutes=90)


async def test_a_read_key_cannot_edit_segments_and_funnels(
    page: Any, console_suite: ConsoleSuite
) -> None:
    segment = await new_segment(console_suite, f"Read only {uuid.uuid4().hex[:6]}", plan_is("x"))
    await sign_in(page, console_suite, "read", land=False)
    await page.goto(console_suite.url + "/segments")
    await expect(page.get_by_role("heading", name="Custom segments")).to_be_visible()
    await expect(page.get_by_role("link", name="Edit", exact=False)).to_have_count(0)
    token = await page.locator("form.signout input[name=csrf_token]").input_value()
    for path in (f"/segments/{segment.segment_id}/edit", f"/funnels/{uuid.uuid4()}/edit"):
        assert (await page.request.get(console_suite.url + path)).status == 403, path
        posted = await page.request.post(
            console_suite.url + path,
            form={"csrf_token": token, "name": "nope", "action": "save"},
            max_redirects=0,
        )
        assert posted.status == 403, path
    got = await admin_call(
        console_suite, "GetSegment", segments_pb.GetSegmentRequest(segment_id=segment.segment_id)
    )
    assert got.segment.display_name == segment.display_name


async def test_a_forged_edit_form_changes_nothing(page: Any, console_suite: ConsoleSuite) -> None:
    segment = await new_segment(console_suite, f"Forged {uuid.uuid4().hex[:6]}", plan_is("x"))
    await sign_in(page, console_suite, "admin", land=False)
    posted = await page.request.post(
        console_suite.url + f"/segments/{segment.segment_id}/edit",
        form={"csrf_token": "forged", "name": "taken over", "action": "save"},
        max_redirects=0,
    )
    assert posted.status == 403
    got = await admin_call(
        console_suite, "GetSegment", segments_pb.GetSegmentRequest(segment_id=segment.segment_id)
    )
    assert got.segment.display_name == segment.display_name


def test_every_condition_the_form_builds_comes_back_in_the_boxes_it_was_typed_in() -> None:
    typed = (
        definitions.ConditionForm(custom_name="plan", value="pro"),
        definitions.ConditionForm(attribute="email", operator="contains", value="@x.org"),
        definitions.ConditionForm(
            custom_name="age", operator="at_least", value_type="number", value="18"
        ),
        definitions.ConditionForm(custom_name="score", value_type="number", value="4.5"),
        definitions.ConditionForm(custom_name="vip", value_type="bool", value="true", negate=True),
        definitions.ConditionForm(
            custom_name="signup",
            operator="greater_than",
            value_type="timestamp",
            value="2026-12-01T10:30:00Z",
        ),
        definitions.ConditionForm(custom_name="plan", operator="in", value="free, pro"),
        definitions.ConditionForm(custom_name="plan", operator="exists", ignore_case=True),
        definitions.ConditionForm(kind="platform", platforms=("ios", "web")),
        definitions.ConditionForm(kind="country", countries="FR, DE"),
        definitions.ConditionForm(
            kind="subscription", channel="sms", sub_kind="transactional", subscribed="no"
        ),
        definitions.ConditionForm(kind="last_seen", days="7"),
        definitions.ConditionForm(kind="first_seen", days="30", negate=True),
        definitions.ConditionForm(
            kind="event_count", event_name="purchase", count_operator="less_than", count="3"
        ),
        definitions.ConditionForm(kind="smart_segment", smart=("smart:3", "flag:3")),
    )
    form = definitions.SegmentForm(name="All", description="d", join="or", conditions=typed)
    request, refused = definitions.segment_request(form)
    assert not refused
    stored = segments_pb2.Segment(
        display_name=request.display_name, description=request.description, filter=request.filter
    )
    assert definitions.segment_form_of(stored) == (form, True)

    steps = (
        definitions.StepForm(event_name="view"),
        definitions.StepForm(
            event_name="purchase",
            attribute_name="amount",
            operator="greater_than",
            value_type="number",
            value="20",
        ),
    )
    for window, unit in (("90", "minutes"), ("2", "days"), ("36", "hours")):
        funnel_form = definitions.FunnelForm(name="F", steps=steps, window=window, window_unit=unit)
        built, refused = definitions.funnel_request(funnel_form)
        assert not refused
        funnel = funnels_pb2.Funnel(
            display_name=built.display_name,
            steps=built.steps,
            conversion_window=built.conversion_window,
        )
        assert definitions.funnel_form_of(funnel) == (funnel_form, True)


def test_a_filter_the_form_has_no_boxes_for_is_not_editable() -> None:
    engagement = filters_pb2.FilterNode()
    engagement.condition.engagement.operator = filters_pb2.OPERATOR_GREATER_THAN
    engagement.condition.engagement.score = 50
    url = plan_is("x")
    url.group.children[0].condition.attribute.value.url_value = "https://x.org"
    nested = filters_pb2.FilterNode()
    nested.group.operator = filters_pb2.GROUP_OPERATOR_AND
    nested.group.children.add().CopyFrom(plan_is("x"))
    commas = plan_is("x")
    commas.group.children[0].condition.attribute.operator = filters_pb2.OPERATOR_IN
    commas.group.children[0].condition.attribute.ClearField("value")
    commas.group.children[0].condition.attribute.values.add(string_value="a, b")
    for node in (engagement, url, nested, commas):
        form, editable = definitions.segment_form_of(
            segments_pb2.Segment(display_name="n", description="d", filter=node)
        )
        assert not editable, node
        assert (form.name, form.description) == ("n", "d")
    assert definitions.segment_form_of(segments_pb2.Segment(filter=plan_is("x")))[1]
