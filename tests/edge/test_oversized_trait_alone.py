"""Over HTTP, with the real SDKs: a trait over the contract's limits (a 5,000-character
nickname) is rejected and listed alone, with ingest's reason, and the name and email sent with
it are stored; the same request sent again stores nothing twice."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from posthog import Posthog
from segment.analytics.client import Client

from tests.conftest import eventually
from tests.edge.conftest import Edge, flush

# The audit's identify: a full name with markup in it, an email, and a nickname 4,700
# characters over the contract's 300.
TRAITS = {"name": "Zoë <b>Bold</b>", "email": "zoe@example.com", "nickname": "z" * 5000}


async def assert_kept_and_listed_alone(
    edge: Edge, send: Callable[[], Awaitable[None]], **lookup: str
) -> None:
    await send()

    async def profile() -> Any:
        try:
            return await edge.profile(**lookup)
        except Exception:  # not stored yet: NOT_FOUND
            return None

    async def stored() -> bool:
        found = await profile()
        return found is not None and found.native_attributes.email != ""

    await eventually(stored)
    kept = await profile()
    native = kept.native_attributes
    assert (native.first_name, native.last_name, native.email) == (
        "Zoë",
        "<b>Bold</b>",
        "zoe@example.com",
    )
    assert [a.name for a in kept.custom_attributes] == []
    [rejected] = await edge.rejected()
    assert (rejected.reason, rejected.field_path) == (
        "VALUE_INVALID",
        "attribute_operations.operations[0].value",
    )
    assert "300 characters" in rejected.message
    operations = json.loads(rejected.raw_payload_json)["attribute_operations"]["operations"]
    assert [(o["custom_attribute"], len(o["value"]["string_value"])) for o in operations] == [
        ("nickname", 5000)
    ]
    # The names' and the email's events (ingest checks an email's format: it travels alone).
    events = sorted(e.event_id for e in await edge.events(kept.summary.profile_id))
    assert len(events) == 2
    assert rejected.event_id not in events

    # The same request again (the SDK's retry of a batch whose answer was lost): the same
    # events, which ingest answers DUPLICATE, and the nickname's refusal, stored once (the
    # edge answered the retry once ingest had: nothing is pending).
    await send()
    assert [r.event_id for r in await edge.rejected()] == [rejected.event_id]
    again = await profile()
    assert sorted(e.event_id for e in await edge.events(again.summary.profile_id)) == events
    assert again.native_attributes == native


async def test_segment_identify_keeps_name_and_email_beside_an_oversized_trait(
    edge: Edge,
) -> None:
    client = Client(edge.sdk_key, host=edge.url, max_retries=20, upload_interval=0.05)
    sent_at = datetime.now(UTC) - timedelta(minutes=1)

    async def send() -> None:
        client.identify(
            user_id="zoe-segment", traits=TRAITS, message_id="oversized-1", timestamp=sent_at
        )
        await flush(client)

    await assert_kept_and_listed_alone(edge, send, custom_id="zoe-segment")


async def test_posthog_set_keeps_name_and_email_beside_an_oversized_property(
    edge: Edge,
) -> None:
    client = Posthog(edge.sdk_key, host=edge.url, max_retries=20, flush_interval=0.05)
    sent_at = datetime.now(UTC) - timedelta(minutes=1)
    uuid = "0190a5f7-2c4b-7000-8000-000000000001"

    async def send() -> None:
        client.set(distinct_id="zoe-posthog", properties=TRAITS, uuid=uuid, timestamp=sent_at)
        await flush(client)

    await assert_kept_and_listed_alone(edge, send, installation_id="zoe-posthog")
