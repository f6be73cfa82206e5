"""The operator tools on in-process services: `profiles import` of the sample file (twice:
the second run finds only duplicates) and `profiles demo` for a few users."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

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
