"""Request limits of the edge: reading a body within a size cap, decompressing within a cap,
and a token bucket per SDK key. Pure asyncio and zlib: no HTTP framework here."""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

MAX_DECOMPRESSED_BYTES = 10 * 1024 * 1024


class BodyTooLarge(Exception):
    """The body is over the limit (announced or read so far); nothing more is read."""


class BodyUnreadable(Exception):
    """The body could not be decoded (bad gzip, unknown encoding)."""


async def read_limited(
    chunks: AsyncIterator[bytes], content_length: str | None, limit: int
) -> bytes:
    """The whole body, refusing it as soon as it is known to exceed `limit` bytes: from its
    Content-Length before reading anything, else while reading."""
    if content_length is not None:
        try:
            announced = int(content_length)
        except ValueError as exc:
            raise BodyUnreadable("Content-Length is not a number") from exc
        if announced > limit:
            raise BodyTooLarge(f"{announced} bytes announced, over {limit}")
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


# The first two bytes of every gzip stream (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"
# Gzip members read in one body: SDKs send one; each further member copies the rest of the body
# (zlib's unused_data), so a body of many empty members would cost time quadratic in its size.
MAX_GZIP_MEMBERS = 16


def decompress(body: bytes, encoding: str, limit: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """The body decoded from gzip or deflate, stopping at `limit` bytes of output (a gzip bomb
    costs at most that much memory); identity returns it unchanged. The stream must be whole:
    one cut short (a gzip member without its CRC and length trailer, what a client's bug or a
    broken proxy leaves) is refused, not read as far as it goes; so are bytes after its end,
    except what gzip itself allows there (RFC 1952: further members, as `cat a.gz b.gz` makes,
    up to MAX_GZIP_MEMBERS; zero padding, which gzip(1) and Python's gzip module skip)."""
    encoding = encoding.strip().lower()
    if not encoding and body[:2] == GZIP_MAGIC:
        # posthog-js sends gzip as text/plain with no Content-Encoding (nor ?compression=) by
        # default; no JSON or form body starts with these bytes. PostHog's capture sniffs too.
        encoding = "gzip"
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "gzip-js"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise BodyUnreadable(f"Unsupported content encoding {encoding[:20]!r}")
    gzip = wbits != zlib.MAX_WBITS
    parts: list[bytes] = []
    size = 0
    rest = body
    for _ in range(MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise BodyUnreadable("The compressed body is corrupt") from exc
        size += len(out)
        if size > limit or inflater.unconsumed_tail:
            raise BodyTooLarge(f"over {limit} bytes decompressed")
        if not inflater.eof:
            raise BodyUnreadable("The compressed body is truncated")
        parts.append(out)
        rest = inflater.unused_data
        if not (gzip and rest[:2] == GZIP_MAGIC):
            break
    else:
        raise BodyUnreadable(f"The compressed body has over {MAX_GZIP_MEMBERS} gzip members")
    if rest and (not gzip or rest.strip(b"\0")):
        raise BodyUnreadable("The compressed body has bytes after its end")
    return b"".join(parts)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved. In memory, per
    process: each edge replica limits on its own (N replicas allow N times the rate). At most
    `max_keys` buckets are kept; the least recently used is forgotten (a forgotten bucket
    restarts full, which is what an idle key's bucket is anyway)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def acquire(self, key: str, now: float) -> float:
        """0 when the request may go; else the seconds to wait before retrying."""
        if self._rate <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self._rate


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
