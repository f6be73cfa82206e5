"""The names the suite accepts as time zones: IANA zones, not every file of the zone database."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from shared.time_zones import is_time_zone


@pytest.mark.parametrize(
    "name", ["UTC", "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT+5", "EST5EDT"]
)
def test_iana_zones_are_accepted(name: str) -> None:
    assert is_time_zone(name)


@pytest.mark.parametrize(
    "name",
    ["localtime", "posixrules", "Factory", "posix/Europe/Paris", "right/UTC", "europe/paris", ""],
)
def test_other_files_and_spellings_of_the_zone_database_are_refused(name: str) -> None:
    assert not is_time_zone(name)


def test_zoneinfo_alone_would_open_the_refused_paths() -> None:
    # Why zoneinfo is not the rule: it opens any zone file by path.
    assert ZoneInfo("posix/Europe/Paris").key == "posix/Europe/Paris"
