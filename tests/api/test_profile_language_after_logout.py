"""A person's language, time zone and device outlive their last device's logout: a profile with
no installation left that reported one takes them from the installations it left, each as it
was when it left (ingest's profile_former_installations), after the attribute and the
installations it holds. GetProfile, ListProfiles(language=) and the overview's language
breakdown agree on it through merges, a second login and an erasure."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

from profiles.common.v1 import types_pb2
from profiles.query.v1 import query_service_pb2 as pb
from tests.conftest import eventually
from tests.support.identity import export_document, new_id
from tests.support.query import (
    NOW,
    Suite,
    installation_update,
    overview_figures,
    pages,
    session_start,
    start_suite,
)

ANDROID, IOS = types_pb2.PLATFORM_ANDROID, types_pb2.PLATFORM_IOS


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


async def device(
    suite: Suite, installation_id: str, hours_ago: float, platform: int = ANDROID, **fields: Any
) -> None:
    """A device reporting its details, then a session, `hours_ago` before NOW."""
    time = NOW - timedelta(hours=hours_ago)
    await suite.track(
        installation_update(installation_id, time, platform, **fields),
        session_start(installation_id, new_id(), time + timedelta(seconds=1), platform=platform),
    )


async def log_in(suite: Suite, installation_id: str, custom_id: str) -> str:
    """Identify on a device; the custom ID's profile (a merge when someone held it already)."""
    await suite.identity.identify(installation_id, custom_id)
    return await suite.identity.profile_of_custom_id(custom_id)


async def languages_agree(suite: Suite) -> dict[str, str]:
    """Every live profile's language as GetProfile shows it, once the bus is drained; the
    overview's breakdown counts them so and ListProfiles(language=) lists them so."""
    await suite.settle()
    rows = await pages(suite, "ListProfiles", pb.ListProfilesRequest(page_size=100), "profiles")
    shown = {
        r.profile_id: (await suite.get(profile_id=r.profile_id)).profile.summary.language
        for r in rows
    }
    overview = (await suite.call("GetOverview", pb.GetOverviewRequest(top_values=100))).overview
    assert overview_figures(overview)["languages"] == dict(Counter(shown.values()))
    for language in set(shown.values()) - {""}:
        listed = await pages(
            suite,
            "ListProfiles",
            pb.ListProfilesRequest(language=language, page_size=100),
            "profiles",
        )
        assert sorted(r.profile_id for r in listed) == sorted(
            p for p, spoken in shown.items() if spoken == language
        ), language
    return shown


async def row_of(suite: Suite, profile_id: str) -> pb.ProfileRow:
    rows = await pages(suite, "ListProfiles", pb.ListProfilesRequest(page_size=100), "profiles")
    (row,) = [r for r in rows if r.profile_id == profile_id]
    return row


async def test_a_logged_out_customer_keeps_language_time_zone_and_device(suite: Suite) -> None:
    # The customer's account exists (another device signed up), then they log in on a phone
    # (its anonymous profile merges into the account) and out again.
    laptop, phone = new_id(), new_id()
    customer = await log_in(suite, laptop, "ann")
    await device(suite, phone, 2, language="fr", timezone="Europe/Paris", device_model="Pixel 8")
    assert await log_in(suite, phone, "ann") == customer
    await suite.identity.identify(laptop, "someone-else")  # the laptop moves away (rule 4)
    logged_out = await suite.identity.logout(phone)
    anonymous = logged_out.profile_id

    profile = (await suite.get(profile_id=customer)).profile
    assert list(profile.installations) == []
    assert (profile.summary.language, profile.summary.timezone) == ("fr", "Europe/Paris")
    shown = await languages_agree(suite)
    assert (shown[customer], shown[anonymous]) == ("fr", "fr")
    row = await row_of(suite, customer)
    assert (row.device_model, row.platform) == ("Pixel 8", ANDROID)

    # As of when it left: the next person on the phone changes its language, not the customer's.
    await suite.track(
        installation_update(
            phone, NOW - timedelta(hours=1), ANDROID, language="it", timezone="Europe/Rome"
        )
    )
    profile = (await suite.get(profile_id=customer)).profile
    assert (profile.summary.language, profile.summary.timezone) == ("fr", "Europe/Paris")
    shown = await languages_agree(suite)
    assert (shown[customer], shown[anonymous]) == ("fr", "it")

    # The export holds what is kept about the person's former device.
    document = export_document(await suite.identity.export(customer))
    (former,) = document["profile"]["formerInstallations"]
    assert (former["installationId"], former["language"], former["timezone"]) == (
        phone,
        "fr",
        "Europe/Paris",
    )
    assert (former["deviceModel"], former["platform"]) == ("Pixel 8", "PLATFORM_ANDROID")


async def test_a_merge_after_logouts_keeps_the_most_recently_seen_former_device(
    suite: Suite,
) -> None:
    laptop, phone, watch = new_id(), new_id(), new_id()
    await device(suite, laptop, 5, language="es", timezone="Europe/Madrid", device_model="XPS")
    await device(suite, phone, 3, language="fr", timezone="Europe/Paris", device_model="Pixel")
    survivor = await log_in(suite, laptop, "bob")
    source = await log_in(suite, phone, "bobby")
    await suite.identity.logout(laptop)
    await suite.identity.logout(phone)
    shown = await languages_agree(suite)
    assert (shown[survivor], shown[source]) == ("es", "fr")

    # Neither holds a device: the survivor takes the most recently seen of both former ones.
    await suite.identity.merge(source, survivor, allow_conflict=True)
    profile = (await suite.get(profile_id=survivor)).profile
    assert (profile.summary.language, profile.summary.timezone) == ("fr", "Europe/Paris")
    shown = await languages_agree(suite)
    assert shown[survivor] == "fr"
    assert source not in shown
    assert (await row_of(suite, survivor)).device_model == "Pixel"

    # The survivor's own installations come first, however long ago a former one was seen: a
    # watch reporting no language leaves it to the former phone, one reporting it wins.
    await device(suite, watch, 4, platform=IOS, device_model="Watch")
    await log_in(suite, watch, "bob")
    profile = (await suite.get(profile_id=survivor)).profile
    assert (profile.summary.language, profile.summary.timezone) == ("fr", "Europe/Paris")

    # The users table hears of the login from the bus: a moment later.
    async def watch_listed() -> bool:
        return (await row_of(suite, survivor)).device_model == "Watch"

    await eventually(watch_listed)
    await suite.track(
        installation_update(
            watch, NOW - timedelta(hours=4), IOS, language="de", timezone="Europe/Berlin"
        )
    )
    profile = (await suite.get(profile_id=survivor)).profile
    assert (profile.summary.language, profile.summary.timezone) == ("de", "Europe/Berlin")
    assert (await languages_agree(suite))[survivor] == "de"


async def test_a_second_login_on_another_device_takes_that_devices_language(suite: Suite) -> None:
    phone, tablet = new_id(), new_id()
    await device(suite, phone, 1, language="fr", timezone="Europe/Paris")
    await device(suite, tablet, 6, platform=IOS, language="nl", timezone="Europe/Amsterdam")
    customer = await log_in(suite, phone, "cleo")
    await suite.identity.logout(phone)
    assert (await languages_agree(suite))[customer] == "fr"

    # The tablet was last seen before the phone, yet it is the device the customer holds now.
    assert await log_in(suite, tablet, "cleo") == customer
    profile = (await suite.get(profile_id=customer)).profile
    assert (profile.summary.language, profile.summary.timezone) == ("nl", "Europe/Amsterdam")
    assert (await languages_agree(suite))[customer] == "nl"

    # Logging out of the tablet too: the most recently seen of the two former devices.
    await suite.identity.logout(tablet)
    profile = (await suite.get(profile_id=customer)).profile
    assert (profile.summary.language, profile.summary.timezone) == ("fr", "Europe/Paris")
    assert (await languages_agree(suite))[customer] == "fr"


async def test_an_erasure_leaves_nothing_of_the_former_devices(suite: Suite) -> None:
    phone, tablet = new_id(), new_id()
    await device(suite, phone, 2, language="fr", timezone="Europe/Paris", device_model="Pixel")
    await device(suite, tablet, 3, language="pt", device_model="Tab")
    customer = await log_in(suite, phone, "dora")
    tombstone = await log_in(suite, tablet, "dora-old")
    await suite.identity.logout(tablet)
    await suite.identity.merge(tombstone, customer, allow_conflict=True)
    await suite.identity.logout(phone)
    kept = "SELECT count(*) FROM profile_former_installations WHERE project_id = $1"
    assert await suite.fetchval(kept, suite.project.project_id) == 2
    assert (await languages_agree(suite))[customer] == "fr"

    await suite.identity.delete(customer)
    assert await suite.fetchval(kept, suite.project.project_id) == 0
    shown = await languages_agree(suite)
    assert customer not in shown
    # The devices' new anonymous profiles keep the devices and their languages.
    assert sorted(shown.values()) == ["fr", "pt"]
