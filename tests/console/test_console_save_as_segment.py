""" "Save as segment" on the users table (an operator's audit against Batch, Countly, PostHog and
Segment: a filtered list of users could not become a segment without typing its filters
again): a link that opens the new-segment form filled with conditions equivalent to the
table's filters, naming those no condition expresses. A segment saved so, evaluated by the
segments service, lists the profiles the filtered table lists."""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from playwright.async_api import expect

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import filters_pb2
from services.console import definitions
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_definitions_edit import accessible, new_segment
from tests.console.test_console_pages import query, sign_in, track
from tests.support.ingest import attribute_event, op
from tests.support.query import session_start, subscription

SHOTS = os.environ.get("PROFILES_CONSOLE_TEST_SHOTS", "")
ANDROID, IOS = types_pb2.PLATFORM_ANDROID, types_pb2.PLATFORM_IOS
EMAIL, MARKETING = types_pb2.CHANNEL_EMAIL, types_pb2.SUBSCRIPTION_KIND_MARKETING


@dataclass(frozen=True, slots=True)
class Person:
    first_name: str
    platform: int
    country: str
    email: str  # before the tag's "@"-less domain; "" for none
    email_marketing: bool


def crowd() -> list[Person]:
    """Two people every filter below keeps, and one left out by each of them."""
    return [
        Person("Ana", ANDROID, "FR", "sas", True),
        Person("Ben", ANDROID, "FR", "sas", True),
        Person("Cleo", IOS, "FR", "sas", True),  # another platform
        Person("Dan", ANDROID, "DE", "sas", True),  # another country
        Person("Eve", ANDROID, "FR", "sas", False),  # not reachable by email
        Person("Finn", ANDROID, "FR", "other", True),  # an email starting otherwise
    ]


async def add_crowd(suite: ConsoleSuite, tag: str) -> dict[str, Any]:
    """Tracks the crowd (last name `Crowd<tag>`, one session each), once the users table lists
    each of them with a smart segment; their rows by first name."""
    family = f"Crowd{tag}"
    now = datetime.now(UTC)
    for n, person in enumerate(crowd()):
        installation = f"console-sas-{uuid.uuid4().hex}"
        time = now - timedelta(minutes=n + 1)
        email = f"{person.email}.{tag}.{person.first_name.lower()}@example.com"
        events = [
            attribute_event(
                installation,
                [
                    op("set", "FIRST_NAME", person.first_name),
                    op("set", "LAST_NAME", family),
                    op("set", "EMAIL", email),
                ],
                time=time,
            ),
            session_start(installation, f"s-{uuid.uuid4().hex}", time, country=person.country),
        ]
        if person.email_marketing:
            events.append(subscription(installation, EMAIL, MARKETING, True, time))
        for event in events:
            event.platform = person.platform  # type: ignore[assignment]
        await track(suite, *events)
    rows: dict[str, Any] = {}

    async def listed() -> bool:
        reply = await query(
            suite, "ListProfiles", query_pb.ListProfilesRequest(name_prefix=family, page_size=50)
        )
        rows.clear()
        rows.update({r.first_name: r for r in reply.profiles if r.smart_segment and r.country})
        return len(rows) == len(crowd())

    await eventually(listed, within=30)
    return rows


async def table_names(page: Any) -> set[str]:
    await expect(page.locator("#shown")).to_be_visible()
    return set(await page.locator("table.users tbody td.name a").all_inner_texts())


async def members_of_created(page: Any, name: str, size: int) -> set[str]:
    """After "Create segment": the segments page's notice, then the members it links (the
    users table filtered by the new segment, as segments stored them)."""
    created = page.locator("#created")
    await expect(created).to_contain_text(f"Segment “{name}” created:")
    await expect(created).to_contain_text(f"{size} profiles match it now")
    await created.get_by_role("link", name=f"{size} profiles").click()
    await expect(page.locator("#shown")).to_have_text(f"Profiles 1 to {size} of {size}")
    return await table_names(page)


async def test_a_filtered_table_saved_as_a_segment_lists_the_same_profiles(
    page: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    rows = await add_crowd(console_suite, tag)
    smart = rows["Ana"].smart_segment
    assert rows["Ben"].smart_segment == smart  # the same history: the same smart segment
    filters = {
        "tab": "details",
        "segment": f"smart:{smart}",
        "platform": "android",
        "country": "FR",
        "reach": "email",
        "email": f"SAS.{tag}",
        "sort": "name",
        "order": "asc",
        "rows": "25",
    }
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/users?" + urlencode(filters))
    family = f"Crowd{tag}"
    expected = {f"Ana {family}", f"Ben {family}"}
    assert await table_names(page) == expected
    await expect(page.locator("#shown")).to_have_text("Profiles 1 to 2 of 2")

    # The link carries the filters (not the sort, the order or the page size).
    link = page.get_by_role("link", name="Save as segment")
    href = await link.get_attribute("href")
    assert href is not None
    assert href.startswith("/segments/new?from=users&")
    assert "sort=" not in href
    assert "rows=" not in href
    await link.click()
    await expect(page.get_by_role("heading", name="New segment")).to_be_visible()
    carried = page.locator("#carried-over li")
    await expect(carried).to_have_text(
        [
            f"Smart segment “{definitions.SMART_CHOICES[f'smart:{smart}']}”",
            "Platform “Android”",
            "Country of the last session “FR”",
            "Reachable by “Email”: an email marketing subscription, and the email set",
            f"Email starting with “SAS.{tag}”: in any case",
            "With user details (a first or last name, an email or a phone number):"
            " implied by the email or phone set",
        ]
    )
    await expect(page.locator("#not-carried")).to_have_count(0)
    # The conditions, in the form's own boxes, joined by AND.
    await expect(page.get_by_role("radio", name="every condition (AND)")).to_be_checked()
    await expect(page.locator("ol.conditions > li")).to_have_count(6)
    await expect(page.locator("#c0-kind")).to_have_value("smart_segment")
    await expect(page.locator("#c1-kind")).to_have_value("platform")
    await expect(
        page.get_by_role("group", name="Condition 2").get_by_label("Android")
    ).to_be_checked()
    await expect(page.locator("#c2-countries")).to_have_value("FR")
    await expect(page.locator("#c3-kind")).to_have_value("subscription")
    await expect(page.locator("#c3-channel")).to_have_value("email")
    await expect(page.locator("#c4-attribute")).to_have_value("email")
    await expect(page.locator("#c4-operator")).to_have_value("exists")
    await expect(page.locator("#c5-operator")).to_have_value("starts_with")
    await expect(page.locator("#c5-value")).to_have_value(f"SAS.{tag}")
    await accessible(page, axe_source, "segment form from the users table")
    if SHOTS:
        await page.locator("main").screenshot(path=f"{SHOTS}/save-as-segment-form.png")

    # Previewed, then created: the service's count, and its members, are the table's.
    name = f"Saved from the table {tag}"
    await page.get_by_label("Name", exact=True).fill(name)
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#preview")).to_contain_text("Preview: 2 profiles match now.")
    await expect(page.locator("#carried-over li")).to_have_count(6)  # still said
    await page.get_by_role("button", name="Create segment").click()
    assert await members_of_created(page, name, 2) == expected

    # That segment as the table's only filter, saved as a segment again: its conditions are
    # copied, and the copy lists the same profiles.
    segment_id = re.search(r"segment=custom(?:%3A|:)([0-9a-f-]+)", page.url)
    assert segment_id is not None, page.url
    await page.goto(
        console_suite.url + f"/users?segment=custom:{segment_id.group(1)}&name={family}"
    )
    assert await table_names(page) == expected
    await page.get_by_role("link", name="Save as segment").click()
    await expect(page.locator("#carried-over li").first).to_have_text(
        f"Member of the custom segment “{name}”: its conditions, copied: a later change to"
        f" “{name}” does not follow"
    )
    # The name filter is named, not carried; here it leaves out no one the copy keeps.
    await expect(page.locator("#not-carried li")).to_have_text(
        [
            f"Name with a word starting with “{family}”: a segment compares a first or last"
            " name from its start, not any word of the name ignoring accents"
        ]
    )
    await expect(page.locator("ol.conditions > li")).to_have_count(6)
    copy = f"Copy of the saved segment {tag}"
    await page.get_by_label("Name", exact=True).fill(copy)
    await page.get_by_role("button", name="Create segment").click()
    assert await members_of_created(page, copy, 2) == expected


async def test_filters_no_condition_expresses_are_named_on_the_form(
    page: Any, console_suite: ConsoleSuite
) -> None:
    tag = uuid.uuid4().hex[:8]
    either = await new_segment(
        console_suite,
        f"Either {tag}",
        filters_pb2.FilterNode(
            group=filters_pb2.FilterGroup(
                operator=filters_pb2.GROUP_OPERATOR_OR,
                children=[
                    filters_pb2.FilterNode(
                        condition=filters_pb2.Condition(
                            country=filters_pb2.CountryCondition(countries=[country])
                        )
                    )
                    for country in ("FR", "DE")
                ],
            )
        ),
    )
    filters = {
        "tab": "identified",
        "segment": f"custom:{either.segment_id}",
        "platform": "ios",
        "name": "élo",
        "language": "fr",
        "reach": "push",
        "id": "dcae577b",
        "custom_id": "user-",
    }
    await sign_in(page, console_suite, "admin", land=False)
    await page.goto(console_suite.url + "/segments/new?from=users&" + urlencode(filters))
    await expect(page.locator("#carried-over li")).to_have_text(["Platform “iOS”"])
    left = [
        "Reachable by “Push”: a segment has no condition on push tokens or on the devices'"
        " notification opt-in",
        "Identified profiles (with a custom ID): a segment has no condition on the custom ID",
        f"Member of the custom segment “Either {tag}”: joined by OR, it needs a group of its own"
        " beside the other conditions, and this form holds one group",
        "Language “fr”: a segment tests the language attribute only, where the table also takes"
        " the language of the person's devices",
        "Name with a word starting with “élo”: a segment compares a first or last name from its"
        " start, not any word of the name ignoring accents",
        "Custom ID starting with “user-”: a segment has no condition on the custom ID",
        "Profile ID starting with “dcae577b”: a segment has no condition on the profile ID",
    ]
    await expect(page.locator("#not-carried li")).to_have_text(left)
    await expect(page.locator("ol.conditions > li")).to_have_count(1)
    await expect(page.get_by_role("group", name="Condition 1").get_by_label("iOS")).to_be_checked()
    # Adding a condition (the form posted back) keeps saying it, and the way back.
    await page.get_by_role("button", name="Add a condition").click()
    await expect(page.locator("ol.conditions > li")).to_have_count(2)
    await expect(page.locator("#not-carried li")).to_have_text(left)
    back = page.get_by_role("link", name="Back to the users table")
    assert await back.get_attribute("href") == "/users?" + urlencode(filters)

    # Alone, the OR segment is the whole filter: its conditions, joined by OR.
    await page.goto(
        console_suite.url + f"/segments/new?from=users&segment=custom:{either.segment_id}"
    )
    await expect(page.get_by_role("radio", name="at least one condition (OR)")).to_be_checked()
    await expect(page.locator("#c0-countries")).to_have_value("FR")
    await expect(page.locator("#c1-countries")).to_have_value("DE")
    await expect(page.locator("#not-carried")).to_have_count(0)


async def test_only_an_admin_sees_save_as_segment(page: Any, console_suite: ConsoleSuite) -> None:
    await sign_in(page, console_suite, "read", land=False)
    await page.goto(console_suite.url + "/users?platform=ios")
    await expect(page.locator("#shown")).to_be_visible()
    await expect(page.get_by_role("link", name="Save as segment")).to_have_count(0)


def test_user_details_are_a_group_of_their_own_carried_only_alone() -> None:
    alone = definitions.segment_form_from_users(definitions.UsersFilters(tab="details"))
    assert alone.form.join == "or"
    assert [(c.attribute, c.operator) for c in alone.form.conditions] == [
        ("first_name", "exists"),
        ("last_name", "exists"),
        ("email", "exists"),
        ("phone", "exists"),
    ]
    assert not alone.left
    with_country = definitions.segment_form_from_users(
        definitions.UsersFilters(tab="details", country="FR")
    )
    assert with_country.form.join == "and"
    assert [c.kind for c in with_country.form.conditions] == ["country"]
    assert [f.label for f in with_country.left] == [definitions.USER_DETAILS]
    # A phone set (reachable by SMS) implies user details.
    by_sms = definitions.segment_form_from_users(
        definitions.UsersFilters(tab="details", reach="sms")
    )
    assert [(c.kind, c.channel, c.attribute) for c in by_sms.form.conditions] == [
        ("subscription", "sms", "custom"),
        ("attribute", "email", "phone"),
    ]
    assert not by_sms.left
    # No filter at all: the form as "New segment" opens it, and nothing to name.
    empty = definitions.segment_form_from_users(definitions.UsersFilters())
    assert empty.form == definitions.SegmentForm()
    assert (empty.carried, empty.left) == ((), ())
