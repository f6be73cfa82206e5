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
from tests.support.browser import chromium, npm_package

HERE = Path(__file__).parent / "browser"
PAGE = b"""<!doctype html><html lang="en"><head><title>Shop</title></head>
<body><h1>Shop</h1><script src="/sdk.js"></script></body></html>"""


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
async def site(edge: Edge) -> AsyncIterator[Any]:
    """`site(library)`: a new visitor's page of the shop with the library loaded."""
    async with chromium() as browser, contextlib.AsyncExitStack() as stack:
        context = await browser.new_context()
        stack.push_async_callback(context.close)

        async def open_with(library: Path) -> Any:
            url = stack.enter_context(shop(library))
            page = await context.new_page()
            await page.goto(url)
            return page

        yield open_with


async def stored_profile(edge: Edge, **lookup: str) -> Any:
    found: dict[str, Any] = {}

    async def stored() -> bool:
        try:
            found["profile"] = await edge.profile(**lookup)
        except Exception:  # NOT_FOUND until the SDK's request is stored
            return False
        return True

    await eventually(stored, within=30)
    return found["profile"]


async def test_posthog_js_with_its_defaults_reaches_the_profile(edge: Edge, site: Any) -> None:
    page = await site(npm_package(HERE, "posthog-js/dist/array.full.js"))
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    # posthog-js's defaults (gzip, its remote config and flags asked on load), except the bot
    # filter that drops every event of an automated browser (navigator.webdriver), which its
    # docs say to turn off in end-to-end tests.
    init = {"api_host": edge.url, "opt_out_useragent_filter": True}
    await page.evaluate(
        f"""() => {{
            posthog.init({json.dumps(edge.sdk_key)}, {json.dumps(init)});
            posthog.capture("Button Clicked", {{plan: "pro"}});
            posthog.identify("ph-browser-user", {{email: "ada@example.com"}});
        }}"""
    )
    profile = await stored_profile(edge, custom_id="ph-browser-user")

    async def complete() -> bool:
        found = await edge.profile(custom_id="ph-browser-user")
        names = await custom_names(edge, found.summary.profile_id)
        return "button_clicked" in names and found.native_attributes.email == "ada@example.com"

    await eventually(complete, within=30)
    final = await edge.profile(custom_id="ph-browser-user")
    assert final.summary.profile_id == profile.summary.profile_id
    # The browser's installation is the web's (the user's own ID is one too: docs/edge.md).
    assert types_pb2.PLATFORM_WEB in [i.platform for i in final.installations]
    # Its remote config and flags were answered: nothing failed on the shop's page.
    assert problems == []


async def test_analytics_js_loads_its_settings_from_the_edge_and_sends_there(
    edge: Edge, site: Any
) -> None:
    page = await site(npm_package(HERE, "@segment/analytics-next/dist/umd/index.js"))
    await page.evaluate(
        f"""async () => {{
            const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
                {{writeKey: {json.dumps(edge.sdk_key)}, cdnURL: {json.dumps(edge.url)}}});
            await analytics.track("Course Clicked", {{title: "Intro"}});
            await analytics.identify("ajs-browser-user", {{email: "grace@example.com"}});
        }}"""
    )
    profile = await stored_profile(edge, custom_id="ajs-browser-user")
    assert profile.native_attributes.email == "grace@example.com"
    assert "course_clicked" in await custom_names(edge, profile.summary.profile_id)
