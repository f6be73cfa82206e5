"""What an SDK audit of countly-sdk-nodejs 24.10.4 and countly-sdk-web 26.1.1 found, over real
HTTP against an edge started with the suite:
- a view is one `cly_view` event: the SDKs' second `[CLY]_view` (its end: `dur`, no `visit`) is
  `cly_view_end`, holding the view's name and duration;
- `[CLY]_orientation` and `[CLY]_action` (SDK-internal) are read and not stored;
- `/o/sdk`'s remote config, A/B variants and feedback widget reads are answered as Countly's
  server answers an app with none (they were 400s: the Node SDK's callback got an error, the
  page a console error on every load)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import requests

from tests.conftest import eventually
from tests.edge.conftest import Edge
from tests.edge.test_browser_sdks import HERE, shop
from tests.edge.test_countly_sdk import Driver, driver, node
from tests.support.browser import npm_package

__all__ = ["driver", "node"]  # the fixtures, shared with the Countly SDK tests


async def custom_events(edge: Edge, **lookup: str) -> list[Any]:
    try:
        profile = await edge.profile(**lookup)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:  # not stored yet
            return []
        raise
    events = await edge.events(profile.summary.profile_id)
    return sorted(
        (e.custom for e in events if e.HasField("custom")),
        key=lambda c: (c.name, c.attributes["name"].string_value),
    )


async def events_once(edge: Edge, count: int, *, quiet_s: float = 0.0, **lookup: str) -> list[Any]:
    """The custom events of `lookup` once `count` of them are stored and, with `quiet_s`, that
    long after (a live page's SDK may still send). Without: every request was answered, and
    the edge answers once the events are stored, so nothing more can arrive."""
    found: dict[str, list[Any]] = {}

    async def arrived() -> bool:
        found["events"] = await custom_events(edge, **lookup)
        return len(found["events"]) >= count

    await eventually(arrived, within=30)
    if quiet_s:
        await asyncio.sleep(quiet_s)  # nothing more arrives
    return await custom_events(edge, **lookup)


async def send(edge: Edge, path: str, **params: Any) -> requests.Response:
    """A POSTed form, off the loop (the edge runs on this test's)."""
    return await asyncio.to_thread(requests.post, f"{edge.url}{path}", data=params, timeout=10)


async def test_node_sdk_views_are_one_event_each_with_their_durations_apart(
    edge: Edge, driver: Driver
) -> None:
    last = await driver.run(
        [
            ["begin_session"],
            ["view", "Home"],
            ["advance", 5],
            ["view", "Cart"],
            ["advance", 3],
            ["view", "Checkout"],
            # What the SDKs send for the screen's orientation and click heatmaps.
            ["event", {"key": "[CLY]_orientation", "segmentation": {"mode": "portrait"}}],
            ["event", {"key": "[CLY]_action", "segmentation": {"type": "click", "x": 3}}],
            ["event", {"key": "[CLY]_star_rating", "segmentation": {"rating": 5}}],
            ["advance", 2],
            ["end_session"],  # ends the last view too
        ]
    )
    events = await events_once(edge, 7, installation_id=last["device_id"])

    names = [(e.name, e.attributes["name"].string_value) for e in events]
    assert names == [
        ("cly_star_rating", ""),
        ("cly_view", "Cart"),
        ("cly_view", "Checkout"),
        ("cly_view", "Home"),
        ("cly_view_end", "Cart"),
        ("cly_view_end", "Checkout"),
        ("cly_view_end", "Home"),
    ]
    durations = {
        e.attributes["name"].string_value: e.attributes["dur"].number_value
        for e in events
        if e.name == "cly_view_end"
    }
    # The fake clock's moves (and the little real time between the SDK's calls).
    assert 5 <= durations["Home"] < 30
    assert 3 <= durations["Cart"] < 30
    assert 2 <= durations["Checkout"] < 30
    views = [e for e in events if e.name == "cly_view"]
    assert all(e.attributes["visit"].number_value == 1 for e in views)
    assert all("dur" not in e.attributes for e in views)
    assert await edge.rejected() == []


async def test_node_sdk_remote_config_is_an_empty_config(edge: Edge, driver: Driver) -> None:
    await driver.run([["remote_config"]])
    (fetched,) = [line["remote_config"] for line in driver.lines if "remote_config" in line]
    assert fetched == {"error": False, "config": {}}
    (answer,) = [line for line in driver.lines if "method" in line.get("params", [])]
    assert answer["edge_status"] == 200


async def test_web_sdk_view_start_and_end_as_it_sends_them(edge: Edge) -> None:
    # countly-sdk-web 26.1.1's events, as it queues them: the start with `visit`, the end
    # under the same `id` with `dur`; its orientation before the session; a heatmap click.
    def event(key: str, at: int, **fields: Any) -> dict[str, Any]:
        return {"key": key, "count": 1, "timestamp": at, "hour": 12, "dow": 3, **fields}

    start = int(time.time() * 1000)
    common = {
        "app_key": edge.sdk_key,
        "device_id": "web-views-1",
        "sdk_name": "javascript_native_web",
    }
    orientation = event("[CLY]_orientation", start, segmentation={"mode": "landscape"}, cvid="")
    reply = await send(edge, "/i", **common, timestamp=start, events=json.dumps([orientation]))
    assert (reply.status_code, reply.json()) == (200, {"result": "Success"})
    view = {"name": "/shop", "visit": 1, "view": "http://shop.example/shop", "start": 1}
    click = {"type": "click", "x": 10, "y": 20, "width": 1280, "height": 800, "view": "/shop"}
    batch = [
        event("[CLY]_view", start + 1, segmentation=view, id="v1", pvid=""),
        event("[CLY]_action", start + 2, segmentation=click, cvid="v1"),
        event("Add To Cart", start + 3, cvid="v1"),
        event("[CLY]_view", start + 9000, dur=9, segmentation={"name": "/shop"}, id="v1"),
    ]
    reply = await send(edge, "/i", **common, timestamp=start + 9001, events=json.dumps(batch))
    assert (reply.status_code, reply.json()) == (200, {"result": "Success"})

    events = await events_once(edge, 3, installation_id="web-views-1")
    assert [(e.name, e.attributes["name"].string_value) for e in events] == [
        ("add_to_cart", ""),
        ("cly_view", "/shop"),
        ("cly_view_end", "/shop"),
    ]
    assert events[2].attributes["dur"].number_value == 9
    assert await edge.rejected() == []


SDK_READS = [
    ("fetch_remote_config", {}),  # countly-sdk-nodejs, countly-sdk-web's default
    ("rc", {}),  # countly-sdk-web's explicit RC API, the mobile SDKs
    ("ab_fetch_variants", {}),
    ("ab_fetch_experiments", []),
    ("feedback", {"result": []}),  # countly-sdk-web reads `result`
]


@pytest.mark.parametrize(("method", "expected"), SDK_READS)
async def test_sdk_reads_are_answered_as_an_app_with_nothing(
    edge: Edge, method: str, expected: Any
) -> None:
    query = {"method": method, "app_key": edge.sdk_key, "device_id": "d-1", "av": "3.1.0"}
    for call in (requests.get, requests.post):
        kind = "params" if call is requests.get else "data"
        reply = await asyncio.to_thread(call, f"{edge.url}/o/sdk", timeout=10, **{kind: query})
        assert (reply.status_code, reply.json()) == (200, expected)
    # An unknown key is refused as on /i.
    wrong = {**query, "app_key": "prf_no_such_key"}
    reply = await asyncio.to_thread(requests.get, f"{edge.url}/o/sdk", params=wrong, timeout=10)
    assert (reply.status_code, reply.json()) == (400, {"result": "App does not exist"})
    assert await edge.rejected() == []


async def test_unknown_sdk_read_methods_are_still_refused(edge: Edge) -> None:
    for method in ("fetch_variants", "ab_enroll_variant", "nope"):
        query = {"method": method, "app_key": edge.sdk_key, "device_id": "d-1"}
        reply = await asyncio.to_thread(requests.get, f"{edge.url}/o/sdk", params=query, timeout=10)
        assert (reply.status_code, reply.json()) == (
            400,
            {"result": "This server offers no such SDK method"},
        ), method


@pytest.fixture
async def page(edge: Edge, browser: Any) -> AsyncIterator[Any]:
    """A shop's page (on its own origin) with countly-sdk-web loaded, in a browser context of
    its own."""
    library = npm_package(HERE, "countly-sdk-web/lib/countly.js")
    async with contextlib.AsyncExitStack() as stack:
        context = await browser.new_context()
        stack.push_async_callback(context.close)
        url = stack.enter_context(shop(library))
        opened = await context.new_page()
        await opened.goto(url)
        yield opened


async def test_web_sdk_page_with_remote_config_and_widgets_shows_no_error(
    edge: Edge, page: Any
) -> None:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    config = {
        "app_key": edge.sdk_key,
        "url": edge.url,
        "interval": 50,  # its loop (500 ms by default): each call's request sent at once
        "ignore_bots": False,
        "remote_config": True,  # fetched at init, on every page load
    }
    await page.evaluate(f"() => Countly.init({json.dumps(config)})")
    widgets = await page.evaluate(
        """() => new Promise((resolve) => Countly.get_available_feedback_widgets(
            (list, error) => resolve({list, error: error ? String(error) : null})))"""
    )
    assert widgets == {"list": [], "error": None}
    device = await page.evaluate("() => Countly.get_device_id()")
    await page.evaluate("() => { Countly.begin_session(); Countly.track_pageview('/home'); }")
    await page.evaluate("() => Countly.track_pageview('/cart')")  # ends /home
    events = await events_once(edge, 3, quiet_s=0.5, installation_id=device)
    assert [(e.name, e.attributes["name"].string_value) for e in events] == [
        ("cly_view", "/cart"),
        ("cly_view", "/home"),
        ("cly_view_end", "/home"),
    ]
    assert await page.evaluate("() => Countly.get_remote_config()") == {}
    assert problems == []
