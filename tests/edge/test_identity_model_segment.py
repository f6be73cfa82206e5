"""A model of where analytics.js traffic lands, checked against the edge on random sessions.

The promise: every event lands once on a profile, the installation's anonymous one or the one
of the customer's custom ID; a login merges the anonymous history into the identified profile,
a logout starts a new anonymous profile, and the next login merges that one in, whoever logs in,
whatever the retries and the order in which the requests arrive.

analytics.js (`@segment/analytics-next`) sends every message with its `anonymousId` and, once
`identify(userId)` was called, its `userId`; `reset()` (the logout) forgets the `userId` and
makes a new `anonymousId`, and so does an `identify()` with another user ID than the current one
(Segment's "Managing identity in Analytics.js"). So an anonymous ID is logged in as one user at
most, and the model is short: an event of an anonymous ID goes to the user that ID logged in as,
else to that ID's anonymous profile (docs/edge.md, Segment: `anonymousId` is the installation,
`userId` the custom ID, a message with both a login).

Each seed is a session of one or two browsers, sent message by message as analytics.js posts
them (`/v1/t`, `/v1/p`, `/v1/i`) or in `/v1/batch` requests as its batching mode and the server
libraries send them, some requests resent (a lost answer) and some late (a retry after a failure,
older timestamps arriving after newer ones). Then every profile is read back through query.
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

# Six seeds in the suite (about 2 s each); 10 ran clean when the test was written.
SEEDS = range(6)
SHORT_PATHS = {"track": "t", "page": "p", "identify": "i"}


@dataclass(slots=True)
class Browser:
    """What analytics.js keeps in the browser's storage."""

    anonymous_id: str
    user_id: str | None = None


@dataclass(slots=True)
class Model:
    """The session's messages in the order the browsers made them, and where each event goes."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    # An anonymous ID's user, once it logged in (never more than one: see the module's doc).
    login_of: dict[str, str] = field(default_factory=dict)
    # Event (messageId) -> its installation and, when sent logged in, its user.
    events: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def person_of(self, message_id: str) -> tuple[str, str]:
        """("user", custom ID) or ("anonymous", installation ID): where the event belongs."""
        installation, user = self.events[message_id]
        user = user or self.login_of.get(installation)
        return ("user", user) if user else ("anonymous", installation)

    def people(self) -> set[tuple[str, str]]:
        """Every profile the session makes: the users, and the anonymous IDs that sent events
        and never logged in (an anonymous ID that logged in before any event leaves nothing)."""
        users = {("user", u) for u in self.login_of.values()}
        return users | {self.person_of(m) for m in self.events}


def new_anonymous_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def session(rng: random.Random, tag: str) -> Model:
    """A random session of one or two browsers: anonymous visits, logins as A or B, logouts,
    logins again; the messages as analytics.js builds them."""
    model = Model()
    users = [f"user-a-{tag}", f"user-b-{tag}"]
    browsers = [Browser(new_anonymous_id(rng)) for _ in range(rng.choice((1, 2)))]
    clock = datetime.now(UTC) - timedelta(minutes=50)
    for _ in range(rng.randint(8, 22)):
        browser = rng.choice(browsers)
        clock += timedelta(seconds=rng.randint(1, 90))
        action = rng.choices(("track", "page", "login", "logout"), (5, 2, 2, 1))[0]
        if action == "logout":
            if browser.user_id is not None:  # reset(): a new anonymous ID, no user
                browser.user_id = None
                browser.anonymous_id = new_anonymous_id(rng)
            continue
        if action == "login":
            user = rng.choice(users)
            if browser.user_id not in (None, user):
                # identify() with another user ID: analytics.js makes a new anonymous ID first.
                browser.anonymous_id = new_anonymous_id(rng)
            browser.user_id = user
            model.login_of[browser.anonymous_id] = user
        message: dict[str, Any] = {
            "type": "identify" if action == "login" else action,
            "messageId": f"ajs-next-{rng.getrandbits(128):032x}",
            "anonymousId": browser.anonymous_id,
            "userId": browser.user_id,  # analytics.js sends null when anonymous
            "timestamp": clock.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "integrations": {},
            "context": {
                "library": {"name": "analytics.js", "version": "npm:next-1.70.0"},
                "page": {"path": "/pricing", "url": "https://shop.example/pricing"},
                "userAgent": "Mozilla/5.0 (X11; Linux x86_64)",
                "locale": "en-US",
            },
        }
        if action == "track":
            message["event"] = rng.choice(("Product Viewed", "Order Completed", "Cart Opened"))
            message["properties"] = {"n": len(model.messages)}
        elif action == "page":
            message["properties"] = {"path": "/pricing", "title": "Pricing"}
            message["name"] = "Pricing"
        else:
            message["traits"] = {"plan": rng.choice(("free", "pro"))}
        if action != "login":
            model.events[message["messageId"]] = (browser.anonymous_id, browser.user_id)
        model.messages.append(message)
    return model


def deliveries(rng: random.Random, messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The requests that carry the messages, in the order they reach the edge: some messages
    late (a retry after a failed request, behind newer ones), some twice (a retry after a lost
    answer), in requests of one message (analytics.js) or batches of a few."""
    order = list(messages)
    for message in messages:
        if rng.random() < 0.2:  # late: sent after newer ones
            at = order.index(message)
            order.pop(at)
            order.insert(rng.randint(at, len(order)), message)
    for message in messages:
        if rng.random() < 0.15:  # resent after a lost answer, the same message
            order.insert(rng.randint(order.index(message) + 1, len(order)), message)
    requests_: list[list[dict[str, Any]]] = []
    while order:
        size = rng.choice((1, 1, 2, 3, 5))
        requests_.append(order[:size])
        del order[:size]
    return requests_


def post(session_: requests.Session, url: str, body: dict[str, Any]) -> int:
    reply = session_.post(
        url, data=json.dumps(body), headers={"Content-Type": "text/plain"}, timeout=10
    )
    return reply.status_code


async def send(edge: Edge, batches: list[list[dict[str, Any]]]) -> None:
    with requests.Session() as http:
        for batch in batches:
            sent_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            if len(batch) == 1:  # analytics.js: one message per request, to its short path
                message = batch[0]
                body = {**message, "writeKey": edge.sdk_key, "sentAt": sent_at}
                url = f"{edge.url}/v1/{SHORT_PATHS[message['type']]}"
            else:
                body = {
                    "batch": batch,
                    "sentAt": sent_at,
                    "writeKey": edge.sdk_key,
                }
                url = f"{edge.url}/v1/batch"
            assert await asyncio.to_thread(post, http, url, body) == 200


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_analytics_js_sessions_land_where_the_model_says(
    edge: Edge, seed: int
) -> None:
    rng = random.Random(seed)
    model = session(rng, f"{seed}-{uuid.uuid4().hex[:8]}")
    await send(edge, deliveries(rng, model.messages))
    await check(edge, model)
