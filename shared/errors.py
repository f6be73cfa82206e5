"""Error kinds of the suite, in domain words. Services subclass these with a stable `reason`.

Only shared/interceptors.py knows how a kind maps to a gRPC status code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: `field` is a path such as `events[3].event_id`."""

    field: str
    description: str
    reason: str = ""


class DomainError(Exception):
    """Base of every error a caller may see with its own status code."""

    reason: str = "ERROR"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: list[FieldViolation] | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.violations = list(violations or [])


class NotFound(DomainError):
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    reason = "UNAUTHENTICATED"


class Aborted(DomainError):
    reason = "ABORTED"


class ResourceExhausted(DomainError):
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    reason = "UNAVAILABLE"


class Internal(DomainError):
    """A fault of the server's, not of the request: what the interceptor answers for an
    unexpected exception (never raised by domain code: a bug is not a domain outcome)."""

    reason = "INTERNAL"


def raised_from(exc: BaseException, test: Callable[[BaseException], bool]) -> bool:
    """True if `test` holds for `exc` or for what it was raised from (its cause, else its
    context), looking at most eight errors deep: drivers wrap the error that tells."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return False
        if test(current):
            return True
        current = current.__cause__ or current.__context__
    return False
