"""Over real HTTP, against an edge started with the suite: dates sent by each dialect land as
timestamp attributes (GetProfile and ListEvents show their type), and Segment's page and
campaign fields land on its events (docs/edge.md, "Names, properties and platforms" and
Segment)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import Any

import grpc
import requests
from posthog import Posthog
from segment.analytics.client import Client

from shared.convert import datetime_of
from tests.conftest import eventually
from tests.edge.conftest import Edge, flush

SIGNED_UP = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
BIRTHDAY = datetime(1990, 5, 17, tzinfo=UTC)


async def profile_when(edge: Edge, ready: Any, **lookup: str) -> Any:
    """The profile of `lookup` once `ready(profile, events)` holds."""
    found: dict[str, Any] = {}

    async def check() -> bool:
        try:
            profile = await edge.profile(**lookup)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        events = await edge.events(profile.summary.profile_id)
        found["result"] = (profile, events)
        return bool(ready(profile, events))

    await eventually(check)
    return found["result"]


def times(attributes: Any) -> dict[str, datetime]:
    """The timestamp attributes of an event's attribute map, or of a profile's custom
    attributes (a list of named values), as datetimes."""
    named = (
        attributes.items()
        if hasattr(attributes, "items")
        else ((a.name, a.value) for a in attributes)
    )
    return {
        name: datetime_of(value.timestamp_value)
        for name, value in named
        if value.WhichOneof("value") == "timestamp_value"
    }


def custom_event(events: list[Any], name: str) -> Any:
    return next((e.custom for e in events if e.custom.name == name), None)


async def test_segment_python_dates_and_the_page_context_are_stored_typed(edge: Edge) -> None:
    client = Client(edge.sdk_key, host=edge.url, max_retries=20, upload_interval=0.05)
    client.identify(
        anonymous_id="seg-dates",
        traits={
            "createdAt": SIGNED_UP,  # aware: "2024-01-02T03:04:05+00:00"
            "lastSeen": datetime(2024, 1, 2, 3, 4, 5),  # naive: "2024-01-02T03:04:05"
            "birthday": date(1990, 5, 17),  # "1990-05-17"
            "plan": "pro",
        },
    )
    client.track(
        anonymous_id="seg-dates",
        event="Trial Started",
        properties={"endsAt": datetime(2024, 2, 1, tzinfo=UTC), "utm_source": "mine"},
        context={
            "page": {"url": "https://shop.example/pricing", "path": "/pricing", "title": "P"},
            "campaign": {"source": "news", "medium": "email", "name": "spring"},
        },
    )
    await flush(client)

    profile, events = await profile_when(
        edge,
        lambda p, e: len(p.custom_attributes) == 4 and custom_event(e, "trial_started"),
        installation_id="seg-dates",
    )
    assert times(profile.custom_attributes) == {
        "createdat": SIGNED_UP,
        "lastseen": SIGNED_UP,  # naive is UTC
        "birthday": BIRTHDAY,
    }
    trial = custom_event(events, "trial_started")
    assert times(trial.attributes) == {"endsat": datetime(2024, 2, 1, tzinfo=UTC)}
    assert trial.attributes["page_url"].url_value == "https://shop.example/pricing"
    assert trial.attributes["page_path"].string_value == "/pricing"
    assert trial.attributes["page_title"].string_value == "P"
    assert trial.attributes["utm_medium"].string_value == "email"
    assert trial.attributes["utm_campaign"].string_value == "spring"
    assert trial.attributes["utm_source"].string_value == "mine"  # the property wins


async def test_posthog_dates_land_as_timestamp_attributes(edge: Edge) -> None:
    client = Posthog(edge.sdk_key, host=edge.url, max_retries=20, flush_interval=0.05)
    client.capture(
        "Trial Started",
        distinct_id="ph-dates",
        properties={
            # posthog-js's capture of a Date, serialized by JSON.stringify.
            "endsAt": "2024-02-01T00:00:00.000Z",
            "$set": {"signed_up": "2024-01-02T03:04:05.000Z", "birthday": "1990-05-17"},
        },
    )
    await flush(client)

    profile, events = await profile_when(
        edge,
        lambda p, e: len(p.custom_attributes) == 2 and custom_event(e, "trial_started"),
        installation_id="ph-dates",
    )
    assert times(profile.custom_attributes) == {
        "signed_up": SIGNED_UP,
        "birthday": BIRTHDAY,
    }
    trial = custom_event(events, "trial_started")
    assert times(trial.attributes) == {"endsat": datetime(2024, 2, 1, tzinfo=UTC)}


async def test_countly_dates_land_as_timestamp_attributes(edge: Edge) -> None:
    reply = await asyncio.to_thread(
        requests.post,
        f"{edge.url}/i",
        json={
            "app_key": edge.sdk_key,
            "device_id": "ly-dates",
            "user_details": {"custom": {"signed_up": "2024-01-02T03:04:05Z"}},
            "events": [
                {"key": "Trial Started", "segmentation": {"ends_at": "2024-02-01T00:00:00Z"}}
            ],
        },
        timeout=10,
    )
    assert (reply.status_code, reply.json()) == (200, {"result": "Success"})

    profile, events = await profile_when(
        edge,
        lambda p, e: len(p.custom_attributes) == 1 and custom_event(e, "trial_started"),
        installation_id="ly-dates",
    )
    assert times(profile.custom_attributes) == {"signed_up": SIGNED_UP}
    trial = custom_event(events, "trial_started")
    assert times(trial.attributes) == {"ends_at": datetime(2024, 2, 1, tzinfo=UTC)}
