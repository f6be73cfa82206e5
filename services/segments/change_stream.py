"""Reads the durable segment change stream (the SEGMENT_CHANGES topic) for watchers.

Watchers read with plain XREAD from a cursor (no consumer group: each watcher has its own
position, which it keeps as the last entry ID it received), at most `count` entries per read, so
a slow watcher only costs a position, never a buffer. Entry IDs are Redis's clock, so the
retention test uses Redis's TIME, not the service clock.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from profiles.common.v1 import bus_pb2
from services.segments.messages import change_from_bus
from services.segments.model import MembershipChange
from shared.bus import Bus, PoisonMessage, decode_entry
from shared.topics import SEGMENT_CHANGES

# A cursor is an entry ID as Redis writes it, "<ms>-<seq>": two unsigned 64-bit integers in
# ASCII decimal without leading zeros. Redis would also read a bare "<ms>", signs, spaces and
# leading zeros, and fail on a number above 64 bits; no SegmentChange.cursor is any of those.
_CURSOR = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})", re.ASCII)
MAX_SEQUENCE = 2**64 - 1


@dataclass(frozen=True, slots=True)
class RecordedChange:
    """One change as the stream holds it: its cursor (the entry ID) and for whom."""

    cursor: str
    project_id: str
    profile_id: str
    change: MembershipChange


def parse_cursor(cursor: str) -> tuple[int, int] | None:
    """(milliseconds, sequence) of an entry ID; None for anything Redis does not write as one."""
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        return None
    millis, sequence = int(match[1]), int(match[2])
    if millis > MAX_SEQUENCE or sequence > MAX_SEQUENCE:
        return None
    return millis, sequence


def cursor_before(millis: int) -> str:
    """The cursor just before every entry appended at or after `millis` (epoch ms)."""
    return "0-0" if millis <= 0 else f"{millis - 1}-{MAX_SEQUENCE}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ChangeStream:
    def __init__(self, bus: Bus, *, block_ms: int = 1000) -> None:
        self._redis = bus.redis
        self._key = bus.stream_key(SEGMENT_CHANGES.name)
        self._block_ms = block_ms

    async def server_time_ms(self) -> int:
        seconds, micros = await self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def last_cursor(self) -> str:
        """The ID of the newest entry, "0-0" for an empty stream: reading after it returns
        only what is appended later."""
        entries: Any = await self._redis.xrevrange(self._key, "+", "-", count=1)
        return _text(entries[0][0]) if entries else "0-0"

    async def holds(self, cursor: str) -> bool:
        """Whether an entry of the stream has this ID."""
        entries: Any = await self._redis.xrange(self._key, cursor, cursor, count=1)
        return bool(entries)

    async def first_cursor(self) -> str | None:
        entries: Any = await self._redis.xrange(self._key, "-", "+", count=1)
        return _text(entries[0][0]) if entries else None

    async def read_after(self, cursor: str, count: int) -> tuple[str, list[RecordedChange]]:
        """Up to `count` entries after `cursor`, waiting up to the block time for one; returns
        the new position (past entries of other projects and kinds too) and the changes."""
        async with asyncio.timeout(self._block_ms / 1000 + 10):
            response: Any = await self._redis.xread(
                {self._key: cursor}, count=count, block=self._block_ms
            )
        if not response:
            return cursor, []
        changes = []
        position = cursor
        for raw_id, fields in response[0][1]:
            position = _text(raw_id)
            try:
                project_id, message = decode_entry(SEGMENT_CHANGES, fields)
            except PoisonMessage:
                continue
            assert isinstance(message, bus_pb2.SegmentMembershipChanged)
            change = change_from_bus(message)
            if change is not None:
                changes.append(RecordedChange(position, project_id, message.profile_id, change))
        return position, changes
