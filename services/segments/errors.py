"""Segments' errors, in domain words; shared/interceptors.py maps their kinds to statuses."""

from __future__ import annotations

from shared.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)


class PlatformInvalid(InvalidArgument):
    reason = "PLATFORM_INVALID"


class CursorInvalid(InvalidArgument):
    """A `start_after` that is not a change stream cursor."""

    reason = "CURSOR_INVALID"


class StartTimeInvalid(InvalidArgument):
    """A watch's `start_time` further ahead than clocks drift."""

    reason = "START_TIME_INVALID"


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


class DefinitionInvalid(InvalidArgument):
    """A segment or funnel definition with bad fields; one violation per field."""

    reason = "DEFINITION_INVALID"


class UpdateMaskInvalid(InvalidArgument):
    """An update_mask path that is unknown, a sub-path, or names a field no update changes."""

    reason = "UPDATE_MASK_INVALID"


class EtagMismatch(Aborted):
    """An update's etag is not the definition's current one: it changed since it was read."""

    reason = "ETAG_MISMATCH"


class FunnelIdInvalid(InvalidArgument):
    reason = "FUNNEL_ID_INVALID"


class PageInvalid(InvalidArgument):
    """A negative `page_size` or a malformed `page_token`."""

    reason = "PAGE_INVALID"


class FunnelNotFound(NotFound):
    reason = "FUNNEL_NOT_FOUND"


class StepInvalid(InvalidArgument):
    """A step number the funnel has not, or a drop-off after its last step."""

    reason = "STEP_INVALID"


class SelectionInvalid(InvalidArgument):
    """A FunnelProfileSelection that is unset or unknown."""

    reason = "SELECTION_INVALID"


class FunnelChanged(Aborted):
    """A funnel's steps or window changed since the first page of a listing of its profiles:
    the pages would mix two rules."""

    reason = "FUNNEL_CHANGED"


class NameTaken(AlreadyExists):
    """Another segment (or funnel) of the project has this display name."""

    reason = "DISPLAY_NAME_TAKEN"


class RequestIdReused(FailedPrecondition):
    """The request_id created a different definition."""

    reason = "REQUEST_ID_REUSED"


class LimitReached(ResourceExhausted):
    """The project already has the most segments (100) or funnels (50) allowed."""

    reason = "DEFINITION_LIMIT_REACHED"


class RecomputeInterrupted(Unavailable):
    """The server running a RecomputeAll stopped; the next call starts a new run."""

    reason = "RECOMPUTE_INTERRUPTED"
