"""Live feeds for the browser: one upstream WatchProfile per profile, shared by every tab.

A tab subscribes with a bounded queue; the hub's pump task reads the gRPC stream and copies each
item to every queue. A tab that lets its queue fill is dropped (its page reconnects and re-reads
what it missed), so one slow browser never holds the others back. At most `max_watches`
upstream streams per process: beyond that a page is told that live updates are paused. One
project opens at most its share of them (`project_share`), whatever number of keys it holds, so
the tabs of one project cannot pause every other project's live updates; a tab following a
profile already followed joins its stream whatever its project's share.

A session knows its key's project: GetCaller named it at sign-in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from profiles.query.v1 import query_service_pb2 as query_pb
from services.console.backend import Backend
from services.console.errors import ConsoleError, NotFound

log = structlog.get_logger(__name__)

MAX_WATCHES = 50
# The cap is split in this many shares: a project opens at most one share of the upstream
# streams (12 of 50), so at least four projects exhaust the cap.
PROJECT_SHARES = 4
QUEUE_SIZE = 256


def project_share(max_watches: int) -> int:
    """The most upstream streams one project opens when a process opens `max_watches`."""
    return max(1, max_watches // PROJECT_SHARES)


class Ended:
    """The last item a subscriber reads: why its feed stopped."""

    def __init__(self, reason: str) -> None:
        # "lagging" (the tab fell behind), "gone" (the profile was erased) or "closed" (the
        # upstream stream ended: a restart, a refused key, the key's last tab leaving). Whether
        # a tab's own session still holds is for the tab's stream to check, not the hub: the
        # upstream may run on another tab's key.
        self.reason = reason


@dataclass(eq=False, slots=True)
class _Watch:
    profile_id: str
    # The key the upstream stream runs on, its project, and how many tabs of each key follow
    # it.
    key: str = ""
    project_id: str = ""
    subscribers: set[asyncio.Queue[Any]] = field(default_factory=set)
    keys: Counter[str] = field(default_factory=Counter)
    task: asyncio.Task[None] | None = None
    # The stream's `started` item: a tab joining later gets it too, to know it is live.
    started: Any = None
    # The profile's version after the last item read: what a tab joining later is told as its
    # `started` version (items after it reach its queue).
    version: int = 0
    # The profile the upstream stream follows now: the survivor once a merge moved it there
    # (a tab joining later is told so by its `started`, and its page that it was merged away).
    followed: str = ""


class LiveHub:
    def __init__(self, backend: Backend, max_watches: int = MAX_WATCHES) -> None:
        self._backend = backend
        self._max = max_watches
        self._share = project_share(max_watches)
        self._watches: dict[str, _Watch] = {}
        # The upstream streams each project runs.
        self._by_project: Counter[str] = Counter()

    @property
    def watch_count(self) -> int:
        return len(self._watches)

    @contextlib.asynccontextmanager
    async def follow(
        self, key: str, project_id: str, profile_id: str
    ) -> AsyncIterator[asyncio.Queue[Any] | None]:
        """A queue of WatchProfileResponse items (then one Ended) for this profile; None when
        the process already follows `max_watches` profiles, or the key's project (GetCaller's)
        its share of them. The caller must have checked that the key may read the profile: the
        upstream stream may run with another tab's key."""
        watch = self._watches.get(profile_id) or self._open(key, project_id, profile_id)
        if watch is None:
            yield None
            return
        # No await since the watch was found or opened: its pump cannot have ended meanwhile.
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUE_SIZE)
        if watch.started is not None:
            joined = query_pb.WatchProfileResponse()
            joined.CopyFrom(watch.started)
            joined.version = watch.version
            if watch.followed:
                joined.profile_id = watch.followed
            queue.put_nowait(joined)
        watch.subscribers.add(queue)
        watch.keys[key] += 1
        try:
            yield queue
        finally:
            watch.subscribers.discard(queue)
            watch.keys[key] -= 1
            current = self._watches.get(profile_id) is watch
            # The last tab of the key the upstream runs on left (signed out, maybe revoked): the
            # stream must not outlive it. The other tabs are told it closed; they reconnect on
            # their own keys and re-read what they missed meanwhile.
            if current and (not watch.subscribers or watch.keys[watch.key] <= 0):
                self._forget(watch)
                if watch.task is not None:
                    watch.task.cancel()

    def _open(self, key: str, project_id: str, profile_id: str) -> _Watch | None:
        """A new watch of the profile, its upstream stream opened on `key`; None when the cap
        or the project's share is reached."""
        if len(self._watches) >= self._max or self._by_project[project_id] >= self._share:
            return None
        watch = _Watch(profile_id, key, project_id)
        self._watches[profile_id] = watch
        self._by_project[project_id] += 1
        watch.task = asyncio.get_running_loop().create_task(self._pump(watch, key))
        return watch

    def _forget(self, watch: _Watch) -> None:
        """Drops a watch the hub still holds: its profile and its project's share are free."""
        del self._watches[watch.profile_id]
        self._by_project[watch.project_id] -= 1
        if self._by_project[watch.project_id] <= 0:
            del self._by_project[watch.project_id]

    async def _pump(self, watch: _Watch, key: str) -> None:
        reason = "closed"
        request = query_pb.WatchProfileRequest(profile_id=watch.profile_id)
        try:
            async for item in self._backend.stream(key, "query", "WatchProfile", request):
                if item.WhichOneof("item") == "started":
                    watch.started = item
                if item.version:
                    watch.version = item.version
                if item.profile_id:
                    watch.followed = item.profile_id
                for queue in list(watch.subscribers):
                    try:
                        queue.put_nowait(item)
                    except asyncio.QueueFull:
                        watch.subscribers.discard(queue)
                        _end(queue, Ended("lagging"))
        except NotFound:
            reason = "gone"
        except ConsoleError as exc:
            log.info("console_watch_ended", error=type(exc).__name__)
        finally:
            if self._watches.get(watch.profile_id) is watch:
                self._forget(watch)
            for queue in list(watch.subscribers):
                _end(queue, Ended(reason))


def _end(queue: asyncio.Queue[Any], ended: Ended) -> None:
    # The subscriber must see the end even when its queue is full: make room for it.
    while True:
        try:
            queue.put_nowait(ended)
            return
        except asyncio.QueueFull:
            queue.get_nowait()
