"""Query's errors, in domain words; shared/interceptors.py maps their kinds to statuses."""

from __future__ import annotations

from shared.errors import FailedPrecondition, InvalidArgument, NotFound


class RequestInvalid(InvalidArgument):
    """A malformed request field (a lookup, a filter, a page size or a date range)."""

    reason = "REQUEST_INVALID"


class PageTokenInvalid(InvalidArgument):
    """A page token that is not one of ours, or was issued for other request fields."""

    reason = "PAGE_TOKEN_INVALID"


class ProfileNotFound(NotFound):
    """No such profile in the caller's project (never created, erased, or another project's)."""

    reason = "PROFILE_NOT_FOUND"


class SegmentNotFound(NotFound):
    """No such custom segment in the caller's project (never created, deleted, or another
    project's)."""

    reason = "SEGMENT_NOT_FOUND"


class AmbiguousLookup(FailedPrecondition):
    """An email or phone number held by several profiles; metadata `profile_ids` names them."""

    reason = "AMBIGUOUS_LOOKUP"
