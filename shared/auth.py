"""Who is calling: API keys of a project, or the internal service credential.

The calling project always comes from the credential, never from a request field. Services call
each other with the internal credential and pass the original caller's project in the
`x-profiles-project` header; that header means nothing next to an API key, and the internal
credential is refused on any RPC that the policy does not open to it.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from shared.auth_policy import INTERNAL, allowed_roles
from shared.errors import PermissionDenied, Unauthenticated
from shared.tenancy import ApiKey, TenancyRepository, secret_matches, split_key

PROJECT_HEADER = "x-profiles-project"
API_KEY_HEADER = "x-api-key"


@dataclass(frozen=True, slots=True)
class Caller:
    project_id: uuid.UUID
    role: str  # sdk, read, admin, or internal
    key_id: str | None
    display_name: str = ""  # the key's, as issued; "" for the internal credential


_current_caller: ContextVar[Caller | None] = ContextVar("profiles_caller", default=None)


def current_caller() -> Caller:
    """The authenticated caller of the RPC being served."""
    caller = _current_caller.get()
    if caller is None:
        raise RuntimeError("no authenticated caller: called outside an authenticated RPC")
    return caller


def set_current_caller(caller: Caller | None) -> object:
    return _current_caller.set(caller)


def reset_current_caller(token: object) -> None:
    _current_caller.reset(token)  # type: ignore[arg-type]


class MissingCredential(Unauthenticated):
    reason = "MISSING_CREDENTIAL"


class InvalidCredential(Unauthenticated):
    reason = "INVALID_CREDENTIAL"


class RoleNotAllowed(PermissionDenied):
    reason = "ROLE_NOT_ALLOWED"


def _credential(metadata: Sequence[tuple[str, str | bytes]]) -> tuple[str | None, str | None]:
    """(bearer token or API key, x-profiles-project) from the call's metadata."""
    token = project = None
    for name, value in metadata:
        if isinstance(value, bytes):
            continue
        if name == "authorization" and value[:7].lower() == "bearer ":
            token = value[7:].strip()
        elif name == API_KEY_HEADER:
            token = value.strip()
        elif name == PROJECT_HEADER:
            project = value.strip()
    return token, project


class Authenticator:
    """Verifies credentials; verified keys are cached for `cache_seconds` (so a revocation takes
    effect within that time) to keep the database off the path of every call."""

    def __init__(
        self, tenancy: TenancyRepository, internal_token: str, *, cache_seconds: float = 5.0
    ) -> None:
        self._tenancy = tenancy
        self._internal_token = internal_token
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, ApiKey, bytes]] = {}

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Caller:
        token, project = _credential(metadata)
        if not token:
            raise MissingCredential("missing credential: send `authorization: Bearer <API key>`")
        if self._internal_token and hmac.compare_digest(
            token.encode(), self._internal_token.encode()
        ):
            return self._internal_caller(project)
        parts = split_key(token)
        if parts is None:
            raise InvalidCredential("unknown or revoked API key")
        key_id, secret = parts
        found = await self._find_key(key_id)
        if found is None or not secret_matches(secret, found[1]):
            raise InvalidCredential("unknown or revoked API key")
        key = found[0]
        return Caller(
            project_id=key.project_id,
            role=key.role,
            key_id=key.key_id,
            display_name=key.display_name,
        )

    def _internal_caller(self, project: str | None) -> Caller:
        try:
            project_id = uuid.UUID(project or "")
        except ValueError:
            raise InvalidCredential(
                f"the internal credential needs a valid {PROJECT_HEADER} header"
            ) from None
        return Caller(project_id=project_id, role=INTERNAL, key_id=None)

    async def _find_key(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        found = await self._tenancy.find_active_key(key_id)
        if found is None:
            self._cache.pop(key_id, None)
            return None
        if len(self._cache) > 10_000:  # bounded: a flood of distinct keys cannot grow memory
            self._cache.clear()
        self._cache[key_id] = (now + self._cache_seconds, found[0], found[1])
        return found


def authorize(caller: Caller, method: str) -> None:
    """Raises PermissionDenied unless the caller's role may call `method` (a full method name)."""
    roles = allowed_roles(method)
    if caller.role not in roles:
        allowed = ", ".join(sorted(roles)) or "nobody"
        raise RoleNotAllowed(
            f"role {caller.role} may not call {method} (allowed: {allowed})",
            metadata={"role": caller.role, "method": method},
        )
