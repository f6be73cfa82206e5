"""A model of where posthog-js traffic lands, checked against the edge on random sessions.

The promise: every event lands once on a profile, the installation's anonymous one or the one
of the customer's custom ID; a login merges the anonymous history into the identified profile,
a logout starts a new anonymous profile, and the next login merges that one in, whoever logs in,
whatever the retries and the order in which the requests arrive.

posthog-js puts on every event its `distinct_id`, its `$device_id` (the first anonymous
distinct_id, kept for the browser's life) and `$is_identified`. `identify(id)` of an anonymous
visitor sends `$identify` with `$anon_distinct_id`, the anonymous distinct_id; `identify()` of
an identified visitor with another ID sends no `$identify`, only its later events say the new
`distinct_id`; `reset()` (the logout) makes a new anonymous distinct_id on the same `$device_id`.
Before `identify()`, with the default `person_profiles: 'identified_only'`, every event says
`$process_person_profile: false`. The edge's rules (docs/edge.md, PostHog): the installation is
`$device_id`, but the anonymous `distinct_id` when it differs from it (after `reset()`); an
identified event logs `$device_id` in with its `distinct_id`; `$identify` logs
`$anon_distinct_id` in. The model: an anonymous event belongs to the user its anonymous
distinct_id logged in as (`$identify`), else to that distinct_id's anonymous profile; an
identified event belongs to its `distinct_id`.

Each seed is a session of one or two browsers, sent as posthog-js sends them (gzip bodies to
`/e/`, a few events per request), some requests resent (a lost answer) and some late (a retry
after a failure, older timestamps arriving after newer ones). Then every profile is read back
through query.
"""

from __future__ import annotations

import asyncio
import gzip
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

# Six seeds in the suite (about 2 s each), and one found failing: 22, one request holding a
# browser's events of users A, B, then A again (test_one_request_..., fixed). Of seeds 0 to 39,
# 13, 35 and 39 fail on a late anonymous event (test_a_late_anonymous_event_..., open).
SEEDS = [*range(6), 22]


def uuid7(rng: random.Random, when: datetime) -> str:
    """A UUIDv7 as posthog-js makes its IDs: milliseconds first, then random bits."""
    value = (int(when.timestamp() * 1000) << 80) | rng.getrandbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # the version
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # the variant
    return str(uuid.UUID(int=value))


@dataclass(slots=True)
class Browser:
    """What posthog-js keeps in the browser's storage."""

    device_id: str
    distinct_id: str
    user_id: str | None = None  # the distinct_id, once identified
    session_id: str = ""


@dataclass(slots=True)
class Model:
    """The session's events in the order the browsers made them, and where each one goes."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    # An anonymous distinct_id's user, once its $identify said so (one at most: after the
    # login, the browser is identified until reset(), which makes a new anonymous ID).
    login_of: dict[str, str] = field(default_factory=dict)
    # Event (uuid) -> its anonymous distinct_id, or its user when sent identified.
    events: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def person_of(self, event_id: str) -> tuple[str, str]:
        """("user", custom ID) or ("anonymous", installation ID): where the event belongs."""
        anonymous, user = self.events[event_id]
        user = user or self.login_of.get(anonymous)
        return ("user", user) if user else ("anonymous", anonymous)

    def people(self) -> set[tuple[str, str]]:
        """Every profile the session makes: the users, and the anonymous distinct_ids that
        sent events and never logged in."""
        users = {("user", u) for u in self.login_of.values()}
        users |= {("user", u) for _, u in self.events.values() if u}
        return users | {self.person_of(e) for e in self.events}


def session(rng: random.Random, tag: str) -> Model:
    """A random session of one or two browsers: anonymous visits, logins as A or B, logouts,
    logins again; the events as posthog-js builds them."""
    model = Model()
    users = [f"user-a-{tag}", f"user-b-{tag}"]
    clock = datetime.now(UTC) - timedelta(minutes=50)
    browsers = []
    for _ in range(rng.choice((1, 2))):
        device = uuid7(rng, clock)
        browsers.append(Browser(device, device, session_id=uuid7(rng, clock)))
    for _ in range(rng.randint(8, 22)):
        browser = rng.choice(browsers)
        clock += timedelta(seconds=rng.randint(1, 90))
        action = rng.choices(("pageview", "custom", "login", "logout"), (3, 4, 2, 1))[0]
        if action == "logout":
            if browser.user_id is not None:  # reset(): a new anonymous distinct_id
                browser.user_id = None
                browser.distinct_id = uuid7(rng, clock)
                browser.session_id = uuid7(rng, clock)
            continue
        properties: dict[str, Any] = {
            "$os": "Linux",
            "$browser": "Chrome",
            "$lib": "web",
            "$lib_version": "1.200.0",
            "$current_url": "https://shop.example/pricing",
            "$pathname": "/pricing",
            "$device_id": browser.device_id,
            "$session_id": browser.session_id,
            "$window_id": browser.session_id,
            "token": "",  # the key, set when sent
        }
        name = {"pageview": "$pageview", "custom": rng.choice(("Cart Opened", "Paid"))}.get(
            action, "$identify"
        )
        if action == "login":
            user = rng.choice(users)
            if browser.user_id == user:
                continue  # identify() with the current ID sends nothing
            if browser.user_id is None:
                properties["$anon_distinct_id"] = browser.distinct_id
                model.login_of[browser.distinct_id] = user
            else:
                # identify() of an identified visitor with another ID: no $identify, the
                # next events say the new distinct_id.
                browser.user_id = browser.distinct_id = user
                continue
            browser.user_id = browser.distinct_id = user
        properties["distinct_id"] = browser.distinct_id
        properties["$is_identified"] = browser.user_id is not None
        if browser.user_id is None:
            properties["$process_person_profile"] = False
        if action == "custom":
            properties["n"] = len(model.messages)
        message: dict[str, Any] = {
            "uuid": uuid7(rng, clock),
            "event": name,
            "properties": properties,
            "timestamp": clock.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        if action == "login":
            message["$set"] = {}
            message["$set_once"] = {"$initial_pathname": "/pricing"}
        else:
            anonymous = browser.distinct_id if browser.user_id is None else ""
            model.events[message["uuid"]] = (anonymous, browser.user_id)
        model.messages.append(message)
    return model


def deliveries(rng: random.Random, messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The requests that carry the events, in the order they reach the edge: some events late
    (a retry after a failed request, behind newer ones), some twice (a retry after a lost
    answer), a few events per request as posthog-js's queue flushes them."""
    order = list(messages)
    for message in messages:
        if rng.random() < 0.2:  # late: sent after newer ones
            at = order.index(message)
            order.pop(at)
            order.insert(rng.randint(at, len(order)), message)
    for message in messages:
        if rng.random() < 0.15:  # resent after a lost answer, the same event
            order.insert(rng.randint(order.index(message) + 1, len(order)), message)
    requests_: list[list[dict[str, Any]]] = []
    while order:
        size = rng.choice((1, 1, 2, 3, 5))
        requests_.append(order[:size])
        del order[:size]
    return requests_


def post(http: requests.Session, url: str, body: bytes) -> int:
    return http.post(url, data=body, headers={"Content-Type": "text/plain"}, timeout=10).status_code


async def send(edge: Edge, batches: list[list[dict[str, Any]]]) -> None:
    with requests.Session() as http:
        for batch in batches:
            events = [
                {**m, "properties": {**m["properties"], "token": edge.sdk_key}} for m in batch
            ]
            now = int(datetime.now(UTC).timestamp() * 1000)
            url = f"{edge.url}/e/?ip=0&_={now}&ver=1.200.0&compression=gzip-js"
            body = gzip.compress(json.dumps(events).encode())
            assert await asyncio.to_thread(post, http, url, body) == 200


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_posthog_js_sessions_land_where_the_model_says(edge: Edge, seed: int) -> None:
    rng = random.Random(seed)
    model = session(rng, f"{seed}-{uuid.uuid4().hex[:8]}")
    await send(edge, deliveries(rng, model.messages))
    await check(edge, model)


def js_event(
    name: str, distinct_id: str, device_id: str, when: datetime, **extra: Any
) -> dict[str, Any]:
    """One event as posthog-js sends it; identified unless its distinct_id is anonymous
    (`anonymous` among `extra`)."""
    anonymous = extra.pop("anonymous", False)
    properties: dict[str, Any] = {
        "$lib": "web",
        "$os": "Linux",
        "$device_id": device_id,
        "distinct_id": distinct_id,
        "$is_identified": not anonymous,
        **extra,
    }
    if anonymous:
        properties["$process_person_profile"] = False
    return {
        "uuid": str(uuid.uuid4()),
        "event": name,
        "properties": properties,
        "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


@pytest.mark.xfail(
    strict=True,
    reason="posthog.py takes $device_id as the installation of the first anonymous period "
    "and of every identified event: identified events log it in as their user (rule 4 moves "
    "it), so a late anonymous event of before the first login lands on the current user",
)
async def test_a_late_anonymous_event_lands_on_the_user_its_period_logged_in_as(
    edge: Edge,
) -> None:
    """A visitor browses (event `early`, whose request fails and is retried later), logs in as
    A, logs out (reset()), logs in as B; `early` arrives last. It belongs to A, whose login
    ended its anonymous period; the edge stores it on B."""
    tag = uuid.uuid4().hex[:8]
    device, after_reset = str(uuid.uuid4()), str(uuid.uuid4())
    a, b = f"user-a-{tag}", f"user-b-{tag}"
    t = datetime.now(UTC) - timedelta(minutes=30)
    early = js_event("Early", device, device, t, anonymous=True)
    login_a = js_event(
        "$identify", a, device, t + timedelta(minutes=1), **{"$anon_distinct_id": device}
    )
    as_a = js_event("As A", a, device, t + timedelta(minutes=2))
    anonymous = js_event("Anonymous", after_reset, device, t + timedelta(minutes=3), anonymous=True)
    login_b = js_event(
        "$identify", b, device, t + timedelta(minutes=4), **{"$anon_distinct_id": after_reset}
    )
    as_b = js_event("As B", b, device, t + timedelta(minutes=5))
    model = Model(login_of={device: a, after_reset: b})
    model.events = {
        early["uuid"]: (device, None),
        as_a["uuid"]: ("", a),
        anonymous["uuid"]: (after_reset, None),
        as_b["uuid"]: ("", b),
    }
    await send(edge, [[login_a], [as_a], [anonymous], [login_b], [as_b], [early]])
    await check(edge, model, within=10)


async def test_one_request_with_a_browser_s_events_of_a_then_b_then_a(edge: Edge) -> None:
    """A browser identified as A, then identify(B) (no reset: posthog-js sends no $identify),
    then identify(A) again, its three events flushed in one request: the third is A's (the
    edge stored it on B: it logged each installation and custom ID pair in once a request)."""
    tag = uuid.uuid4().hex[:8]
    device = str(uuid.uuid4())
    a, b = f"user-a-{tag}", f"user-b-{tag}"
    t = datetime.now(UTC) - timedelta(minutes=30)
    login_a = js_event("$identify", a, device, t, **{"$anon_distinct_id": device})
    first_a = js_event("First A", a, device, t + timedelta(minutes=1))
    then_b = js_event("Then B", b, device, t + timedelta(minutes=2))
    again_a = js_event("Again A", a, device, t + timedelta(minutes=3))
    model = Model(login_of={device: a})
    model.events = {
        first_a["uuid"]: ("", a),
        then_b["uuid"]: ("", b),
        again_a["uuid"]: ("", a),
    }
    await send(edge, [[login_a], [first_a, then_b, again_a]])
    await check(edge, model, within=10)
