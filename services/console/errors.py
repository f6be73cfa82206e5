"""What can go wrong when the console calls a service, in the words a page needs, and a request
body too large to read.

Plain exceptions, no gRPC: backend.py translates status codes into these once.
"""

from __future__ import annotations


class ConsoleError(Exception):
    """Base of the console's errors."""


class SignedOut(ConsoleError):
    """The key was refused (UNAUTHENTICATED): revoked or unknown; the session ends."""


class Forbidden(ConsoleError):
    """The key's role may not make this call (PERMISSION_DENIED), or the console keeps an
    action to a role: then `action` says what was refused ("erase a profile") and `roles`
    which roles may do it, for the page to name."""

    def __init__(self, message: str = "", action: str = "", roles: tuple[str, ...] = ()) -> None:
        super().__init__(message or action)
        self.action = action
        self.roles = roles


class NotFound(ConsoleError):
    """No such profile, segment or funnel in the key's project (NOT_FOUND)."""


class BadInput(ConsoleError):
    """The service refused what the person typed (INVALID_ARGUMENT, FAILED_PRECONDITION)."""

    def __init__(
        self,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        fields: tuple[str, ...] = (),
        violations: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message  # the service's words, naming contract fields: not for a page
        self.reason = reason
        self.metadata = metadata or {}
        # The request fields the service refused (BadRequest paths such as `reasons[0]`), so a
        # page can say which of its boxes held the problem.
        self.fields = fields
        # Each refused field with the service's reason for it (`("steps[1].event_name", "must
        # match ...")`): the definition forms tell each beside its box, in their own words.
        self.violations = violations


class ServiceDown(ConsoleError):
    """A service did not answer: unreachable, failing, or slower than the console waits."""

    def __init__(self, service: str, timed_out: bool, detail: str = "") -> None:
        super().__init__(f"{service}: {'timed out' if timed_out else 'unavailable'}")
        self.service = service
        self.timed_out = timed_out
        self.detail = detail


class BodyTooLarge(Exception):
    """A request body over the console's limit (app.Guard): refused, with 413, unread. Not a
    ConsoleError: no service was called."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit
