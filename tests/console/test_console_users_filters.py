"""What an operator's comparison with Batch and Countly found missing on the users table: the
start of a custom ID or of an email finds people (the header's search and the table's own
boxes), every filter ListProfiles has is a box on the page (the URL still the state, the chips
still removable), and each row shows the email, country and language, which the CSV has
too."""

from __future__ import annotations

import csv
import io
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.async_api import expect

from profiles.client import open_channel
from profiles.common.v1 import types_pb2
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from tests.conftest import eventually
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import query, sign_in, track
from tests.support.ingest import attribute_event, op
from tests.support.query import session_start, subscription

EMAIL = types_pb2.CHANNEL_EMAIL
MARKETING = types_pb2.SUBSCRIPTION_KIND_MARKETING


@dataclass(frozen=True, slots=True)
class Person:
    custom_id: str | None
    first_name: str
    email: str
    language: str
    country: str
    email_marketing: bool = False


@dataclass(frozen=True, slots=True)
class People:
    tag: str  # in every custom ID, email and last name of these people: no other test's match
    ids: dict[str, str]  # profile ID by first name


def family(tag: str) -> str:
    """The last name every person of one test has: a name search for it lists them all."""
    return f"Filters{tag}"


async def add_people(suite: ConsoleSuite, people: list[Person], tag: str) -> People:
    """Tracks and identifies `people` (last name `family(tag)`, a session each in their country,
    newest first), once the users table (a projection fed by the bus) lists every one of
    them."""
    now = datetime.now(UTC)
    installations = {}
    for n, person in enumerate(people):
        installation = f"console-filters-{uuid.uuid4().hex}"
        installations[person.first_name] = installation
        time = now - timedelta(minutes=n + 1)
        operations = [
            op("set", "FIRST_NAME", person.first_name),
            op("set", "LAST_NAME", family(tag)),
        ]
        if person.email:
            operations.append(op("set", "EMAIL", person.email))
        if person.language:
            operations.append(op("set", "LANGUAGE", person.language))
        events = [attribute_event(installation, operations, time=time)]
        if person.country:
            events.append(
                session_start(
                    installation,
                    f"s-{uuid.uuid4().hex}",
                    time,
                    country=person.country,
                    platform=types_pb2.PLATFORM_ANDROID,
                )
            )
        if person.email_marketing:
            consent = subscription(installation, EMAIL, MARKETING, True, time)
            consent.platform = types_pb2.PLATFORM_ANDROID
            events.append(consent)
        await track(suite, *events)
        if person.custom_id is not None:
            async with open_channel(
                suite.addresses["identity"], suite.project.keys["sdk"]
            ) as channel:
                await identity_grpc.IdentityServiceStub(channel).Identify(
                    identity_pb.IdentifyRequest(
                        installation_id=installation, custom_id=person.custom_id
                    )
                )
    ids: dict[str, str] = {}

    async def listed() -> bool:
        reply = await query(
            suite,
            "ListProfiles",
            query_pb.ListProfilesRequest(name_prefix=family(tag), page_size=50),
        )
        rows = {r.first_name: r for r in reply.profiles}
        for person in people:
            row = rows.get(person.first_name)
            if row is None or row.custom_id != (person.custom_id or ""):
                return False
            if (row.email, row.language, row.country) != (
                person.email.lower(),
                person.language,
                person.country,
            ):
                return False
            ids[person.first_name] = row.profile_id
        return True

    await eventually(listed, within=30)
    return People(tag, ids)


def crew(tag: str) -> list[Person]:
    """Four identified people whose custom IDs start with "cu<tag>-" (one in capitals), and
    one anonymous; three emails start with "ben.muller.<tag>"; only Ana is reachable by
    email."""
    return [
        Person(f"cu{tag}-1", "Ana", f"ben.muller.{tag}@example.com", "fr", "FR", True),
        Person(f"cu{tag}-2", "Bo", f"Ben.Muller.{tag}son@Example.org", "de", "DE"),
        Person(f"cu{tag}-10", "Chloe", "", "fr", "DE"),
        Person(f"Cu{tag}-3", "Dora", f"dora.{tag}@example.com", "", "FR"),
        Person(None, "Eli", f"ben.muller.{tag}.anon@example.com", "fr", "FR"),
    ]


def new_tag() -> str:
    return uuid.uuid4().hex[:8]


async def search_for(page: Any, text: str) -> None:
    await page.get_by_label("Find a profile").fill(text)
    await page.locator("form.search").get_by_role("button", name="Search").click()


def names(people: People, *first: str) -> list[str]:
    """The names the users table shows of these first names."""
    return [f"{name} {family(people.tag)}" for name in first]


async def listed_names(page: Any) -> list[str]:
    """The names the users table lists, in order."""
    await expect(page.locator("#shown")).to_be_visible()
    return await page.locator("table.users tbody td.name a").all_inner_texts()


async def test_the_search_box_finds_people_by_the_start_of_their_custom_id_or_email(
    page: Any, console_suite: ConsoleSuite
) -> None:
    people = await add_people(console_suite, crew(tag := new_tag()), tag)
    await sign_in(page, console_suite)

    # The start of several custom IDs: the users table lists them, the filter in its box and
    # as a chip. Case-sensitive: "Cu<tag>-3" is not among them.
    await search_for(page, f"cu{tag}-")
    await expect(page).to_have_url(re.compile(r"/users\?custom_id=cu"))
    assert sorted(await listed_names(page)) == names(people, "Ana", "Bo", "Chloe")
    box = page.locator("form.users-filters").get_by_label("Custom ID starts with")
    await expect(box).to_have_value(f"cu{tag}-")
    await expect(page.locator("table.users caption")).to_contain_text(
        f"whose custom ID starts with “cu{tag}-”"
    )
    await expect(page.locator("#shown")).to_have_text("Profiles 1 to 3 of 3")
    # A whole custom ID opens its profile, though another starts with it ("cu…-10").
    await search_for(page, f"cu{tag}-1")
    await expect(page).to_have_url(re.compile(f"/profiles/{people.ids['Ana']}$"))
    # One profile's custom ID starts with it: its page opens.
    await search_for(page, f"Cu{tag}")
    await expect(page).to_have_url(re.compile(f"/profiles/{people.ids['Dora']}$"))

    # The start of an email, in any case: "ben.muller" finds what it starts.
    await search_for(page, f"Ben.Muller.{tag}")
    await expect(page).to_have_url(re.compile(r"/users\?email="))
    assert sorted(await listed_names(page)) == names(people, "Ana", "Bo", "Eli")
    await expect(page.locator("ul.chips")).to_contain_text(
        f"Email starting with “Ben.Muller.{tag}”"
    )
    await search_for(page, f"ben.muller.{tag}@exa")  # with its "@": no whole email, a start
    await expect(page).to_have_url(re.compile(f"/profiles/{people.ids['Ana']}$"))
    # Searched "by custom ID" or "by email", the start of one too.
    await page.goto(console_suite.url + f"/search?by=custom_id&q=cu{tag}-")
    await expect(page).to_have_url(re.compile(f"/users\\?custom_id=cu{tag}-$"))
    await page.goto(console_suite.url + f"/search?by=email&q=BEN.muller.{tag}son")
    await expect(page).to_have_url(re.compile(f"/profiles/{people.ids['Bo']}$"))

    # Nothing starts with it: each start looked for is said.
    await search_for(page, f"cu{tag}-9")
    await expect(page.locator("main p.found")).to_have_text(f"No profile matches “cu{tag}-9”.")
    await expect(page.locator("#search-misses li")).to_contain_text(
        [
            f"No profile has the custom ID “cu{tag}-9”.",
            f"No profile has a custom ID starting with “cu{tag}-9”.",
            f"No profile has an email address starting with “cu{tag}-9” (in any case).",
        ]
    )


async def test_several_kinds_of_value_starting_with_a_search_are_offered_to_choose(
    page: Any, console_suite: ConsoleSuite
) -> None:
    # One person's custom ID and another's name start with the same text.
    tag = new_tag()
    people = await add_people(
        console_suite,
        [Person(f"zq{tag}-id", "Ana", "", "", ""), Person(None, f"Zq{tag}", "", "", "")],
        tag,
    )
    await sign_in(page, console_suite)
    await search_for(page, f"zq{tag}")
    await expect(page).to_have_url(re.compile(r"/search\?"))
    await expect(page.locator("main p.found")).to_contain_text("which do you mean?")
    choices = page.locator("#search-starts a")
    await expect(choices).to_have_text(
        [
            f"Profiles whose custom ID starts with “zq{tag}”",
            f"Profiles with a word of their name starting with “zq{tag}”",
        ]
    )
    await choices.first.click()
    await expect(page).to_have_url(re.compile(f"/users\\?custom_id=zq{tag}$"))
    assert await listed_names(page) == names(people, "Ana")
    await page.go_back()
    await page.locator("#search-starts a").last.click()
    await expect(page).to_have_url(re.compile(f"/users\\?name=zq{tag}$"))
    assert await listed_names(page) == names(people, f"Zq{tag}")


async def test_every_filter_of_the_users_table_is_a_box_and_the_url_keeps_them(
    page: Any, console_suite: ConsoleSuite
) -> None:
    people = await add_people(console_suite, crew(tag := new_tag()), tag)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + "/users")
    form = page.locator("form.users-filters")
    # Each filter by its box, then Filter: the URL holds it, the box keeps it.
    await form.get_by_label("Name", exact=True).fill(family(tag).lower())
    await form.get_by_label("Custom ID starts with").fill(f"cu{tag}-")
    await form.get_by_role("button", name="Filter").click()
    assert sorted(await listed_names(page)) == names(people, "Ana", "Bo", "Chloe")
    await form.get_by_label("Country").fill("de")
    await form.get_by_role("button", name="Filter").click()
    assert sorted(await listed_names(page)) == names(people, "Bo", "Chloe")
    await expect(form.get_by_label("Country")).to_have_value("DE")
    await form.get_by_label("Language").fill("FR")
    await form.get_by_role("button", name="Filter").click()
    assert await listed_names(page) == names(people, "Chloe")
    state = parse_qs(urlsplit(page.url).query)
    assert state["custom_id"] == [f"cu{tag}-"]
    assert state["country"] == ["DE"]
    assert state["language"] == ["FR"]  # as typed; read as the code "fr"
    await expect(form.get_by_label("Language")).to_have_value("fr")
    assert state["name"] == [family(tag).lower()]
    # The chips of the filters an overview figure or a search opens: each ✕ lifts its own.
    await expect(page.locator("ul.chips li")).to_have_text(
        [f"Custom ID starting with “cu{tag}-” ✕", "Language: fr ✕", "Country: DE ✕"]
    )
    await page.get_by_role("link", name="Remove the filter Country: DE").click()
    assert sorted(await listed_names(page)) == names(people, "Ana", "Chloe")
    await expect(form.get_by_label("Country")).to_have_value("")
    await expect(form.get_by_label("Language")).to_have_value("fr")
    await page.get_by_role(
        "link", name=f"Remove the filter Custom ID starting with “cu{tag}-”"
    ).click()
    assert sorted(await listed_names(page)) == names(people, "Ana", "Chloe", "Eli")

    # The email box, the reach, the identity and the platform.
    await page.goto(console_suite.url + f"/users?name={family(tag)}")
    await form.get_by_label("Email starts with").fill(f"BEN.muller.{tag}")
    await form.get_by_role("button", name="Filter").click()
    assert sorted(await listed_names(page)) == names(people, "Ana", "Bo", "Eli")
    await form.get_by_label("Show").select_option("anonymous")
    await form.get_by_role("button", name="Filter").click()
    assert await listed_names(page) == names(people, "Eli")
    await expect(page.locator("nav.tabs a[aria-current=page]")).to_have_text("Anonymous")
    await form.get_by_label("Show").select_option("all")
    await form.get_by_label("Reachable by").select_option("email")
    await form.get_by_role("button", name="Filter").click()
    assert await listed_names(page) == names(people, "Ana")
    await expect(page.locator("ul.chips")).to_contain_text("Reachable by email")
    await form.get_by_label("Reachable by").select_option("")
    await form.get_by_label("Platform").select_option("web")
    await form.get_by_role("button", name="Filter").click()
    await expect(page.locator("#shown")).to_have_text("No profile")
    await form.get_by_label("Platform").select_option("android")
    await form.get_by_role("button", name="Filter").click()
    assert sorted(await listed_names(page)) == names(people, "Ana", "Bo", "Eli")
    state = parse_qs(urlsplit(page.url).query)
    assert state["email"] == [f"BEN.muller.{tag}"]
    assert state["platform"] == ["android"]
    # Sorting keeps every box's filter.
    await page.get_by_role("link", name="Total sessions").click()
    assert sorted(await listed_names(page)) == names(people, "Ana", "Bo", "Eli")
    await expect(form.get_by_label("Email starts with")).to_have_value(f"BEN.muller.{tag}")

    # A start longer than any custom ID is told beside its box, and lists nothing.
    await page.goto(console_suite.url + "/users?custom_id=" + "x" * 600)
    await expect(page.locator("#custom_id-error")).to_have_text(
        "A custom ID holds at most 512 characters: no custom ID starts so."
    )
    await expect(form.get_by_label("Custom ID starts with")).to_have_attribute(
        "aria-invalid", "true"
    )
    await expect(page.locator("table.users")).to_have_count(0)


async def test_each_row_shows_the_email_country_and_language_and_the_csv_has_them(
    page: Any, console_suite: ConsoleSuite
) -> None:
    people = await add_people(console_suite, crew(tag := new_tag()), tag)
    await sign_in(page, console_suite, land=False)
    await page.goto(console_suite.url + f"/users?name={family(tag)}&sort=name&order=asc")
    headers = await page.locator("table.users thead th").all_inner_texts()
    assert headers[-3:] == ["Email", "Country", "Language"]
    rows = page.locator("table.users tbody tr")
    await expect(rows).to_have_count(5)
    cells = [
        (
            await row.locator("td.email").inner_text(),
            *await row.locator("td.code").all_inner_texts(),
        )
        for row in await rows.all()
    ]
    assert cells == [
        (f"ben.muller.{tag}@example.com", "FR", "fr"),
        (f"ben.muller.{tag}son@example.org", "DE", "de"),
        ("—", "DE", "fr"),
        (f"dora.{tag}@example.com", "FR", "—"),
        (f"ben.muller.{tag}.anon@example.com", "FR", "fr"),
    ]
    # The email is in its column, not repeated under the name.
    await expect(rows.first.locator(".also")).to_have_text(f"cu{tag}-1")

    reply = await page.request.get(
        console_suite.url + f"/users.csv?name={family(tag)}&sort=name&order=asc"
    )
    assert reply.status == 200
    table = list(csv.DictReader(io.StringIO(await reply.text())))
    assert [(r["first_name"], r["email"], r["country"], r["language"]) for r in table] == [
        ("Ana", f"ben.muller.{tag}@example.com", "FR", "fr"),
        ("Bo", f"ben.muller.{tag}son@example.org", "DE", "de"),
        ("Chloe", "", "DE", "fr"),
        ("Dora", f"dora.{tag}@example.com", "FR", ""),
        ("Eli", f"ben.muller.{tag}.anon@example.com", "FR", "fr"),
    ]
    # The CSV follows the new filters too.
    reply = await page.request.get(console_suite.url + f"/users.csv?custom_id=cu{tag}-1")
    assert sorted(r["profile_id"] for r in csv.DictReader(io.StringIO(await reply.text()))) == (
        sorted(people.ids[n] for n in ("Ana", "Chloe"))
    )
