"""What the identity model tests (test_identity_model_*.py) check once each dialect's traffic is
sent: every profile as query shows it against the model's people and events. Each event stored
exactly once, on the profile of the person the model says; one profile per person, with the
custom ID (or none) the model gives it; no other profile."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from profiles.query.v1 import query_service_pb2 as query_pb
from tests.conftest import eventually
from tests.edge.conftest import Edge

# A person: ("user", custom ID) or ("anonymous", installation ID).
Person = tuple[str, str]


class LandingModel(Protocol):
    """Where a dialect's model says each event belongs."""

    @property
    def events(self) -> Any: ...  # the events' keys (their IDs, or what identifies them)

    def people(self) -> set[Person]: ...

    def person_of(self, event_key: str) -> Person: ...


def event_id_of(event: Any) -> str:
    return str(event.event_id)


@dataclass(slots=True)
class Observed:
    """What query shows: every profile, the custom events on each, the profile of each
    person the model names."""

    profiles: dict[str, Any]  # profile ID -> ProfileRow
    events: list[tuple[str, str]]  # (event key, profile ID), one per stored custom event
    person_profiles: dict[Person, str]  # person -> profile ID ("" when not found)


async def observe(
    edge: Edge, people: set[Person], event_key: Callable[[Any], str] = event_id_of
) -> Observed:
    reply = await edge.query.ListProfiles(
        query_pb.ListProfilesRequest(page_size=500), metadata=edge.read()
    )
    profiles = {row.profile_id: row for row in reply.profiles}
    events = [
        (event_key(event), profile_id)
        for profile_id in profiles
        for event in await edge.events(profile_id)
        if event.HasField("custom")
    ]
    person_profiles = {}
    for kind, key in people:
        lookup = {"custom_id": key} if kind == "user" else {"installation_id": key}
        found = await edge.stored_profile(**lookup)
        person_profiles[kind, key] = "" if found is None else found.summary.profile_id
    return Observed(profiles, events, person_profiles)


def discrepancies(model: LandingModel, observed: Observed) -> list[str]:
    """Everything where the edge's answer differs from the model's, in words."""
    found = []
    people = model.people()
    by_person = observed.person_profiles
    if len(set(by_person.values())) != len(people) or "" in by_person.values():
        found.append(f"people -> profiles {by_person} (expected one profile each)")
    if set(observed.profiles) != set(by_person.values()):
        extra = set(observed.profiles) - set(by_person.values())
        found.append(f"profiles {sorted(observed.profiles)}, extra {sorted(extra)}")
    for (kind, key), profile_id in by_person.items():
        row = observed.profiles.get(profile_id)
        if row is None:
            continue
        expected_custom_id = key if kind == "user" else ""
        if (row.custom_id, row.anonymous) != (expected_custom_id, kind == "anonymous"):
            found.append(f"{kind} {key}: custom ID {row.custom_id!r}, anonymous {row.anonymous}")
    stored: dict[str, list[str]] = {}
    for key, profile_id in observed.events:
        stored.setdefault(key, []).append(profile_id)
    for key in model.events:
        person = model.person_of(key)
        expected = [by_person.get(person, "?")]
        if stored.get(key) != expected:
            found.append(f"event {key} of {person}: on {stored.get(key)}, not {expected}")
    for key in set(stored) - set(model.events):
        found.append(f"event {key} was never sent as an event")
    return found


def misplaced_for_good(model: LandingModel, observed: Observed) -> bool:
    """Whether an event is stored once, on the profile of another person of the model than its
    own: no later write can move it. The tests check once every request was answered, and the
    edge answers once ingest stored the events, and identity merged profiles (moving their
    events), in the transactions that answered; GetProfile and ListEvents read those tables.
    Only the users table (ListProfiles, query's projection) lags, which is why `check` waits:
    until then an event may be missing, or seen twice through a profile merged since."""
    current = set(observed.person_profiles.values()) - {""}
    stored: dict[str, list[str]] = {}
    for key, profile_id in observed.events:
        stored.setdefault(key, []).append(profile_id)
    for key in model.events:
        on = stored.get(key, [])
        expected = observed.person_profiles.get(model.person_of(key), "")
        if len(on) == 1 and on[0] in current and on[0] != expected:
            return True
    return False


async def check(
    edge: Edge,
    model: LandingModel,
    within: float = 20,
    event_key: Callable[[Any], str] = event_id_of,
) -> None:
    """Waits (up to `within` seconds) for what query shows to match the model, or for an event
    to be misplaced for good (no wait can mend it); then fails saying every difference."""
    people = model.people()
    latest: list[str] = ["nothing read"]

    async def decided() -> bool:
        observed = await observe(edge, people, event_key)
        latest[:] = discrepancies(model, observed)
        return not latest or misplaced_for_good(model, observed)

    with contextlib.suppress(TimeoutError):  # then say what differs
        await eventually(decided, within=within)
    assert latest == [], "\n".join(latest)
