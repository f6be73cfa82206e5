"""Fixtures of the edge tests: ingest, identity and query started in-process on free ports, and
the edge's real uvicorn server on a socket of its own, pointed at them; one Chromium for the
browser SDK tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from services.edge.app import server as edge_server
from services.edge.handlers import REQUESTS
from shared.settings import Settings
from tests.conftest import StartServices, TestProject, eventually
from tests.support.browser import chromium


@dataclass(slots=True)
class Edge:
    """A running edge and what a test needs around it."""

    url: str
    settings: Settings
    project: TestProject
    query: query_grpc.QueryServiceStub
    restart_ingest: Callable[[], Awaitable[None]]
    stop_ingest: Callable[[], Awaitable[None]]

    @property
    def sdk_key(self) -> str:
        return self.project.keys["sdk"]

    def read(self) -> tuple[tuple[str, str], ...]:
        return self.project.metadata("read")

    async def profile(self, **lookup: str) -> Any:
        reply = await self.query.GetProfile(
            query_pb.GetProfileRequest(**lookup), metadata=self.read()
        )
        return reply.profile

    async def stored_profile(self, **lookup: str) -> Any | None:
        """The profile, or None while it is not stored yet (NOT_FOUND); any other failure
        raises, so that a poll on it fails with its cause, not a timeout."""
        try:
            return await self.profile(**lookup)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def events(self, profile_id: str) -> list[Any]:
        reply = await self.query.ListEvents(
            query_pb.ListEventsRequest(profile_id=profile_id, page_size=500), metadata=self.read()
        )
        return list(reply.events)

    async def sessions(self, profile_id: str) -> list[Any]:
        reply = await self.query.ListSessions(
            query_pb.ListSessionsRequest(profile_id=profile_id, page_size=500),
            metadata=self.read(),
        )
        return list(reply.sessions)

    async def rejected(self) -> list[Any]:
        reply = await self.query.ListRejectedEvents(
            query_pb.ListRejectedEventsRequest(page_size=500), metadata=self.read()
        )
        return list(reply.rejected_events)


async def serve_edge(settings: Settings) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Starts the edge's uvicorn server on a free port; returns its URL and a stopper."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = edge_server(settings, port=port)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(10):
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes no event for it
            await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await task
        sock.close()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="package")
async def browser() -> AsyncIterator[Any]:
    """One Chromium for the edge tests that drive the browser SDKs (test_browser_sdks.py,
    test_countly_views_and_reads.py); each test's visitor gets a context of its own."""
    async with chromium() as launched:
        yield launched


@pytest.fixture
async def edge(
    start_services: StartServices, settings_for_test: Settings, project: TestProject
) -> AsyncIterator[Edge]:
    # Query calls no other service: it starts beside identity, whose address ingest needs.
    identity, query = await asyncio.gather(start_services("identity"), start_services("query"))
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": identity["identity"].address}
    )
    rest = await start_services("ingest", settings=settings)
    ingest_port = int(rest["ingest"].address.rsplit(":", 1)[1])
    settings = settings.with_changes(
        addresses={**settings.addresses, "ingest": rest["ingest"].address}
    )
    ingest = {"running": rest["ingest"].running}

    async def stop_ingest() -> None:
        await ingest["running"].stop(grace=1.0)  # type: ignore[attr-defined]

    async def restart_ingest() -> None:
        from profiles_cli.runner import BUILDERS
        from shared.server import start_service

        ingest["running"] = await start_service(
            "ingest", settings, BUILDERS["ingest"], port=ingest_port, metrics=False
        )

    url, stop = await serve_edge(settings)
    try:
        yield Edge(
            url=url,
            settings=settings,
            project=project,
            query=query_grpc.QueryServiceStub(query["query"].channel),
            restart_ingest=restart_ingest,
            stop_ingest=stop_ingest,
        )
    finally:
        await stop()
        if ingest["running"] is not rest["ingest"].running:
            await ingest["running"].stop(grace=1.0)  # type: ignore[attr-defined]


__all__ = ["Edge", "eventually"]


async def flush(client: Any) -> None:
    """Sends an SDK client's queue. The SDK blocks its caller until its queue is sent; the edge
    runs on this test's loop."""
    await asyncio.to_thread(client.flush)


async def custom_names(edge: Edge, profile_id: str) -> list[str]:
    """The names of a profile's custom events, sorted."""
    return sorted(e.custom.name for e in await edge.events(profile_id) if e.HasField("custom"))


async def assert_stored_once(edge: Edge, installation_id: str, name: str, count: int = 3) -> None:
    """Waits for `count` custom events of the installation's profile, then checks they are
    exactly `count` events `name`: none stored twice."""

    async def stored() -> bool:
        profile = await edge.profile(installation_id=installation_id)
        return len(await custom_names(edge, profile.summary.profile_id)) >= count

    await eventually(stored)
    profile = await edge.profile(installation_id=installation_id)
    assert await custom_names(edge, profile.summary.profile_id) == [name] * count


async def assert_sent_during_outage_arrives(
    edge: Edge,
    dialect: str,
    send: Callable[[], Awaitable[None]],
    installation_id: str,
    names: list[str],
) -> None:
    """Stops ingest, has `send` send with an SDK (which retries while the edge answers
    unavailable), restarts ingest, and waits for the installation's events `names`."""
    refused = REQUESTS.labels(dialect, "unavailable")
    before = refused._value.get()
    await edge.stop_ingest()
    flushing = asyncio.create_task(send())

    async def answered_unavailable() -> bool:
        return refused._value.get() > before

    await eventually(answered_unavailable)
    await edge.restart_ingest()
    await asyncio.wait_for(flushing, 30)

    async def arrived() -> bool:
        profile = await edge.profile(installation_id=installation_id)
        return await custom_names(edge, profile.summary.profile_id) == names

    await eventually(arrived)


async def assert_lost_answer_is_retried(
    edge: Edge, dialect: str, send: Callable[[str], Awaitable[None]], installation_id: str
) -> None:
    """Has `send` send three events "Lost Answer" through a proxy (its URL) that loses the
    edge's first answer: the SDK retries the same batch, which is stored once."""
    answered = REQUESTS.labels(dialect, "ok")
    before = answered._value.get()
    async with LossyProxy(edge.url, drops=1) as proxy:
        await send(proxy.url)
        assert proxy.drops == 0  # the first attempt was stored, its answer lost, then retried
    assert answered._value.get() - before == 2  # the same batch, twice
    await assert_stored_once(edge, installation_id, "lost_answer")


class LossyProxy:
    """A TCP proxy in front of the edge that lets the first `drops` requests reach it and then
    cuts their connection before the answer gets back: the SDK sees a lost answer for data the
    edge stored, and retries the same batch."""

    def __init__(self, target_url: str, drops: int) -> None:
        self._target = target_url.removeprefix("http://").rsplit(":", 1)
        self.drops = drops
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self._target
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()

        upstream = asyncio.create_task(pump(reader, up_writer))
        try:
            if self.drops > 0:
                first = await up_reader.read(65536)  # the edge answered: the data is stored
                if first:
                    self.drops -= 1
                return
            await pump(up_reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            upstream.cancel()
            up_writer.close()
            writer.close()
