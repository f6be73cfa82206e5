"""Over real HTTP: after an erasure, SDK messages that are refused before identity is asked (the
edge cannot translate them, or ingest's validation refuses their event) and that name the
erased custom ID (Countly's device ID after a login, Segment's userId) are kept as bare ERASED
rows of rejected_events during the quarantine, while another person's refused messages keep
their IDs and what they sent."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import asyncpg
import grpc

from tests.conftest import eventually
from tests.edge.conftest import Edge
from tests.edge.test_countly_erasure import settled_cells_naming
from tests.edge.test_countly_sdk import get, post
from tests.support.cells import cells_naming
from tests.support.identity import Identity

ROWS = """
    SELECT event_id, reason, field_path, message, installation_id, custom_id, payload,
           profile_id
    FROM rejected_events WHERE project_id = $1 ORDER BY rejected_seq"""


def countly(edge: Edge, device_id: str, events: list[dict[str, Any]]) -> Any:
    return get(
        edge,
        "/i",
        app_key=edge.sdk_key,
        device_id=device_id,
        timestamp=int(time.time() * 1000),
        events=json.dumps(events),
    )


def segment(edge: Edge, *messages: dict[str, Any]) -> Any:
    return post(edge, "/v1/batch", json={"writeKey": edge.sdk_key, "batch": list(messages)})


def track(event: str, **fields: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": uuid.uuid4().hex, "event": event, **fields}


async def test_refused_sdk_messages_naming_an_erased_id_are_kept_bare(
    edge: Edge, db: asyncpg.Pool
) -> None:
    alice = f"alice-cid-{uuid.uuid4().hex[:8]}"
    alice_browser = f"anon-{uuid.uuid4().hex[:8]}"
    # Alice logs in on the web (Segment), and her Countly app sends under her ID after a login.
    reply = await asyncio.to_thread(
        segment,
        edge,
        {
            "type": "identify",
            "messageId": uuid.uuid4().hex,
            "anonymousId": alice_browser,
            "userId": alice,
            "traits": {"email": "alice@example.com"},
        },
        track("Fine", anonymousId=alice_browser, userId=alice),
    )
    assert reply.status_code == 200
    async with grpc.aio.insecure_channel(edge.settings.addresses["identity"]) as channel:
        identity = Identity(channel, edge.project)
        profile = await identity.profile_of(alice_browser)
        assert (await identity.identify(alice, alice)).profile_id == profile
        assert (await asyncio.to_thread(countly, edge, alice, [{"key": "Opened"}])).ok
        erased = await identity.delete(profile)
    assert erased.custom_id_quarantined
    before = await settled_cells_naming(db, alice)
    old_ms = int((time.time() - 40 * 86400) * 1000)

    # Her Countly app goes on under her ID: an unusable name (the edge refuses it) and an event
    # from 40 days ago (ingest's validation refuses it).
    for events in (
        [{"key": "!!!", "count": 1, "segmentation": {"note": "alice-private"}}],
        [{"key": "Old", "count": 1, "timestamp": old_ms, "segmentation": {"n": "alice-private"}}],
    ):
        answer = await asyncio.to_thread(countly, edge, alice, events)
        assert (answer.status_code, answer.json()) == (200, {"result": "Success"})
    # Segment messages with her userId: alone, and beside a new anonymous ID (whose login the
    # edge tries first: identity refuses it, CUSTOM_ID_ERASED, kept without her ID).
    new_browser = f"anon-{uuid.uuid4().hex[:8]}"
    answer = await asyncio.to_thread(
        segment,
        edge,
        track("!!!", userId=alice, properties={"note": "alice-private"}),
        track("???", userId=alice, anonymousId=new_browser),
    )
    assert answer.status_code == 200
    # Bob's refused messages, on both SDKs.
    bob_device, bob = f"bob-dev-{uuid.uuid4().hex[:8]}", f"bob-cid-{uuid.uuid4().hex[:8]}"
    answer = await asyncio.to_thread(
        countly, edge, bob_device, [{"key": "!!!", "segmentation": {"note": "bob-private"}}]
    )
    assert answer.status_code == 200
    answer = await asyncio.to_thread(
        segment, edge, track("!!!", userId=bob, properties={"note": "bob-private"})
    )
    assert answer.status_code == 200

    async def all_kept() -> bool:
        return len(await db.fetch(ROWS, edge.project.project_id)) >= 7

    await eventually(all_kept)
    rows = await db.fetch(ROWS, edge.project.project_id)
    hers = [r for r in rows if r["reason"] == "ERASED"]
    others = [r for r in rows if r["reason"] != "ERASED"]
    # Hers: four bare rows, saying which ID was erased and what refused them first.
    assert sorted(
        (
            r["field_path"],
            r["installation_id"],
            r["custom_id"],
            r["payload"],
            r["profile_id"],
        )
        for r in hers
    ) == sorted(
        [
            ("installation_id", None, None, None, None),
            ("installation_id", None, None, None, None),
            ("custom_id", None, None, None, None),
            ("untranslated.message", None, None, None, None),
        ]
    )
    assert sorted(r["message"].split(" ")[2] for r in hers) == [
        "EVENT_TIME_TOO_OLD",
        "NAME_UNUSABLE",
        "NAME_UNUSABLE",
        "NAME_UNUSABLE",
    ]
    assert await settled_cells_naming(db, alice) == before
    assert await cells_naming(db, "alice-private") == {}
    # Bob's keep their IDs and what was sent; so does the refused login of the new browser.
    assert sorted(
        ((r["reason"], r["installation_id"], r["custom_id"]) for r in others), key=str
    ) == sorted(
        [
            ("NAME_UNUSABLE", bob_device, None),
            ("NAME_UNUSABLE", None, bob),
            ("CUSTOM_ID_ERASED", new_browser, None),
        ],
        key=str,
    )
    bobs = [r for r in others if r["reason"] == "NAME_UNUSABLE"]
    assert all("bob-private" in json.dumps(r["payload"]) for r in bobs)
