"""Which names the suite accepts as time zones, one rule for every service: an IANA zone name
that Python's zoneinfo and PostgreSQL's `AT TIME ZONE` both know.

`zoneinfo.available_timezones()` lists every file of the system's zone database, including
`localtime` (a link to the machine's own zone) and `Factory`, and `ZoneInfo()` opens any zone
file by path (`posix/Europe/Paris`, `right/UTC`, `posixrules`). PostgreSQL refuses some of those
(`localtime` among them), and a name it refuses broke every read that counts days in the zone:
GetActivity answered INTERNAL, and segments' handler failed on the whole batch that carried it.
"""

from __future__ import annotations

from functools import cache
from zoneinfo import available_timezones

# Files of the zone database that are not zones a person lives in.
NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})
# Copies of the database under other conventions (POSIX, leap seconds), by path.
NOT_ZONE_PREFIXES = ("posix/", "right/")


@cache
def _names() -> frozenset[str]:
    return frozenset(
        name
        for name in available_timezones()
        if name not in NOT_ZONES and not name.startswith(NOT_ZONE_PREFIXES)
    )


def is_time_zone(name: str) -> bool:
    """Whether `name` is an IANA time zone the suite accepts (case-sensitive, as stored)."""
    return name in _names()
