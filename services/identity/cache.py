"""Identity's cache of ResolveProfiles answers for known installations, and what keeps it true.

Why it is safe (the issue's rule: a cached answer must never attach an event to a profile the
installation has already left):
- ingest never trusts an installation's resolved profile when it stores events: its insert reads
  the installation's current link FOR SHARE in the same statement (ingest repository.py,
  INSERT_INSTALLATION_EVENTS), so a stale answer from this cache costs at most one more
  resolution, never a wrong profile;
- every identity transaction that changes an installation's answer (Identify, Logout,
  MergeProfiles, DeleteProfile) names the profiles it changed with a NOTIFY on LINKS_CHANNEL,
  which PostgreSQL delivers at commit to every identity replica; each replica drops the cached
  installations of those profiles (CacheInvalidationWorker);
- the replica that made the change drops them itself before the RPC returns, so a caller of
  that replica never reads an answer older than its own change;
- a resolve that read the database before a change committed cannot store what it read after
  that change's invalidation (the generation check below), and while the LISTEN connection is
  down the cache is empty and stores nothing: every answer comes from the database then.
Other replicas may answer from their cache for the moment the notification takes to reach
them (milliseconds); answers carry link_version for callers that check it in their writes.

No I/O here: the worker gets its listener from the repository."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol
from uuid import UUID

import structlog

from services.identity.model import Resolution

log = structlog.get_logger(__name__)

# Installations kept per identity process (about 200 bytes each with the reverse index).
CACHE_CAPACITY = 200_000
# Pause before listening again after the LISTEN connection broke (the cache stays off meanwhile).
RELISTEN_DELAY_S = 1.0


class ResolutionCache:
    """Known installations' answers, by project and installation ID, with a reverse index by
    profile so a change to a profile drops every installation cached on it."""

    def __init__(self, capacity: int = CACHE_CAPACITY) -> None:
        self._capacity = capacity
        # Keyed by the project's UUID as an int: hashed in C (a UUID hashes in Python).
        self._entries: dict[tuple[int, str], Resolution] = {}
        self._by_profile: dict[tuple[int, UUID], set[str]] = {}
        self._generation = 0
        # Off until the invalidation listener runs: without it, other replicas' changes would
        # go unnoticed.
        self._enabled = False

    @property
    def generation(self) -> int:
        """Read before a database read whose answers will be stored with `store`."""
        return self._generation

    def get(self, project: int, installation_id: str) -> Resolution | None:
        return self._entries.get((project, installation_id))

    def store(self, project_id: UUID, found: dict[str, Resolution], generation: int) -> None:
        """Keeps answers read from the database, unless the cache is off or anything was
        invalidated since `generation` was read (what was read may be older than that change)."""
        if not self._enabled or generation != self._generation:
            return
        project = project_id.int
        if len(self._entries) + len(found) > self._capacity:
            self._drop_everything()  # rare: a bounded cache refills from the database
        entries, by_profile = self._entries, self._by_profile
        for installation_id, resolution in found.items():
            if resolution.created or resolution.profile_id is None:
                continue  # a creation's answer says `created`, which is true only once
            key = (project, installation_id)
            previous = entries.get(key)
            if previous is not None and previous.profile_id != resolution.profile_id:
                self._unindex(project, previous.profile_id, installation_id)
            entries[key] = resolution
            by_profile.setdefault((project, resolution.profile_id), set()).add(installation_id)

    def invalidate_profiles(self, project_id: UUID, profile_ids: Iterable[UUID]) -> None:
        """Drops every cached installation of these profiles (their answers changed)."""
        self._generation += 1
        project = project_id.int
        for profile_id in profile_ids:
            for installation_id in self._by_profile.pop((project, profile_id), ()):
                self._entries.pop((project, installation_id), None)

    def forget_installations(self, project_id: UUID, installation_ids: Iterable[str]) -> None:
        """Drops these installations' answers: a fresh read found or will find them otherwise."""
        self._generation += 1
        project = project_id.int
        for installation_id in installation_ids:
            previous = self._entries.pop((project, installation_id), None)
            if previous is not None:
                self._unindex(project, previous.profile_id, installation_id)

    def enable(self) -> None:
        """Called once changes of every replica are being listened to."""
        self._drop_everything()
        self._enabled = True

    def disable(self) -> None:
        """Called when changes may go unnoticed (listener down): nothing cached is trusted."""
        self._enabled = False
        self._drop_everything()

    def __len__(self) -> int:
        return len(self._entries)

    def _drop_everything(self) -> None:
        self._generation += 1
        self._entries = {}
        self._by_profile = {}

    def _unindex(self, project: int, profile_id: UUID | None, installation_id: str) -> None:
        if profile_id is None:
            return
        members = self._by_profile.get((project, profile_id))
        if members is not None:
            members.discard(installation_id)
            if not members:
                del self._by_profile[(project, profile_id)]


def links_payload(project_id: UUID, profile_ids: Sequence[UUID]) -> str:
    """The NOTIFY payload of a change: `<project>:<profile>,<profile>...` (36 bytes per ID; a
    change names a handful, far below PostgreSQL's 8,000-byte payload limit)."""
    return f"{project_id}:{','.join(str(p) for p in profile_ids)}"


def parse_links_payload(payload: str) -> tuple[UUID, list[UUID]]:
    project, _, profiles = payload.partition(":")
    return UUID(project), [UUID(p) for p in profiles.split(",") if p]


class Listener(Protocol):
    """A LISTEN connection (repository.listen_for_link_changes): `lost` ends when it breaks."""

    async def lost(self) -> None: ...

    async def close(self) -> None: ...


ListenerFactory = Callable[[Callable[[str], None]], Awaitable[Listener]]


class CacheInvalidationWorker:
    """Keeps the cache in step with every replica's changes (a BackgroundWorker): listens on
    LINKS_CHANNEL, enables the cache once listening, and empties and disables it whenever the
    connection breaks, until it listens again."""

    def __init__(self, cache: ResolutionCache, listen: ListenerFactory) -> None:
        self._cache = cache
        self._listen = listen
        self._stopped = asyncio.Event()

    def on_payload(self, payload: str) -> None:
        try:
            project_id, profile_ids = parse_links_payload(payload)
        except ValueError:
            log.warning("identity_links_payload_invalid")
            self._cache.disable()
            self._cache.enable()  # unknown change: forget everything, keep caching
            return
        self._cache.invalidate_profiles(project_id, profile_ids)

    async def run(self) -> None:
        while not self._stopped.is_set():
            listener: Listener | None = None
            try:
                listener = await self._listen(self.on_payload)
                self._cache.enable()
                lost = asyncio.ensure_future(listener.lost())
                stopped = asyncio.ensure_future(self._stopped.wait())
                try:
                    await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                    stopped.cancel()
            except Exception as exc:  # any failure to listen: the cache stays off, retry later
                log.warning("identity_links_listen_failed", error=type(exc).__name__)
            finally:
                self._cache.disable()
                if listener is not None:
                    with contextlib.suppress(Exception):  # closing a broken connection
                        await listener.close()
            if not self._stopped.is_set():
                log.warning("identity_links_listener_lost")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), RELISTEN_DELAY_S)

    async def stop(self) -> None:
        self._stopped.set()
