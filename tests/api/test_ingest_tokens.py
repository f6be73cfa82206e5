"""ImportTokens: push tokens from a previous provider become imported installations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from redis.asyncio import Redis

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from shared.bus import Bus, decode_entry
from shared.clock import FrozenClock
from shared.topics import IDENTITY
from tests.conftest import eventually
from tests.support.ingest import NOW, Ingest, stamp
from tests.support.ingest_running import running_ingest, session_event

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.conftest import TestProject

IOS, ANDROID, WEB = types_pb2.PLATFORM_IOS, types_pb2.PLATFORM_ANDROID, types_pb2.PLATFORM_WEB
IMPORTED, KNOWN, REJECTED = (
    pb.TOKEN_OUTCOME_IMPORTED,
    pb.TOKEN_OUTCOME_ALREADY_KNOWN,
    pb.TOKEN_OUTCOME_REJECTED,
)


@pytest.fixture
async def ingest(
    start_services: Any, settings_for_test: Settings, project: TestProject, database_url: str
) -> AsyncIterator[Ingest]:
    handles = await start_services("identity")
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    async with running_ingest(settings, FrozenClock(NOW)) as channel:
        yield Ingest(
            pb_grpc.IngestServiceStub(channel),
            project.metadata("sdk"),
            project.metadata("admin"),
            database_url,
        )


async def import_tokens(ingest: Ingest, *tokens: pb.ImportedToken) -> pb.ImportTokensResponse:
    return await ingest.stub.ImportTokens(
        pb.ImportTokensRequest(tokens=tokens), metadata=ingest.admin, timeout=20
    )


async def identity_messages(redis_url: str, prefix: str) -> list[Any]:
    client = Redis.from_url(redis_url)
    try:
        entries = await client.xrange(Bus(client, prefix).stream_key(IDENTITY.name))
    finally:
        await client.aclose()
    return [decode_entry(IDENTITY, fields)[1] for _, fields in entries]


async def test_new_tokens_become_imported_installations_and_a_rerun_changes_nothing(
    ingest: Ingest, redis_url: str, redis_prefix: str
) -> None:
    tokens = [
        pb.ImportedToken(platform=IOS, push_token="apns-1", push_opt_in=True),
        pb.ImportedToken(platform=ANDROID, push_token="fcm-1"),
        pb.ImportedToken(platform=WEB, push_token="apns-1"),  # same token, other platform
        pb.ImportedToken(platform=IOS, push_token="apns-1"),  # repeated in the request
        pb.ImportedToken(platform=types_pb2.PLATFORM_API, push_token="x"),
        pb.ImportedToken(platform=IOS, push_token=""),
        pb.ImportedToken(platform=IOS, push_token="apns-2", custom_id="null"),
    ]
    reply = await import_tokens(ingest, *tokens)
    assert [r.outcome for r in reply.results] == [IMPORTED] * 3 + [KNOWN] + [REJECTED] * 3
    assert [r.reason for r in reply.results[4:]] == [
        "PLATFORM_INVALID",
        "PUSH_TOKEN_INVALID",
        "CUSTOM_ID_INVALID",
    ]
    assert (reply.imported_count, reply.already_known_count, reply.rejected_count) == (3, 1, 3)
    first = reply.results[0]
    assert first.installation_id.startswith("imported:ios:")
    assert "apns-1" not in first.installation_id
    assert reply.results[3].installation_id == first.installation_id
    assert len({r.profile_id for r in reply.results[:3]}) == 3  # one anonymous profile each

    rows = await ingest.fetch(
        "SELECT d.installation_id, d.platform, d.push_token, d.push_opt_in, d.imported,"
        " i.profile_id::text FROM installation_details d JOIN installations i"
        " USING (project_id, installation_id) ORDER BY d.platform"
    )
    assert [(r["platform"], r["push_token"], r["push_opt_in"], r["imported"]) for r in rows] == [
        (IOS, "apns-1", True, True),
        (ANDROID, "fcm-1", False, True),
        (WEB, "apns-1", False, True),
    ]
    assert rows[0]["profile_id"] == first.profile_id

    again = await import_tokens(ingest, *tokens[:3])
    assert [r.outcome for r in again.results] == [KNOWN] * 3
    assert [r.installation_id for r in again.results] == [
        r.installation_id for r in reply.results[:3]
    ]

    async def imported_message() -> list[bus_pb2.InstallationsImported]:
        messages = await identity_messages(redis_url, redis_prefix)
        return [m for m in messages if isinstance(m, bus_pb2.InstallationsImported)]

    async def published() -> bool:
        return len(await imported_message()) == 1

    await eventually(published)
    (message,) = await imported_message()
    assert sorted(i.installation_id for i in message.installations) == sorted(
        r.installation_id for r in reply.results[:3]
    )
    assert "apns-1" not in str(message)


async def test_a_token_an_sdk_installation_holds_is_already_known(ingest: Ingest) -> None:
    update = pb.Event(
        event_id="u1",
        installation_id="device-1",
        platform=IOS,
        event_time=stamp(NOW),
    )
    update.installation_update.push_token = "apns-live"
    assert (await ingest.track(update)).accepted_count == 1
    reply = await import_tokens(ingest, pb.ImportedToken(platform=IOS, push_token="apns-live"))
    assert reply.results[0].outcome == KNOWN
    assert reply.results[0].installation_id == "device-1"


async def test_a_token_with_a_custom_id_lands_on_that_custom_ids_identified_profile(
    ingest: Ingest,
) -> None:
    reply = await import_tokens(
        ingest,
        pb.ImportedToken(platform=IOS, push_token="apns-3", custom_id="user-7"),
        pb.ImportedToken(platform=ANDROID, push_token="fcm-3", custom_id="user-7"),
        pb.ImportedToken(platform=IOS, push_token="apns-4", custom_id=" user-7"),  # padded
    )
    assert [r.outcome for r in reply.results] == [IMPORTED, IMPORTED, REJECTED]
    assert reply.results[2].reason == "CUSTOM_ID_INVALID"  # identity's rule
    assert reply.results[0].profile_id == reply.results[1].profile_id
    rows = await ingest.fetch(
        "SELECT custom_id FROM profiles WHERE profile_id = $1::uuid", reply.results[0].profile_id
    )
    assert [r["custom_id"] for r in rows] == ["user-7"]
    # A server-side event for the custom ID lands on the same profile.
    server_side = pb.Event(event_id="s1", custom_id="user-7", platform=types_pb2.PLATFORM_API)
    server_side.event_time.CopyFrom(stamp(NOW))
    server_side.custom.name = "renewed"
    tracked = await ingest.track(server_side)
    assert tracked.results[0].profile_id == reply.results[0].profile_id
    again = await import_tokens(
        ingest, pb.ImportedToken(platform=IOS, push_token="apns-3", custom_id="user-7")
    )
    assert again.results[0].outcome == KNOWN


def token_update(installation_id: str, token: str, event_id: str) -> pb.Event:
    event = pb.Event(
        event_id=event_id, installation_id=installation_id, platform=IOS, event_time=stamp(NOW)
    )
    event.installation_update.push_token = token
    return event


async def reintegrated_messages(
    redis_url: str, prefix: str
) -> list[bus_pb2.InstallationReintegrated]:
    messages = await identity_messages(redis_url, prefix)
    return [m for m in messages if isinstance(m, bus_pb2.InstallationReintegrated)]


async def test_the_first_session_with_an_imported_token_folds_the_imported_installation(
    ingest: Ingest, redis_url: str, redis_prefix: str
) -> None:
    imported = (
        await import_tokens(ingest, pb.ImportedToken(platform=IOS, push_token="apns-9"))
    ).results[0]
    # The token alone (no session yet) folds nothing.
    await ingest.track(token_update("device-9", "apns-9", "u1"))
    rows = await ingest.fetch("SELECT imported FROM installation_details WHERE imported")
    assert len(rows) == 1
    first = await ingest.track(session_event("start", "device-9", "s1", NOW, event_id="st1"))
    device_profile = first.results[0].profile_id
    assert device_profile != imported.profile_id

    rows = await ingest.fetch(
        "SELECT installation_id, imported, push_token, reintegrated_into"
        " FROM installation_details ORDER BY installation_id"
    )
    assert [tuple(r) for r in rows] == [
        ("device-9", False, "apns-9", None),
        (imported.installation_id, False, None, "device-9"),
    ]
    # Same rules as a merge: the imported anonymous profile went into the device's profile.
    links = await ingest.fetch(
        "SELECT i.installation_id, i.profile_id::text, p.merged_into::text AS merged_into"
        " FROM installations i JOIN profiles p ON p.project_id = i.project_id"
        " AND p.profile_id = $1::uuid ORDER BY 1",
        imported.profile_id,
    )
    assert {r["profile_id"] for r in links} == {device_profile}
    assert {r["merged_into"] for r in links} == {device_profile}

    async def one_message() -> bool:
        return len(await reintegrated_messages(redis_url, redis_prefix)) == 1

    await eventually(one_message)
    # A later session, or the same batch again, folds nothing twice.
    await ingest.track(session_event("start", "device-9", "s2", NOW, event_id="st2"))
    await ingest.track(session_event("start", "device-9", "s1", NOW, event_id="st1"))
    (message,) = await reintegrated_messages(redis_url, redis_prefix)
    assert (message.imported_installation_id, message.installation_id) == (
        imported.installation_id,
        "device-9",
    )
    assert (message.imported_profile_id, message.profile_id) == (
        imported.profile_id,
        device_profile,
    )
    assert "apns-9" not in str(message)
    # The token is the device's now.
    known = await import_tokens(ingest, pb.ImportedToken(platform=IOS, push_token="apns-9"))
    assert (known.results[0].outcome, known.results[0].installation_id) == (KNOWN, "device-9")


async def test_an_anonymous_device_joins_the_identified_profile_of_its_imported_token(
    ingest: Ingest, redis_url: str, redis_prefix: str
) -> None:
    imported = (
        await import_tokens(
            ingest, pb.ImportedToken(platform=IOS, push_token="apns-8", custom_id="user-8")
        )
    ).results[0]
    reply = await ingest.track(
        token_update("device-8", "apns-8", "u1"),
        session_event("start", "device-8", "s1", NOW, event_id="st1"),
    )
    assert reply.accepted_count == 2
    rows = await ingest.fetch(
        "SELECT i.profile_id::text, p.custom_id FROM installations i JOIN profiles p"
        " USING (project_id, profile_id) WHERE i.installation_id = 'device-8'"
    )
    assert [tuple(r) for r in rows] == [(imported.profile_id, "user-8")]
    events = await ingest.fetch("SELECT DISTINCT profile_id::text FROM events")
    assert [r["profile_id"] for r in events] == [imported.profile_id]

    async def folded() -> bool:
        return len(await reintegrated_messages(redis_url, redis_prefix)) == 1

    await eventually(folded)
    (message,) = await reintegrated_messages(redis_url, redis_prefix)
    assert message.profile_id == imported.profile_id


async def test_import_tokens_is_for_admins_and_refuses_empty_requests(ingest: Ingest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await ingest.stub.ImportTokens(
            pb.ImportTokensRequest(tokens=[pb.ImportedToken(platform=IOS, push_token="t")]),
            metadata=ingest.metadata,
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await import_tokens(ingest)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
