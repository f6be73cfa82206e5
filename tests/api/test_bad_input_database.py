"""A database connection lost in the middle of a call is transient: UNAVAILABLE (which the client
helper retries for safe RPCs), never INTERNAL; the service goes on serving once it is back."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc
import pytest

from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as pb_grpc
from tests.conftest import TestProject, eventually
from tests.support.bad_input import violations

# The backend of the service's call, waiting for the test's lock on the users table.
WAITING_BACKENDS = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()
      AND query LIKE '%FROM query_profiles q%'"""


async def test_a_connection_lost_mid_call_is_unavailable_and_the_service_recovers(
    start_services: Any, project: TestProject, database_url: str
) -> None:
    stub = pb_grpc.QueryServiceStub((await start_services("query"))["query"].channel)
    metadata = project.metadata("read")
    await stub.ListProfiles(pb.ListProfilesRequest(), metadata=metadata, timeout=10)
    locker = await asyncpg.connect(database_url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE query_profiles IN ACCESS EXCLUSIVE MODE")
            call = asyncio.ensure_future(
                stub.ListProfiles(pb.ListProfilesRequest(), metadata=metadata, timeout=20)
            )

            async def blocked() -> bool:
                # pg_stat_activity is read once per transaction and kept to its end: without
                # clearing that snapshot, a first look taken before the call's statement arrived
                # would be all this transaction ever sees (a flake under load).
                await locker.execute("SELECT pg_stat_clear_snapshot()")
                return bool(await locker.fetch(WAITING_BACKENDS))

            await eventually(blocked)
            await locker.execute(f"SELECT pg_terminate_backend(pid) FROM ({WAITING_BACKENDS}) w")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
    finally:
        await locker.close()
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert violations(raised.value)[0] == "DATABASE_UNAVAILABLE"
    await stub.ListProfiles(pb.ListProfilesRequest(), metadata=metadata, timeout=10)
