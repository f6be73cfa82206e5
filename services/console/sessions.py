"""Console sessions, kept server-side in Redis so replicas share them.

The browser holds an opaque random session ID only; Redis holds the session under the ID's hash
(a copy of Redis does not yield usable cookies): the key, sealed (AES-GCM) with a key derived
from the session ID, which Redis never sees, so a copy of Redis (a backup, a shared instance,
MONITOR) does not yield the project keys either; the key's role and project (as GetCaller named
them at sign-in), the session's CSRF token and when it was created, in clear, the role and
project bound to the sealed key (altered, the record does not open). Sessions expire after
`idle_seconds` without a request (a person's request renews the expiry; a page's automatic
refresh and the live feeds' checks do not), and `max_age_seconds` after sign-in whatever their
use: a stolen cookie or a tab left open does not stay signed in for good.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.asyncio import Redis

IDLE_SECONDS = 8 * 3600
# A working week: a person signs in again once a week at most.
MAX_AGE_SECONDS = 7 * 24 * 3600
COOKIE = "profiles_console_session"
SIGNIN_CSRF_COOKIE = "profiles_console_signin"
# HKDF's label: the sealing key is for this purpose only (and a later format gets a new label).
SEAL_INFO = b"profiles console session: sealed api key v1"
# Why a session ended, as the sign-in page and the live feeds tell it: the key was refused
# (revoked or unknown), the session expired, the person signed out, or signed in again in this
# browser (another tab), which replaces its session, maybe with a key of another role.
KEY_REFUSED = "key"
EXPIRED = "1"
SIGNED_OUT = "signed_out"
SIGNED_IN_AGAIN = "again"
# How long an ended session's reason stays in its place: the person's next page reads it.
ENDED_SECONDS = 24 * 3600
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce, random per write
TAG_BYTES = 16


@dataclass(frozen=True, slots=True)
class SessionEnding:
    """Why a session no longer holds (`why`: one of the reasons above) and, when the person
    signed in again, the new session's role and project."""

    why: str
    role: str = ""
    project_id: str = ""


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    session_id: str
    key: str = field(repr=False)  # a logged session must not print the key
    role: str  # read or admin
    csrf_token: str
    project_id: str  # the key's project, a UUID string (GetCaller)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def tokens_match(expected: str, given: str) -> bool:
    """Constant-time comparison; an empty expected token never matches."""
    return bool(expected) and hmac.compare_digest(expected.encode(), given.encode())


def _cipher(session_id: str) -> AESGCM:
    """AES-256-GCM under a key derived from the session ID (256 random bits, so HKDF needs no
    salt): only the cookie's holder can open what it seals."""
    secret = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEAL_INFO).derive(
        session_id.encode()
    )
    return AESGCM(secret)


def _bound(role: str, project_id: str) -> bytes:
    """What a sealed key is bound to: its role and project, stored beside it in clear."""
    return f"{role}\n{project_id}".encode()


def seal(session_id: str, key: str, role: str, project_id: str) -> bytes:
    """The key encrypted for the session: nonce, then ciphertext and tag. The role and the
    project are authenticated with it, so a record whose role or project was changed in Redis
    does not open."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _cipher(session_id).encrypt(nonce, key.encode(), _bound(role, project_id))


def unseal(session_id: str, sealed: bytes, role: str, project_id: str) -> str | None:
    """The key `seal` sealed for this session, role and project; None for anything else
    (altered, another session's, or not sealed at all)."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        return None
    nonce, ciphertext = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        plain = _cipher(session_id).decrypt(nonce, ciphertext, _bound(role, project_id))
        return plain.decode()
    except (InvalidTag, UnicodeDecodeError):
        return None


def _text(value: bytes | str | None) -> str:
    """A Redis field as text; "" when missing or not UTF-8 (an altered record)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        return ""


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

    async def create(self, key: str, role: str, project_id: str) -> ConsoleSession:
        session = ConsoleSession(new_token(), key, role, new_token(), project_id)
        name = self._name(session.session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            created = str(int(time.time()))
            pipe.hset(
                name,
                mapping={
                    "sealed_key": seal(session.session_id, key, role, project_id),
                    "role": role,
                    "project": project_id,
                    "csrf": session.csrf_token,
                    "created": created,
                },
            )
            pipe.expire(name, min(self._idle, self._max_age))
            await pipe.execute()
        return session

    async def get(self, session_id: str, *, renew: bool = True) -> ConsoleSession | None:
        """The session, its idle expiry renewed (unless `renew` is False: a request no person
        made); None when unknown or expired, idle or past its maximum age, or when its key does
        not open (an altered record, or one stored in clear before keys were sealed)."""
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
        if not fields or b"ended" in fields:
            return None
        left = self._seconds_left(_text(fields.get(b"created")))
        role, csrf = _text(fields.get(b"role")), _text(fields.get(b"csrf"))
        project_id = _text(fields.get(b"project"))
        key = unseal(session_id, fields.get(b"sealed_key", b""), role, project_id)
        if left <= 0 or key is None or not csrf:
            # Over, or of no use: removed, so a record from before keys were sealed does not
            # keep its key in clear until it expires.
            await self._redis.delete(name)
            return None
        if renew and left < self._idle:
            # In its last idle period: Redis drops it at its maximum age, not later.
            await self._redis.expire(name, left)
        return ConsoleSession(session_id, key, role, csrf, project_id)

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

    async def end(
        self, session_id: str, why: str, *, successor: ConsoleSession | None = None
    ) -> None:
        """Ends the session and leaves, for ENDED_SECONDS, why in its place (`why`: KEY_REFUSED,
        SIGNED_OUT, or SIGNED_IN_AGAIN with the `successor` session's role and project): a live
        feed of the session, in another tab, tells the person why it stopped, and a page
        opened with a revoked key's cookie says so instead of a bare sign-in. The key, the CSRF
        token and the sign-in time go at once; only the reason stays."""
        if not session_id:
            return
        name = self._name(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(name)
            pipe.hset(name, "ended", why)
            if successor is not None:
                pipe.hset(name, "role", successor.role)
                pipe.hset(name, "project", successor.project_id)
            pipe.expire(name, ENDED_SECONDS)
            await pipe.execute()

    async def ending(self, session_id: str) -> SessionEnding:
        """Why a session that no longer holds ended: what `end` left, else EXPIRED (its
        cookie outlived it: idle too long, or past its maximum age); why "" for no session
        ID (never signed in)."""
        if not session_id:
            return SessionEnding("")
        fields = await self._redis.hgetall(self._name(session_id))
        return SessionEnding(
            _text(fields.get(b"ended")) or EXPIRED,
            _text(fields.get(b"role")),
            _text(fields.get(b"project")),
        )

    async def why_ended(self, session_id: str) -> str:
        """`ending`'s reason alone."""
        return (await self.ending(session_id)).why

    async def delete(self, session_id: str) -> None:
        if session_id:
            await self._redis.delete(self._name(session_id))
