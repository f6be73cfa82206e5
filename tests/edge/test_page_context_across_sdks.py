"""One set of page and campaign attribute names whatever the SDK (docs/edge.md, "Names,
properties and platforms"): a PostHog event's `$current_url`, `$pathname`, `$referrer` and
`utm_` properties land as `page_url`, `page_path`, `page_referrer` and `utm_source`... as a
Segment event's `context.page` and `context.campaign` do (properties.add_page_context), so that
one segment filter or funnel step works for an app that sends from both. Over real HTTP with
posthog-python and segment-analytics-python, then the translator's edges without I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from posthog import Posthog
from segment.analytics.client import Client

from services.edge.dialects import posthog
from services.edge.properties import PAGE_CONTEXT_ATTRIBUTES
from services.edge.steps import Track
from tests.conftest import eventually
from tests.edge.conftest import Edge, flush

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)
URL = "https://shop.example/pricing?utm_source=news&utm_medium=email&utm_campaign=spring"
REFERRER = "https://search.example/?q=shoes"
CAMPAIGN = {"source": "news", "medium": "email", "name": "spring", "term": "shoes", "content": "a"}
# What posthog-js puts on a page view of that page (posthog-js 1.449: getEventProperties, the
# session's referrer and campaign parameters, the document's title), trimmed to the page's.
POSTHOG_JS_PAGE = {
    "$lib": "web",
    "$current_url": URL,
    "$host": "shop.example",
    "$pathname": "/pricing",
    "$referrer": REFERRER,
    "$referring_domain": "search.example",
    "title": "Pricing",
    "utm_source": "news",
    "utm_medium": "email",
    "utm_campaign": "spring",
    "utm_term": "shoes",
    "utm_content": "a",
    "gclid": None,
    "fbclid": None,
}


def shape(attributes: Any) -> dict[str, tuple[str | None, Any]]:
    """Each attribute's name, type and value."""
    return {
        name: (value.WhichOneof("value"), getattr(value, str(value.WhichOneof("value"))))
        for name, value in attributes.items()
    }


async def stored_event(edge: Edge, installation_id: str, name: str) -> Any:
    found: dict[str, Any] = {}

    async def stored() -> bool:
        profile = await edge.stored_profile(installation_id=installation_id)
        if profile is None:  # not stored yet
            return False
        events = await edge.events(profile.summary.profile_id)
        found["event"] = next((e.custom for e in events if e.custom.name == name), None)
        return found["event"] is not None

    await eventually(stored)
    return found["event"]


async def test_one_page_visit_from_posthog_and_segment_has_the_same_attributes(
    edge: Edge,
) -> None:
    segment_client = Client(edge.sdk_key, host=edge.url, max_retries=20, upload_interval=0.05)
    segment_client.page(
        anonymous_id="cross-seg",
        name="Pricing",
        properties={"url": URL, "path": "/pricing", "referrer": REFERRER, "title": "Pricing"},
        context={"campaign": CAMPAIGN},
    )
    posthog_client = Posthog(edge.sdk_key, host=edge.url, max_retries=20, flush_interval=0.05)
    posthog_client.capture("$pageview", distinct_id="cross-ph", properties=POSTHOG_JS_PAGE)
    await flush(segment_client)
    await flush(posthog_client)

    from_segment = await stored_event(edge, "cross-seg", "page")
    from_posthog = await stored_event(edge, "cross-ph", "pageview")
    assert shape(from_posthog.attributes) == shape(from_segment.attributes)
    assert set(from_posthog.attributes) == set(PAGE_CONTEXT_ATTRIBUTES) - {"page_search"}
    assert from_posthog.attributes["page_url"].url_value == URL
    assert from_posthog.attributes["page_referrer"].url_value == REFERRER


def custom_of(properties: dict[str, Any], event: str = "$pageview") -> Any:
    body = {
        "api_key": "k",
        "batch": [{"event": event, "distinct_id": "d", "properties": properties}],
    }
    steps = posthog.translate(body, NOW).steps
    (custom,) = [e for s in steps if isinstance(s, Track) for e in s.events if e.custom.name]
    return custom.custom


def test_every_posthog_js_event_carries_its_page_and_campaign() -> None:
    custom = custom_of({**POSTHOG_JS_PAGE, "plan": "pro", "title": "Mine"}, "Plan Chosen")
    assert set(custom.attributes) == {"plan", "title", *PAGE_CONTEXT_ATTRIBUTES} - {
        "page_title",  # only a page view's `title` is its page's: this one is the app's
        "page_search",
    }
    assert custom.attributes["title"].string_value == "Mine"
    assert custom.attributes["page_path"].string_value == "/pricing"


def test_no_referrer_is_no_page_referrer() -> None:
    custom = custom_of({**POSTHOG_JS_PAGE, "$referrer": "$direct"})
    assert "page_referrer" not in custom.attributes


def test_the_page_fills_only_the_room_the_properties_leave() -> None:
    # 18 properties of the app's own: the page's URL and path, first, fill the event's 20.
    custom = custom_of({**POSTHOG_JS_PAGE, **{f"p{i}": i for i in range(18)}})
    assert len(custom.attributes) == 20
    assert {"page_url", "page_path"} <= set(custom.attributes)
    # A long campaign parameter is cut, never a reason to refuse the event.
    custom = custom_of({**POSTHOG_JS_PAGE, "utm_content": "x" * 400})
    assert custom.attributes["utm_content"].string_value == "x" * 300


def test_an_autocapture_event_says_its_page_as_page_url() -> None:
    clicked = {**POSTHOG_JS_PAGE, "$event_type": "click", "$elements": [{"tag_name": "a"}]}
    custom = custom_of(clicked, "$autocapture")
    assert custom.attributes["page_url"].url_value == URL
    assert "url" not in custom.attributes
