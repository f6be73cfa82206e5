"""Identity's errors, in domain words; shared/interceptors.py maps their kinds to statuses."""

from __future__ import annotations

from shared.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound


class KeysInvalid(InvalidArgument):
    """A ResolveProfiles request with no keys or too many."""

    reason = "KEYS_INVALID"


class KeyMissing(InvalidArgument):
    """A ProfileKey with neither an installation ID nor a custom ID."""

    reason = "KEY_MISSING"


class InstallationIdInvalid(InvalidArgument):
    reason = "INSTALLATION_ID_INVALID"


class CustomIdInvalid(InvalidArgument):
    """Empty, padded, too long, or a junk value such as "null"."""

    reason = "CUSTOM_ID_INVALID"


class RequestIdInvalid(InvalidArgument):
    reason = "REQUEST_ID_INVALID"


class RequestIdReused(InvalidArgument):
    """The same request_id was sent earlier with other fields."""

    reason = "REQUEST_ID_REUSED"


class MergeIntoItself(InvalidArgument):
    reason = "MERGE_INTO_ITSELF"


class InstallationNotFound(NotFound):
    reason = "INSTALLATION_NOT_FOUND"


class ProfileNotFound(NotFound):
    reason = "PROFILE_NOT_FOUND"


class CustomIdConflict(FailedPrecondition):
    """An operator merge of two identified profiles with different custom IDs, not allowed."""

    reason = "CUSTOM_ID_CONFLICT"


class CustomIdErased(FailedPrecondition):
    reason = "CUSTOM_ID_ERASED"


class ProfileMerged(FailedPrecondition):
    """An exact erasure or merge (DeleteProfileRequest.exact, MergeProfilesRequest.exact) of a
    profile merged into another since."""

    reason = "PROFILE_MERGED"


class ConcurrentChange(Aborted):
    """A concurrent change won a race (deadlock, unique violation, moved row). The service
    retries the whole transaction a few times and lets this through only after the last try."""

    reason = "CONCURRENT_CHANGE"
