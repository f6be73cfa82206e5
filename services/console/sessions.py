"""Console sessions, kept server-side in Redis so replicas share them.

The browser holds an opaque random session ID only; Redis holds the key under the ID's hash
(a copy of Redis does not yield usable cookies), with the role and the session's CSRF token.
Sessions expire after `idle_seconds` without a request: every read renews the expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from redis.asyncio import Redis

IDLE_SECONDS = 8 * 3600
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
    def __init__(self, redis: Redis, prefix: str, idle_seconds: int = IDLE_SECONDS) -> None:
        self._redis = redis
        self._prefix = prefix
        self._idle = idle_seconds

    def _name(self, session_id: str) -> str:
        digest = hashlib.sha256(session_id.encode()).hexdigest()
        return f"{self._prefix}:console:session:{digest}"

    async def create(self, key: str, role: str) -> ConsoleSession:
        session = ConsoleSession(new_token(), key, role, new_token())
        name = self._name(session.session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(name, mapping={"key": key, "role": role, "csrf": session.csrf_token})
            pipe.expire(name, self._idle)
            await pipe.execute()
        return session

    async def get(self, session_id: str) -> ConsoleSession | None:
        """The session, its idle expiry renewed; None when unknown or expired."""
        if not session_id:
            return None
        name = self._name(session_id)
        # One round trip without MULTI: an EXPIRE of a key that vanished meanwhile does nothing.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(name)
            pipe.expire(name, self._idle)
            fields, _ = await pipe.execute()
        if not fields:
            return None
        values = {k.decode(): v.decode() for k, v in fields.items()}
        return ConsoleSession(session_id, values["key"], values["role"], values["csrf"])

    async def alive(self, session_id: str) -> bool:
        """Whether the session still exists, without renewing it: an open live feed re-checks
        its session every few seconds and must not keep it from expiring."""
        return bool(session_id) and bool(await self._redis.exists(self._name(session_id)))

    async def delete(self, session_id: str) -> None:
        if session_id:
            await self._redis.delete(self._name(session_id))
