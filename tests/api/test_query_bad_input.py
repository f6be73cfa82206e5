"""Query under hostile input: page tokens tampered with field by field (each list RPC refuses
every token it did not issue with INVALID_ARGUMENT on `page_token`), GetActivity dates at the
ends of the calendar, and ListRejectedEvents pages of large raw payloads (a reply stays under
the message size limits and paging goes on)."""

from __future__ import annotations

import base64
import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2 as pb
from tests.support.identity import new_id, violations
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    base_event,
    custom_event,
    op,
    session_end,
    session_start,
    start_suite,
)

NOT_OURS = "is not a page token of this RPC"
ORDERS = {False: pb.SORT_ORDER_DESCENDING, True: pb.SORT_ORDER_ASCENDING}
# Microseconds since the epoch of the first and last instants Python's datetime holds.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MICROS = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
MAX_MICROS = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // timedelta(
    microseconds=1
)
# The rows of a ListRejectedEvents page pass this only when one row alone does (the RPC's
# comment in query_service.proto).
REJECTED_PAGE_BYTES = 2 * 1024 * 1024


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


# -- page tokens ------------------------------------------------------------------------------


def token_body(token: str) -> dict[str, Any]:
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert isinstance(body, dict)
    return body


def token_of(body: Any, *, separators: tuple[str, str] = (",", ":")) -> str:
    """A token as the server writes one (compact JSON, URL-safe base64 without padding), of any
    JSON a forger likes, NaN and lone surrogates included."""
    raw = json.dumps(body, separators=separators).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class Lister:
    """One list RPC with its request fields; `timestamps` names the token fields holding a
    time, `nullable` those the server writes null in."""

    rpc: str
    request: Message
    timestamps: frozenset[str] = frozenset()
    nullable: frozenset[str] = frozenset()

    def with_token(self, token: str) -> Message:
        request = type(self.request)()
        request.CopyFrom(self.request)
        request.page_token = token  # type: ignore[attr-defined]
        return request


async def page_token_refusal(suite: Suite, lister: Lister, token: str) -> str | None:
    """None when the RPC answers the token, else the page_token violation's description;
    fails the test on any other answer."""
    refusal: grpc.aio.AioRpcError | None = None
    try:
        await suite.call(lister.rpc, lister.with_token(token))
    except grpc.aio.AioRpcError as error:
        refusal = error
    if refusal is None:
        return None
    assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT, (lister.rpc, token, refusal)
    assert violations(refusal) == ["page_token"], (lister.rpc, token)
    return violation_description(refusal)


def violation_description(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return str(bad.field_violations[0].description)
    raise AssertionError("no BadRequest")


# Values no field of any token may hold.
HOSTILE_EVERYWHERE: list[Any] = [
    True,
    False,
    1.5,
    1.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    [],
    {},
    [1],
    {"t": 1},
    [[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]],
    2**63,
    -(2**63) - 1,
    10**40,
    -(10**40),
    "a\x00b",
    "\ud800",
]


def hostile_values(lister: Lister, key: str, issued: Any) -> list[Any]:
    """What a forger may put in field `key` of a token that held `issued`, none of which the
    RPC ever writes there."""
    values = list(HOSTILE_EVERYWHERE)
    if key not in lister.nullable:
        values.append(None)
    if isinstance(issued, int):
        values += ["x", "1", "", str(issued)]
    if isinstance(issued, str):
        values += [1, 0, -1]
    if key in lister.timestamps:
        values += [MAX_MICROS + 1, MIN_MICROS - 1, 2**63 - 1, -(2**63)]
    if isinstance(issued, str) and len(issued) == 36 and issued.count("-") == 4:  # a UUID
        values += [
            "not-a-uuid",
            "x",
            "",
            issued.upper(),
            issued.replace("-", ""),
            "{" + issued + "}",
            "urn:uuid:" + issued,
        ]
    if lister.rpc == "ListEvents" and key == "k":
        values += [2, -1]
    if lister.rpc == "ListEvents" and key == "c":  # an event's position holds no change ID
        values += ["x", str(uuid.uuid4())]
    return values


def whole_token_forgeries(body: dict[str, Any]) -> list[str]:
    """Tokens no RPC issues, built from a real one's body."""
    forged = [token_of({k: v for k, v in body.items() if k != key}) for key in body]
    forged += [
        token_of({**body, "x": 1}),
        token_of({**body, "v": 2}),
        token_of({**body, "v": True}),
        token_of({**body, "v": "1"}),
        token_of({**body, "v": 1.0}),
        token_of(list(body.values())),
        token_of(None),
        token_of(1),
        token_of("token"),
        token_of(body, separators=(", ", ": ")),  # the same fields, not as the server writes
        token_of(body) + "==",
        token_of(body) + "!",
        base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode(),
        base64.urlsafe_b64encode(b'{"v":' * 50_000).decode(),
        base64.urlsafe_b64encode(b'{"v":1,"t":' + b"9" * 5000 + b"}").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe{}").decode(),
        "\u00e9\u00e9\u00e9\u00e9",
        "=",
    ]
    text = json.dumps(body, separators=(",", ":"))
    # The same key twice: JSON keeps the last one.
    forged.append(token_of_text(text[:-1] + ',"v":1}'))
    return forged


def token_of_text(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def seed_lists(suite: Suite) -> list[Lister]:
    """Rows for every list RPC, and each RPC with the request fields of its pages."""
    inst = new_id()
    batch = []
    for i in range(3):
        start = NOW - timedelta(hours=3 - i)
        batch += [
            session_start(inst, f"s{i}", start, country="FR"),
            custom_event(inst, time=start + timedelta(minutes=1)),
            session_end(inst, f"s{i}", start + timedelta(minutes=2), 60),
        ]
    await suite.track(*batch)
    # Three events refused alike: distinct IDs (one event sent thrice is one rejected row).
    no_payload = [base_event(inst, NOW) for _ in range(3)]
    assert (await suite.track(*no_payload)).rejected_count == 3
    for n, name in enumerate(["Ana", "Bob", "zo\u00e9"]):
        other = new_id()
        await suite.track(
            attribute_event(other, [op("set", "FIRST_NAME", name)], time=NOW - timedelta(hours=n))
        )
    profile_id = await suite.identity.profile_of(inst)
    await suite.settle()  # the users table reads query's projection, fed by the bus
    listers = [
        Lister(
            "ListEvents",
            pb.ListEventsRequest(profile_id=profile_id, page_size=1),
            timestamps=frozenset({"t", "mc"}),
            nullable=frozenset({"mc"}),
        ),
        Lister(
            "ListSessions",
            pb.ListSessionsRequest(profile_id=profile_id, page_size=1),
            timestamps=frozenset({"t", "ms"}),
        ),
        Lister(
            "ListRejectedEvents",
            pb.ListRejectedEventsRequest(page_size=1),
            timestamps=frozenset({"t"}),
        ),
    ]
    for order_by in (1, 2, 3, 4):
        for ascending in (False, True):
            listers.append(
                Lister(
                    "ListProfiles",
                    pb.ListProfilesRequest(
                        page_size=1,
                        order_by=order_by,  # type: ignore[arg-type]
                        sort_order=ORDERS[ascending],
                    ),
                    timestamps=frozenset({"k"} if order_by == 1 else ()),
                    nullable=frozenset({"k"}),
                )
            )
    return listers


async def test_every_list_refuses_a_token_with_any_field_tampered_with(suite: Suite) -> None:
    listers = await seed_lists(suite)
    for lister in listers:
        first = await suite.call(lister.rpc, lister.request)
        token = first.next_page_token
        assert token, lister.rpc
        body = token_body(token)
        for key, issued in body.items():
            if key in ("v", "f"):
                continue
            for value in hostile_values(lister, key, issued):
                forged = token_of({**body, key: value})
                assert await page_token_refusal(suite, lister, forged) == NOT_OURS, (
                    lister.rpc,
                    lister.request,
                    key,
                    value,
                )
        for forged in whole_token_forgeries(body):
            assert await page_token_refusal(suite, lister, forged) is not None, (
                lister.rpc,
                forged[:80],
            )
        # The token as issued still pages on.
        assert await page_token_refusal(suite, lister, token) is None


async def test_random_edits_of_real_tokens_are_answered_or_refused_on_page_token(
    suite: Suite,
) -> None:
    """Property: whatever a caller does to the JSON of a real token, a list answers (a forged
    position of the caller's own data) or refuses it on `page_token`; never another status."""
    listers = await seed_lists(suite)
    chance = random.Random(20_301)
    alphabet = '0123456789-.eE+"{}[],:tfnulx\\ \x00\u00e9'
    refused = 0
    for lister in listers:
        token = (await suite.call(lister.rpc, lister.request)).next_page_token
        text = json.dumps(token_body(token), separators=(",", ":"))
        for _ in range(60):
            edited = list(text)
            for _ in range(chance.randint(1, 4)):
                at = chance.randrange(len(edited) + 1)
                what = chance.random()
                if what < 0.4 and at < len(edited):
                    edited[at] = chance.choice(alphabet)
                elif what < 0.7:
                    edited.insert(at, chance.choice(alphabet) * chance.choice((1, 2, 30)))
                elif at < len(edited):
                    del edited[at]
            if await page_token_refusal(suite, lister, token_of_text("".join(edited))):
                refused += 1
    assert refused > 0


# -- GetActivity ------------------------------------------------------------------------------

ACTIVITY_RANGE = "must be from 0002-01-01 to 9998-12-31"


@pytest.mark.parametrize(
    ("start_date", "end_date", "time_zone", "fields"),
    [
        ("9999-12-01", "9999-12-31", "", ["start_date", "end_date"]),
        ("9999-12-01", "9999-12-31", "Pacific/Kiritimati", ["start_date", "end_date"]),
        ("9999-12-31", "9999-12-31", "Pacific/Pago_Pago", ["start_date", "end_date"]),
        ("9998-12-31", "9999-01-01", "Pacific/Kiritimati", ["end_date"]),
        ("0001-01-01", "0001-01-31", "Pacific/Kiritimati", ["start_date", "end_date"]),
        ("0001-12-31", "0002-01-01", "", ["start_date"]),
    ],
)
async def test_activity_dates_outside_the_supported_range_are_invalid_argument(
    suite: Suite, start_date: str, end_date: str, time_zone: str, fields: list[str]
) -> None:
    inst = new_id()
    await suite.track(custom_event(inst))
    profile_id = await suite.identity.profile_of(inst)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call(
            "GetActivity",
            pb.GetActivityRequest(
                profile_id=profile_id,
                start_date=start_date,
                end_date=end_date,
                time_zone=time_zone,
            ),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == fields
    assert ACTIVITY_RANGE in str(caught.value.details())


@pytest.mark.parametrize(
    "time_zone",
    ["localtime", "posixrules", "posix/Europe/Paris", "right/UTC", "Factory", "Mars/Base"],
)
async def test_activity_time_zone_that_is_no_iana_zone_is_invalid_argument(
    suite: Suite, time_zone: str
) -> None:
    # zoneinfo opens each of these but PostgreSQL refuses some (GetActivity answered INTERNAL).
    inst = new_id()
    await suite.track(custom_event(inst))
    profile_id = await suite.identity.profile_of(inst)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call(
            "GetActivity",
            pb.GetActivityRequest(
                profile_id=profile_id,
                start_date="2030-05-01",
                end_date="2030-05-31",
                time_zone=time_zone,
            ),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == ["time_zone"]


@pytest.mark.parametrize(
    "time_zone", ["", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Manila"]
)
async def test_activity_answers_at_both_ends_of_the_supported_range(
    suite: Suite, time_zone: str
) -> None:
    inst = new_id()
    await suite.track(custom_event(inst))
    profile_id = await suite.identity.profile_of(inst)
    for start_date, end_date in (("9998-12-01", "9998-12-31"), ("0002-01-01", "0002-01-31")):
        reply = await suite.call(
            "GetActivity",
            pb.GetActivityRequest(
                profile_id=profile_id,
                start_date=start_date,
                end_date=end_date,
                time_zone=time_zone,
            ),
        )
        assert [d.date for d in reply.days][::30] == [start_date, end_date]
        assert all(d.event_count == 0 for d in reply.days)


# -- ListRejectedEvents -----------------------------------------------------------------------


async def store_rejected(suite: Suite, sizes: list[int]) -> list[str]:
    """Rejected events with raw payloads of about `sizes` bytes, the first the newest (as
    ingest keeps them: large payloads come through the edge); their event IDs, newest first."""
    conn = await asyncpg.connect(suite.database_url)
    try:
        event_ids = [f"big-{n}" for n in range(len(sizes))]
        await conn.executemany(
            """INSERT INTO rejected_events (project_id, receive_time, reason, field_path,
                   message, event_id, installation_id, payload)
               VALUES ($1, $2, 'EVENT_TOO_LARGE', '', 'the event is too large', $3, 'inst-1',
                       $4::jsonb)""",
            [
                (
                    suite.project.project_id,
                    NOW - timedelta(seconds=n),
                    event_ids[n],
                    json.dumps({"platform": types_pb2.PLATFORM_WEB, "blob": "x" * size}),
                )
                for n, size in enumerate(sizes)
            ],
        )
    finally:
        await conn.close()
    return event_ids


async def test_rejected_event_pages_stay_under_the_message_size_and_page_on(
    suite: Suite,
) -> None:
    # 14 MB of payloads: a page of 500 rows would be far over the 8 MiB the server may send.
    sizes = [1_000_000] * 6 + [300] * 20 + [1_000_000] * 8 + [2_500_000] + [50] * 10
    event_ids = await store_rejected(suite, sizes)
    seen: list[str] = []
    request = pb.ListRejectedEventsRequest(page_size=501)  # coerced to the maximum, 500
    pages = 0
    while True:
        reply = await suite.call("ListRejectedEvents", request)
        pages += 1
        assert len(reply.rejected_events) >= 1
        # One row over the budget comes alone; otherwise the rows fit in the budget.
        if len(reply.rejected_events) > 1:
            rows = sum(r.ByteSize() + 6 for r in reply.rejected_events)
            assert rows <= REJECTED_PAGE_BYTES
        seen += [r.event_id for r in reply.rejected_events]
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert seen == event_ids  # no gap, no repeat, newest first
    assert pages > 1
    newest = await suite.call("ListRejectedEvents", pb.ListRejectedEventsRequest())
    big = newest.rejected_events[0]
    assert big.event_id == "big-0"
    assert json.loads(big.raw_payload_json)["blob"] == "x" * 1_000_000
    assert big.platform == types_pb2.PLATFORM_WEB


async def test_small_rejected_events_still_fill_a_page_of_page_size(suite: Suite) -> None:
    event_ids = await store_rejected(suite, [100] * 30)
    reply = await suite.call("ListRejectedEvents", pb.ListRejectedEventsRequest(page_size=25))
    assert [r.event_id for r in reply.rejected_events] == event_ids[:25]
    rest = await suite.call(
        "ListRejectedEvents",
        pb.ListRejectedEventsRequest(page_size=25, page_token=reply.next_page_token),
    )
    assert [r.event_id for r in rest.rejected_events] == event_ids[25:]
    assert rest.next_page_token == ""


async def test_ids_are_read_in_canonical_form_only_as_every_service_reads_them(
    suite: Suite,
) -> None:
    """Query reads a profile or segment ID by the rule identity and segments use
    (shared.convert.profile_id_of): a hyphenated UUID in either case; braces, a URN or missing
    hyphens are INVALID_ARGUMENT on the field, never another spelling of the same ID."""
    inst = new_id()
    await suite.track(custom_event(inst, time=NOW - timedelta(minutes=1)))
    profile_id = await suite.identity.profile_of(inst)
    spellings = [
        "{" + profile_id + "}",
        "urn:uuid:" + profile_id,
        profile_id.replace("-", ""),
        " " + profile_id,
    ]
    requests: list[tuple[str, Any]] = [
        ("GetProfile", lambda text: pb.GetProfileRequest(profile_id=text)),
        ("ListEvents", lambda text: pb.ListEventsRequest(profile_id=text)),
        ("ListSessions", lambda text: pb.ListSessionsRequest(profile_id=text)),
        (
            "GetActivity",
            lambda text: pb.GetActivityRequest(
                profile_id=text, start_date="2030-01-01", end_date="2030-01-02"
            ),
        ),
    ]
    for rpc, request in requests:
        answered = await suite.call(rpc, request(profile_id.upper()))  # either case
        # The same profile, named in its canonical (lower-case) spelling.
        assert profile_id == profile_id.lower() != profile_id.upper()
        named = answered.profile.summary.profile_id if rpc == "GetProfile" else answered.profile_id
        assert named == profile_id, rpc
        for text in spellings:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await suite.call(rpc, request(text))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, text)
            assert violations(caught.value) == ["profile_id"], (rpc, text)
    segment_id = str(uuid.uuid4())
    for text in ["{" + segment_id + "}", segment_id.replace("-", "")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.call("ListProfiles", pb.ListProfilesRequest(segment_id=text))
        assert violations(caught.value) == ["segment_id"], text
