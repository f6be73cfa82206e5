"""A large body costs the edge's other requests nothing: its key is judged before its
translation (unless it sent lately), and it is translated off the event loop. In a hostile-input
audit, one 5 MB-class PostHog batch of 150,000 small events held every other request of the
edge, health checks included, for its whole translation on the loop (7 s with an unknown key,
which bought that translation by itself; 43 s with a good one)."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from typing import Any

import pytest
import requests

from services.edge.dialects import posthog
from services.edge.handlers import OFF_LOOP_BODY_BYTES
from tests.edge.conftest import Edge


def large_body(key: str) -> bytes:
    """A PostHog batch over OFF_LOOP_BODY_BYTES of flag calls: read, counted and dropped (the
    SDK's own events), so that nothing but the translation costs anything."""
    batch = [
        {"event": "$feature_flag_called", "distinct_id": f"d-{n}", "properties": {"flag": "x"}}
        for n in range(1_500)
    ]
    body = json.dumps({"api_key": key, "batch": batch}).encode()
    assert len(body) >= OFF_LOOP_BODY_BYTES
    return body


def send(url: str, body: bytes) -> requests.Response:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    return requests.post(f"{url}/batch/", data=gzip.compress(body), headers=headers, timeout=60)


class HeldTranslation:
    """posthog.translate, held at its start until released, its calls counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        original = posthog.translate

        def held(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.started.set()
            self.release.wait(30)
            return original(*args, **kwargs)

        monkeypatch.setattr(posthog, "translate", held)


async def test_the_edge_answers_others_while_it_translates_a_large_body(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldTranslation(monkeypatch)
    health: list[object] = []

    def ask_health_during_the_translation() -> None:
        # A thread of its own: the edge runs on this test's event loop, which a translation
        # held on it would hold too. It releases the translation once answered (or not).
        try:
            if held.started.wait(30):
                reply = requests.get(f"{edge.url}/healthz", timeout=10)
                health.append(reply.status_code)
        except requests.RequestException as exc:
            health.append(type(exc).__name__)
        finally:
            held.release.set()

    prober = threading.Thread(target=ask_health_during_the_translation)
    prober.start()
    try:
        answered = await asyncio.to_thread(send, edge.url, large_body(edge.sdk_key))
    finally:
        held.release.set()
        await asyncio.to_thread(prober.join, 60)
    assert health == [200]  # answered while the large body was being translated
    assert (answered.status_code, answered.json()) == (200, {"status": 1})


async def test_an_unknown_key_buys_no_translation_of_a_large_body(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldTranslation(monkeypatch)
    held.release.set()
    unknown = await asyncio.to_thread(send, edge.url, large_body("prf_unknown_0_key"))
    assert unknown.status_code == 401
    read_key = await asyncio.to_thread(send, edge.url, large_body(edge.project.keys["read"]))
    assert read_key.status_code == 403
    assert held.calls == 0
    good = await asyncio.to_thread(send, edge.url, large_body(edge.sdk_key))
    assert good.status_code == 200
    assert held.calls == 1
