"""The browser SDKs as shipped (posthog-js, analytics.js 2.0 from @segment/analytics-next), in
Debian's Chromium, against the edge: a page on its own origin loads each library from its npm
package (package-lock.json in tests/edge/browser), initialised as docs/edge.md says, and what
the visitor does must be stored. posthog-js's defaults found two defects the translator tests
could not: it sends gzip without saying so, and it drops a 429."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from profiles.common.v1 import types_pb2
from tests.conftest import eventually
from tests.edge.conftest import Edge, custom_names
from tests.support.browser import npm_package

HERE = Path(__file__).parent / "browser"
PAGE = b"""<!doctype html><html lang="en"><head><title>Shop</title></head>
<body><h1>Shop</h1><button id="buy" class="btn primary">Buy now</button>
<script src="/sdk.js"></script></body></html>"""


@contextmanager
def shop(library: Path) -> Iterator[str]:
    """A shop's page on an origin of its own (another port: the SDK's calls to the edge are
    cross-origin, as on a real site), loading `library` as /sdk.js; yields its URL."""
    script = library.read_bytes()

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, kind = (
                (script, "text/javascript") if self.path == "/sdk.js" else (PAGE, "text/html")
            )
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def site(edge: Edge, browser: Any) -> AsyncIterator[Any]:
    """`site(library)`: a new visitor's page of the shop with the library loaded (a fresh
    browser context: no cookie, storage or cache of another test's visitor)."""
    async with contextlib.AsyncExitStack() as stack:
        context = await browser.new_context()
        stack.push_async_callback(context.close)

        async def open_with(library: Path) -> Any:
            url = stack.enter_context(shop(library))
            page = await context.new_page()
            await page.goto(url)
            return page

        yield open_with


# posthog-js batches what is captured and sends its queue every 3 s by default; its shortest
# interval (250 ms, `request_queue_config`, as its config docs describe) sends the same batches
# (gzip, several events a request) without the test sitting through the default interval.
FLUSH_SOON = {"request_queue_config": {"flush_interval_ms": 250}}


async def stored_profile(edge: Edge, **lookup: str) -> Any:
    found: dict[str, Any] = {}

    async def stored() -> bool:
        found["profile"] = await edge.stored_profile(**lookup)
        return found["profile"] is not None  # None: not stored yet

    await eventually(stored, within=30)
    return found["profile"]


async def test_posthog_js_with_its_defaults_reaches_the_profile(edge: Edge, site: Any) -> None:
    page = await site(npm_package(HERE, "posthog-js/dist/array.full.js"))
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    # posthog-js's defaults (gzip, its remote config and flags asked on load), except the bot
    # filter that drops every event of an automated browser (navigator.webdriver), which its
    # docs say to turn off in end-to-end tests, and its queue's flush interval.
    init = {"api_host": edge.url, "opt_out_useragent_filter": True, **FLUSH_SOON}
    await page.evaluate(
        f"""() => {{
            posthog.init({json.dumps(edge.sdk_key)}, {json.dumps(init)});
            posthog.capture("Button Clicked", {{plan: "pro"}});
            posthog.identify("ph-browser-user", {{email: "ada@example.com"}});
        }}"""
    )
    # Autocapture (on by default) starts once the remote config says `autocapture_opt_out`
    # false: then a click on the button is an autocapture event.
    await page.wait_for_function("() => posthog.autocapture && posthog.autocapture.isEnabled")
    await page.click("#buy")
    profile = await stored_profile(edge, custom_id="ph-browser-user")

    async def complete() -> bool:
        found = await edge.profile(custom_id="ph-browser-user")
        names = await custom_names(edge, found.summary.profile_id)
        return {"button_clicked", "autocapture", "pageview"} <= set(
            names
        ) and found.native_attributes.email == "ada@example.com"

    await eventually(complete, within=30)
    final = await edge.profile(custom_id="ph-browser-user")
    assert final.summary.profile_id == profile.summary.profile_id
    events = await edge.events(final.summary.profile_id)
    (click,) = [e.custom for e in events if e.custom.name == "autocapture"]
    # posthog-js's own page view: its page and title as analytics.js's page call gives them.
    pageview = next(e.custom for e in events if e.custom.name == "pageview")
    assert pageview.attributes["page_url"].url_value.startswith("http://127.0.0.1:")
    assert pageview.attributes["page_title"].string_value == "Shop"
    assert not {"url", "title", "pathname", "current_url"} & set(pageview.attributes)
    attributes = dict(click.attributes)
    assert click.label == "Buy now"
    assert attributes["text"].string_value == "Buy now"
    assert attributes["event_type"].string_value == "click"
    assert attributes["tag"].string_value == "button"
    assert attributes["element_id"].string_value == "buy"
    assert list(attributes["classes"].string_list_value.values) == ["btn", "primary"]
    # The page, under the name every SDK's events give it (docs/edge.md).
    assert attributes["page_url"].url_value.startswith("http://127.0.0.1:")
    assert attributes["page_path"].string_value.startswith("/")
    assert "url" not in attributes
    # The browser's installation is the web's (the user's own ID is one too: docs/edge.md).
    assert types_pb2.PLATFORM_WEB in [i.platform for i in final.installations]
    # Its remote config and flags were answered: nothing failed on the shop's page.
    assert problems == []


async def test_analytics_js_loads_its_settings_from_the_edge_and_sends_there(
    edge: Edge, site: Any
) -> None:
    page = await site(npm_package(HERE, "@segment/analytics-next/dist/umd/index.js"))
    # The visitor came from a campaign: analytics.js reads the page's utm_ parameters.
    landing = page.url + "pricing?utm_source=news&utm_medium=email&utm_campaign=spring"
    await page.goto(landing)
    await page.evaluate(
        f"""async () => {{
            const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
                {{writeKey: {json.dumps(edge.sdk_key)}, cdnURL: {json.dumps(edge.url)}}});
            await analytics.track("Course Clicked", {{title: "Intro"}});
            await analytics.identify("ajs-browser-user", {{
                email: "grace@example.com", createdAt: new Date(Date.UTC(2024, 0, 2, 3, 4, 5))}});
        }}"""
    )
    profile = await stored_profile(edge, custom_id="ajs-browser-user")
    assert profile.native_attributes.email == "grace@example.com"
    # A JavaScript Date, sent as JSON.stringify writes it, is a timestamp attribute.
    (created,) = [a.value for a in profile.custom_attributes if a.name == "createdat"]
    assert created.timestamp_value.ToJsonString() == "2024-01-02T03:04:05Z"
    (clicked,) = [
        e.custom
        for e in await edge.events(profile.summary.profile_id)
        if e.custom.name == "course_clicked"
    ]
    # The page and the campaign it happened on, beside the app's own `title`.
    attributes = clicked.attributes
    assert attributes["title"].string_value == "Intro"
    assert attributes["page_url"].url_value == landing
    assert attributes["page_path"].string_value == "/pricing"
    assert attributes["page_title"].string_value == "Shop"
    assert [attributes[f"utm_{k}"].string_value for k in ("source", "medium", "campaign")] == [
        "news",
        "email",
        "spring",
    ]


async def posthog_page(edge: Edge, site: Any, **config: Any) -> Any:
    """A shop's page with posthog-js initialised for a test: no autocapture, no automatic
    page views (only what the test does is sent)."""
    page = await site(npm_package(HERE, "posthog-js/dist/array.full.js"))
    init = {
        "api_host": edge.url,
        "opt_out_useragent_filter": True,
        "autocapture": False,
        "capture_pageview": False,
        "capture_pageleave": False,
        **FLUSH_SOON,
        **config,
    }
    await page.evaluate(f"() => posthog.init({json.dumps(edge.sdk_key)}, {json.dumps(init)})")
    return page


async def test_posthog_js_reset_then_another_user_keeps_each_user_s_history(
    edge: Edge, site: Any
) -> None:
    page = await posthog_page(edge, site)
    await page.evaluate(
        """() => {
            posthog.capture("first visit");
            posthog.identify("ph-alice");
            posthog.capture("alice event");
            posthog.reset();  // the logout
            posthog.capture("logged out browsing");
            posthog.identify("ph-bob");
            posthog.capture("bob event");
        }"""
    )
    bob = await stored_profile(edge, custom_id="ph-bob")

    async def bob_complete() -> bool:
        names = await custom_names(edge, bob.summary.profile_id)
        return names == ["bob_event", "logged_out_browsing"]

    await eventually(bob_complete, within=30)
    alice = await edge.profile(custom_id="ph-alice")
    # The logout started a new anonymous profile, which Bob's login merged: nothing of his
    # (or of the logged-out visitor's) on Alice's profile, nothing of hers on his.
    assert await custom_names(edge, alice.summary.profile_id) == ["alice_event", "first_visit"]
    final = await edge.profile(custom_id="ph-bob")
    assert final.summary.profile_id != alice.summary.profile_id
    assert await custom_names(edge, final.summary.profile_id) == [
        "bob_event",
        "logged_out_browsing",
    ]
    # Bob's own ID is an installation of his profile too, of platform API (docs/edge.md).
    platforms = {i.installation_id: i.platform for i in final.installations}
    assert platforms["ph-bob"] == types_pb2.PLATFORM_API
    assert types_pb2.PLATFORM_UNSPECIFIED not in platforms.values()


async def test_posthog_js_bootstrapped_as_identified_reaches_that_user(
    edge: Edge, site: Any
) -> None:
    # PostHog's server-side bootstrap: the page starts as the user, no identify() is called.
    bootstrap = {"distinctID": "ph-booted", "isIdentifiedID": True}
    page = await posthog_page(edge, site, bootstrap=bootstrap)
    await page.evaluate("() => posthog.capture('Dashboard Opened')")
    profile = await stored_profile(edge, custom_id="ph-booted")

    async def arrived() -> bool:
        return await custom_names(edge, profile.summary.profile_id) == ["dashboard_opened"]

    await eventually(arrived, within=30)


async def countly_page(edge: Edge, site: Any, problems: list[str]) -> Any:
    page = await site(npm_package(HERE, "countly-sdk-web/lib/countly.js"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    # A short queue interval (its loop; 500 ms by default), so that each action goes in a
    # request of its own, as it does on a real page with a person between two clicks, without
    # the test waiting a turn of the loop for each; its bot filter off (it drops every request
    # of a headless browser).
    config = {
        "app_key": edge.sdk_key,
        "url": edge.url,
        "interval": 50,
        "app_version": "3.1.0",
        "ignore_bots": False,
    }
    await page.evaluate(f"() => Countly.init({json.dumps(config)})")
    return page


async def test_countly_web_stores_its_repeated_details_once(edge: Edge, site: Any) -> None:
    problems: list[str] = []
    page = await countly_page(edge, site, problems)
    device = await page.evaluate("() => Countly.get_device_id()")
    await page.evaluate("() => Countly.begin_session()")
    for tap in range(4):
        # countly-sdk-web sends `metrics` and `tz` with every request, not only at the start.
        await page.evaluate(f"() => Countly.add_event({{key: 'Tap {tap}'}})")

        async def sent(tap: int = tap) -> bool:
            profile = await edge.stored_profile(installation_id=device)
            if profile is None:  # not stored yet
                return False
            names = await custom_names(edge, profile.summary.profile_id)
            return f"tap_{tap}" in names

        await eventually(sent, within=30)
    profile = await edge.profile(installation_id=device)
    updates = [
        e.installation_update
        for e in await edge.events(profile.summary.profile_id)
        if e.HasField("installation_update")
    ]
    # Each detail once: the app version (begin_session's metrics), the time zone (`tz`, sent
    # with every request), the language.
    assert sorted(name for u in updates for name in (f.name for f, _ in u.ListFields())) == [
        "app_version",
        "language",
        "timezone",
    ]
    (installation,) = profile.installations
    assert installation.app_version == "3.1.0"
    # Its server config (/o/sdk?method=sc, asked on every page load) was answered.
    assert problems == []
