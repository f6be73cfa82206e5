"""What an operator's comparison with Batch and Countly found missing on the profile page: an
admin's merge of another profile into this one (a confirmation of both side by side, every
refusal of MergeProfiles told on the form, one merge for a form sent twice, read keys and
forged forms refused), and crashes: the last crash opens itself in the timeline, and a Crashes
tab lists the profile's crashes only."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from playwright.async_api import expect

from profiles.client import open_channel
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.query.v1 import profile_pb2, timeline_pb2
from profiles.query.v1 import query_service_pb2 as query_pb
from services.console.app import build_app
from tests.console.conftest import ConsoleSuite, start_console
from tests.console.test_console_pages import (
    query,
    sign_in,
    stored_profile,
    stored_profile_by_custom_id,
    track,
)
from tests.support.ingest import custom_event
from tests.support.query import crash, installation_update, session_start

MERGE_LINK = "Merge another profile into this one"


def event_name(prefix: str) -> str:
    """A custom event name no other test sends (at most 30 letters, digits or underscores)."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def identified(suite: ConsoleSuite, prefix: str, name: str) -> tuple[str, str]:
    """A new profile known by a custom ID, with one custom event `name`: its custom ID and
    profile ID once query has it."""
    custom_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    await track(
        suite,
        custom_event(None, custom_id=custom_id, name=name, time=datetime.now(UTC)),
    )
    return custom_id, await stored_profile_by_custom_id(suite, custom_id)


async def anonymous(suite: ConsoleSuite, name: str) -> tuple[str, str]:
    """A new anonymous profile of one installation, with one custom event `name`: its
    installation ID and profile ID once query has it."""
    installation = f"console-merge-{uuid.uuid4().hex[:8]}"
    await track(suite, custom_event(installation, name=name, time=datetime.now(UTC)))
    return installation, (await stored_profile(suite, installation)).summary.profile_id


async def profile_of(suite: ConsoleSuite, profile_id: str) -> profile_pb2.Profile:
    reply = await query(suite, "GetProfile", query_pb.GetProfileRequest(profile_id=profile_id))
    return reply.profile


async def merges_into(suite: ConsoleSuite, target: str, source: str) -> int:
    """How many merges of `source` into `target` the target's timeline records."""
    reply = await query(
        suite,
        "ListEvents",
        query_pb.ListEventsRequest(
            profile_id=target, page_size=500, kinds=[timeline_pb2.TIMELINE_EVENT_KIND_MERGE]
        ),
    )
    return sum(
        1
        for event in reply.events
        if event.identity_change.source_profile_id == source
        and event.identity_change.target_profile_id == target
    )


async def choose(page: Any, suite: ConsoleSuite, target: str, other: str) -> None:
    """Opens the merge form of `target` from its page and looks `other` up."""
    await page.goto(suite.url + f"/profiles/{target}")
    await page.get_by_role("link", name=MERGE_LINK).click()
    await page.get_by_label("The other profile").fill(other)
    await page.get_by_role("button", name="Show both profiles").click()


async def accessible(page: Any, axe_source: str, name: str) -> None:
    """No serious or critical axe-core violation on the page (as every console page)."""
    await page.evaluate(axe_source)
    found = await page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
        ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))"
    )
    assert found == [], f"{name}: {found}"


async def test_an_admin_merges_another_profile_and_the_survivor_holds_both_histories(
    page: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    suite = console_suite
    kept_name, moved_name = event_name("kept"), event_name("moved")
    custom_id, target = await identified(suite, "survivor", kept_name)
    installation, source = await anonymous(suite, moved_name)
    await sign_in(page, suite, "admin", land=False)

    # Found by its installation ID: both profiles side by side before anything changes.
    await choose(page, suite, target, installation)
    await expect(page.get_by_role("heading", level=1)).to_have_text(
        f"Merge Anonymous {source[:8]} into {custom_id}?"
    )
    compare = page.locator("#merge-compare")
    await expect(compare.locator("[data-row=name] td")).to_have_text(
        [f"Anonymous {source[:8]}", custom_id]
    )
    await expect(compare.locator("[data-row=custom-id] td")).to_have_text(
        ["none (anonymous)", custom_id]
    )
    await expect(compare.locator("[data-row=profile-id] td")).to_have_text([source, target])
    await expect(compare.locator("[data-row=events] td")).to_have_text(["1 event", "1 event"])
    await expect(compare.locator("[data-row=last-seen] td").first).to_contain_text("UTC")
    what = page.locator("#merge-what")
    await expect(what).to_contain_text("cannot be undone")
    await expect(what).to_contain_text(f"this one keeps {custom_id}")
    await accessible(page, axe_source, "merge-confirmation")

    await page.get_by_role("button", name="Merge into this profile").click()
    await expect(page).to_have_url(re.compile(f"/profiles/{target}\\?merged={source}$"))
    await expect(page.locator("#merge-done")).to_contain_text(
        f"Merged: profile {source} was merged into this one."
    )
    # The survivor's timeline holds both histories, and its installations the other's device.
    timeline = page.locator("#timeline > li")
    await expect(timeline.filter(has_text=kept_name)).to_have_count(1)
    await expect(timeline.filter(has_text=moved_name)).to_have_count(1)
    await expect(page.locator("section", has_text="Platforms and installations")).to_contain_text(
        installation
    )
    history = page.locator("#identity-history tbody tr")
    await expect(history).to_have_count(1)
    await expect(history).to_contain_text("Merge (operator merge)")
    await expect(history.get_by_role("link", name=source)).to_be_visible()
    await accessible(page, axe_source, "merged")
    # The other profile's ID now opens the survivor.
    assert (await profile_of(suite, source)).summary.profile_id == target


async def test_each_refusal_of_a_merge_is_told_on_the_form(
    page: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    suite = console_suite
    custom_id, target = await identified(suite, "refusing", event_name("one"))
    other_custom_id, other = await identified(suite, "other-person", event_name("two"))
    await sign_in(page, suite, "admin", land=False)
    box_error = page.locator("#other-error")

    # The same profile, by its own custom ID.
    await choose(page, suite, target, custom_id)
    await expect(box_error).to_have_text(
        f"“{custom_id}” is this profile: choose another profile to merge into it."
    )
    await expect(page.get_by_label("The other profile")).to_have_attribute("aria-invalid", "true")
    await expect(page.get_by_label("The other profile")).to_have_value(custom_id)

    # A profile no lookup finds: each lookup that found nothing is said.
    nobody = f"nobody-{uuid.uuid4().hex[:8]}"
    await page.get_by_label("The other profile").fill(nobody)
    await page.get_by_role("button", name="Show both profiles").click()
    await expect(box_error).to_have_text(
        f"No profile matches “{nobody}”: nothing to merge. An erased profile matches nothing."
    )
    await expect(page.locator("#merge-misses li")).to_have_text(
        [
            f"No profile has the custom ID “{nobody}”.",
            f"No profile has an installation with the ID “{nobody}”.",
        ]
    )
    await accessible(page, axe_source, "merge-refused")

    # Two identified profiles with different custom IDs: told on the confirmation, refused by
    # the service without the operator's consent, nothing merged.
    await page.get_by_label("The other profile").fill(other_custom_id)
    await page.get_by_label("Look it up as").select_option("custom_id")
    await page.get_by_role("button", name="Show both profiles").click()
    await expect(page.locator("#merge-conflict")).to_contain_text(
        "both profiles are identified, with different custom IDs"
    )
    await page.get_by_role("button", name="Merge into this profile").click()
    await expect(page.locator("#merge-error")).to_have_text(
        "Both profiles are identified, with different custom IDs: nothing was merged. To merge"
        f" them anyway, tick “Merge anyway”; “{other_custom_id}” then stays an alias that opens"
        " this profile."
    )
    await accessible(page, axe_source, "merge-conflict")
    assert await stored_profile_by_custom_id(suite, other_custom_id) == other
    assert await merges_into(suite, target, other) == 0

    # With the operator's consent: merged, and the other custom ID opens the survivor.
    await page.get_by_label(f"Merge anyway, keeping {other_custom_id} as an alias").check()
    await page.get_by_role("button", name="Merge into this profile").click()
    await expect(page.locator("#merge-done")).to_be_visible()
    assert await stored_profile_by_custom_id(suite, other_custom_id) == target
    assert (await profile_of(suite, target)).summary.custom_id == custom_id

    # A profile merged into this one already.
    await choose(page, suite, target, other)
    await expect(box_error).to_have_text(
        f"“{other}” was merged into this profile already: they are one profile, there is"
        " nothing to merge."
    )

    # A profile erased between the confirmation and the merge.
    _, doomed = await anonymous(suite, event_name("gone"))
    await choose(page, suite, target, doomed)
    await expect(page.get_by_role("button", name="Merge into this profile")).to_be_visible()
    async with open_channel(suite.addresses["identity"], suite.project.keys["admin"]) as channel:
        await identity_grpc.IdentityServiceStub(channel).DeleteProfile(
            identity_pb.DeleteProfileRequest(profile_id=doomed, request_id=str(uuid.uuid4()))
        )
    await page.get_by_role("button", name="Merge into this profile").click()
    await expect(box_error).to_have_text(
        "The other profile no longer exists (it was erased since you chose it): nothing was merged."
    )
    # And looked up again, an erased profile is no profile.
    await page.get_by_label("The other profile").fill(doomed)
    await page.get_by_role("button", name="Show both profiles").click()
    await expect(page.locator("#merge-misses li").first).to_have_text(
        f"No profile has the ID {doomed}."
    )

    # A profile merged into a third one between the confirmation and the merge: merging it now
    # would merge that third person, whom nobody confirmed.
    _, wanderer = await anonymous(suite, event_name("wander"))
    _, third = await anonymous(suite, event_name("third"))
    await choose(page, suite, target, wanderer)
    await expect(page.get_by_role("button", name="Merge into this profile")).to_be_visible()
    async with open_channel(suite.addresses["identity"], suite.project.keys["admin"]) as channel:
        await identity_grpc.IdentityServiceStub(channel).MergeProfiles(
            identity_pb.MergeProfilesRequest(
                source_profile_id=wanderer, target_profile_id=third, request_id=str(uuid.uuid4())
            )
        )
    await page.get_by_role("button", name="Merge into this profile").click()
    await expect(page.locator("#merge-error")).to_have_text(
        "The other profile was merged into the one shown below since you chose it: nothing was"
        " merged. Check who it is now before you confirm again. Open the profile it was merged"
        f" into ({third})"
    )
    await expect(page.locator("#merge-survivor")).to_have_attribute("href", f"/profiles/{third}")
    await expect(page.locator("#merge-compare [data-row=profile-id] td")).to_have_text(
        [third, target]
    )
    assert await merges_into(suite, target, third) == 0


async def test_a_login_merging_either_profile_away_just_before_the_merge_is_told_on_the_form(
    page: Any, console_suite: ConsoleSuite, axe_source: str
) -> None:
    # The console reads both profiles again, then calls MergeProfiles: a login landing between
    # the two merges one of them into someone else's profile. The exact merge refuses it
    # (PROFILE_MERGED) instead of merging that other person, and the form says so.
    suite = console_suite
    app = build_app(suite.settings)
    logins: list[tuple[str, str]] = []  # (installation, custom ID) to log in before the merge
    async with start_console(app) as url:
        backend = app._app.state.console.backend
        original = backend.call

        async def logged_in_just_before_the_merge(
            key: str, service: str, method: str, request: Any
        ) -> Any:
            if method == "MergeProfiles" and logins:
                installation, custom_id = logins.pop()
                async with open_channel(
                    suite.addresses["identity"], suite.project.keys["sdk"]
                ) as channel:
                    await identity_grpc.IdentityServiceStub(channel).Identify(
                        identity_pb.IdentifyRequest(
                            installation_id=installation, custom_id=custom_id
                        )
                    )
            return await original(key, service, method, request)

        backend.call = logged_in_just_before_the_merge
        try:
            local = ConsoleSuite(url, suite.project, suite.addresses, suite.settings)
            await sign_in(page, local, "admin", land=False)

            # The other profile (a visitor) logs in as a customer: merged into the customer's.
            _, target = await anonymous(suite, event_name("stays"))
            visitor_device, visitor = await anonymous(suite, event_name("visitor"))
            customer, third = await identified(suite, "customer", event_name("customer"))
            await choose(page, local, target, visitor)
            await expect(page.locator("#merge-compare [data-row=profile-id] td")).to_have_text(
                [visitor, target]
            )
            logins.append((visitor_device, customer))
            await page.get_by_role("button", name="Merge into this profile").click()
            await expect(page.locator("#merge-error")).to_have_text(
                "The other profile was merged into the one shown below since you chose it: nothing"
                " was merged. Check who it is now before you confirm again. Open the profile it was"
                f" merged into ({third})"
            )
            await expect(page.locator("#merge-survivor")).to_have_attribute(
                "href", f"/profiles/{third}"
            )
            await expect(page.locator("#merge-compare [data-row=profile-id] td")).to_have_text(
                [third, target]
            )
            await accessible(page, axe_source, "merge-source-merged")
            assert logins == []
            assert await merges_into(suite, target, third) == 0
            assert await merges_into(suite, target, visitor) == 0
            assert (await profile_of(suite, visitor)).summary.profile_id == third
            assert (await profile_of(suite, target)).summary.profile_id == target
            assert (await profile_of(suite, third)).summary.profile_id == third

            # This profile (a visitor) logs in as a customer: merged into the customer's.
            stays_device, stays = await anonymous(suite, event_name("stays"))
            _, other = await anonymous(suite, event_name("other"))
            buyer, bought = await identified(suite, "buyer", event_name("buyer"))
            await choose(page, local, stays, other)
            await expect(page.locator("#merge-compare [data-row=profile-id] td")).to_have_text(
                [other, stays]
            )
            logins.append((stays_device, buyer))
            await page.get_by_role("button", name="Merge into this profile").click()
            await expect(page.locator("#other-error")).to_have_text(
                "This profile was merged into the one shown here since you opened the"
                " confirmation: nothing was merged. Choose the other profile again. Open the"
                f" profile it was merged into ({bought})"
            )
            await expect(page.locator("#merge-survivor")).to_have_attribute(
                "href", f"/profiles/{bought}"
            )
            await accessible(page, axe_source, "merge-target-merged")
            assert logins == []
            assert await merges_into(suite, stays, other) == 0
            assert await merges_into(suite, bought, other) == 0
            assert (await profile_of(suite, other)).summary.profile_id == other
            assert (await profile_of(suite, stays)).summary.profile_id == bought
        finally:
            # A failure may leave a profile page open: its live stream would hold the
            # console's shutdown until the test's timeout.
            await page.goto("about:blank")


async def test_a_merge_form_sent_twice_merges_once(page: Any, console_suite: ConsoleSuite) -> None:
    suite = console_suite
    _, target = await identified(suite, "twice", event_name("kept"))
    _, source = await anonymous(suite, event_name("moved"))
    await sign_in(page, suite, "admin", land=False)
    await choose(page, suite, target, source)
    form = page.locator("form.confirm")
    fields = {
        name: await form.locator(f"input[name={name}]").input_value()
        for name in ("csrf_token", "request_id", "source")
    }
    url = suite.url + f"/profiles/{target}/merge"

    # Two clicks at once, then the same form sent again later (a reload of the answer): each
    # answers the one merge, as the first did, and only one merge is recorded.
    answers = await asyncio.gather(
        page.request.post(url, form=fields), page.request.post(url, form=fields)
    )
    answers.append(await page.request.post(url, form=fields))
    for answer in answers:
        assert answer.status == 200
        assert answer.url.endswith(f"/profiles/{target}?merged={source}")
        assert f"Merged: profile {source} was merged into this one." in await answer.text()
    assert await merges_into(suite, target, source) == 1
    assert (await profile_of(suite, source)).summary.profile_id == target


async def test_a_read_key_sees_no_merge_and_is_refused(
    page: Any, console_suite: ConsoleSuite
) -> None:
    suite = console_suite
    _, target = await identified(suite, "read-target", event_name("one"))
    _, source = await anonymous(suite, event_name("two"))
    await sign_in(page, suite, "read", land=False)
    await page.goto(suite.url + f"/profiles/{target}")
    await expect(page.get_by_role("heading", level=1)).to_be_visible()
    await expect(page.get_by_role("link", name=MERGE_LINK)).to_have_count(0)
    for path in (f"/profiles/{target}/merge", f"/profiles/{target}/merge?other={source}"):
        assert (await page.request.get(suite.url + path)).status == 403
    # The read session's own CSRF token, so only the role refuses it.
    token = await page.locator("form.signout input[name=csrf_token]").input_value()
    posted = await page.request.post(
        suite.url + f"/profiles/{target}/merge",
        form={"csrf_token": token, "request_id": str(uuid.uuid4()), "source": source},
        max_redirects=0,
    )
    assert posted.status == 403
    assert (await profile_of(suite, source)).summary.profile_id == source


async def test_a_forged_merge_form_merges_nothing(page: Any, console_suite: ConsoleSuite) -> None:
    suite = console_suite
    _, target = await identified(suite, "forged-target", event_name("one"))
    _, source = await anonymous(suite, event_name("two"))
    await sign_in(page, suite, "admin", land=False)
    posted = await page.request.post(
        suite.url + f"/profiles/{target}/merge",
        form={"csrf_token": "guessed", "request_id": str(uuid.uuid4()), "source": source},
        max_redirects=0,
    )
    assert posted.status == 403
    assert "nothing was merged" in await posted.text()
    assert (await profile_of(suite, source)).summary.profile_id == source
    assert await merges_into(suite, target, source) == 0


async def test_the_last_crash_opens_that_crash_in_the_timeline(
    page: Any, console_suite: ConsoleSuite
) -> None:
    suite = console_suite
    installation = f"console-crash-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    older = crash(installation, now - timedelta(days=2), name="OlderCrash")
    latest = crash(installation, now - timedelta(hours=1), name="LatestCrash")
    latest.crash.reason = "disk full"
    latest.crash.fatal = False
    # More events after the crash than the timeline's first page holds: only a link to the
    # crash itself finds it.
    later = [
        custom_event(installation, name="after_crash", time=now - timedelta(minutes=59 - n))
        for n in range(55)
    ]
    await track(suite, older, latest, *later)
    profile = await stored_profile(
        suite,
        installation,
        lambda p: p.counters.crash_count == 2 and p.counters.last_crash.name == "LatestCrash",
    )
    await sign_in(page, suite, land=False)
    await page.goto(suite.url + f"/profiles/{profile.summary.profile_id}")
    await expect(page.locator("#timeline > li", has_text="LatestCrash")).to_have_count(0)

    await page.locator("#last-crash").click()
    day = (now - timedelta(hours=1)).date().isoformat()
    anchor = f"timeline-event-{latest.event_id}"
    await expect(page).to_have_url(
        re.compile(re.escape(f"?kind=crash&from={day}&to={day}#{anchor}") + "$")
    )
    target = page.locator(f"[id='{anchor}']")
    await expect(target).to_be_in_viewport()
    assert await page.evaluate("() => document.querySelector(':target')?.id") == anchor
    await expect(target).to_contain_text("Crash: LatestCrash")
    await expect(target.locator(".details").first).to_contain_text("reason disk full")
    await expect(target.locator(".details").first).to_contain_text("fatal false")
    # That day's crashes only: not the custom events after it, nor an older day's crash.
    await expect(page.locator("#timeline > li")).to_have_count(1)


async def test_the_crashes_tab_lists_only_the_profile_s_crashes(
    page: Any, console_suite: ConsoleSuite
) -> None:
    suite = console_suite
    installation = f"console-crashes-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    fatal = crash(installation, now - timedelta(minutes=5), name="FatalCrash")
    handled = crash(installation, now - timedelta(minutes=3), name="HandledCrash")
    handled.crash.reason = "timeout"
    handled.crash.fatal = False
    await track(
        suite,
        session_start(installation, f"s-{uuid.uuid4().hex[:8]}", now - timedelta(minutes=10)),
        installation_update(installation, now - timedelta(minutes=9), app_version="3.4.5"),
        custom_event(installation, name="purchase", time=now - timedelta(minutes=8)),
        fatal,
        custom_event(installation, name="purchase", time=now - timedelta(minutes=4)),
        handled,
    )
    profile = await stored_profile(
        suite, installation, lambda p: p.counters.crash_count == 2 and p.counters.event_count >= 6
    )
    await sign_in(page, suite, land=False)
    await page.goto(suite.url + f"/profiles/{profile.summary.profile_id}")
    await expect(page.locator("#timeline > li")).to_have_count(6)

    tab = page.get_by_role("navigation", name="Profile sections").get_by_role(
        "link", name="Crashes", exact=True
    )
    await tab.click()
    await expect(tab).to_have_attribute("aria-current", "true")
    await expect(page.locator("#events h2")).to_have_text("Events: crashes")
    entries = page.locator("#timeline > li")
    await expect(entries).to_have_count(2)
    await expect(entries.locator("strong")).to_have_text(
        ["Crash: HandledCrash", "Crash: FatalCrash"]
    )
    for entry, reason, is_fatal in (
        (entries.nth(0), "timeout", "false"),
        (entries.nth(1), "boom", "true"),
    ):
        await expect(entry.locator(".details").first).to_contain_text(f"reason {reason}")
        await expect(entry.locator(".details").first).to_contain_text(f"fatal {is_fatal}")
        origin = entry.locator(".origin")
        await expect(origin).to_contain_text(f"installation {installation}")
        await expect(origin).to_contain_text("platform iOS")
        await expect(origin).to_contain_text("app version now 3.4.5")
