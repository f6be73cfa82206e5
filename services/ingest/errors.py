"""Ingest's errors, in domain words; shared/interceptors.py maps their kinds to status codes."""

from __future__ import annotations

from shared.errors import FailedPrecondition, InvalidArgument, Unavailable


class BatchInvalid(InvalidArgument):
    """The request as a whole is malformed: no events."""

    reason = "EVENTS_MISSING"


class TooManyEvents(BatchInvalid):
    reason = "TOO_MANY_EVENTS"


class RequestTooLarge(BatchInvalid):
    reason = "REQUEST_TOO_LARGE"


class EventInvalid(InvalidArgument):
    """One event of a batch was rejected; carried as that event's status, never raised."""


class EventErased(FailedPrecondition):
    """One event (or imported token) names a custom ID quarantined after an erasure; carried
    as its status, never raised."""

    reason = "ERASED"


class IdentityUnavailable(Unavailable):
    """Identity could not resolve the batch's installations; nothing was stored."""

    reason = "IDENTITY_UNAVAILABLE"


class StorageUnavailable(Unavailable):
    """The batch could not be committed; nothing of it was stored, retry it."""

    reason = "STORAGE_UNAVAILABLE"
