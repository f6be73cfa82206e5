"""Segments' errors, in domain words; shared/interceptors.py maps their kinds to statuses."""

from __future__ import annotations

from shared.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound


class ProfileIdInvalid(InvalidArgument):
    reason = "PROFILE_ID_INVALID"


class PlatformInvalid(InvalidArgument):
    reason = "PLATFORM_INVALID"


class CursorInvalid(InvalidArgument):
    """A `start_after` that is not a change stream cursor."""

    reason = "CURSOR_INVALID"


class SegmentFilterInvalid(InvalidArgument):
    """A watch filter naming SMART_SEGMENT_UNSPECIFIED or SMART_SEGMENT_FLAG_UNSPECIFIED."""

    reason = "SEGMENT_FILTER_INVALID"


class SegmentIdInvalid(InvalidArgument):
    reason = "SEGMENT_ID_INVALID"


class ProfileNotFound(NotFound):
    """No such profile in the project, or erased."""

    reason = "PROFILE_NOT_FOUND"


class SegmentNotFound(NotFound):
    reason = "SEGMENT_NOT_FOUND"


class CursorExpired(FailedPrecondition):
    """`start_after` is older than the change stream's retention; resume from a time instead."""

    reason = "CURSOR_EXPIRED"


class ConcurrentChange(Aborted):
    """Two transactions on the same profiles deadlocked; the loser rolled back and may retry."""

    reason = "CONCURRENT_CHANGE"
