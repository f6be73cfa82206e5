"""The users table's page size (an operator's audit against Batch, Countly, PostHog and
Segment: 50 rows a page, always, was too few to scan and too many on a phone): 25, 50, 100 or
200 rows, chosen in the filter form, kept in the URL, by the page trail (Previous and First
page) and by the Next page link, and a page link whose size was changed by hand numbered as
its trail was made."""

from __future__ import annotations

import html
import re
import uuid
from urllib.parse import parse_qs, urlsplit

import requests

from tests.console.conftest import ConsoleSuite
from tests.console.test_console_pages import profiles_listed_by
from tests.console.test_console_session_keys import get, signed_in

PROFILES = 30


def shown(page: requests.Response) -> str:
    found = re.search(r'<span id="shown">([^<]*)</span>', page.text)
    assert found is not None, page.text[-2000:]
    return found.group(1)


def row_count(page: requests.Response) -> int:
    return page.text.count('<td class="name">')


def link(page: requests.Response, pattern: str) -> str:
    """The href of the page's first link matching `pattern` (a regex of its attributes and
    text after the href), "" when none."""
    found = re.search(r'<a href="([^"]*)"' + pattern, page.text)
    return html.unescape(found.group(1)) if found else ""


def query_of(href: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(href).query)


async def test_the_users_table_shows_the_rows_a_page_chosen_and_its_links_keep_them(
    console_suite: ConsoleSuite,
) -> None:
    family = "Rowsize" + uuid.uuid4().hex[:8]
    await profiles_listed_by(console_suite, "LAST_NAME", family, PROFILES, name_prefix=family)
    browser = await signed_in(console_suite, console_suite.project.keys["read"])
    base = console_suite.url

    # The form offers the sizes, the default chosen.
    first = await get(browser, f"{base}/users?name={family}")
    assert '<label for="rows">Rows per page</label>' in first.text
    choices = re.search(r'<select id="rows" name="rows">(.*?)</select>', first.text, re.S)
    assert choices is not None
    assert re.findall(r'<option value="(\d+)"', choices.group(1)) == ["25", "50", "100", "200"]
    assert '<option value="50" selected>' in choices.group(1)
    assert shown(first) == f"Profiles 1 to {PROFILES} of {PROFILES}"

    # 25 a page, as the form submits it: the page, its Next page link, its sort headers, tabs
    # and chips keep the size; the CSV (every page) does not need it.
    page = await get(browser, f"{base}/users?name={family}&rows=25&tab=all&sort=last_seen")
    assert '<option value="25" selected>' in page.text
    assert (shown(page), row_count(page)) == (f"Profiles 1 to 25 of {PROFILES}", 25)
    following = link(page, r' rel="next"')
    assert query_of(following)["rows"] == ["25"]
    assert query_of(link(page, r">Total sessions"))["rows"] == ["25"]
    assert query_of(link(page, r">Anonymous</a>"))["rows"] == ["25"]
    assert "rows" not in query_of(link(page, r' download aria-describedby="csv-meaning"'))

    second = await get(browser, base + following)
    assert (shown(second), row_count(second)) == (f"Profiles 26 to {PROFILES} of {PROFILES}", 5)
    assert '<option value="25" selected>' in second.text
    assert not link(second, r' rel="next"')
    # Back through the trail, and to the first page: still 25 a page.
    previous = link(second, r' rel="prev"')
    assert query_of(previous)["rows"] == ["25"]
    back = await get(browser, base + previous)
    assert (shown(back), row_count(back)) == (f"Profiles 1 to 25 of {PROFILES}", 25)
    first_page = link(second, r">First page</a>")
    assert query_of(first_page)["rows"] == ["25"]
    assert row_count(await get(browser, base + first_page)) == 25

    # 100 and 200: every one on one page.
    for size in (100, 200):
        whole = await get(browser, f"{base}/users?name={family}&rows={size}")
        assert (shown(whole), row_count(whole)) == (
            f"Profiles 1 to {PROFILES} of {PROFILES}",
            PROFILES,
        )
        assert f'<option value="{size}" selected>' in whole.text
        assert not link(whole, r' rel="next"')

    # A size the form does not offer is named, and the default shown.
    odd = await get(browser, f"{base}/users?name={family}&rows=7")
    assert "Unknown number of rows a page “7”: showing 50" in html.unescape(odd.text)
    assert row_count(odd) == PROFILES
    assert '<option value="50" selected>' in odd.text

    # The second page's link with its size changed by hand: the rows after the first 25, as
    # its token says, numbered as the trail (made 25 a page) counts them, and no Previous
    # page (the trail's pages are of another size).
    edited = following.replace("rows=25", "rows=100")
    assert edited != following
    changed = await get(browser, base + edited)
    assert (shown(changed), row_count(changed)) == (f"Profiles 26 to {PROFILES} of {PROFILES}", 5)
    assert not link(changed, r' rel="prev"')
