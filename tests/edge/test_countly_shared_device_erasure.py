"""A shared device with the real Countly Node.js SDK: Alice logs in (the SDK's device ID becomes
her user ID), then Bob logs in on the same app (a device ID change with merge from her ID to
his), so the installation named by her ID is Bob's. Alice is erased: nothing names her custom ID
any more (identity, ingest and query rows), Bob keeps his history under the installation's new
random ID, his app goes on working under his ID, and a late request under her ID is refused as
the quarantine refuses it."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import grpc
import pytest

from tests.edge.conftest import Edge
from tests.edge.test_countly_erasure import erased_markers, settled_cells_naming
from tests.edge.test_countly_sdk import Driver, custom_names, driver, get, node, wait_for_names
from tests.support.identity import Identity

__all__ = ["driver", "node"]  # the fixtures, shared with the Countly SDK tests


def late_request(edge: Edge, device_id: str, key: str) -> tuple[int, object]:
    """A request the app queued under `device_id` (sent after the ID changed): one event."""
    answer = get(
        edge,
        "/i",
        app_key=edge.sdk_key,
        device_id=device_id,
        timestamp=int(time.time() * 1000),
        events=f'[{{"key": "{key}", "count": 1}}]',
    )
    return answer.status_code, answer.json()


async def test_erasing_a_user_renames_the_installation_their_id_named_on_a_switched_device(
    edge: Edge, driver: Driver, db: asyncpg.Pool
) -> None:
    alice, bob = f"alice-cid-{uuid.uuid4().hex[:8]}", f"bob-cid-{uuid.uuid4().hex[:8]}"
    await driver.run(
        [
            ["begin_session"],
            ["change_id", alice, True],  # Alice's login: the device ID is her ID now
            ["user_details", {"custom": {"plan": "pro"}}],
            ["end_session"],
            ["change_id", bob, True],  # Bob logs in on the same app: her ID moves to him
            ["begin_session"],
            ["event", {"key": "Bob Browse"}],
            ["end_session"],
        ]
    )
    # A request queued under her ID before the switch arrives after it: Bob's now.
    assert await asyncio.to_thread(late_request, edge, alice, "Late") == (
        200,
        {"result": "Success"},
    )
    bob_view = await wait_for_names(edge, ["bob_browse", "late"], custom_id=bob)
    assert sorted(i.installation_id for i in bob_view.installations) == sorted([alice, bob])
    alice_view = await edge.profile(custom_id=alice)
    assert alice not in [i.installation_id for i in alice_view.installations]
    assert await settled_cells_naming(db, alice)  # named before the erasure

    async with grpc.aio.insecure_channel(edge.settings.addresses["identity"]) as channel:
        erased = await Identity(channel, edge.project).delete(alice_view.summary.profile_id)
    assert erased.custom_id_quarantined

    # Nothing names her custom ID: not identity's installation or history, not ingest's events,
    # sessions or details, not query's installation rows (recounted from ProfileDeleted).
    assert await settled_cells_naming(db, alice) == {}
    bob_after = await edge.profile(custom_id=bob)
    installations = sorted(i.installation_id for i in bob_after.installations)
    assert installations[0] == bob
    renamed = installations[1]
    assert renamed.startswith("renamed:")
    events = await edge.events(bob_after.summary.profile_id)
    late = [e for e in events if e.HasField("custom") and e.custom.name == "late"]
    assert [e.installation_id for e in late] == [renamed]
    assert await custom_names(edge, bob_after.summary.profile_id) == sorted(["bob_browse", "late"])
    query_rows = await db.fetch("SELECT installation_key FROM query_installations")
    assert renamed in [r["installation_key"] for r in query_rows]

    # Bob's app goes on under his ID; a late request under hers is refused (answered as stored,
    # kept as a bare ERASED row): no profile or installation named by it comes back.
    await driver.run([["begin_session"], ["event", {"key": "Bob Again"}], ["end_session"]])
    await wait_for_names(edge, ["bob_browse", "late", "bob_again"], custom_id=bob)
    markers_before = len(await erased_markers(db))
    assert await asyncio.to_thread(late_request, edge, alice, "Later") == (
        200,
        {"result": "Success"},
    )
    assert len(await erased_markers(db)) == markers_before + 1
    assert set(await erased_markers(db)) == {(None, None, None, None)}
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await edge.profile(installation_id=alice)
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert await settled_cells_naming(db, alice) == {}
    assert await custom_names(edge, bob_after.summary.profile_id) == sorted(
        ["bob_browse", "late", "bob_again"]
    )
