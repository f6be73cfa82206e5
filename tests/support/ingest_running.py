"""Helpers (no tests) for the newer ingest API tests: an ingest started with its own build
options, session events, and reading the events stream back from Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import grpc
from redis.asyncio import Redis

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from services.ingest.app import make_build
from shared.bus import Bus, decode_entry
from shared.clock import Clock
from shared.server import start_service
from shared.settings import Settings
from shared.topics import EVENTS
from tests.support.ingest import stamp


@asynccontextmanager
async def running_ingest(
    settings: Settings, clock: Clock, *, sweep_interval_s: float = 0.05
) -> AsyncIterator[grpc.aio.Channel]:
    """Ingest in-process with a fast session sweeper; `settings` must point at an identity."""
    running = await start_service(
        "ingest",
        settings,
        make_build(sweep_interval_s=sweep_interval_s),
        port=0,
        clock=clock,
        metrics=False,
    )
    channel = grpc.aio.insecure_channel(running.address)
    try:
        yield channel
    finally:
        await channel.close()
        await running.stop(grace=1.0)


def session_event(
    kind: str,
    installation_id: str,
    session_id: str,
    time: datetime,
    *,
    event_id: str | None = None,
    duration: timedelta | None = None,
    country: str = "",
    client_ip: str = "",
    platform: int = types_pb2.PLATFORM_IOS,
) -> pb.Event:
    event = pb.Event(
        event_id=event_id or f"{kind}-{session_id}-{time.isoformat()}",
        installation_id=installation_id,
        platform=platform,  # type: ignore[arg-type]
        event_time=stamp(time),
        session_id=session_id,
    )
    if kind == "start":
        event.session_start.country = country
        event.session_start.client_ip = client_ip
        event.session_start.SetInParent()
    elif kind == "heartbeat":
        event.session_heartbeat.duration.FromTimedelta(duration or timedelta(0))
    elif kind == "end":
        event.session_end.duration.FromTimedelta(duration or timedelta(0))
    else:
        event.custom.name = kind
    return event


async def stream_events(redis_url: str, prefix: str) -> list[bus_pb2.IngestedEvent]:
    """Every IngestedEvent published so far on the events stream, in stream order."""
    client = Redis.from_url(redis_url)
    try:
        bus = Bus(client, prefix)
        entries: list[Any] = await client.xrange(bus.stream_key(EVENTS.name))
    finally:
        await client.aclose()
    found: list[bus_pb2.IngestedEvent] = []
    for _, fields in entries:
        _, message = decode_entry(EVENTS, fields)
        assert isinstance(message, bus_pb2.EventsIngested)
        found.extend(message.events)
    return found
