"""The audit's scenario with the real Countly Node.js SDK: a user logs in (device ID change with
merge, after which the SDK sends under the user's ID), the person is erased, and the app goes on
sending under the erased custom ID, as does another device that logs in with it again. Every
request is answered as Countly's server answers a stored one (200 `{"result": "Success"}`), so
the SDK empties its queue instead of resending forever; nothing of it is stored: the events are
kept as bare ERASED markers, and the custom ID is in no new cell of any table."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from tests.conftest import eventually
from tests.edge.conftest import Edge
from tests.edge.test_countly_sdk import Driver, driver, get, node, wait_for_names
from tests.support.cells import cells_naming
from tests.support.identity import Identity

__all__ = ["driver", "node"]  # the fixtures, shared with the Countly SDK tests


async def settled_cells_naming(db: asyncpg.Pool, value: str) -> dict[str, int]:
    """cells_naming once the erasure's consequences have settled: the outbox relayed and two
    reads in a row alike (query's consumers remove their copies from the bus)."""
    last: list[dict[str, int]] = []

    async def settled() -> bool:
        outbox = await db.fetchval("SELECT count(*) FROM outbox")
        now = await cells_naming(db, value)
        alike = outbox == 0 and bool(last) and last[-1] == now
        last.append(now)
        return alike

    await eventually(settled)
    return last[-1]


async def erased_markers(db: asyncpg.Pool) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT installation_id, custom_id, payload, profile_id FROM rejected_events"
        " WHERE reason = 'ERASED'"
    )
    return [tuple(r) for r in rows]


def answers(driver: Driver, since: int) -> list[tuple[int, int]]:
    """(status the SDK saw, status the edge answered) of every request since line `since`."""
    return [
        (line["status"], line["edge_status"]) for line in driver.lines[since:] if "status" in line
    ]


async def test_an_erased_users_id_sent_as_device_id_stores_nothing_and_empties_the_queue(
    edge: Edge, driver: Driver, db: asyncpg.Pool, tmp_path: Path
) -> None:
    user_id = f"alice-cid-{uuid.uuid4().hex[:8]}"
    logged_in = await driver.run(
        [
            ["begin_session"],
            ["event", {"key": "Browse"}],
            ["change_id", user_id, True],  # the login
            ["event", {"key": "Checkout"}],
            ["end_session"],
        ]
    )
    assert logged_in["device_id"] == user_id  # the SDK's device ID is the user's ID now
    profile = await wait_for_names(edge, ["browse", "checkout"], custom_id=user_id)
    installations = [i.installation_id for i in profile.installations]
    assert len(installations) == 2
    assert user_id in installations
    async with grpc.aio.insecure_channel(edge.settings.addresses["identity"]) as channel:
        erased = await Identity(channel, edge.project).delete(profile.summary.profile_id)
    assert erased.custom_id_quarantined
    before = await settled_cells_naming(db, user_id)

    # The app goes on under the erased ID, which is now its device ID...
    seen = len(driver.lines)
    after = await driver.run(
        [
            ["begin_session"],
            ["event", {"key": "Reorder", "segmentation": {"note": "alice-private"}}],
            ["user_details", {"email": "alice@example.com", "custom": {"plan": "pro"}}],
            ["advance", 90],
            ["end_session"],
        ]
    )
    assert after["device_id"] == user_id
    # ...and a second device logs in with it again (change with merge), then sends under it.
    second = Driver(driver.node, edge, tmp_path / "app-2")
    await second.run(
        [
            ["begin_session"],
            ["change_id", user_id, True],
            ["event", {"key": "Wishlist"}],
            ["end_session"],
        ]
    )

    # The erased person's device logs in as someone else: the change names the erased ID as the
    # old device ID, which cannot log in (kept as a bare marker); the new user's ID can.
    bob_id = f"bob-{uuid.uuid4().hex[:8]}"
    await driver.run([["change_id", bob_id, True], ["event", {"key": "Bob Browse"}]])
    bob = await wait_for_names(edge, ["bob_browse"], custom_id=bob_id)
    assert [i.installation_id for i in bob.installations] == [bob_id]

    # Every request was answered as stored, and the SDKs' queues emptied (Driver.run checks).
    sent = answers(driver, seen) + answers(second, 0)
    assert len(sent) >= 5
    assert set(sent) == {(200, 200)}
    # In Countly's words: the very answer of a stored request, which the SDK drops from its queue.
    raw = await asyncio.to_thread(
        get,
        edge,
        "/i",
        app_key=edge.sdk_key,
        device_id=user_id,
        timestamp=int(time.time() * 1000),
        events='[{"key": "Raw", "count": 1}]',
    )
    assert (raw.status_code, raw.json()) == (200, {"result": "Success"})
    # Nothing of the erased person is back: no profile for the ID, as an installation or as a
    # custom ID, and no new cell holding it anywhere.
    for lookup in ({"installation_id": user_id}, {"custom_id": user_id}):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await edge.profile(**lookup)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert await settled_cells_naming(db, user_id) == before
    assert await cells_naming(db, "alice-private") == {}
    assert await cells_naming(db, "alice@example.com") == {}
    # The refused messages are listed as bare ERASED markers.
    markers = await erased_markers(db)
    assert len(markers) >= 7
    assert set(markers) == {(None, None, None, None)}
