"""GetOverview end to end against a plain-Python model of its figures: random histories of a
few installations (sessions, installation updates, attribute and subscription changes, custom
events; device platforms with server-side API events on them) go in through ingest's
TrackEvents in random arrival order, with retries, between identity's Identify, Logout,
MergeProfiles and DeleteProfile; once the bus is drained, every figure on every platform must
equal the model's (the smart segment distribution and custom segment sizes are segments'
figures, tested beside segments, and not here).

The model knows only the documented rules (docs/query.md, overview.proto, docs/ingest.md,
docs/identity.md): installation fields hold the latest event's value by event time, the later
arrival on a tie, a session start clearing the uninstalled flag, a device platform winning over
API; attributes and consent are the replay of every change that reached the profile by event
time, then event ID, then origin; a merge moves everything to the survivor; an erasure removes
the profile and its installations (a later event starts a fresh anonymous profile); a profile's
language is its attribute, else that of its most recently seen installation reporting one, else
that of the most recently seen installation it left (Logout, Identify moving it away) reporting
one, as it was when it left (a merge takes the source's, the later departure from one
installation winning; an erasure drops them); its country that of its latest session with one;
on one platform, profile figures cover the profiles with an installation of it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from tests.conftest import create_test_project
from tests.support.identity import Identity
from tests.support.query import NOW, Suite, overview_figures, stamp, start_suite

SEEDS = range(30)
IOS, ANDROID, WEB, API = (
    types_pb2.PLATFORM_IOS,
    types_pb2.PLATFORM_ANDROID,
    types_pb2.PLATFORM_WEB,
    types_pb2.PLATFORM_API,
)
PLATFORMS = (0, IOS, ANDROID, WEB, API)
DEVICE_PLATFORMS = (IOS, ANDROID, WEB)
CHANNELS = {types_pb2.CHANNEL_EMAIL: "email", types_pb2.CHANNEL_SMS: "sms"}
CHANNELS[types_pb2.CHANNEL_PUSH] = "push"
KINDS = {
    types_pb2.SUBSCRIPTION_KIND_MARKETING: "marketing",
    types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL: "transactional",
}
NATIVE = {
    "email": types_pb2.NATIVE_ATTRIBUTE_EMAIL,
    "phone": types_pb2.NATIVE_ATTRIBUTE_PHONE,
    "language": types_pb2.NATIVE_ATTRIBUTE_LANGUAGE,
    "region": types_pb2.NATIVE_ATTRIBUTE_REGION,
}
ATTRIBUTE_VALUES = {
    "email": ["a@example.com", "b@example.com"],
    "phone": ["+33612345678"],
    "language": ["fr", "DE", "es"],
    "region": ["fr", "BE"],
}
# How ingest stores the values (docs/ingest.md: language ISO 639-1, region upper-case).
NORMALIZE = {"language": str.lower, "region": str.upper, "email": str.lower, "phone": str}
INSTALLATION_FIELDS = ("app_version", "push_token", "push_opt_in", "language", "uninstalled")


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


# --- the model ------------------------------------------------------------------------------


@dataclass
class Installation:
    fields: dict[str, tuple[datetime, int, Any]] = field(default_factory=dict)
    platforms: list[tuple[datetime, int, int]] = field(default_factory=list)  # time, arrival
    last_seen: datetime | None = None

    def set(self, name: str, time: datetime, arrival: int, value: Any) -> None:
        """The latest event by event time sets the field; the later arrival on a tie."""
        if name not in self.fields or (time, arrival) >= self.fields[name][:2]:
            self.fields[name] = (time, arrival, value)

    def value(self, name: str) -> Any:
        return self.fields[name][2] if name in self.fields else None

    @property
    def platform(self) -> int:
        """The latest event's platform, a device platform winning over API; 0: no event."""
        if not self.platforms:
            return 0
        devices = [p for p in self.platforms if p[2] != API]
        return max(devices or self.platforms)[2]

    @property
    def has_token(self) -> bool:
        return bool(self.value("push_token"))


@dataclass
class Change:
    """One attribute or subscription change, in replay order (time, event ID, origin, index)."""

    order: tuple[datetime, str, str, int]
    key: str  # attribute name, or "channel:kind"
    value: Any  # None: unset
    profile: int


@dataclass
class Session:
    start: datetime
    country: str
    profile: int


@dataclass
class ModelProfile:
    custom_id: str | None = None
    merged_into: int | None = None
    erased: bool = False
    # The installations it left, each as it was then: installation -> (departure, last seen,
    # language).
    former: dict[str, tuple[int, datetime, str | None]] = field(default_factory=dict)


@dataclass
class World:
    profiles: list[ModelProfile] = field(default_factory=list)
    owner: dict[str, int] = field(default_factory=dict)  # installation -> profile (identity)
    installations: dict[str, Installation] = field(default_factory=dict)  # ingest's details
    attributes: list[Change] = field(default_factory=list)
    subscriptions: list[Change] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    event_ids: set[tuple[str, str]] = field(default_factory=set)
    quarantined: set[str] = field(default_factory=set)
    arrivals: int = 0
    departures: int = 0

    def new_profile(self, custom_id: str | None = None) -> int:
        self.profiles.append(ModelProfile(custom_id))
        return len(self.profiles) - 1

    def profile_of(self, installation_id: str) -> int:
        if installation_id not in self.owner:
            self.owner[installation_id] = self.new_profile()
        return self.owner[installation_id]

    def live(self) -> list[int]:
        return [i for i, p in enumerate(self.profiles) if p.merged_into is None and not p.erased]

    def holder(self, custom_id: str) -> int | None:
        return next((i for i in self.live() if self.profiles[i].custom_id == custom_id), None)

    def leave(self, installation_id: str, profile: int) -> None:
        """A split moves the installation off the profile, which keeps its details as they
        are now (nothing when ingest never saw it)."""
        details = self.installations.get(installation_id)
        if details is None or details.last_seen is None:
            return
        self.departures += 1
        self.profiles[profile].former[installation_id] = (
            self.departures,
            details.last_seen,
            details.value("language"),
        )

    def merge(self, source: int, target: int) -> None:
        self.profiles[source].merged_into = target
        kept = self.profiles[target].former
        for installation_id, copy in self.profiles[source].former.items():
            if installation_id not in kept or copy[0] > kept[installation_id][0]:
                kept[installation_id] = copy
        self.profiles[source].former = {}
        for installation_id, profile in self.owner.items():
            if profile == source:
                self.owner[installation_id] = target
        for item in (*self.attributes, *self.subscriptions, *self.sessions):
            if item.profile == source:
                item.profile = target

    def identify(self, installation_id: str, custom_id: str) -> None:
        current = self.profile_of(installation_id)
        mine = self.profiles[current]
        holder = self.holder(custom_id)
        if mine.custom_id == custom_id:
            return
        if mine.custom_id is None:
            if holder is None:
                mine.custom_id = custom_id
            else:
                self.merge(current, holder)
            return
        self.leave(installation_id, current)
        self.owner[installation_id] = holder if holder is not None else self.new_profile(custom_id)

    def logout(self, installation_id: str) -> None:
        current = self.profile_of(installation_id)
        if self.profiles[current].custom_id is not None:
            self.leave(installation_id, current)
            self.owner[installation_id] = self.new_profile()

    def erase(self, profile: int) -> None:
        """The profile, its tombstones and its installations go; event IDs stay (dedupe)."""
        gone = {profile, *(i for i, p in enumerate(self.profiles) if p.merged_into == profile)}
        for i in gone:
            self.profiles[i].erased = True
            self.profiles[i].former = {}
        if self.profiles[profile].custom_id is not None:
            self.quarantined.add(self.profiles[profile].custom_id)  # type: ignore[arg-type]
        for installation_id in [i for i, p in self.owner.items() if p in gone]:
            del self.owner[installation_id]
            self.installations.pop(installation_id, None)
        self.attributes = [c for c in self.attributes if c.profile not in gone]
        self.subscriptions = [c for c in self.subscriptions if c.profile not in gone]
        self.sessions = [s for s in self.sessions if s.profile not in gone]

    def receive(self, event: ingest_pb.Event) -> int:
        """What ingest answers for one valid event, and what it stores."""
        if event.HasField("custom_id"):
            return self.receive_from_back_end(event)
        installation_id = event.installation_id
        key = (installation_id, event.event_id)
        if key in self.event_ids:
            return ingest_pb.EVENT_OUTCOME_DUPLICATE
        self.event_ids.add(key)
        profile = self.profile_of(installation_id)
        self.arrivals += 1
        arrival = self.arrivals
        time = event.event_time.ToDatetime().replace(tzinfo=NOW.tzinfo)
        details = self.installations.setdefault(installation_id, Installation())
        details.platforms.append((time, arrival, event.platform))
        details.last_seen = max(time, details.last_seen or time)
        self.store_changes(event, profile, time, "i:" + installation_id)
        kind = event.WhichOneof("payload")
        if kind == "session_start":
            details.set("uninstalled", time, arrival, False)
            country = event.session_start.country.upper()
            self.sessions.append(Session(time, country, profile))
        elif kind == "installation_update":
            update = event.installation_update
            for name in INSTALLATION_FIELDS:
                if update.HasField(name):
                    value = getattr(update, name)
                    details.set(name, time, arrival, value.lower() if name == "language" else value)
        return ingest_pb.EVENT_OUTCOME_ACCEPTED

    def receive_from_back_end(self, event: ingest_pb.Event) -> int:
        """An event sent with a custom ID: the profile holding it (created identified when
        none does), no installation; refused while the custom ID is quarantined."""
        custom_id = event.custom_id
        if custom_id in self.quarantined:
            return ingest_pb.EVENT_OUTCOME_REJECTED
        key = ("c:" + custom_id, event.event_id)
        if key in self.event_ids:
            return ingest_pb.EVENT_OUTCOME_DUPLICATE
        self.event_ids.add(key)
        profile = self.holder(custom_id)
        if profile is None:
            profile = self.new_profile(custom_id)
        time = event.event_time.ToDatetime().replace(tzinfo=NOW.tzinfo)
        self.store_changes(event, profile, time, "c:" + custom_id)
        return ingest_pb.EVENT_OUTCOME_ACCEPTED

    def store_changes(
        self, event: ingest_pb.Event, profile: int, time: datetime, origin: str
    ) -> None:
        """The event's attribute or consent changes, in replay order."""
        order_of = (time, event.event_id, origin)
        kind = event.WhichOneof("payload")
        if kind == "attribute_operations":
            for index, op in enumerate(event.attribute_operations.operations):
                name = next(n for n, number in NATIVE.items() if number == op.native_attribute)
                value = None
                if op.kind == types_pb2.ATTRIBUTE_OPERATION_KIND_SET:
                    value = NORMALIZE[name](op.value.string_value)
                self.attributes.append(Change((*order_of, index), name, value, profile))
        elif kind == "subscription_change":
            change = event.subscription_change
            pair = f"{CHANNELS[change.channel]}:{KINDS[change.kind]}"
            self.subscriptions.append(Change((*order_of, 0), pair, change.subscribed, profile))

    def replayed(self, changes: list[Change], profile: int) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for change in sorted((c for c in changes if c.profile == profile), key=lambda c: c.order):
            if change.value is None:
                state.pop(change.key, None)
            else:
                state[change.key] = change.value
        return state

    def figures(self, platform: int) -> dict[str, Any]:
        """The overview's figures in tests.support.query.overview_figures' shape."""
        figures: dict[str, Any] = {
            "installs": 0,
            "tokens": 0,
            "opt_ins": 0,
            "imported_unseen": 0,
            "platforms": {},
            "app_versions": {},
            "identified": 0,
            "anonymous": 0,
            "sessionless": 0,
            "addressable": {},
            "subscribed": {},
            "reach": {"email": 0, "sms": 0, "push": 0},
            "languages": {},
            "regions": {},
            "countries": {},
        }

        def bump(name: str, key: Any) -> None:
            figures[name][key] = figures[name].get(key, 0) + 1

        names = {p: types_pb2.Platform.Name(p) for p in (IOS, ANDROID, WEB, API)}  # type: ignore[arg-type]
        for installation_id in self.owner:
            details = self.installations.get(installation_id, Installation())
            if platform and details.platform != platform:
                continue
            figures["installs"] += 1
            figures["tokens"] += details.has_token
            figures["opt_ins"] += bool(details.value("push_opt_in"))
            if not details.value("uninstalled"):
                bump("platforms", names.get(details.platform, ""))
                version = details.value("app_version")
                known = version and details.platform
                bump("app_versions", (version, details.platform) if known else "")
        for profile in self.live():
            mine = [
                self.installations[i]
                for i, p in self.owner.items()
                if p == profile and i in self.installations
            ]
            if platform and not any(d.platform == platform for d in mine):
                continue
            figures["identified" if self.profiles[profile].custom_id else "anonymous"] += 1
            sessions = sorted(
                (s for s in self.sessions if s.profile == profile), key=lambda s: s.start
            )
            figures["sessionless"] += not sessions
            attributes = self.replayed(self.attributes, profile)
            subscribed = {k for k, v in self.replayed(self.subscriptions, profile).items() if v}
            address = {
                "email": "email" in attributes,
                "sms": "phone" in attributes,
                "push": any(d.has_token for d in mine),
            }
            for channel, has_address in address.items():
                for kind in ("marketing", "transactional"):
                    if has_address:
                        bump("addressable", f"{channel}:{kind}")
                        if f"{channel}:{kind}" in subscribed:
                            bump("subscribed", f"{channel}:{kind}")
            figures["reach"]["email"] += address["email"] and "email:marketing" in subscribed
            figures["reach"]["sms"] += address["sms"] and "sms:marketing" in subscribed
            figures["reach"]["push"] += any(d.has_token and d.value("push_opt_in") for d in mine)
            spoken = sorted((d for d in mine if d.value("language")), key=lambda d: d.last_seen)
            left = sorted(
                (c for c in self.profiles[profile].former.values() if c[2]), key=lambda c: c[1]
            )
            language = attributes.get("language") or (
                spoken[-1].value("language") if spoken else left[-1][2] if left else ""
            )
            bump("languages", language)
            bump("regions", attributes.get("region", ""))
            with_country = [s for s in sessions if s.country]
            bump("countries", with_country[-1].country if with_country else "")
        return figures


# --- random histories -----------------------------------------------------------------------


class Times:
    """Event times: distinct ones (sessions and installations are compared by time, and the
    order of two at one time is documented only for the cases below), and ties between
    events of one kind where the documented tie-breaks decide: installation updates of one
    installation (the later arrival), attribute and consent changes of one installation or of
    a back-end against any (event ID, then origin)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used = 0
        self.by_kind: dict[tuple[str, str], list[datetime]] = {}

    def pick(self, kind: str, origin: str, tie_with: list[str]) -> datetime:
        candidates = [t for o in tie_with for t in self.by_kind.get((kind, o), [])]
        if candidates and self.rng.random() < 0.3:
            time = self.rng.choice(candidates)
        else:
            self.used += 1
            minutes = self.rng.randint(0, 3 * 24 * 60)
            time = NOW - timedelta(minutes=minutes, microseconds=self.used)
        self.by_kind.setdefault((kind, origin), []).append(time)
        return time


def random_event(
    rng: random.Random, installation_id: str, platform: int, times: Times, custom_id: str = ""
) -> ingest_pb.Event:
    kind = rng.choice(["session", "update", "update", "attribute", "subscription", "custom"])
    if custom_id:
        kind = rng.choice(["attribute", "subscription"])
        origins = sorted({o for _, o in times.by_kind})
        time = times.pick(kind, "back-end", origins)
    elif kind in ("update", "attribute", "subscription"):
        time = times.pick(kind, installation_id, [installation_id])
    else:
        time = times.pick(kind, installation_id, [])
    event = ingest_pb.Event(
        event_id=f"{rng.getrandbits(64):016x}",
        installation_id=installation_id,
        platform=platform,  # type: ignore[arg-type]
        event_time=stamp(time),
    )
    if custom_id:
        event.custom_id = custom_id
    if kind == "session":
        event.session_id = f"{rng.getrandbits(32):08x}"
        event.session_start.country = rng.choice(["", "", "fr", "DE", "Es"])
    elif kind == "update":
        update = event.installation_update
        for name in rng.sample(INSTALLATION_FIELDS, rng.randint(1, 3)):
            if name == "app_version":
                update.app_version = rng.choice(["1.0", "2.0"])
            elif name == "push_token":
                update.push_token = rng.choice([f"tok-{installation_id}", ""])
            elif name == "language":
                update.language = rng.choice(["fr", "DE", "it"])
            else:
                setattr(update, name, rng.random() < 0.5)
    elif kind == "attribute":
        for name in rng.sample(sorted(NATIVE), rng.randint(1, 2)):
            op = event.attribute_operations.operations.add(native_attribute=NATIVE[name])  # type: ignore[arg-type]
            if rng.random() < 0.25:
                op.kind = types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET
            else:
                op.kind = types_pb2.ATTRIBUTE_OPERATION_KIND_SET
                op.value.string_value = rng.choice(ATTRIBUTE_VALUES[name])
    elif kind == "subscription":
        change = event.subscription_change
        change.channel = rng.choice(list(CHANNELS))  # type: ignore[assignment]
        change.kind = rng.choice(list(KINDS))  # type: ignore[assignment]
        change.subscribed = rng.random() < 0.6
    else:
        event.custom.name = "visit"
        if rng.random() < 0.3:
            event.platform = API  # a back-end tracking with the device's installation ID
    return event


@dataclass
class Operation:
    kind: str  # "batch", "identify", "logout", "merge", "erase"
    events: list[ingest_pb.Event] = field(default_factory=list)
    installation_id: str = ""
    custom_id: str = ""
    pick: float = 0.0


def random_history(rng: random.Random, seed: int) -> list[Operation]:
    installations = {
        f"s{seed}-i{k}": rng.choice([*DEVICE_PLATFORMS, API]) for k in range(rng.randint(2, 5))
    }
    custom_ids = [f"s{seed}-u{k}" for k in range(rng.randint(1, 3))]
    times = Times(rng)
    events = []
    for _ in range(rng.randint(8, 30)):
        installation_id = rng.choice(list(installations))
        platform = installations[installation_id]
        if rng.random() < 0.15:  # a back-end's change for a custom ID
            events.append(random_event(rng, "", API, times, rng.choice(custom_ids)))
        else:
            events.append(random_event(rng, installation_id, platform, times))
    rng.shuffle(events)  # arrival order is not time order
    operations: list[Operation] = []
    sent: list[ingest_pb.Event] = []
    while events:
        batch = [events.pop() for _ in range(min(len(events), rng.randint(1, 8)))]
        if sent and rng.random() < 0.3:
            batch.insert(rng.randrange(len(batch) + 1), rng.choice(sent))  # a retry
        sent.extend(batch)
        operations.append(Operation("batch", batch))
        roll = rng.random()
        chosen = rng.choice(list(installations))
        if roll < 0.3:
            operations.append(Operation("identify", [], chosen, rng.choice(custom_ids)))
        elif roll < 0.42:
            operations.append(Operation("logout", [], chosen))
        elif roll < 0.52:
            operations.append(Operation("merge", [], chosen, pick=rng.random()))
        elif roll < 0.58:
            operations.append(Operation("erase", [], chosen))
    return operations


# --- running a history through the services -------------------------------------------------


async def real_profile(identity: Identity, world: World, profile: int) -> str:
    """The service's ID of a live model profile, by one of its installations or its custom ID
    (every live profile has one or the other)."""
    for installation_id, owner in world.owner.items():
        if owner == profile:
            return await identity.profile_of(installation_id)
    custom_id = world.profiles[profile].custom_id
    assert custom_id is not None, profile
    return await identity.profile_of_custom_id(custom_id)


async def run_history(suite: Suite, world: World, ops: list[Operation]) -> None:
    identity = suite.identity
    for op in ops:
        known = op.installation_id in world.owner
        if op.kind == "batch":
            response = await suite.track(*op.events)
            for event, result in zip(op.events, response.results, strict=True):
                assert result.outcome == world.receive(event), (event, result)
        elif op.kind == "identify":
            if op.custom_id in world.quarantined:
                continue  # refused for 30 days after the erasure
            world.identify(op.installation_id, op.custom_id)
            await identity.identify(op.installation_id, op.custom_id)
        elif op.kind == "logout" and known:
            world.logout(op.installation_id)
            await identity.logout(op.installation_id)
        elif op.kind == "merge" and known:
            # An operator's merge of an anonymous profile into another live one.
            source = world.owner[op.installation_id]
            targets = [p for p in world.live() if p != source]
            if world.profiles[source].custom_id is not None or not targets:
                continue
            target = targets[int(op.pick * len(targets))]
            source_id = await real_profile(identity, world, source)
            target_id = await real_profile(identity, world, target)
            world.merge(source, target)
            await identity.merge(source_id, target_id)
        elif op.kind == "erase" and known:
            profile = world.owner[op.installation_id]
            profile_id = await real_profile(identity, world, profile)
            world.erase(profile)
            await identity.delete(profile_id)


async def test_the_overview_equals_the_model_on_random_histories(
    suite: Suite, database_url: str
) -> None:
    for seed in SEEDS:
        rng = random.Random(seed)
        # A project per seed: the overview counts the whole project.
        project = await create_test_project(database_url)
        here = dataclasses.replace(
            suite, project=project, identity=Identity(suite.identity.channel, project)
        )
        world = World()
        await run_history(here, world, random_history(rng, seed))
        await here.settle()
        for platform in PLATFORMS:
            reply = await here.call(
                "GetOverview", pb.GetOverviewRequest(platform=platform, top_values=100)
            )
            expected = world.figures(platform)
            assert overview_figures(reply.overview) == expected, (seed, platform)
            overview = reply.overview
            installs = expected["installs"]
            rate = expected["opt_ins"] / installs if installs else 0.0
            assert overview.push_opt_in_rate == pytest.approx(rate), (seed, platform)
            for r in overview.subscription_rates:
                pair = f"{CHANNELS[r.channel]}:{KINDS[r.kind]}"
                addressable = expected["addressable"].get(pair, 0)
                subscribed = expected["subscribed"].get(pair, 0)
                share = subscribed / addressable if addressable else 0.0
                assert r.subscribed_rate == pytest.approx(share), (seed, platform, pair)
