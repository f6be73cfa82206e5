"""The operator tools on in-process services: `profiles import` of the sample file (twice:
the second run finds only duplicates) and `profiles demo` for a few users."""

from __future__ import annotations

import asyncio
import json
import locale
import re
import zoneinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from profiles.common.v1 import types_pb2
from profiles_cli.cli import build_parser, run
from profiles_cli.demo import run_demo
from profiles_cli.importer import run_import
from tests.support.ingest import Ingest

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.conftest import TestProject

SAMPLE = Path(__file__).resolve().parents[2] / "bench" / "sample_events.jsonl"


@pytest.fixture
async def addresses(start_services: Any, settings_for_test: Settings) -> dict[str, str]:
    identity = (await start_services("identity"))["identity"]
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": identity.address}
    )
    ingest = (await start_services("ingest", settings=settings))["ingest"]
    return {"identity": identity.address, "ingest": ingest.address}


def key(project: TestProject, role: str) -> str:
    return project.keys[role]


async def test_importing_the_sample_twice_stores_it_once(
    addresses: dict[str, str], project: TestProject, database_url: str
) -> None:
    lines = [line for line in SAMPLE.read_text().splitlines() if line.strip()]
    first = await run_import(SAMPLE, addresses["ingest"], key(project, "admin"), quiet=True)
    assert (first.accepted, first.duplicate, first.rejected, first.unreadable) == (
        len(lines),
        0,
        0,
        [],
    )
    second = await run_import(SAMPLE, addresses["ingest"], key(project, "admin"), quiet=True)
    assert (second.accepted, second.duplicate, second.rejected) == (0, len(lines), 0)
    db = Ingest(None, (), (), database_url)  # type: ignore[arg-type]
    rows = await db.fetch("SELECT count(*) AS n, bool_and(imported) AS imported FROM events")
    assert (rows[0]["n"], rows[0]["imported"]) == (len(lines), True)
    sessions = await db.fetch("SELECT count(*) AS n FROM sessions WHERE ended")
    assert sessions[0]["n"] == 9


async def test_unreadable_lines_are_counted_and_the_rest_imported(
    addresses: dict[str, str], project: TestProject, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    good = SAMPLE.read_text().splitlines()[0]
    path.write_text(f'{good}\n\nnot json\n{{"event_id": 3}}\n')
    summary = await run_import(path, addresses["ingest"], key(project, "admin"), quiet=True)
    assert (summary.accepted, summary.unreadable) == (1, [3, 4])


def test_the_cli_offers_import_and_demo() -> None:
    parser = build_parser()
    args = parser.parse_args(["import", str(SAMPLE), "--address", "127.0.0.1:1", "--key", "k"])
    assert (args.file, args.address, args.key) == (SAMPLE, "127.0.0.1:1", "k")
    args = parser.parse_args(["demo", "--users", "7", "--seed", "3"])
    assert (args.users, args.seed) == (7, 3)


async def test_the_demo_creates_lively_profiles(
    addresses: dict[str, str], project: TestProject, database_url: str
) -> None:
    summary = await run_demo(
        12,
        addresses["ingest"],
        addresses["identity"],
        key(project, "sdk"),
        key(project, "admin"),
        seed=7,
        quiet=True,
    )
    assert summary.events_accepted > 100
    assert summary.events_rejected == 0, summary.reasons
    assert summary.users_logged_in > 0
    db = Ingest(None, (), (), database_url)  # type: ignore[arg-type]
    kinds = await db.fetch("SELECT DISTINCT kind FROM events ORDER BY kind")
    assert len(kinds) >= 6  # sessions, custom events, attributes, consent, installations...
    platforms = await db.fetch("SELECT DISTINCT platform FROM installation_details")
    assert len(platforms) >= 2
    identified = await db.fetch("SELECT count(*) AS n FROM profiles WHERE custom_id IS NOT NULL")
    assert identified[0]["n"] > 0
    # The same seed again: nothing new.
    again = await run_demo(
        12,
        addresses["ingest"],
        addresses["identity"],
        key(project, "sdk"),
        key(project, "admin"),
        seed=7,
        quiet=True,
    )
    assert again.events_accepted == 0


async def test_the_demo_summary_counts_people_and_devices_apart(
    addresses: dict[str, str],
    project: TestProject,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`profiles demo` prints how many users logged in, on how many installations (one
    Identify each), and how many logged out: the figures the identity service has."""
    command = [
        "demo", "--users", "12", "--seed", "7", "--key", key(project, "admin"),
        "--ingest-address", addresses["ingest"], "--identity-address", addresses["identity"],
    ]  # fmt: skip
    # A thread of its own: the command runs its own event loop, the services this test's.
    assert await asyncio.to_thread(run, command) == 0

    [summary] = [line for line in capsys.readouterr().out.splitlines() if "users:" in line]
    printed = re.search(
        r"; (\d+) of them logged in \(on (\d+) installations\), (\d+) logged out$", summary
    )
    assert printed is not None, summary
    users, installations, logged_out = (int(n) for n in printed.groups())
    db = Ingest(None, (), (), database_url)  # type: ignore[arg-type]
    identified = await db.fetch("SELECT count(*) AS n FROM profiles WHERE custom_id IS NOT NULL")
    calls = await db.fetch("SELECT rpc, count(*) AS n FROM identity_requests GROUP BY rpc")
    by_rpc = {row["rpc"]: row["n"] for row in calls}
    assert users == identified[0]["n"]
    assert installations == by_rpc["Identify"]
    assert logged_out == by_rpc.get("Logout", 0)
    assert installations > users  # someone logged in on two devices: not the same figure


def _zones_by_country() -> dict[str, set[str]]:
    """The IANA zones of each country, from the zone database's own table (zone.tab)."""
    for directory in zoneinfo.TZPATH:
        table = Path(directory) / "zone.tab"
        if table.is_file():
            zones: dict[str, set[str]] = {}
            for line in table.read_text().splitlines():
                if line and not line.startswith("#"):
                    country, _, zone, *_ = line.split("\t")
                    zones.setdefault(country, set()).add(zone)
            return zones
    raise AssertionError(f"no zone.tab under {zoneinfo.TZPATH}")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


async def test_what_the_demo_shows_an_operator_holds_together(
    addresses: dict[str, str], project: TestProject, database_url: str
) -> None:
    """A newcomer reads the demo's people in the console: each device reports a model and OS
    version of its platform (an Android 12 to 15 phone, an iPhone on iOS 16 to 18, a browser on
    the web) that only move forward, as its app version does; user-N's email carries N; the
    overview's Region table (the `region` attribute) shows several regions, not only
    "unknown"; a device's time zone lies in the country its sessions come from, and its
    language is spoken in the person's region (or is English)."""
    summary = await run_demo(
        16,
        addresses["ingest"],
        addresses["identity"],
        key(project, "sdk"),
        key(project, "admin"),
        seed=7,
        quiet=True,
    )
    assert summary.events_rejected == 0, summary.reasons
    db = Ingest(None, (), (), database_url)  # type: ignore[arg-type]

    devices = await db.fetch(
        """
        SELECT d.installation_id, d.platform, d.app_version, d.os_version, d.device_model,
               d.language, d.timezone,
               (SELECT array_agg(DISTINCT s.country) FROM sessions s
                WHERE s.installation_id = d.installation_id AND s.country <> '') AS countries,
               -- The person's region: on the profile the device's events went to (a device
               -- logged out since sends to a new, anonymous profile).
               (SELECT a.value ->> 'value' FROM events e
                JOIN profile_attributes a ON a.profile_id = e.profile_id AND a.native
                                         AND a.name = 'region'
                WHERE e.installation_id = d.installation_id LIMIT 1) AS region
        FROM installation_details d"""
    )
    assert {d["platform"] for d in devices} == {
        types_pb2.PLATFORM_IOS,
        types_pb2.PLATFORM_ANDROID,
        types_pb2.PLATFORM_WEB,
    }
    assert sum(bool(d["region"]) for d in devices) > len(devices) / 2
    zones = _zones_by_country()
    for d in devices:
        seen = (d["installation_id"], d["device_model"], d["os_version"], d["app_version"])
        assert re.fullmatch(r"\d+\.\d+\.\d+", d["app_version"]), seen
        if d["platform"] == types_pb2.PLATFORM_IOS:
            assert re.fullmatch(r"(iPhone|iPad)\d+,\d+", d["device_model"]), seen
            assert re.fullmatch(r"1[6-8]\.\d+(\.\d+)?", d["os_version"]), seen
        elif d["platform"] == types_pb2.PLATFORM_ANDROID:
            assert not re.match(r"iPhone|iPad|Chrome|Safari|Firefox|Edge", d["device_model"]), seen
            assert re.fullmatch(r"1[2-5]", d["os_version"]), seen
        else:  # a browser, on a computer's OS (a name, not a bare number) or none
            assert d["device_model"] in {"Chrome", "Safari", "Firefox", "Edge"}, seen
            assert not re.fullmatch(r"[\d.]+", d["os_version"] or "x"), seen
        [country] = d["countries"]
        assert d["timezone"] in zones[country], (d["installation_id"], country, d["timezone"])
        if d["region"]:
            spoken = f"{d['language']}_{d['region']}".lower() in locale.locale_alias
            assert spoken or d["language"] == "en", (d["installation_id"], d["region"], d)

    # Versions only move forward: each installation's updates in event-time order.
    updates = await db.fetch(
        """SELECT installation_id, payload FROM events WHERE kind = $1
           ORDER BY installation_id, event_time, event_seq""",
        types_pb2.EVENT_KIND_INSTALLATION_UPDATE,
    )
    reported: dict[tuple[str, str], tuple[int, ...]] = {}
    moved = {"app_version": 0, "os_version": 0}
    for update in updates:
        payload = update["payload"]
        payload = json.loads(payload) if isinstance(payload, str) else payload
        for name in moved:
            if name in payload and re.fullmatch(r"[\d.]+", payload[name]):
                now = _version(payload[name])
                before = reported.get((update["installation_id"], name), now)
                assert before <= now, (update["installation_id"], name, before, now)
                moved[name] += before < now
                reported[update["installation_id"], name] = now
    # Some devices updated their app, and some phones their OS, so the order was checked.
    assert min(moved.values()) > 0, moved

    people = await db.fetch(
        """SELECT p.custom_id, a.value ->> 'value' AS email FROM profiles p
           JOIN profile_attributes a ON a.profile_id = p.profile_id AND a.native
                                    AND a.name = 'email'
           WHERE p.custom_id IS NOT NULL"""
    )
    assert people
    for person in people:
        number = person["custom_id"].removeprefix("user-")
        assert re.fullmatch(rf"[a-z]+\.[a-z]+\.{number}@example\.com", person["email"]), person
    assert len({person["email"] for person in people}) == len(people)

    regions = await db.fetch(
        "SELECT DISTINCT value ->> 'value' AS region FROM profile_attributes"
        " WHERE native AND name = 'region'"
    )
    assert len(regions) >= 3, regions
