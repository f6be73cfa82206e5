"""The LISTEN side of identity's link notifications: each replica's cache (cache.py) hears,
at commit, which profiles' installations now resolve differently."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg

# Tells every identity replica, at commit, which profiles' installations now resolve
# differently (cache.py): NOTIFY is transactional, so a rolled-back change announces nothing and
# a committed one is announced before any later transaction can see its effects elsewhere.
NOTIFY_LINKS = "SELECT pg_notify($1, $2)"
LINKS_CHANNEL = "profiles_identity_links"


class LinkListener:
    """A dedicated connection LISTENing on LINKS_CHANNEL (not a pooled one: a pool resets
    listeners on release, and this one is held for the life of the process)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: self._lost.set())

    @classmethod
    async def open(cls, database_url: str, on_payload: Callable[[str], None]) -> LinkListener:
        conn = await asyncpg.connect(database_url)
        listener = cls(conn)
        await conn.add_listener(LINKS_CHANNEL, lambda _c, _pid, _channel, p: on_payload(p))
        return listener

    async def lost(self) -> None:
        """Returns when the connection is gone (checked every few seconds as well, since a
        silently dropped socket triggers no termination callback until it is used)."""
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), LISTENER_CHECK_S)
            if self._conn.is_closed():
                return
            try:
                await self._conn.execute(PROBE)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                return

    async def close(self) -> None:
        await self._conn.close(timeout=5)


PROBE = "SELECT 1"
# How often the LISTEN connection is probed; a change made while it was silently dead is then
# missed for at most this long by this replica's cache.
LISTENER_CHECK_S = 5.0
