"""PostHog's SDK-internal events, groups and `/static/` against a running edge, with real HTTP
and the real posthog-python: what an SDK audit found (docs/edge.md, PostHog)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
import requests
from posthog import Posthog

from profiles.query.v1 import query_service_pb2 as query_pb
from services.edge.handlers import IGNORED
from shared.settings import SettingInvalid, Settings
from tests.conftest import eventually
from tests.edge.conftest import Edge, custom_names, flush, serve_edge


def sdk(edge: Edge) -> Posthog:
    return Posthog(edge.sdk_key, host=edge.url, gzip=True, max_retries=20, flush_interval=0.05)


def post(url: str, body: Any) -> requests.Response:
    return requests.post(url, data=json.dumps(body).encode(), timeout=10)


async def profile_count(edge: Edge) -> int:
    reply = await edge.query.ListProfiles(
        query_pb.ListProfilesRequest(page_size=50), metadata=edge.read()
    )
    return len(reply.profiles)


def web(distinct_id: str, **properties: Any) -> dict[str, Any]:
    """posthog-js's own properties on an anonymous visitor's event."""
    return {
        "$lib": "web",
        "$device_id": distinct_id,
        "$is_identified": False,
        "$session_id": f"01938000-0000-7000-8000-{distinct_id[-12:]:0>12}",
        **properties,
    }


async def test_sdk_internal_events_are_dropped_but_for_their_attributes(edge: Edge) -> None:
    ignored = IGNORED.labels("posthog")
    before = ignored._value.get()
    quiet, visitor = "ph-internal-only", "ph-visitor-01"
    internal = [
        ("$feature_flag_called", {"$feature_flag": "new-checkout", "$feature_flag_response": True}),
        ("$web_vitals", {"$web_vitals_LCP_value": 1234.5}),
        ("$$heatmap", {"$heatmap_data": {"https://shop.example/": [{"x": 1, "y": 2}]}}),
        ("$opt_in", {}),
    ]
    batch = [
        {"event": name, "distinct_id": quiet, "properties": web(quiet, **properties)}
        for name, properties in internal
    ]
    # posthog-js puts its initial person properties on the first event it sends, whichever it
    # is: an $opt_in's $set_once is kept, the event itself dropped.
    batch.append(
        {
            "event": "$opt_in",
            "distinct_id": visitor,
            "properties": web(visitor, **{"$set_once": {"landing": "spring-sale"}}),
        }
    )
    batch.append({"event": "Viewed Shoes", "distinct_id": visitor, "properties": web(visitor)})
    reply = await asyncio.to_thread(
        post, f"{edge.url}/batch/", {"api_key": edge.sdk_key, "batch": batch}
    )
    assert (reply.status_code, reply.json()) == (200, {"status": 1})

    async def stored() -> bool:
        try:
            profile = await edge.profile(installation_id=visitor)
        except grpc.aio.AioRpcError:
            return False
        return bool(profile.custom_attributes) and bool(
            await custom_names(edge, profile.summary.profile_id)
        )

    await eventually(stored)
    profile = await edge.profile(installation_id=visitor)
    assert await custom_names(edge, profile.summary.profile_id) == ["viewed_shoes"]
    assert {a.name: a.value.string_value for a in profile.custom_attributes} == {
        "landing": "spring-sale"
    }
    # The SDK's own events made no profile, were not listed, and were counted.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await edge.profile(installation_id=quiet)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert await edge.rejected() == []
    assert await profile_count(edge) == 1
    assert ignored._value.get() - before == 5


async def test_group_identify_makes_no_profile_and_groups_become_attributes(edge: Edge) -> None:
    client = sdk(edge)
    # group_identify() without distinct_id: posthog-python makes one up per call.
    for _ in range(3):
        client.group_identify("company", "acme", {"name": "Acme Inc.", "employees": 11})
    client.capture("Invoice Sent", distinct_id="ph-member", groups={"company": "acme"})
    client.capture(
        "Invoice Paid", distinct_id="ph-member", groups={"company": "acme", "Team Name": "ops"}
    )
    await flush(client)

    async def grouped() -> bool:
        try:
            profile = await edge.profile(installation_id="ph-member")
        except grpc.aio.AioRpcError:
            return False
        names = await custom_names(edge, profile.summary.profile_id)
        return len(names) == 2 and len(profile.custom_attributes) == 2

    await eventually(grouped)
    profile = await edge.profile(installation_id="ph-member")
    assert {a.name: a.value.string_value for a in profile.custom_attributes} == {
        "group_company": "acme",
        "group_team_name": "ops",
    }
    assert await profile_count(edge) == 1  # none per $groupidentify
    assert await edge.rejected() == []


async def test_static_scripts_are_redirected_to_the_asset_host(edge: Edge) -> None:
    def get(url: str) -> requests.Response:
        return requests.get(url, allow_redirects=False, timeout=10)

    reply = await asyncio.to_thread(get, f"{edge.url}/static/array.js?v=1.449.2")
    assert reply.status_code == 302
    assert reply.headers["Location"] == "https://us-assets.i.posthog.com/static/array.js?v=1.449.2"
    reply = await asyncio.to_thread(get, f"{edge.url}/static/1.449.2/surveys.js")
    assert reply.headers["Location"] == (
        "https://us-assets.i.posthog.com/static/1.449.2/surveys.js"
    )

    own = edge.settings.with_changes(edge_posthog_asset_url="https://cdn.shop.example/posthog")
    url, stop = await serve_edge(own)
    try:
        reply = await asyncio.to_thread(get, f"{url}/static/exception-autocapture.js")
    finally:
        await stop()
    assert reply.status_code == 302
    assert reply.headers["Location"] == (
        "https://cdn.shop.example/posthog/static/exception-autocapture.js"
    )


def test_the_asset_url_setting_takes_an_http_url() -> None:
    assert Settings.from_env({}).edge_posthog_asset_url == "https://us-assets.i.posthog.com"
    settings = Settings.from_env({"PROFILES_EDGE_POSTHOG_ASSET_URL": "http://10.0.0.5:8080/"})
    assert settings.edge_posthog_asset_url == "http://10.0.0.5:8080"
    for bad in ("us-assets.i.posthog.com", "ftp://assets.example", "https://"):
        with pytest.raises(SettingInvalid, match="PROFILES_EDGE_POSTHOG_ASSET_URL"):
            Settings.from_env({"PROFILES_EDGE_POSTHOG_ASSET_URL": bad})
