"""Helpers (no tests) for the query API tests: the suite (identity, ingest and query started
in-process), event builders, and JSON round trips."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as pb_grpc
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.topics import EVENTS, IDENTITY
from tests.conftest import eventually
from tests.support.identity import Identity
from tests.support.ingest import NOW, attribute_event, custom_event, op, stamp

__all__ = ["NOW", "attribute_event", "custom_event", "op", "stamp"]


def round_trip(message: Message) -> None:
    """What grpcurl does: proto -> JSON -> proto gives the same message back."""
    text = json_format.MessageToJson(message)
    back = type(message)()
    json_format.Parse(text, back)
    assert back == message, text


@dataclass(slots=True)
class Suite:
    query: pb_grpc.QueryServiceStub
    ingest: ingest_grpc.IngestServiceStub
    identity: Identity
    project: Any  # tests.conftest.TestProject
    database_url: str
    clock: FrozenClock
    redis_url: str = ""
    redis_prefix: str = ""

    async def track(self, *events: ingest_pb.Event) -> ingest_pb.TrackEventsResponse:
        return await self.ingest.TrackEvents(
            ingest_pb.TrackEventsRequest(events=events),
            metadata=self.project.metadata("sdk"),
            timeout=20,
        )

    async def get(self, role: str = "read", **lookup: str) -> pb.GetProfileResponse:
        reply = await self.query.GetProfile(
            pb.GetProfileRequest(**lookup), metadata=self.project.metadata(role), timeout=20
        )
        round_trip(reply)
        return reply

    async def call(self, rpc: str, request: Message, role: str = "read") -> Any:
        reply = await getattr(self.query, rpc)(
            request, metadata=self.project.metadata(role), timeout=30
        )
        round_trip(reply)
        return reply

    async def fetchval(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    async def settle(self, *, within: float = 20.0, groups: tuple[str, ...] = ("query",)) -> None:
        """Waits until every outbox message was published and query's consumer group (and any
        other named) handled every entry of the events and identity streams: the rollups are
        then up to date."""
        bus = Bus.from_url(self.redis_url, self.redis_prefix)

        async def settled() -> bool:
            if await self.fetchval("SELECT count(*) FROM outbox"):
                return False
            for topic in (EVENTS, IDENTITY):
                key = bus.stream_key(topic.name)
                if not await bus.redis.exists(key):
                    continue
                stream = await bus.redis.xinfo_stream(key)
                found = {_text(g["name"]): g for g in await bus.redis.xinfo_groups(key)}
                for name in groups:
                    group = found.get(name)
                    if group is None or int(group["pending"]):
                        return False
                    if _text(group["last-delivered-id"]) != _text(stream["last-generated-id"]):
                        return False
            return True

        try:
            await eventually(settled, within=within)
        finally:
            await bus.aclose()

    async def replay_rollups(self) -> None:
        """Delivers every retained entry of the events and identity streams to query's group
        again (XGROUP SETID to the start), then waits until they are handled."""
        bus = Bus.from_url(self.redis_url, self.redis_prefix)
        try:
            for topic in (EVENTS, IDENTITY):
                await bus.redis.xgroup_setid(bus.stream_key(topic.name), "query", "0")
        finally:
            await bus.aclose()
        await self.settle()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()


async def start_suite(
    start_services: Any,
    settings_for_test: Any,
    project: Any,
    database_url: str,
    *,
    clock: FrozenClock | None = None,
    query_settings: Any = None,
    ingest_build: Any = None,
) -> Suite:
    clock = clock or FrozenClock(NOW)
    # Every service on the same settings: an outbox relay publishes whatever rows it finds, so a
    # service on another Redis would carry the others' messages there.
    handles = await start_services("identity", settings=settings_for_test)
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    ingest = await start_services("ingest", settings=settings, clock=clock, build=ingest_build)
    query = await start_services("query", settings=query_settings or settings, clock=clock)
    return Suite(
        query=pb_grpc.QueryServiceStub(query["query"].channel),
        ingest=ingest_grpc.IngestServiceStub(ingest["ingest"].channel),
        identity=Identity(handles["identity"].channel, project),
        project=project,
        database_url=database_url,
        clock=clock,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
    )


def base_event(
    installation_id: str | None, time: datetime, platform: int = types_pb2.PLATFORM_IOS
) -> ingest_pb.Event:
    event = ingest_pb.Event(event_id=uuid.uuid4().hex, platform=platform, event_time=stamp(time))  # type: ignore[arg-type]
    if installation_id is not None:
        event.installation_id = installation_id
    return event


def session_start(
    installation_id: str, session_id: str, time: datetime, *, country: str = "", **kw: Any
) -> ingest_pb.Event:
    event = base_event(installation_id, time, **kw)
    event.session_id = session_id
    event.session_start.country = country
    return event


def session_end(
    installation_id: str, session_id: str, time: datetime, seconds: int, **kw: Any
) -> ingest_pb.Event:
    event = base_event(installation_id, time, **kw)
    event.session_id = session_id
    event.session_end.duration.FromTimedelta(timedelta(seconds=seconds))
    return event


def subscription(
    installation_id: str, channel: int, kind: int, subscribed: bool, time: datetime
) -> ingest_pb.Event:
    event = base_event(installation_id, time)
    event.subscription_change.channel = channel  # type: ignore[assignment]
    event.subscription_change.kind = kind  # type: ignore[assignment]
    event.subscription_change.subscribed = subscribed
    return event


def installation_update(
    installation_id: str, time: datetime, platform: int = types_pb2.PLATFORM_IOS, **fields: Any
) -> ingest_pb.Event:
    event = base_event(installation_id, time, platform)
    for name, value in fields.items():
        setattr(event.installation_update, name, value)
    if not fields:
        event.installation_update.app_version = "1.0"
    return event


def crash(installation_id: str, time: datetime, name: str = "NullPointer") -> ingest_pb.Event:
    event = base_event(installation_id, time)
    event.crash.name = name
    event.crash.reason = "boom"
    event.crash.stack_trace = "at main()"
    event.crash.fatal = True
    return event


def is_grpc_error(error: BaseException, code: grpc.StatusCode) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == code


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


PLATFORM_NAMES = {n: types_pb2.Platform.Name(n) for n in types_pb2.Platform.values()}


async def direct_overview(suite: Suite, platform: int = 0) -> dict[str, Any]:
    """The overview's figures counted directly from the stored rows, in Python, without query's
    projection: what GetOverview must show once the bus is drained."""
    project_id = suite.project.project_id
    live = {
        r["profile_id"]: r["custom_id"]
        for r in await suite.fetch(
            "SELECT profile_id, custom_id FROM profiles"
            " WHERE project_id = $1 AND merged_into IS NULL",
            project_id,
        )
    }
    native: dict[Any, dict[str, str]] = {}
    for r in await suite.fetch(
        "SELECT profile_id, name, value ->> 'value' AS v FROM profile_attributes"
        " WHERE project_id = $1 AND native AND value IS NOT NULL",
        project_id,
    ):
        native.setdefault(r["profile_id"], {})[r["name"]] = r["v"]
    installs = await suite.fetch(
        "SELECT i.installation_id, i.profile_id, d.platform, d.app_version, d.push_token,"
        " d.push_opt_in, d.language, d.uninstalled, d.last_seen, d.imported"
        " FROM installations i LEFT JOIN installation_details d"
        " ON d.project_id = i.project_id AND d.installation_id = i.installation_id"
        # An imported installation folded into a device is history (0004), not counted.
        " WHERE i.project_id = $1 AND d.reintegrated_into IS NULL",
        project_id,
    )
    # The installations each profile left, as they were then (ingest's 0057): its language
    # once no installation it holds reported one.
    former: dict[Any, list[Any]] = {}
    for r in await suite.fetch(
        "SELECT profile_id, language, last_seen FROM profile_former_installations"
        " WHERE project_id = $1",
        project_id,
    ):
        former.setdefault(r["profile_id"], []).append(r)
    subscribed: dict[Any, set[str]] = {}
    for r in await suite.fetch(
        "SELECT profile_id, channel, kind FROM profile_subscriptions"
        " WHERE project_id = $1 AND subscribed",
        project_id,
    ):
        subscribed.setdefault(r["profile_id"], set()).add(f"{r['channel']}:{r['kind']}")
    sessions: dict[Any, list[Any]] = {}
    for r in await suite.fetch(
        "SELECT profile_id, country, start_time FROM sessions WHERE project_id = $1", project_id
    ):
        sessions.setdefault(r["profile_id"], []).append(r)
    figures: dict[str, Any] = {
        "installs": 0,
        "tokens": 0,
        "opt_ins": 0,
        "imported_unseen": 0,
        "platforms": {},
        "app_versions": {},
        "identified": 0,
        "anonymous": 0,
        "sessionless": 0,
        "addressable": {},
        "subscribed": {},
        "reach": {"email": 0, "sms": 0, "push": 0},
        "languages": {},
        "regions": {},
        "countries": {},
    }

    def bump(name: str, key: Any) -> None:
        figures[name][key] = figures[name].get(key, 0) + 1

    for r in installs:
        if platform and r["platform"] != platform:
            continue
        figures["installs"] += 1
        figures["tokens"] += r["push_token"] is not None
        figures["opt_ins"] += bool(r["push_opt_in"])
        figures["imported_unseen"] += bool(r["imported"]) and r["push_token"] is not None
        if not r["uninstalled"]:
            bump("platforms", PLATFORM_NAMES[r["platform"]] if r["platform"] else "")
            known = r["app_version"] and r["platform"]
            bump("app_versions", (r["app_version"], r["platform"]) if known else "")
    for profile_id, custom_id in live.items():
        mine = [r for r in installs if r["profile_id"] == profile_id and r["platform"]]
        if platform and not any(r["platform"] == platform for r in mine):
            continue
        figures["identified" if custom_id else "anonymous"] += 1
        if not sessions.get(profile_id):
            figures["sessionless"] += 1
        attributes = native.get(profile_id, {})
        subs = subscribed.get(profile_id, set())
        has_token = any(r["push_token"] is not None for r in mine)
        address = {"email": "email" in attributes, "sms": "phone" in attributes, "push": has_token}
        for channel in ("email", "sms", "push"):
            for kind in ("marketing", "transactional"):
                if address[channel]:
                    bump("addressable", f"{channel}:{kind}")
                    if f"{channel}:{kind}" in subs:
                        bump("subscribed", f"{channel}:{kind}")
        figures["reach"]["email"] += address["email"] and "email:marketing" in subs
        figures["reach"]["sms"] += address["sms"] and "sms:marketing" in subs
        figures["reach"]["push"] += any(
            r["push_token"] is not None and r["push_opt_in"] for r in mine
        )
        languages = sorted((r for r in mine if r["language"]), key=lambda r: r["last_seen"])
        left = sorted(
            (r for r in former.get(profile_id, []) if r["language"]), key=lambda r: r["last_seen"]
        )
        spoken = languages or left  # the installations held first
        language = attributes.get("language") or (spoken[-1]["language"] if spoken else "")
        bump("languages", language)
        bump("regions", attributes.get("region", ""))
        with_country = sorted(
            (s for s in sessions.get(profile_id, []) if s["country"]),
            key=lambda s: s["start_time"],
        )
        bump("countries", with_country[-1]["country"] if with_country else "")
    return figures


def overview_figures(overview: Any) -> dict[str, Any]:
    """GetOverview's answer (with top_values large enough) in direct_overview's shape."""

    def values(breakdown: Any) -> dict[Any, int]:
        found = {v.value: v.count for v in breakdown.top_values}
        if breakdown.unknown_count:
            found[""] = breakdown.unknown_count
        return found

    channels = {1: "email", 2: "sms", 3: "push"}
    kinds = {1: "marketing", 2: "transactional"}
    versions = {(v.value, v.platform): v.count for v in overview.app_versions.top_values}
    if overview.app_versions.unknown_count:
        versions[""] = overview.app_versions.unknown_count
    return {
        "installs": overview.install_count,
        "tokens": overview.push_token_count,
        "opt_ins": overview.push_opt_in_count,
        "imported_unseen": overview.imported_unseen_token_count,
        "platforms": values(overview.platforms),
        "app_versions": versions,
        "identified": overview.identified_profile_count,
        "anonymous": overview.anonymous_profile_count,
        "sessionless": overview.sessionless_profile_count,
        "addressable": {
            f"{channels[r.channel]}:{kinds[r.kind]}": r.addressable_profile_count
            for r in overview.subscription_rates
            if r.addressable_profile_count
        },
        "subscribed": {
            f"{channels[r.channel]}:{kinds[r.kind]}": r.subscribed_profile_count
            for r in overview.subscription_rates
            if r.subscribed_profile_count
        },
        "reach": {channels[r.channel]: r.reachable_profile_count for r in overview.channel_reaches},
        "languages": values(overview.languages),
        "regions": values(overview.regions),
        "countries": values(overview.countries),
    }


async def pages(suite: Suite, rpc: str, request: Any, field: str, between: Any = None) -> list[Any]:
    """Every item over every page of a list RPC; `between` runs after each page (to write
    meanwhile)."""
    items: list[Any] = []
    while True:
        reply = await suite.call(rpc, request)
        items.extend(getattr(reply, field))
        if between is not None:
            await between()
        if not reply.next_page_token:
            return items
        request.page_token = reply.next_page_token
