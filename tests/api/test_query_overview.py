"""GetOverview: figures after a mixed workload, checked against a direct count of stored data."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import overview_pb2
from profiles.query.v1 import query_service_pb2 as pb
from tests.conftest import create_test_project, eventually
from tests.support.identity import new_id, violations
from tests.support.query import (
    NOW,
    Suite,
    base_event,
    custom_event,
    direct_overview,
    installation_update,
    op,
    overview_figures,
    session_start,
    start_suite,
    subscription,
)

IOS, ANDROID, WEB = types_pb2.PLATFORM_IOS, types_pb2.PLATFORM_ANDROID, types_pb2.PLATFORM_WEB
EMAIL, SMS, PUSH = types_pb2.CHANNEL_EMAIL, types_pb2.CHANNEL_SMS, types_pb2.CHANNEL_PUSH
MARKETING = types_pb2.SUBSCRIPTION_KIND_MARKETING
TRANSACTIONAL = types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL
T = NOW - timedelta(hours=3)


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def attributes(inst: str, platform: int, *operations: Any) -> ingest_pb.Event:
    event = base_event(inst, T + timedelta(minutes=5), platform)
    event.attribute_operations.operations.extend(operations)
    return event


async def workload(suite: Suite) -> dict[str, str]:
    """iOS, Android and Web users; a login that merges, a logout that splits, an uninstall."""
    i = {name: new_id() for name in ("ios", "android", "web", "leaver", "gone")}
    web_visit = custom_event(i["web"], time=T)
    web_visit.platform = WEB
    await suite.track(
        installation_update(
            i["ios"], T, IOS, app_version="1.0", push_token="t1", push_opt_in=True, language="fr"
        ),
        session_start(i["ios"], "s1", T + timedelta(minutes=1), country="FR", platform=IOS),
        attributes(i["ios"], IOS, op("set", "EMAIL", "u1@example.com")),
        subscription(i["ios"], EMAIL, MARKETING, True, T + timedelta(minutes=6)),
        installation_update(
            i["android"],
            T,
            ANDROID,
            app_version="2.0",
            push_token="t2",
            push_opt_in=False,
            language="de",
        ),
        session_start(i["android"], "s2", T + timedelta(minutes=1), country="DE", platform=ANDROID),
        attributes(i["android"], ANDROID, op("set", "PHONE", "+33612345678")),
        subscription(i["android"], SMS, MARKETING, False, T + timedelta(minutes=6)),
        subscription(i["android"], SMS, TRANSACTIONAL, True, T + timedelta(minutes=6)),
        web_visit,
        session_start(i["leaver"], "s4", T, platform=IOS),
        installation_update(i["gone"], T, IOS, uninstalled=True),
    )
    # The subscription helper sends as iOS; put the Android installation back on its platform.
    await suite.track(
        installation_update(i["android"], T + timedelta(minutes=7), ANDROID, app_version="2.0")
    )
    await suite.identity.identify(i["ios"], "u1")
    await suite.identity.identify(i["web"], "u1")  # merges the web visitor into u1
    await suite.identity.identify(i["leaver"], "u4")
    await suite.identity.logout(i["leaver"])  # u4 keeps its history, the device starts afresh
    return i


def breakdown(b: overview_pb2.Breakdown) -> tuple[list[tuple[str, int]], int, int]:
    return [(v.value, v.count) for v in b.top_values], b.other_count, b.unknown_count


async def test_the_overview_after_a_mixed_workload(suite: Suite) -> None:
    await workload(suite)
    await suite.settle()
    overview = (await suite.call("GetOverview", pb.GetOverviewRequest())).overview
    assert overview.install_count == 5
    assert overview.push_token_count == 2
    assert overview.push_opt_in_count == 1
    assert overview.push_opt_in_rate == pytest.approx(0.2)
    assert overview.identified_profile_count == 2
    assert overview.anonymous_profile_count == 3
    assert overview.sessionless_profile_count == 2
    rates = {
        (r.channel, r.kind): (r.addressable_profile_count, r.subscribed_profile_count)
        for r in overview.subscription_rates
    }
    assert rates == {
        (EMAIL, MARKETING): (1, 1),
        (EMAIL, TRANSACTIONAL): (1, 0),
        (SMS, MARKETING): (1, 0),
        (SMS, TRANSACTIONAL): (1, 1),
        (PUSH, MARKETING): (2, 0),
        (PUSH, TRANSACTIONAL): (2, 0),
    }
    assert {r.channel: r.reachable_profile_count for r in overview.channel_reaches} == {
        EMAIL: 1,
        SMS: 0,
        PUSH: 1,
    }
    assert breakdown(overview.platforms) == (
        [("PLATFORM_IOS", 2), ("PLATFORM_ANDROID", 1), ("PLATFORM_WEB", 1)],
        0,
        0,
    )
    assert breakdown(overview.languages) == ([("de", 1), ("fr", 1)], 0, 3)
    assert breakdown(overview.countries) == ([("DE", 1), ("FR", 1)], 0, 3)
    assert [(v.value, v.platform) for v in overview.app_versions.top_values] == [
        ("1.0", IOS),
        ("2.0", ANDROID),
    ]
    assert overview.app_versions.unknown_count == 2
    assert [s.segment for s in overview.smart_segments] == [1, 2, 3, 4]

    ios = (await suite.call("GetOverview", pb.GetOverviewRequest(platform=IOS))).overview
    assert (ios.install_count, ios.push_token_count, ios.push_opt_in_count) == (3, 1, 1)
    assert (ios.identified_profile_count, ios.anonymous_profile_count) == (1, 2)

    top = (await suite.call("GetOverview", pb.GetOverviewRequest(top_values=1))).overview
    assert breakdown(top.platforms) == ([("PLATFORM_IOS", 2)], 2, 0)


async def test_the_overview_equals_a_direct_count_of_the_stored_data(suite: Suite) -> None:
    await workload(suite)
    await suite.settle()
    project_id = suite.project.project_id
    overview = (await suite.call("GetOverview", pb.GetOverviewRequest())).overview
    direct = {
        "installs": "SELECT count(*) FROM installations WHERE project_id = $1",
        "tokens": "SELECT count(*) FROM installation_details WHERE project_id = $1"
        " AND push_token IS NOT NULL",
        "opt_ins": "SELECT count(*) FROM installation_details WHERE project_id = $1"
        " AND push_opt_in",
        "identified": "SELECT count(*) FROM profiles WHERE project_id = $1"
        " AND merged_into IS NULL AND custom_id IS NOT NULL",
        "anonymous": "SELECT count(*) FROM profiles WHERE project_id = $1"
        " AND merged_into IS NULL AND custom_id IS NULL",
        "with_email": "SELECT count(*) FROM profile_attributes WHERE project_id = $1"
        " AND native AND name = 'email' AND value IS NOT NULL",
        "sessionless": "SELECT count(*) FROM profiles p WHERE project_id = $1"
        " AND merged_into IS NULL AND NOT EXISTS (SELECT 1 FROM sessions s"
        " WHERE s.project_id = p.project_id AND s.profile_id = p.profile_id)",
    }
    counts = {name: await suite.fetchval(sql, project_id) for name, sql in direct.items()}
    assert overview.install_count == counts["installs"]
    assert overview.push_token_count == counts["tokens"]
    assert overview.push_opt_in_count == counts["opt_ins"]
    assert overview.identified_profile_count == counts["identified"]
    assert overview.anonymous_profile_count == counts["anonymous"]
    assert overview.sessionless_profile_count == counts["sessionless"]
    email = next(r for r in overview.subscription_rates if r.channel == EMAIL)
    assert email.addressable_profile_count == counts["with_email"]


async def test_the_overview_of_another_project_is_empty_and_bad_requests_fail(
    suite: Suite,
) -> None:
    await workload(suite)
    await suite.settle()
    other = await create_test_project(suite.database_url)
    theirs = await suite.query.GetOverview(
        pb.GetOverviewRequest(), metadata=other.metadata("read"), timeout=10
    )
    assert theirs.overview.install_count == 0
    assert theirs.overview.identified_profile_count == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call("GetOverview", pb.GetOverviewRequest(top_values=-1))
    assert violations(caught.value) == ["top_values"]


async def test_the_rollups_equal_a_direct_count_after_merges_splits_deletions_and_time(
    suite: Suite,
) -> None:
    i = await workload(suite)
    more = {name: new_id() for name in ("a", "b", "c", "d")}
    await suite.track(
        installation_update(more["a"], T, ANDROID, app_version="3.1", language="es"),
        session_start(more["a"], "sa", T, country="ES", platform=ANDROID),
        attributes(more["a"], ANDROID, op("set", "EMAIL", "a@example.com")),
        subscription(more["a"], EMAIL, MARKETING, True, T + timedelta(minutes=6)),
        installation_update(more["b"], T, WEB, language="it"),
        session_start(more["b"], "sb", T, country="IT", platform=WEB),
        installation_update(more["c"], T, IOS, push_token="t3", push_opt_in=True),
        attributes(more["c"], IOS, op("set", "REGION", "BE"), op("set", "PHONE", "+32470000000")),
        subscription(more["c"], SMS, MARKETING, True, T + timedelta(minutes=6)),
        custom_event(more["d"], time=T),
    )
    platforms = (0, IOS, ANDROID, WEB)

    async def check() -> None:
        await suite.settle()
        for platform in platforms:
            reply = await suite.call(
                "GetOverview", pb.GetOverviewRequest(platform=platform, top_values=100)
            )
            assert overview_figures(reply.overview) == await direct_overview(suite, platform), (
                platform
            )

    await check()
    # Days pass; the Android user comes back elsewhere, logs in as u1 (a merge into u1) and the
    # web visitor logs in as u5, then out (a split).
    suite.clock.advance(timedelta(days=3))
    later = NOW + timedelta(days=3)
    await suite.track(
        session_start(more["a"], "sa2", later, country="PT", platform=ANDROID),
        installation_update(more["a"], later, ANDROID, app_version="3.2", push_token="t4"),
    )
    await suite.identity.identify(more["a"], "u1")
    await suite.identity.identify(more["b"], "u5")
    await suite.identity.logout(more["b"])
    await check()
    # An operator merges c into d, erases u1 (with everything merged into it), and u4 opts out.
    suite.clock.advance(timedelta(days=20))
    c_profile = await suite.identity.profile_of(more["c"])
    d_profile = await suite.identity.profile_of(more["d"])
    await suite.identity.merge(c_profile, d_profile)
    await suite.identity.delete(await suite.identity.profile_of_custom_id("u1"))
    await suite.track(
        subscription(i["android"], SMS, MARKETING, True, later + timedelta(days=20)),
        installation_update(i["gone"], later + timedelta(days=20), IOS, uninstalled=False),
    )
    await check()
    # Replaying every retained entry changes nothing: a recount is exact, not a delta.
    before = await suite.fetch(
        "SELECT platform, metric, value, count FROM query_counters WHERE project_id = $1"
        " ORDER BY 1, 2, 3",
        suite.project.project_id,
    )
    await suite.replay_rollups()
    await check()
    after = await suite.fetch(
        "SELECT platform, metric, value, count FROM query_counters WHERE project_id = $1"
        " ORDER BY 1, 2, 3",
        suite.project.project_id,
    )
    assert after == before


async def test_an_imported_token_a_device_picks_up_counts_once(suite: Suite) -> None:
    tokens = [
        ingest_pb.ImportedToken(platform=IOS, push_token="apns-a", push_opt_in=True),
        ingest_pb.ImportedToken(platform=ANDROID, push_token="fcm-b", push_opt_in=True),
        # Imported for custom ID u7; the device that picks it up logs in as u8: no merge.
        ingest_pb.ImportedToken(
            platform=IOS, push_token="apns-c", push_opt_in=True, custom_id="u7"
        ),
    ]
    imported = await suite.ingest.ImportTokens(
        ingest_pb.ImportTokensRequest(tokens=tokens),
        metadata=suite.project.metadata("admin"),
        timeout=20,
    )
    assert imported.imported_count == 3

    async def figures(platform: int) -> tuple[int, ...]:
        reply = await suite.call("GetOverview", pb.GetOverviewRequest(platform=platform))
        o = reply.overview
        return (
            o.install_count,
            o.push_token_count,
            o.push_opt_in_count,
            o.imported_unseen_token_count,
            o.identified_profile_count,
            o.anonymous_profile_count,
        )

    await suite.settle()
    # installs, tokens, opt-ins, imported unseen, identified, anonymous
    assert await figures(0) == (3, 3, 3, 3, 1, 2)
    assert await figures(IOS) == (2, 2, 2, 2, 1, 1)
    assert await figures(ANDROID) == (1, 1, 1, 1, 0, 1)

    device, other = new_id(), new_id()
    await suite.identity.identify(other, "u8")
    await suite.track(
        installation_update(device, T, IOS, push_token="apns-a", push_opt_in=True),
        session_start(device, "s1", T + timedelta(minutes=1), platform=IOS),
        installation_update(other, T, IOS, push_token="apns-c", push_opt_in=True),
        session_start(other, "s2", T + timedelta(minutes=1), platform=IOS),
    )

    async def folded() -> bool:
        found = await suite.fetchval(
            "SELECT count(*) FROM installation_details"
            " WHERE project_id = $1 AND reintegrated_into IS NOT NULL",
            suite.project.project_id,
        )
        return bool(found == 2)

    await eventually(folded)
    await suite.settle()
    # Each iOS device counts once, as itself; the imported Android token is still unseen. The
    # imported anonymous profile went into the device's; u7 stays apart from u8, with no
    # installation of its own left.
    assert await figures(0) == (3, 3, 3, 1, 2, 2)
    assert await figures(IOS) == (2, 2, 2, 0, 1, 1)
    assert await figures(ANDROID) == (1, 1, 1, 1, 0, 1)
    for platform in (0, IOS, ANDROID, WEB):
        reply = await suite.call(
            "GetOverview", pb.GetOverviewRequest(platform=platform, top_values=100)
        )
        assert overview_figures(reply.overview) == await direct_overview(suite, platform), platform


async def test_an_imported_token_not_yet_seen_is_not_the_profiles_device(suite: Suite) -> None:
    # The users table's device is the profile's most recently seen installation; an imported
    # token's "last seen" is its import, later than any visit, and was shown as the device.
    phone = new_id()
    await suite.identity.identify(phone, "u-device")
    await suite.track(
        installation_update(phone, T, ANDROID, device_model="Pixel 8"),
        session_start(phone, "s1", T + timedelta(minutes=1), platform=ANDROID),
    )
    imported = await suite.ingest.ImportTokens(
        ingest_pb.ImportTokensRequest(
            tokens=[
                ingest_pb.ImportedToken(
                    platform=IOS, push_token="apns-u", push_opt_in=True, custom_id="u-device"
                )
            ]
        ),
        metadata=suite.project.metadata("admin"),
        timeout=20,
    )
    assert imported.imported_count == 1
    await suite.settle()
    reply = await suite.call("ListProfiles", pb.ListProfilesRequest(page_size=500))
    (row,) = [r for r in reply.profiles if r.custom_id == "u-device"]
    assert (row.platform, row.device_model) == (ANDROID, "Pixel 8")


async def test_the_users_table_shows_each_persons_email_and_an_unset_empties_it(
    suite: Suite,
) -> None:
    ana, namesake = new_id(), new_id()
    await suite.track(
        attributes(ana, IOS, op("set", "FIRST_NAME", "Ana"), op("set", "EMAIL", "Ana@Example.com")),
        attributes(namesake, IOS, op("set", "FIRST_NAME", "Ana")),
    )
    await suite.settle()

    async def emails() -> dict[str, str]:
        reply = await suite.call("ListProfiles", pb.ListProfilesRequest(page_size=500))
        return {r.profile_id: r.email for r in reply.profiles if r.first_name == "Ana"}

    ana_id = (await suite.get(installation_id=ana)).profile.summary.profile_id
    namesake_id = (await suite.get(installation_id=namesake)).profile.summary.profile_id
    assert await emails() == {ana_id: "ana@example.com", namesake_id: ""}
    unset = attributes(ana, IOS, op("unset", "EMAIL"))
    unset.event_time.FromDatetime(T + timedelta(minutes=6))
    await suite.track(unset)
    await suite.settle()
    assert await emails() == {ana_id: "", namesake_id: ""}
