"""Group commit: concurrent batches of one key stored by one transaction.

A batch's transaction pays a fixed cost whatever its size (about a dozen statements and round
trips, the profile locks' queue, the commit), and concurrent batches over the same profiles
wait for each other's locked part. So a key runs at most `writers` transactions at once; a
batch that arrives while they run waits, and the next transaction takes every batch then
waiting (up to `max_size` of their events) and stores them together. A lone batch starts at
once, as before; under load, batches go in groups and the fixed cost is paid once per group
(docs/benchmarks.md, issue 19). Nothing here knows what a batch is: `store` takes the group's
items and answers one result (or exception) per item, in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import Gauge, Histogram

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

GROUP_SIZE = Histogram(
    "profiles_ingest_group_commit_batches",
    "Batches (each one's part in a write partition) stored by one transaction (group commit).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
# How many batches queue behind the writers right now: a queue that keeps growing means the
# database cannot keep up, before latencies say so.
WAITING = Gauge(
    "profiles_ingest_group_commit_waiting",
    "Batch parts waiting for a writer (group commit).",
)


@dataclass(slots=True)
class _Waiting(Generic[T, R]):
    item: T
    size: int
    answer: asyncio.Future[R]


@dataclass(slots=True)
class _Key(Generic[T, R]):
    waiting: deque[_Waiting[T, R]] = field(default_factory=deque)
    running: int = 0


class GroupCommit(Generic[K, T, R]):
    """Runs `store` on groups of the items submitted under one key."""

    def __init__(
        self,
        store: Callable[[K, Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        size_of: Callable[[T], int],
        writers: int,
        max_size: int,
    ) -> None:
        if writers < 1:
            raise ValueError("a key needs at least one writer")
        self._store = store
        self._size_of = size_of
        self._writers = writers
        self._max_size = max_size
        self._keys: dict[K, _Key[T, R]] = {}
        # Running groups, kept referenced until done (the loop holds tasks only weakly).
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, key: K, item: T) -> R:
        """Stores `item` with whatever else of `key` is waiting; its own result, or raises its
        own exception. A caller cancelled while waiting leaves its item in the group (a batch
        may be committed after its caller gave up, as a retry then finds)."""
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # Read once done, so that the answer of a caller that gave up is not reported unread.
        answer.add_done_callback(_read_answer)
        state = self._keys.setdefault(key, _Key())
        state.waiting.append(_Waiting(item, self._size_of(item), answer))
        WAITING.inc()
        self._start_groups(key, state)
        return await asyncio.shield(answer)

    def _start_groups(self, key: K, state: _Key[T, R]) -> None:
        while state.waiting and state.running < self._writers:
            group = [state.waiting.popleft()]
            size = group[0].size
            while state.waiting and size + state.waiting[0].size <= self._max_size:
                size += state.waiting[0].size
                group.append(state.waiting.popleft())
            WAITING.dec(len(group))
            state.running += 1
            task = asyncio.create_task(self._run(key, state, group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, key: K, state: _Key[T, R], group: list[_Waiting[T, R]]) -> None:
        GROUP_SIZE.observe(len(group))
        try:
            results = await self._store(key, [w.item for w in group])
            if len(results) != len(group):
                raise AssertionError("a group's store answered the wrong number of results")
            for waiting, result in zip(group, results, strict=True):
                if waiting.answer.done():
                    continue
                if isinstance(result, BaseException):
                    waiting.answer.set_exception(result)
                else:
                    waiting.answer.set_result(result)
        except BaseException as exc:  # every waiter hears of it, then it goes on up
            for waiting in group:
                if not waiting.answer.done():
                    waiting.answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            state.running -= 1
            if state.waiting:
                self._start_groups(key, state)
            elif not state.running:
                self._keys.pop(key, None)


def _read_answer(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled():
        answer.exception()
