"""The field checks of each identity request, run together: a request with several bad fields is
refused once, with one FieldViolation per bad field (the message and reason each check gives on
its own), before any write. No I/O, no gRPC."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar
from uuid import UUID

from services.identity.model import (
    check_custom_id,
    check_installation_id,
    check_merge_ids,
    check_request_id,
    check_unless_custom_id,
)
from shared.convert import profile_id_of
from shared.errors import InvalidArgument

P = ParamSpec("P")
T = TypeVar("T")


class Problems:
    """Collects the errors of one request's checks; raise_if_any() ends the validation."""

    def __init__(self) -> None:
        self._errors: list[InvalidArgument] = []

    def check(self, check: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """What `check` returns, or None when it refused its field (the error is kept)."""
        try:
            return check(*args, **kwargs)
        except InvalidArgument as error:
            self._errors.append(error)
            return None

    def raise_if_any(self) -> None:
        """Raises the kept errors as one, of the first error's kind (so its reason is what the
        caller saw when only that field was checked), with every field violation in order."""
        if not self._errors:
            return
        first = self._errors[0]
        if len(self._errors) == 1:
            raise first
        raise type(first)(
            "; ".join(error.message for error in self._errors),
            [violation for error in self._errors for violation in error.violations],
        )


def check_identify_request(
    installation_id: str, custom_id: str, request_id: str, extra_junk: Iterable[str]
) -> None:
    """Raises InstallationIdInvalid, CustomIdInvalid or RequestIdInvalid (the first bad field's)
    with a violation per bad field."""
    problems = Problems()
    problems.check(check_installation_id, installation_id)
    problems.check(check_custom_id, custom_id, extra_junk)
    problems.check(check_request_id, request_id)
    problems.raise_if_any()


def check_logout_request(installation_id: str, request_id: str, unless_custom_id: str = "") -> None:
    """Raises InstallationIdInvalid, RequestIdInvalid or CustomIdInvalid (`unless_custom_id`)
    with a violation per bad field."""
    problems = Problems()
    problems.check(check_installation_id, installation_id)
    problems.check(check_request_id, request_id)
    problems.check(check_unless_custom_id, unless_custom_id)
    problems.raise_if_any()


def check_merge_request(source_id: UUID, target_id: UUID, request_id: str) -> None:
    """Raises MergeIntoItself or RequestIdInvalid with a violation per bad field."""
    problems = Problems()
    problems.check(check_merge_ids, source_id, target_id)
    problems.check(check_request_id, request_id)
    problems.raise_if_any()


def merge_request_ids(source: str, target: str, request_id: str) -> tuple[UUID, UUID]:
    """A MergeProfilesRequest's source and target profile IDs, parsed; raises ProfileIdInvalid,
    MergeIntoItself or RequestIdInvalid with a violation per bad field (a profile named as both
    source and target is only known once both IDs parse)."""
    problems = Problems()
    source_id = problems.check(profile_id_of, source, "source_profile_id")
    target_id = problems.check(profile_id_of, target, "target_profile_id")
    if source_id is not None and target_id is not None:
        problems.check(check_merge_ids, source_id, target_id)
    problems.check(check_request_id, request_id)
    problems.raise_if_any()
    # Neither is None here: a refused ID raised above.
    assert source_id is not None
    assert target_id is not None
    return source_id, target_id


def delete_request_id(profile_id: str, request_id: str) -> UUID:
    """A DeleteProfileRequest's profile ID, parsed; raises ProfileIdInvalid or RequestIdInvalid
    with a violation per bad field."""
    problems = Problems()
    parsed = problems.check(profile_id_of, profile_id, "profile_id")
    problems.check(check_request_id, request_id)
    problems.raise_if_any()
    assert parsed is not None  # raised above otherwise
    return parsed
