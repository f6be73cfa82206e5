"""Identity's rules without I/O: which keys are valid, which Identify rule applies, what a merge
does with custom IDs, and the answers kept for retried requests."""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

from services.identity.errors import (
    CustomIdConflict,
    CustomIdInvalid,
    InstallationIdInvalid,
    KeyMissing,
    MergeIntoItself,
    RequestIdInvalid,
)
from shared.errors import FieldViolation, InvalidArgument

MAX_KEYS = 1000
MAX_INSTALLATION_ID_LENGTH = 128
MAX_CUSTOM_ID_LENGTH = 512
# What an identity change names in place of a profile erased since (the nil UUID): the change
# stays in the other profile's history.
ERASED_SIDE = UUID(int=0)
MAX_REQUEST_ID_LENGTH = 64

# Values that SDKs and backends send when they have no real user ID ("null" from a JSON
# serializer, "[object Object]" from string concatenation, "0"/"-1" from unset integers...).
# Accepting one would merge everyone who sent it into one profile. Compared case-insensitively.
BUILT_IN_JUNK_CUSTOM_IDS = frozenset(
    {
        "null",
        "undefined",
        "nil",
        "none",
        "nan",
        "infinity",
        "true",
        "false",
        "0",
        "-1",
        "anonymous",
        "guest",
        "[object object]",
    }
)
_QUOTES = ("'", '"')


def _unquoted(value: str) -> str:
    """`value` without one pair of matching single or double quotes around it."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in _QUOTES:
        return value[1:-1]
    return value


def custom_id_problem(custom_id: str, extra_junk: Iterable[str] = ()) -> str | None:
    """Why `custom_id` is refused, or None when it is acceptable.

    Refused: empty, longer than 512 characters (never truncated), leading or trailing
    whitespace, and the junk values above or in `extra_junk` (a project's own list), compared
    case-insensitively, also when wrapped in single or double quotes.
    """
    if not custom_id:
        return "must not be empty"
    if len(custom_id) > MAX_CUSTOM_ID_LENGTH:
        return f"must be at most {MAX_CUSTOM_ID_LENGTH} characters"
    if custom_id != custom_id.strip():
        return "must not start or end with whitespace"
    folded = {custom_id.casefold(), _unquoted(custom_id).casefold()}
    junk = BUILT_IN_JUNK_CUSTOM_IDS | {value.casefold() for value in extra_junk}
    if folded & junk:
        return "is a placeholder value, not a user ID"
    return None


def installation_id_problem(installation_id: str) -> str | None:
    """Why `installation_id` is refused, or None when it is acceptable (1 to 128 characters)."""
    if not 1 <= len(installation_id) <= MAX_INSTALLATION_ID_LENGTH:
        return f"must be 1 to {MAX_INSTALLATION_ID_LENGTH} characters"
    return None


def check_installation_id(installation_id: str, field: str = "installation_id") -> None:
    """Raises InstallationIdInvalid (with `field`) unless the installation ID is acceptable."""
    problem = installation_id_problem(installation_id)
    if problem is not None:
        raise InstallationIdInvalid(
            f"{field} {problem}", [FieldViolation(field, problem, InstallationIdInvalid.reason)]
        )


def check_custom_id(custom_id: str, extra_junk: Iterable[str], field: str = "custom_id") -> None:
    """Raises CustomIdInvalid (with `field`) unless the custom ID is acceptable."""
    problem = custom_id_problem(custom_id, extra_junk)
    if problem is not None:
        raise CustomIdInvalid(
            f"{field} {problem}", [FieldViolation(field, problem, CustomIdInvalid.reason)]
        )


def check_unless_custom_id(unless_custom_id: str) -> None:
    """Raises CustomIdInvalid for a Logout's `unless_custom_id` over 512 characters. Only its
    length: it names the custom ID that keeps the installation, which no junk value is, so a
    junk one simply never matches."""
    if len(unless_custom_id) > MAX_CUSTOM_ID_LENGTH:
        problem = f"must be at most {MAX_CUSTOM_ID_LENGTH} characters"
        raise CustomIdInvalid(
            f"unless_custom_id {problem}",
            [FieldViolation("unless_custom_id", problem, CustomIdInvalid.reason)],
        )


def check_request_id(request_id: str) -> None:
    """Raises RequestIdInvalid unless `request_id` is empty (none) or at most 64 characters."""
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        problem = f"must be at most {MAX_REQUEST_ID_LENGTH} characters"
        raise RequestIdInvalid(
            f"request_id {problem}",
            [FieldViolation("request_id", problem, RequestIdInvalid.reason)],
        )


class ProfileKey(NamedTuple):
    """One key of a ResolveProfiles batch: exactly one of the two is set when valid.

    A named tuple rather than a dataclass (like Resolution below): a batch decodes up to 1,000
    of them per call, and a tuple is built and unpacked at a fraction of a frozen dataclass's
    cost (measured with bench/identity.py)."""

    installation_id: str | None = None
    custom_id: str | None = None


def key_problem(index: int, key: ProfileKey, extra_junk: Iterable[str]) -> InvalidArgument | None:
    """The error of one ResolveProfiles key (field `keys[index]`), or None when it is valid."""
    field = f"keys[{index}]"
    if key.installation_id is not None:
        problem = installation_id_problem(key.installation_id)
        kind: type[InvalidArgument] = InstallationIdInvalid
        what = "installation_id"
    elif key.custom_id is not None:
        problem = custom_id_problem(key.custom_id, extra_junk)
        kind = CustomIdInvalid
        what = "custom_id"
    else:
        problem = "must have an installation_id or a custom_id"
        return KeyMissing(f"{field} {problem}", [FieldViolation(field, problem, KeyMissing.reason)])
    if problem is None:
        return None
    return kind(f"{field}.{what} {problem}", [FieldViolation(field, problem, kind.reason)])


@dataclass(frozen=True, slots=True)
class KeyBatch:
    """A ResolveProfiles batch sorted out in one pass: the valid installation IDs and custom IDs
    (in request order, repeats kept) and the error of each invalid key by its index."""

    installation_ids: list[str]
    custom_ids: list[str]
    problems: dict[int, InvalidArgument]


def split_keys(keys: Iterable[ProfileKey], extra_junk: Iterable[str]) -> KeyBatch:
    """Sorts a batch's keys into valid installation IDs, valid custom IDs and errors (those of
    key_problem). One loop; key_problem, which builds the error, runs for invalid keys only."""
    installation_ids: list[str] = []
    custom_ids: list[str] = []
    problems: dict[int, InvalidArgument] = {}
    junk = tuple(extra_junk)
    for index, (installation_id, custom_id) in enumerate(keys):
        if installation_id is not None:
            if installation_id_problem(installation_id) is None:
                installation_ids.append(installation_id)
                continue
        elif custom_id is not None and custom_id_problem(custom_id, junk) is None:
            custom_ids.append(custom_id)
            continue
        problem = key_problem(index, ProfileKey(installation_id, custom_id), junk)
        assert problem is not None
        problems[index] = problem
    return KeyBatch(installation_ids, custom_ids, problems)


class Resolution(NamedTuple):
    """The current profile of one key.

    A named tuple, not a dataclass: ResolveProfiles makes one per key (up to 1,000 per call,
    ingest calls it for every batch), and a frozen slotted dataclass's __init__ costs about
    twice a tuple's construction; the fields stay named and immutable all the same."""

    profile_id: UUID | None
    created: bool = False
    erased: bool = False
    identified: bool = False
    link_version: int = 0


# A profile's version when it is created (profiles.version DEFAULT 1, 0002_profiles.sql).
FIRST_VERSION = 1


@dataclass(frozen=True, slots=True)
class Profile:
    """A live profile as identity sees it (locked while a change is decided)."""

    profile_id: UUID
    custom_id: str | None
    merged_into: UUID | None = None
    version: int = FIRST_VERSION

    @property
    def identified(self) -> bool:
        return self.custom_id is not None


@dataclass(frozen=True, slots=True)
class InstallationLink:
    installation_id: str
    profile_id: UUID
    link_version: int


class IdentifyOutcome(enum.Enum):
    IDENTIFIED = "identified"  # rule 1
    MERGED = "merged"  # rule 2
    ALREADY_IDENTIFIED = "already_identified"  # rule 3
    MOVED = "moved"  # rule 4


def choose_identify_rule(current: Profile, holder: Profile | None) -> IdentifyOutcome:
    """Which Identify rule applies to an installation on `current` logging in with a custom ID
    held by `holder` (directly or as an alias; None when nobody holds it)."""
    if holder is not None and holder.profile_id == current.profile_id:
        return IdentifyOutcome.ALREADY_IDENTIFIED
    if not current.identified:
        return IdentifyOutcome.IDENTIFIED if holder is None else IdentifyOutcome.MERGED
    return IdentifyOutcome.MOVED


class ChangeKind(enum.Enum):
    MERGE = "merge"
    SPLIT = "split"


class ChangeCause(enum.Enum):
    IDENTIFY = "identify"
    LOGOUT = "logout"
    OPERATOR_MERGE = "operator_merge"
    TOKEN_REINTEGRATION = "token_reintegration"
    IDENTIFY_SWITCH = "identify_switch"


@dataclass(frozen=True, slots=True)
class IdentityChange:
    """One recorded merge or split (see identity_changes in 0003_identity.sql)."""

    change_id: UUID
    kind: ChangeKind
    cause: ChangeCause
    source_profile_id: UUID
    target_profile_id: UUID
    installation_ids: tuple[str, ...]
    change_time: datetime
    alias_custom_id: str | None = None


@dataclass(frozen=True, slots=True)
class MergeMoves:
    """What the repository moved when it merged a source profile into a target."""

    installation_ids: tuple[str, ...]
    # Older tombstones of the source, now pointing at the target directly.
    redirected_profile_ids: tuple[UUID, ...]
    # The source's version once it became a tombstone.
    source_version: int


@dataclass(frozen=True, slots=True)
class MergePlan:
    """What an operator merge does with custom IDs, decided before anything moves."""

    # The source's custom ID, kept as an alias resolving to the target.
    alias_custom_id: str | None
    # The source's custom ID, moved onto an anonymous target.
    inherited_custom_id: str | None


def check_merge_ids(source_id: UUID, target_id: UUID) -> None:
    """Raises MergeIntoItself when an operator names one profile as both source and target."""
    if source_id == target_id:
        raise MergeIntoItself(
            "a profile cannot be merged into itself",
            [FieldViolation("target_profile_id", "equals source_profile_id", "MERGE_INTO_ITSELF")],
        )


def plan_merge(source: Profile, target: Profile, allow_custom_id_conflict: bool) -> MergePlan:
    """Raises MergeIntoItself or CustomIdConflict; otherwise says what happens to custom IDs.

    Two identified profiles with different custom IDs merge only when the operator allows it,
    and then the source's custom ID becomes an alias of the target: a person with two accounts
    stays reachable under both. An identified source merged into an anonymous target gives the
    target its custom ID, so the custom ID keeps resolving to the person's data.
    """
    check_merge_ids(source.profile_id, target.profile_id)
    if source.custom_id is None:
        return MergePlan(alias_custom_id=None, inherited_custom_id=None)
    if target.custom_id is None:
        return MergePlan(alias_custom_id=None, inherited_custom_id=source.custom_id)
    if not allow_custom_id_conflict:
        raise CustomIdConflict(
            "both profiles are identified with different custom IDs; set"
            " allow_custom_id_conflict to merge them and keep the source's as an alias",
            metadata={
                "source_profile_id": str(source.profile_id),
                "target_profile_id": str(target.profile_id),
            },
        )
    return MergePlan(alias_custom_id=source.custom_id, inherited_custom_id=None)


@dataclass(frozen=True, slots=True)
class IdentifyResult:
    outcome: IdentifyOutcome
    profile_id: UUID
    merged_profile_id: UUID | None = None
    previous_profile_id: UUID | None = None
    profile_created: bool = False
    change_id: UUID | None = None


class LogoutOutcome(enum.Enum):
    NEW_ANONYMOUS_PROFILE = "new_anonymous_profile"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class LogoutResult:
    outcome: LogoutOutcome
    profile_id: UUID
    previous_profile_id: UUID | None = None
    change_id: UUID | None = None


@dataclass(frozen=True, slots=True)
class MergeResult:
    target_profile_id: UUID
    source_profile_id: UUID
    already_merged: bool
    alias_custom_id: str | None = None
    change_id: UUID | None = None
    merge_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class Erasure:
    """What one erasure removed, as the repository reports it."""

    # Tombstones that pointed at the erased profile, erased with it.
    tombstone_profile_ids: tuple[UUID, ...]
    # Installations unlinked (their next event starts a fresh anonymous profile).
    installation_ids: tuple[str, ...]
    # Events turned into bare dedupe markers.
    event_count: int
    # Other people's installations whose ID was one of the erased custom IDs (a Countly device
    # that switched users keeps its previous user's ID as its installation ID), as (old ID,
    # new ID): renamed, not unlinked, so their holders keep their history and device.
    renamed_installations: tuple[tuple[str, str], ...] = ()
    # The live profiles those installations' rows belong to (their holders now, and the
    # profiles holding their earlier events): their versions were raised.
    renamed_profile_ids: tuple[UUID, ...] = ()


@dataclass(frozen=True, slots=True)
class DeleteResult:
    profile_id: UUID
    custom_id_quarantined: bool
    quarantine_expire_time: datetime | None
    deleted_event_count: int
    unlinked_installation_count: int
    delete_time: datetime


# -- Keyed hashes of custom IDs (erasure) -------------------------------------------------------
# One random secret per project (custom_id_hmac_keys) yields a key per purpose, so the quarantine
# hash of a custom ID and its events' dedupe markers cannot be joined with each other.
QUARANTINE_PURPOSE = b"profiles.identity.quarantine.v1"
EVENT_MARKER_PURPOSE = b"profiles.identity.event-marker.v1"
# Erased server-side events keep this prefix plus a keyed hash in events.custom_id: the column
# must stay set (one of installation_id and custom_id is), and no SDK sends such a custom ID.
EVENT_MARKER_PREFIX = "erased:"


def _derived_key(secret: bytes, purpose: bytes) -> bytes:
    return hmac.new(secret, purpose, hashlib.sha256).digest()


def quarantine_digest(secret: bytes, custom_id: str) -> bytes:
    """The HMAC-SHA256 of a custom ID kept in quarantined_custom_ids."""
    key = _derived_key(secret, QUARANTINE_PURPOSE)
    return hmac.new(key, custom_id.encode(), hashlib.sha256).digest()


def event_marker(secret: bytes, custom_id: str) -> str:
    """What replaces an erased server-side event's custom ID: a keyed hash, unlinkable to the
    quarantine entry and meaningless without the project's secret."""
    key = _derived_key(secret, EVENT_MARKER_PURPOSE)
    return EVENT_MARKER_PREFIX + hmac.new(key, custom_id.encode(), hashlib.sha256).hexdigest()


# What an installation of another profile is renamed to when its ID is an erased custom ID:
# random, so that nothing, not even the project's secret, links it to the erased ID (a keyed
# hash would let whoever holds the secret confirm a guess for as long as the holder's history
# is kept). The prefix tells an operator why the installation has such an ID; within the
# 128 characters installation IDs may have.
RENAMED_INSTALLATION_PREFIX = "renamed:"


def renamed_installation_id() -> str:
    """A new, random ID for an installation whose ID was an erased custom ID."""
    return RENAMED_INSTALLATION_PREFIX + secrets.token_hex(16)


def quarantine_end(now: datetime, quarantine_days: int) -> datetime | None:
    """When a custom ID erased now leaves quarantine; None when the project keeps no quarantine
    (setting identity.quarantine_days is 0)."""
    if quarantine_days <= 0:
        return None
    return now + timedelta(days=quarantine_days)


# -- ExportProfile ------------------------------------------------------------------------------
class ExportSection(enum.Enum):
    """The sections of an export, in stream order (ExportSection in the proto)."""

    PROFILE = "profile"
    ATTRIBUTES = "attributes"
    SUBSCRIPTIONS = "subscriptions"
    INSTALLATIONS = "installations"
    IDENTITY_HISTORY = "identityHistory"
    SESSIONS = "sessions"
    EVENTS = "events"
    REJECTED_EVENTS = "rejectedEvents"
    SEGMENTS = "segments"
    ENGAGEMENT = "engagement"
    FUNNEL_PROGRESS = "funnelProgress"


EXPORT_FORMAT_VERSION = 1
# What an export's identity history shows in place of a profile that is not the exported
# person's (the other side of a split on a shared device: whoever logged in next, or the
# person before them; a side erased since): another person's profile ID is theirs to know.
EXPORT_OTHER_PROFILE = "another profile"
# A chunk holds at most this many records, and at most about this many bytes of JSON (one
# record larger than that, say an event with a long stack trace, still goes alone).
EXPORT_CHUNK_RECORDS = 500
EXPORT_CHUNK_BYTES = 900 * 1024


@dataclass(frozen=True, slots=True)
class ExportChunk:
    """One chunk of an export: a JSON document and how many records it holds."""

    section: ExportSection
    section_chunk_index: int
    json: str
    record_count: int
    section_end: bool


# Answers are kept as JSON (identity_requests.answer) so that a retried request gets exactly the
# first answer back; these turn a result into plain JSON values and back.
Answer = IdentifyResult | LogoutResult | MergeResult | DeleteResult


def _plain(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def answer_to_json(answer: Answer) -> dict[str, Any]:
    return {f.name: _plain(getattr(answer, f.name)) for f in fields(answer)}


def _uuid(value: Any) -> UUID | None:
    return None if value is None else UUID(value)


def identify_result_from_json(data: Mapping[str, Any]) -> IdentifyResult:
    return IdentifyResult(
        outcome=IdentifyOutcome(data["outcome"]),
        profile_id=UUID(data["profile_id"]),
        merged_profile_id=_uuid(data["merged_profile_id"]),
        previous_profile_id=_uuid(data["previous_profile_id"]),
        profile_created=bool(data["profile_created"]),
        change_id=_uuid(data["change_id"]),
    )


def logout_result_from_json(data: Mapping[str, Any]) -> LogoutResult:
    return LogoutResult(
        outcome=LogoutOutcome(data["outcome"]),
        profile_id=UUID(data["profile_id"]),
        previous_profile_id=_uuid(data["previous_profile_id"]),
        change_id=_uuid(data["change_id"]),
    )


def merge_result_from_json(data: Mapping[str, Any]) -> MergeResult:
    merge_time = data["merge_time"]
    return MergeResult(
        target_profile_id=UUID(data["target_profile_id"]),
        source_profile_id=UUID(data["source_profile_id"]),
        already_merged=bool(data["already_merged"]),
        alias_custom_id=data["alias_custom_id"],
        change_id=_uuid(data["change_id"]),
        merge_time=None if merge_time is None else datetime.fromisoformat(merge_time),
    )


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def delete_result_from_json(data: Mapping[str, Any]) -> DeleteResult:
    delete_time = _time(data["delete_time"])
    assert delete_time is not None
    return DeleteResult(
        profile_id=UUID(data["profile_id"]),
        custom_id_quarantined=bool(data["custom_id_quarantined"]),
        quarantine_expire_time=_time(data["quarantine_expire_time"]),
        deleted_event_count=int(data["deleted_event_count"]),
        unlinked_installation_count=int(data["unlinked_installation_count"]),
        delete_time=delete_time,
    )
