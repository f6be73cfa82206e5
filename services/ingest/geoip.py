"""Country of a client IP, resolved offline with the database the geoip2fast wheel ships.

Privacy by design: only the ISO country code leaves this module; the IP is neither kept nor
logged (log lines carry counts only). The database (IPv4 and IPv6) is loaded once, lazily, on a
worker thread, because loading it takes a noticeable fraction of a second; lookups of a batch
run on a worker thread too (pure Python, tens of microseconds each).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

import structlog

from services.ingest import model

log = structlog.get_logger(__name__)

# The wheel's country database with IPv6 networks (the default file has IPv4 only).
DATA_FILE = "geoip2fast-ipv6.dat.gz"


class CountryResolver:
    """Resolves IPs to ISO 3166-1 alpha-2 codes; "" when unknown (private, reserved, missing)."""

    def __init__(self, data_file: str = DATA_FILE) -> None:
        self._data_file = data_file
        self._database: Any = None
        self._lock = asyncio.Lock()

    async def _loaded(self) -> Any:
        if self._database is None:
            async with self._lock:
                if self._database is None:
                    self._database = await asyncio.to_thread(self._load)
                    log.info("geoip_database_loaded")
        return self._database

    def _load(self) -> Any:
        return _database(self._data_file)

    async def countries(self, ips: Sequence[str]) -> list[str]:
        """One country code per IP, in order ("" when the database does not know it)."""
        if not ips:
            return []
        database = await self._loaded()
        return await asyncio.to_thread(_lookup_all, database, ips)


@functools.cache
def _database(data_file: str) -> Any:
    """The database of `data_file`, loaded once per process: lookups only read it, so every
    resolver of the process shares it (one in a service process; the tests start an ingest per
    test in one process, and each paid the load, 0.3 to 1 s of CPU, on its first batch)."""
    from geoip2fast import GeoIP2Fast  # imported here: the import itself reads files

    return GeoIP2Fast(geoip2fast_data_file=data_file)


def _lookup_all(database: Any, ips: Sequence[str]) -> list[str]:
    codes = []
    # A batch from an edge gateway carries the same few IPs on many events: look each up once.
    seen: dict[str, str] = {}
    for ip in ips:
        if ip in seen:
            codes.append(seen[ip])
            continue
        try:
            code = str(database.lookup(ip).country_code)
        except Exception:  # a malformed IP was refused by validation; never fail a batch here
            code = ""
        seen[ip] = code.upper() if model.is_country(code) else ""
        codes.append(seen[ip])
    return codes
