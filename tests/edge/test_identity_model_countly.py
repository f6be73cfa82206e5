"""A model of where Countly traffic lands, checked against the edge on random sessions.

The promise: every event lands once on a profile, the installation's anonymous one or the one
of the customer's custom ID; a login merges the anonymous history into the identified profile,
a logout starts a new anonymous profile, and the next login merges that one in, whoever logs in,
whatever the retries.

Countly's SDKs (countly-sdk-web, countly-sdk-nodejs, the mobile ones) send everything under a
`device_id`, an anonymous UUID at install. The login is `change_id(user, merge=true)`: one
request `device_id=<user>&old_device_id=<anonymous ID>`, then everything under the user's ID.
The logout is a change without merge: the SDK ends its session, takes a new anonymous ID (or,
countly-sdk-ios's `changeDeviceIDWithoutMerge(nil)`, goes back to the ID it made at install) and
begins a session under it. docs/edge.md ("Login and logout"): the change with merge is
`Identify(old, new)` and `Identify(new, new)`; a change without merge sends nothing; every
`begin_session` logs its device ID out unless it is its profile's custom ID, so that an install
ID a login merged into a user starts a new anonymous profile. The model: an event under an
anonymous period of a device ID belongs to the user that period logged in as, else to the
period's anonymous profile; an event under a user's ID belongs to that user.

Each seed is a session of one or two devices. Countly's queue sends one request at a time, in
order, and resends the head request until it is answered (a lost answer: the same request
twice); events queued offline go in a later request with their own, older, timestamps. The two
devices' queues interleave; some requests go through `/i/bulk`. Then every profile is read back
through query.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from tests.edge.conftest import Edge
from tests.edge.landing_model import check

# Six seeds in the suite (about 2 s each), and those found failing on a resent /i/bulk holding
# a new device's first begin_session and its login (test_a_resent_bulk_..., fixed): 4 and 25.
SEEDS = [*range(6), 25]


@dataclass(slots=True)
class Device:
    """What the SDK keeps: its device ID, the one it made at install, its queue."""

    install_id: str
    device_id: str
    period: int  # the current anonymous period's index in Model.periods, or -1 logged in
    user_id: str | None = None
    queue: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)  # events not sent yet


@dataclass(slots=True)
class Model:
    """Where each event goes. A period is a stretch of a device ID used anonymously, from
    its first request to the login that ends it, if any."""

    periods: list[tuple[str, str | None]] = field(default_factory=list)  # (device ID, login)
    events: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # n -> period/user

    def person_of(self, event: str) -> tuple[str, str]:
        """("user", custom ID) or ("anonymous", device ID): where the event belongs."""
        period, user = self.events[event]
        if user is None:
            device_id, user = self.periods[period]
            if user is None:
                return ("anonymous", device_id)
        return ("user", user)

    def people(self) -> set[tuple[str, str]]:
        """Every profile the session makes: the users, and each anonymous period that never
        logged in (each has at least its session start)."""
        found = {("user", u) for _, u in self.events.values() if u}
        for device_id, user in self.periods:
            found.add(("user", user) if user else ("anonymous", device_id))
        return found


def session(rng: random.Random, tag: str) -> tuple[Model, list[Device]]:
    """A random session of one or two devices; each device's queue of requests, in order."""
    model = Model()
    users = [f"user-a-{tag}", f"user-b-{tag}"]
    clock = datetime.now(UTC) - timedelta(minutes=50)
    devices = []
    sdk = rng.choice((("javascript_native_web", "25.4.0"), ("countly-sdk-nodejs", "24.10.0")))

    def request(device: Device, **params: Any) -> None:
        stamp = int(clock.timestamp() * 1000) + len(device.queue)  # unique per device
        device.queue.append(
            {
                "device_id": device.device_id,
                "timestamp": stamp,
                "hour": clock.hour,
                "dow": clock.isoweekday() % 7,
                "tz": 0,
                "sdk_name": sdk[0],
                "sdk_version": sdk[1],
                **params,
            }
        )

    def begin(device: Device) -> None:
        metrics = {"_os": "Linux", "_app_version": "1.0", "_locale": "en-US"}
        request(device, begin_session=1, metrics=json.dumps(metrics))

    def flush_events(device: Device) -> None:
        if device.pending:
            request(device, events=json.dumps(device.pending))
            device.pending = []

    def new_period(device: Device, device_id: str) -> None:
        device.device_id, device.user_id = device_id, None
        model.periods.append((device_id, None))
        device.period = len(model.periods) - 1
        begin(device)

    for _ in range(rng.choice((1, 2))):
        install = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        device = Device(install, install, -1)
        devices.append(device)
        new_period(device, install)
    for _ in range(rng.randint(8, 22)):
        device = rng.choice(devices)
        clock += timedelta(seconds=rng.randint(1, 90))
        action = rng.choices(("event", "flush", "login", "logout"), (6, 2, 2, 1))[0]
        if action == "event":
            n = f"e{len(model.events)}"
            device.pending.append(
                {
                    "key": rng.choice(("Added to Cart", "Paid")),
                    "count": 1,
                    "segmentation": {"n": n},
                    "timestamp": int(clock.timestamp() * 1000),
                    "hour": clock.hour,
                    "dow": clock.isoweekday() % 7,
                }
            )
            model.events[n] = (device.period, device.user_id)
        elif action == "flush":  # the SDK's timer: queued events go out, with a heartbeat
            flush_events(device)
            request(device, session_duration=rng.randint(1, 60))
        elif action == "login" and device.user_id is None:
            user = rng.choice(users)
            flush_events(device)  # the SDK sends what it holds under the old ID first
            old = device.device_id
            device.device_id, device.user_id = user, user
            model.periods[device.period] = (old, user)
            device.period = -1
            request(device, old_device_id=old)
        elif action == "logout" and device.user_id is not None:
            flush_events(device)
            request(device, end_session=1, session_duration=rng.randint(1, 60))
            # A new anonymous ID, or (countly-sdk-ios) back to the one made at install.
            if rng.random() < 0.4:
                new_period(device, device.install_id)
            else:
                new_period(device, str(uuid.UUID(int=rng.getrandbits(128), version=4)))
    for device in devices:
        flush_events(device)
    return model, devices


def deliveries(rng: random.Random, devices: list[Device]) -> list[list[dict[str, Any]]]:
    """The HTTP requests in the order they reach the edge: the devices' queues interleaved,
    each in its order; a request sometimes twice in a row (its answer lost, the SDK resends
    it), sometimes several in one `/i/bulk` (the SDK's queue after being offline)."""
    queues = [list(d.queue) for d in devices]
    sent: list[list[dict[str, Any]]] = []
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        take = rng.choice((1, 1, 1, 2, 4))
        chunk, queue[:] = queue[:take], queue[take:]
        sent.append(chunk)
        if rng.random() < 0.2:
            sent.append(chunk)
    return sent


def post(http: requests.Session, url: str, data: dict[str, Any]) -> int:
    return http.post(url, data=data, timeout=10).status_code


async def send(edge: Edge, chunks: list[list[dict[str, Any]]]) -> None:
    with requests.Session() as http:
        for chunk in chunks:
            if len(chunk) == 1:
                data = {"app_key": edge.sdk_key, **chunk[0]}
                url = f"{edge.url}/i"
            else:
                data = {"app_key": edge.sdk_key, "requests": json.dumps(chunk)}
                url = f"{edge.url}/i/bulk"
            assert await asyncio.to_thread(post, http, url, data) == 200


def event_n(event: Any) -> str:
    """Countly events carry no ID: each event of the model says its own in segmentation `n`."""
    return str(event.custom.attributes["n"].string_value)


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_countly_sessions_land_where_the_model_says(edge: Edge, seed: int) -> None:
    rng = random.Random(seed)
    model, devices = session(rng, f"{seed}-{uuid.uuid4().hex[:8]}")
    await send(edge, deliveries(rng, devices))
    await check(edge, model, event_key=event_n)


async def test_a_resent_bulk_with_a_new_device_s_first_session_and_login_makes_no_profile(
    edge: Edge,
) -> None:
    """A new device's first session start, an event and its login, in one /i/bulk whose answer
    is lost: the SDK resends it. One profile, the user's, holding the event and the device ID;
    the edge leaves a second, empty, anonymous profile holding the device ID."""
    tag = uuid.uuid4().hex[:8]
    device, user = str(uuid.uuid4()), f"user-a-{tag}"
    stamp = int((datetime.now(UTC) - timedelta(minutes=5)).timestamp() * 1000)
    queue = [
        {
            "device_id": device,
            "timestamp": stamp,
            "begin_session": 1,
            "sdk_name": "countly-sdk-nodejs",
        },
        {
            "device_id": device,
            "timestamp": stamp + 1,
            "events": json.dumps([{"key": "Paid", "count": 1, "segmentation": {"n": "e0"}}]),
            "sdk_name": "countly-sdk-nodejs",
        },
        {
            "device_id": user,
            "timestamp": stamp + 2,
            "old_device_id": device,
            "sdk_name": "countly-sdk-nodejs",
        },
    ]
    model = Model(periods=[(device, user)], events={"e0": (0, None)})
    await send(edge, [queue, queue])
    await check(edge, model, within=10, event_key=event_n)
