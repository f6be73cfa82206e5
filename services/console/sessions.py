"""Console sessions, kept server-side in Redis so replicas share them.

The browser holds an opaque random session ID only; Redis holds the key under the ID's hash
(a copy of Redis does not yield usable cookies), with the role, the session's CSRF token and
when it was created. Sessions expire after `idle_seconds` without a request (a person's
request renews the expiry; a page's automatic refresh and the live feeds' checks do not), and
`max_age_seconds` after sign-in whatever their use: a stolen cookie or a tab left open does not
stay signed in for good.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis

IDLE_SECONDS = 8 * 3600
# A working week: a person signs in again once a week at most.
MAX_AGE_SECONDS = 7 * 24 * 3600
COOKIE = "profiles_console_session"
SIGNIN_CSRF_COOKIE = "profiles_console_signin"


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    session_id: str
    key: str
    role: str  # read or admin
    csrf_token: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def tokens_match(expected: str, given: str) -> bool:
    """Constant-time comparison; an empty expected token never matches."""
    return bool(expected) and hmac.compare_digest(expected.encode(), given.encode())


class SessionStore:
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        idle_seconds: int = IDLE_SECONDS,
        max_age_seconds: int = MAX_AGE_SECONDS,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._idle = idle_seconds
        self._max_age = max_age_seconds

    def _name(self, session_id: str) -> str:
        digest = hashlib.sha256(session_id.encode()).hexdigest()
        return f"{self._prefix}:console:session:{digest}"

    async def create(self, key: str, role: str) -> ConsoleSession:
        session = ConsoleSession(new_token(), key, role, new_token())
        name = self._name(session.session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            created = str(int(time.time()))
            pipe.hset(
                name,
                mapping={"key": key, "role": role, "csrf": session.csrf_token, "created": created},
            )
            pipe.expire(name, min(self._idle, self._max_age))
            await pipe.execute()
        return session

    async def get(self, session_id: str, *, renew: bool = True) -> ConsoleSession | None:
        """The session, its idle expiry renewed (unless `renew` is False: a request no person
        made); None when unknown or expired, idle or past its maximum age."""
        if not session_id:
            return None
        name = self._name(session_id)
        if renew:
            # One round trip without MULTI: an EXPIRE of a key that vanished meanwhile does
            # nothing.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(name)
                pipe.expire(name, self._idle)
                fields, _ = await pipe.execute()
        else:
            fields = await self._redis.hgetall(name)
        if not fields:
            return None
        values = {k.decode(): v.decode() for k, v in fields.items()}
        left = self._seconds_left(values.get("created", ""))
        if left <= 0:
            await self._redis.delete(name)
            return None
        if renew and left < self._idle:
            # In its last idle period: Redis drops it at its maximum age, not later.
            await self._redis.expire(name, left)
        return ConsoleSession(session_id, values["key"], values["role"], values["csrf"])

    async def alive(self, session_id: str) -> bool:
        """Whether the session still holds, without renewing it: an open live feed re-checks
        its session every few seconds and must not keep it from expiring."""
        if not session_id:
            return False
        created = await self._redis.hget(self._name(session_id), "created")
        if created is None:
            return False
        text = created.decode() if isinstance(created, bytes) else created
        return self._seconds_left(text) > 0

    def _seconds_left(self, created: str) -> int:
        """Seconds before a session created at `created` (Unix seconds) reaches its maximum age;
        0 for a session without that time (stored before sessions had a maximum age)."""
        if not created.isdigit():
            return 0
        return int(created) + self._max_age - int(time.time())

    async def delete(self, session_id: str) -> None:
        if session_id:
            await self._redis.delete(self._name(session_id))
