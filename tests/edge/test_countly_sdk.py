"""The real Countly Node.js SDK (countly-sdk-nodejs, installed from tests/edge/node's lock file
and run with Node 20), pointed at an edge started with the suite: what it sends arrives once, on
the right profiles, as query shows it. Push tokens, which the Node SDK does not send, and the
answers to requests that can never succeed, are checked with raw requests in Countly's
documented shape."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import structlog

from profiles.common.v1 import types_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from tests.conftest import StartServices, eventually
from tests.edge.conftest import Edge, serve_edge

NODE_DIR = Path(__file__).parent / "node"
DRIVER = NODE_DIR / "countly_driver.js"


@pytest.fixture(scope="session")
def node() -> str:
    """Node 20 or later with the locked SDK installed (`npm ci` the first time). Missing Node
    skips these tests on a developer's machine and fails them under CI, which must have it."""
    found = shutil.which("node")
    version = ""
    if found:
        version = subprocess.run(
            [found, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    if not found or int(version.lstrip("v").split(".")[0]) < 20:
        message = f"Node.js 20 or later is needed for the Countly SDK tests (found {version!r})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if not (NODE_DIR / "node_modules" / "countly-sdk-nodejs").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed to install the locked Countly SDK")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return found


class Driver:
    """Runs countly_driver.js scenarios: one SDK 'app' with its own storage (its device ID and
    queues survive between runs, as an app's do across launches)."""

    def __init__(self, node: str, edge: Edge, storage: Path) -> None:
        self.node = node
        self.edge = edge
        self.storage = storage
        self.lines: list[dict[str, Any]] = []

    async def run(
        self,
        steps: list[list[Any]],
        *,
        on_line: Callable[[dict[str, Any]], Any] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Runs the steps until the SDK's queues are empty; returns the driver's last line."""
        scenario = {
            "url": self.edge.url,
            "app_key": self.edge.sdk_key,
            "storage_path": str(self.storage),
            "steps": steps,
            **options,
        }
        process = await asyncio.create_subprocess_exec(
            self.node,
            str(DRIVER),
            json.dumps(scenario),
            cwd=NODE_DIR,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        last: dict[str, Any] = {}
        async with asyncio.timeout(60):
            while line := await process.stdout.readline():
                last = json.loads(line)
                self.lines.append(last)
                if on_line is not None:
                    await on_line(last)
            stderr = await process.stderr.read() if process.stderr else b""
            code = await process.wait()
        assert code == 0, (last, stderr.decode()[-2000:])
        assert last.get("done"), last
        return last


@pytest.fixture
def driver(node: str, edge: Edge, tmp_path: Path) -> Driver:
    return Driver(node, edge, tmp_path / "app-1")


async def custom_names(edge: Edge, profile_id: str) -> list[str]:
    events = await edge.events(profile_id)
    return sorted(e.custom.name for e in events if e.HasField("custom"))


async def wait_for_names(edge: Edge, names: list[str], **lookup: str) -> Any:
    """The profile of `lookup` once its custom events are exactly `names` (sorted)."""

    async def arrived() -> bool:
        try:
            profile = await edge.profile(**lookup)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # not created yet
                return False
            raise
        return await custom_names(edge, profile.summary.profile_id) == sorted(names)

    await eventually(arrived)
    return await edge.profile(**lookup)


def seconds(duration: Any) -> float:
    return float(duration.ToTimedelta() / timedelta(seconds=1))


def within_fake_clock(duration: float, advanced: int) -> bool:
    """A session's duration is the time the driver's fake clock was moved forward, plus the
    little real time the SDK took between its calls (generous: CI machines are busy)."""
    return advanced <= duration < advanced + 30


ANONYMOUS_VISIT: list[list[Any]] = [
    ["begin_session"],
    ["event", {"key": "Added to Cart", "count": 2, "sum": 19.5, "segmentation": {"sku": "A1"}}],
    [
        "user_details",
        {
            "name": "Ada Lovelace",
            "email": "Ada@Example.com",
            "byear": 1815,
            "custom": {"plan": "pro"},
        },
    ],
    ["user_data", [["increment_by", "logins", 2], ["push_unique", "tags", "beta"]]],
    # The fake clock moves: the SDK sends its own heartbeat (every 60 s of session).
    ["advance", 90],
    ["event", {"key": "Viewed Product"}],
    ["advance", 30],
    ["end_session"],
]


async def test_anonymous_visit_then_login_logout_and_login_again(
    edge: Edge, driver: Driver, start_services: StartServices
) -> None:
    segments = await start_services("segments", settings=edge.settings)
    engagement = segments_grpc.SegmentsServiceStub(segments["segments"].channel)
    anonymous_id = (await driver.run(ANONYMOUS_VISIT))["device_id"]

    anonymous = await wait_for_names(
        edge, ["added_to_cart", "viewed_product"], installation_id=anonymous_id
    )
    assert anonymous.summary.anonymous
    assert anonymous.native_attributes.first_name == "Ada"
    assert anonymous.native_attributes.last_name == "Lovelace"
    assert anonymous.native_attributes.email == "ada@example.com"
    custom = {a.name: a.value for a in anonymous.custom_attributes}
    assert custom["plan"].string_value == "pro"
    assert custom["logins"].number_value == 2
    assert list(custom["tags"].string_list_value.values) == ["beta"]
    assert custom["byear"].number_value == 1815
    (installation,) = anonymous.installations
    assert (installation.platform, installation.app_version) == (types_pb2.PLATFORM_API, "2.0.0")
    (session,) = await edge.sessions(anonymous.summary.profile_id)
    assert within_fake_clock(seconds(session.duration), 120)
    assert session.end_time.seconds > 0

    # Engagement (segments, from the session events ingest published): one session, ended,
    # with the duration its heartbeat and end were given by ingest.
    async def engaged() -> bool:
        reply = await engagement.GetEngagement(
            segments_pb.GetEngagementRequest(profile_id=anonymous.summary.profile_id),
            metadata=edge.read(),
        )
        return reply.session_count == 1 and reply.average_session_duration.seconds > 0

    await eventually(engaged)
    scored = await engagement.GetEngagement(
        segments_pb.GetEngagementRequest(profile_id=anonymous.summary.profile_id),
        metadata=edge.read(),
    )
    assert within_fake_clock(seconds(scored.average_session_duration), 120)
    assert scored.score2 == 1

    # Login: the SDK's device ID change with merge, the new ID being the user's.
    user_id = f"user-{uuid.uuid4().hex[:8]}"
    await driver.run(
        [
            ["begin_session"],
            ["advance", 10],
            ["change_id", user_id, True],
            ["event", {"key": "Checkout"}],
            ["advance", 40],
            ["end_session"],
        ]
    )
    identified = await wait_for_names(
        edge, ["added_to_cart", "checkout", "viewed_product"], custom_id=user_id
    )
    assert not identified.summary.anonymous
    assert identified.native_attributes.email == "ada@example.com"
    assert sorted(i.installation_id for i in identified.installations) == sorted(
        [anonymous_id, user_id]
    )
    assert {i.platform for i in identified.installations} == {types_pb2.PLATFORM_API}
    sessions = await edge.sessions(identified.summary.profile_id)
    by_installation = sorted((s.installation_id == user_id, seconds(s.duration)) for s in sessions)
    # The first visit (120 s); the second under the anonymous ID, its begin_session only (it is
    # left open until ingest closes it 30 minutes after); the user's, started by its end, with
    # the time Countly reports since the previous request (the begin_session: 50 s).
    assert [mine for mine, _ in by_installation] == [False, False, True]
    for (_, duration), expected in zip(by_installation, (0, 120, 50), strict=True):
        assert within_fake_clock(duration, expected)

    # Logout: a change without merge; the new ID is a new anonymous installation.
    other_id = f"anon-{uuid.uuid4().hex[:8]}"
    await driver.run(
        [["change_id", other_id, False], ["event", {"key": "Browse"}], ["end_session"]]
    )
    after_logout = await wait_for_names(edge, ["browse"], installation_id=other_id)
    assert after_logout.summary.anonymous
    assert after_logout.summary.profile_id != identified.summary.profile_id

    # A later login merges again.
    await driver.run([["change_id", user_id, True], ["event", {"key": "Reorder"}]])
    await wait_for_names(
        edge,
        ["added_to_cart", "browse", "checkout", "reorder", "viewed_product"],
        custom_id=user_id,
    )


async def test_a_request_sent_again_after_a_lost_answer_stores_nothing_twice(
    edge: Edge, driver: Driver
) -> None:
    final = await driver.run(
        [
            ["begin_session"],
            ["event", {"key": "Tap", "segmentation": {"n": 1}}],
            ["event", {"key": "Tap", "segmentation": {"n": 2}}],
            ["end_session"],
        ],
        fail_first=["events"],
        force_post=True,
    )

    assert final["failed"] == 1
    sent = [line for line in driver.lines if "events" in line.get("params", [])]
    assert [(line["status"], line["edge_status"]) for line in sent] == [(502, 200), (200, 200)]
    assert {line["method"] for line in driver.lines if "method" in line} == {"POST"}
    profile = await wait_for_names(edge, ["tap", "tap"], installation_id=final["device_id"])
    events = await edge.events(profile.summary.profile_id)
    assert sorted(e.custom.attributes["n"].number_value for e in events if e.custom.name) == [1, 2]


async def test_events_sent_while_ingest_is_stopped_arrive_once_it_is_back(
    edge: Edge, driver: Driver
) -> None:
    await edge.stop_ingest()
    restarted = asyncio.Event()

    async def restart_after_a_refusal(line: dict[str, Any]) -> None:
        if line.get("status") == 503 and not restarted.is_set():
            restarted.set()
            await edge.restart_ingest()

    final = await driver.run(
        [
            ["begin_session"],
            ["event", {"key": "Offline Tap"}],
            ["event", {"key": "Offline Swipe"}],
            ["end_session"],
        ],
        on_line=restart_after_a_refusal,
    )

    assert restarted.is_set()
    profile = await wait_for_names(
        edge, ["offline_swipe", "offline_tap"], installation_id=final["device_id"]
    )
    (session,) = await edge.sessions(profile.summary.profile_id)
    assert session.end_time.seconds > 0


async def test_messages_that_cannot_be_stored_are_rejected_and_listed(
    edge: Edge, driver: Driver
) -> None:
    too_many = {f"field_{i}": i for i in range(25)}
    final = await driver.run(
        [
            ["event", {"key": "!!!"}],
            ["event", {"key": "Wide", "segmentation": too_many}],
            ["event", {"key": "Fine"}],
            ["user_data", [["multiply", "score", 3], ["set", "level", "gold"]]],
        ]
    )

    async def listed() -> bool:
        return len(await edge.rejected()) == 3

    await eventually(listed)
    rejected = await edge.rejected()
    assert sorted(r.reason for r in rejected) == [
        "NAME_UNUSABLE",
        "OPERATION_UNSUPPORTED",
        "TOO_MANY_ATTRIBUTES",
    ]
    kept = "".join(r.raw_payload_json for r in rejected)
    assert edge.sdk_key not in kept
    assert "$mul" in kept
    profile = await wait_for_names(edge, ["fine"], installation_id=final["device_id"])
    assert {a.name: a.value.string_value for a in profile.custom_attributes} == {"level": "gold"}


def get(edge: Edge, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{edge.url}{path}", params=params, timeout=10)


def post(edge: Edge, path: str, **kwargs: Any) -> requests.Response:
    return requests.post(f"{edge.url}{path}", timeout=10, **kwargs)


async def test_a_session_served_by_two_edge_replicas_is_one_session(edge: Edge) -> None:
    """No session state in the edge: the begin, heartbeat and end of one device's session,
    each served by another replica (a second edge on the same suite), make one session whose
    duration ingest computes from its start."""
    second_url, stop_second = await serve_edge(edge.settings)
    try:
        base = int(time.time() * 1000) - 600_000
        requests_in_order = [
            (edge.url, {"begin_session": 1}, 0),
            (second_url, {"session_duration": 60}, 60_000),
            (edge.url, {"session_duration": 60}, 120_000),
            (second_url, {"end_session": 1, "session_duration": 15}, 135_000),
        ]
        for url, params, offset in requests_in_order:
            reply = await asyncio.to_thread(
                requests.get,
                f"{url}/i",
                params={
                    "app_key": edge.sdk_key,
                    "device_id": "replicated-device",
                    "timestamp": base + offset,
                    **params,
                },
                timeout=10,
            )
            assert reply.json() == {"result": "Success"}
    finally:
        await stop_second()

    async def one_ended_session() -> bool:
        profile = await edge.profile(installation_id="replicated-device")
        sessions = await edge.sessions(profile.summary.profile_id)
        return len(sessions) == 1 and sessions[0].end_time.seconds > 0

    await eventually(one_ended_session)
    profile = await edge.profile(installation_id="replicated-device")
    (session,) = await edge.sessions(profile.summary.profile_id)
    assert seconds(session.duration) == 135
    assert session.event_count == 4


async def test_push_tokens_in_countlys_documented_shape_reach_the_installations(
    edge: Edge,
) -> None:
    key = edge.sdk_key
    ios = await asyncio.to_thread(
        get,
        edge,
        "/i",
        app_key=key,
        device_id="ios-device",
        token_session=1,
        ios_token="ab" * 32,
        test_mode=0,
    )
    android = await asyncio.to_thread(
        post,
        edge,
        "/i",
        data={
            "app_key": key,
            "device_id": "android-device",
            "token_session": "1",
            "android_token": "fcm-token-1",
            "test_mode": "2",
            "locale": "de",
        },
    )
    assert (ios.status_code, ios.json()) == (200, {"result": "Success"})
    assert (android.status_code, android.json()) == (200, {"result": "Success"})

    async def tokens() -> list[tuple[int, bool, bool]]:
        found = []
        for device in ("ios-device", "android-device"):
            (installation,) = (await edge.profile(installation_id=device)).installations
            found.append(
                (installation.platform, installation.push_token_present, installation.push_opt_in)
            )
        return found

    await eventually(
        lambda: _equals(
            tokens, [(types_pb2.PLATFORM_IOS, True, True), (types_pb2.PLATFORM_ANDROID, True, True)]
        )
    )
    opted_out = await asyncio.to_thread(
        get, edge, "/i", app_key=key, device_id="ios-device", token_session=1, ios_token=""
    )
    assert opted_out.status_code == 200
    await eventually(
        lambda: _equals(
            tokens,
            [(types_pb2.PLATFORM_IOS, False, False), (types_pb2.PLATFORM_ANDROID, True, True)],
        )
    )


async def _equals(read: Callable[[], Any], expected: Any) -> bool:
    return bool(await read() == expected)


async def test_requests_that_can_never_succeed_are_answered_as_countly_does(edge: Edge) -> None:
    with structlog.testing.capture_logs() as logs:
        unknown = await asyncio.to_thread(
            get, edge, "/i", app_key="unknown-app-key", device_id="d-1", events='[{"key":"x"}]'
        )
        no_device = await asyncio.to_thread(get, edge, "/i", app_key=edge.sdk_key)
        no_requests = await asyncio.to_thread(post, edge, "/i/bulk", data={"app_key": edge.sdk_key})
        oversized = await asyncio.to_thread(
            post,
            edge,
            "/i",
            data={"app_key": edge.sdk_key, "device_id": "d-1", "events": "x" * 1_100_000},
        )

    assert (unknown.status_code, unknown.json()) == (400, {"result": "App does not exist"})
    assert (no_device.status_code, no_device.json()) == (
        400,
        {"result": 'Missing parameter "app_key" or "device_id"'},
    )
    assert (no_requests.status_code, no_requests.json()) == (
        400,
        {"result": 'Missing parameter "requests"'},
    )
    assert oversized.status_code == 400
    assert oversized.json()["result"].startswith("Request too large")
    assert await edge.rejected() == []
    # Countly's GET puts the key in the query string: no log line holds it.
    assert len([e for e in logs if e["event"] == "edge_request_refused"]) == 4
    assert "unknown-app-key" not in repr(logs)
    assert edge.sdk_key not in repr(logs)


async def test_bulk_and_json_requests_with_parameters_as_objects(edge: Edge) -> None:
    key = edge.sdk_key
    bulk = await asyncio.to_thread(
        post,
        edge,
        "/i/bulk",
        json={
            "app_key": key,
            "requests": [
                {"device_id": "bulk-1", "timestamp": 1, "events": [{"key": "Imported"}]},
                {"device_id": "bulk-1", "user_details": {"custom": {"tier": "gold"}}},
            ],
        },
    )
    single = await asyncio.to_thread(
        post,
        edge,
        "/i",
        json={
            "app_key": key,
            "device_id": "json-1",
            "begin_session": 1,
            "metrics": {"_os": "iOS", "_os_version": "17.2", "_app_version": "5.0"},
            "events": [{"key": "Opened", "segmentation": {"from": "push"}}],
        },
    )
    assert (bulk.status_code, bulk.json()) == (200, {"result": "Success"})
    assert (single.status_code, single.json()) == (200, {"result": "Success"})

    profile = await wait_for_names(edge, ["opened"], installation_id="json-1")
    (installation,) = profile.installations
    assert (installation.platform, installation.os_version) == (types_pb2.PLATFORM_IOS, "17.2")
    # The bulk request's event, timestamped in 1970, is too old for TrackEvents: rejected and
    # listed; its user details are stored.
    bulk_profile = await wait_for_names(edge, [], installation_id="bulk-1")
    assert [a.name for a in bulk_profile.custom_attributes] == ["tier"]
    assert [r.reason for r in await edge.rejected()] == ["EVENT_TIME_TOO_OLD"]
