"""What a dialect's translator returns: the ordered steps the client layer executes.

Pure dataclasses, no I/O. A translator turns one parsed HTTP request into a `Translation`; the
client layer runs its steps in order, each only after the previous one succeeded, so a login
(`Identify`) happens after the anonymous events sent before it in the same request and before
the events sent after it. Consecutive `Track` and `Reject` steps may be merged into one
TrackEvents call by the client layer (order within the call is kept); `Identify` and `Logout`
are barriers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb


@dataclass(frozen=True, slots=True)
class Track:
    """Events to store through ingest's TrackEvents, in order. Each event carries its own
    `event_id` (the SDK's message ID, or one derived deterministically from the request), so a
    retried request stores nothing twice."""

    events: Sequence[ingest_pb.Event]


@dataclass(frozen=True, slots=True)
class Identify:
    """A login: identity's Identify of `installation_id` with `custom_id`. `request_id` is
    derived from the message (its ID), so that a retried request is answered as the first."""

    installation_id: str
    custom_id: str
    request_id: str = ""
    # Events sent only once this login succeeded (with the events that follow it): what
    # would make an installation of a custom ID identity refuses must not be stored then.
    then: Sequence[ingest_pb.Event] = ()


@dataclass(frozen=True, slots=True)
class Logout:
    """A logout: identity's Logout of `installation_id` (later events land on a new anonymous
    profile). An installation identity has never seen is a no-op, not an error."""

    installation_id: str
    request_id: str = ""
    # When set, no logout if the installation's profile holds this custom ID (identity's
    # LogoutRequest.unless_custom_id).
    unless_custom_id: str = ""


@dataclass(frozen=True, slots=True)
class Reject:
    """A message the edge cannot translate (an unknown type, a refused alias, an unusable name).
    It is sent to ingest as an `UntranslatedMessage` event, which ingest always rejects with
    `reason` and keeps for ListRejectedEvents, `message` included. `message` must already be
    free of API keys and IP addresses (see `scrub`)."""

    reason: str
    explanation: str
    message: Mapping[str, Any]
    event_id: str = ""
    installation_id: str = ""
    custom_id: str = ""


Step = Track | Identify | Logout | Reject


@dataclass(frozen=True, slots=True)
class Translation:
    """The steps of one request, in order, and how many SDK messages it held (for metrics).
    `failures`: what the translator raised on messages it then rejected (see backstop.py),
    for the handler to log and count. `ignored`: messages dropped on purpose as the SDK's own
    (PostHog's `$feature_flag_called`...), for the handler to count."""

    steps: Sequence[Step] = field(default_factory=tuple)
    message_count: int = 0
    failures: Sequence[Exception] = ()
    ignored: int = 0


class RequestInvalid(Exception):
    """The request as a whole can never succeed (unreadable body, no key, over a size limit):
    the handler answers the dialect's 4xx and stores nothing. `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


# Keys of a message that name a credential or an IP address, at any depth: removed before a
# message is kept as a rejected event (and never logged).
SECRET_KEYS = frozenset(
    {
        "writekey",
        "write_key",
        "api_key",
        "apikey",
        "token",
        "app_key",
        "ip",
        "$ip",
        "client_ip",
        "x-forwarded-for",
    }
)


def scrub(message: Any, secrets: frozenset[str] = SECRET_KEYS) -> Any:
    """The message with every key of `secrets` (lower-case; compared case-insensitively)
    removed at any depth; lists
    and scalars are copied as they are. Push tokens (`context.device.token`) are secrets too.
    Iterative: a message may nest as deep as the edge's JSON reader admits (1,000 levels), past
    Python's recursion limit (a recursive copy raised RecursionError at about 900, and the
    message was lost as a translation failure)."""
    copy = _shell(message)
    pending: list[tuple[Any, Any]] = [] if copy is message else [(message, copy)]
    while pending:
        source, target = pending.pop()
        if isinstance(source, Mapping):
            for key, value in source.items():
                if str(key).lower() not in secrets:
                    target[str(key)] = child = _shell(value)
                    if child is not value:
                        pending.append((value, child))
        else:
            for value in source:
                child = _shell(value)
                target.append(child)
                if child is not value:
                    pending.append((value, child))
    return copy


def _shell(value: Any) -> Any:
    """An empty container of the value's kind, for scrub to fill; a scalar as it is."""
    if isinstance(value, Mapping):
        return {}
    if isinstance(value, list):
        return []
    return value
