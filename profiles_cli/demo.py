"""`profiles demo --users N`: realistic synthetic traffic through the public API.

For each synthetic user: one or two installations (iOS, Android, Web), a few weeks of sessions
with custom events, attribute changes, consent changes, installation updates and the odd crash,
backfilled through ImportEvents (admin key); then logins (Identify, sdk key), a few logouts, and
a live session for some users through TrackEvents. Everything goes through the running suite's
gRPC API, exactly as apps and backends would send it. Installation and event IDs derive from
--seed, so re-running with the same seed only produces duplicates. The people are the same in
every run: user-N has the same name, email and country, and logs in (or not) in every run
(user-1 always does, about 60% of the others), so the README's examples find them; a run with
another seed logs the same people in on new devices.

What an operator reads on screen holds together: a person's name, phone, region, language, time
zone and session country come from one place (a few live abroad: their time zone and sessions
are where they live, the rest from home); a device's model runs the OS version it reports, which
only moves forward, as the app version does (a release train); prices are the shop's, in the
person's currency; a funnel's steps come in order (view, add to cart, buy what was added).
"""

from __future__ import annotations

import asyncio
import math
import random
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from profiles.client import open_channel
from profiles.common.v1 import types_pb2
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from profiles_cli.importer import Progress

BATCH_SIZE = 500
CONCURRENCY = 8
HISTORY_DAYS = 21

IOS = types_pb2.PLATFORM_IOS
ANDROID = types_pb2.PLATFORM_ANDROID
WEB = types_pb2.PLATFORM_WEB
PLATFORMS: tuple[int, ...] = (IOS, ANDROID, WEB)

Weighted = tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class Place:
    """A country the demo's people come from or live in, and what their devices say there."""

    country: str  # ISO 3166-1 alpha-2: sessions' country, and the region of who is from here
    share: float  # of the demo's people
    languages: Weighted  # ISO 639-1, of the people from here
    time_zones: Weighted  # IANA, of the people living here
    platforms: tuple[float, float, float]  # iOS, Android, Web shares of devices used here
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    phones: tuple[str, ...]  # E.164 patterns, "#" a digit; fictional ranges where one exists
    currency: str
    rate: float  # of the currency per euro: the shop's prices are set in euros


PLACES: tuple[Place, ...] = (
    Place("US", 30, (("en", 88), ("es", 12)),
          (("America/New_York", 47), ("America/Chicago", 29), ("America/Denver", 7),
           ("America/Los_Angeles", 17)), (50, 35, 15),
          ("Emily", "Olivia", "Madison", "Ava", "Hannah", "James", "Michael", "Ethan", "Daniel",
           "Tyler"),
          ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
           "Rodriguez", "Wilson"),
          ("+121255501##", "+131255501##", "+130355501##", "+121355501##", "+141555501##"),
          "USD", 1.1),
    Place("GB", 15, (("en", 100),), (("Europe/London", 1),), (45, 40, 15),
          ("Amelia", "Isla", "Poppy", "Charlotte", "Grace", "Oliver", "George", "Harry", "Jack",
           "Alfie"),
          ("Taylor", "Jones", "Evans", "Davies", "Wilson", "Roberts", "Walker", "Wright",
           "Thompson", "Hughes"),
          ("+447700900###",), "GBP", 0.85),
    Place("FR", 15, (("fr", 92), ("en", 8)), (("Europe/Paris", 1),), (35, 50, 15),
          ("Camille", "Léa", "Chloé", "Manon", "Inès", "Louis", "Hugo", "Lucas", "Julien",
           "Théo"),
          ("Martin", "Bernard", "Dubois", "Durand", "Moreau", "Laurent", "Lefèvre", "Girard",
           "Roux", "Fontaine"),
          ("+3363998####",), "EUR", 1.0),
    Place("DE", 15, (("de", 90), ("en", 10)), (("Europe/Berlin", 1),), (30, 55, 15),
          ("Anna", "Lena", "Greta", "Sophie", "Marie", "Lukas", "Leon", "Jonas", "Felix",
           "Paul"),
          ("Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
           "Hoffmann", "Schäfer"),
          ("+493023125###", "+496990009###", "+498999998###"), "EUR", 1.0),
    Place("BR", 15, (("pt", 97), ("en", 3)),
          (("America/Sao_Paulo", 88), ("America/Fortaleza", 7), ("America/Manaus", 5)),
          (15, 75, 10),
          ("Ana", "Maria", "Júlia", "Beatriz", "Larissa", "João", "Gabriel", "Pedro", "Rafael",
           "Mateus"),
          ("Silva", "Santos", "Oliveira", "Souza", "Rodrigues", "Ferreira", "Alves", "Pereira",
           "Lima", "Gomes"),
          ("+55119########", "+55219########"), "BRL", 6.0),
    Place("JP", 10, (("ja", 95), ("en", 5)), (("Asia/Tokyo", 1),), (60, 30, 10),
          ("Yui", "Aoi", "Hina", "Sakura", "Mio", "Haruto", "Sota", "Ren", "Yuto", "Kaito"),
          ("Sato", "Suzuki", "Takahashi", "Tanaka", "Watanabe", "Ito", "Yamamoto", "Nakamura",
           "Kobayashi", "Kato"),
          ("+8190########", "+8180########"), "JPY", 160.0),
)  # fmt: skip
# People who live in another country than the one they come from: their time zone and sessions
# are where they live; their name, phone, language and region (the `region` attribute, which
# the overview's Region table counts) are from home.
ABROAD = 0.06

# The OS versions each platform's devices report, oldest first; a device reports one it can run
# (MODELS) and later only a newer one.
OS_VERSIONS: dict[int, tuple[str, ...]] = {
    IOS: ("16.7.10", "17.5.1", "17.6.1", "18.0.1", "18.1.1", "18.2"),
    ANDROID: ("12", "13", "14", "15"),
}
# (model as the platform's SDK reports it, the oldest and newest index into OS_VERSIONS it runs)
MODELS: dict[int, tuple[tuple[str, int, int], ...]] = {
    IOS: (("iPhone12,1", 0, 5), ("iPhone14,5", 0, 5), ("iPhone14,7", 0, 5),
          ("iPhone15,2", 0, 5), ("iPhone16,1", 1, 5), ("iPhone17,3", 3, 5), ("iPad13,1", 0, 5)),
    ANDROID: (("Pixel 6a", 0, 3), ("Pixel 7", 1, 3), ("Pixel 8", 2, 3), ("SM-A125F", 0, 0),
              ("SM-A546B", 1, 3), ("SM-S918B", 1, 3), ("SM-S921B", 2, 3), ("CPH2449", 1, 3),
              ("2201117TG", 0, 1), ("moto g54 5G", 1, 2)),
}  # fmt: skip
# Shares of people on two devices (a phone and the web, or two), by whether they log in.
TWO_DEVICES_LOGGED_IN = 0.45
TWO_DEVICES = 0.2
# A web installation reports its browser as the device and the computer's OS by name (the
# platform, Web, does not say which OS); it keeps the OS it first reported.
BROWSERS: tuple[tuple[str, str, float], ...] = (
    ("Chrome", "Windows 11", 24), ("Chrome", "Windows 10", 14), ("Chrome", "macOS 14", 12),
    ("Chrome", "macOS 15", 8), ("Edge", "Windows 11", 10), ("Edge", "Windows 10", 5),
    ("Safari", "macOS 15", 10), ("Safari", "macOS 14", 7), ("Firefox", "Windows 11", 4),
    ("Firefox", "Ubuntu 24.04", 3), ("Chrome", "ChromeOS 130", 3),
)  # fmt: skip
# The app's releases (every platform ships the same version), days before now. An installation
# starts on the newest release of its first day; phones check the store now and then and take
# the newest release then (some lag behind), a web app reloads onto it within hours.
RELEASES: tuple[tuple[str, float], ...] = (
    ("3.0.2", 45), ("3.1.0", 31), ("3.1.1", 24), ("3.2.0", 12), ("3.2.1", 5),
)  # fmt: skip
# Mean days between two checks for an update.
UPDATE_CHECK_DAYS: dict[int, float] = {IOS: 4.0, ANDROID: 5.0, WEB: 0.3}
OS_UPDATE_SHARE = 0.25  # of phones that install the next OS version during their history

# The shop: item, price in euros.
CATALOG: tuple[tuple[str, float], ...] = (
    ("sneakers", 89), ("jacket", 129), ("headphones", 59), ("backpack", 45), ("watch", 199),
    ("lamp", 35), ("mug", 12),
)  # fmt: skip
# Crashes as each platform names them: (name, reason).
CRASHES: dict[int, tuple[tuple[str, str], ...]] = {
    IOS: (("SIGABRT", "Fatal error: Unexpectedly found nil while unwrapping an Optional value"),
          ("EXC_BAD_ACCESS", "KERN_INVALID_ADDRESS at 0x0000000000000010"),
          ("NSInvalidArgumentException", "-[__NSCFNumber length]: unrecognized selector")),
    ANDROID: (("java.lang.NullPointerException",
               "Attempt to invoke virtual method 'int java.lang.String.length()' on a null"
               " object reference"),
              ("java.lang.IllegalStateException", "Fragment CartFragment not attached to a"
               " context"),
              ("java.lang.OutOfMemoryError", "Failed to allocate a 25165836 byte allocation")),
    WEB: (("TypeError", "Cannot read properties of undefined (reading 'price')"),
          ("ChunkLoadError", "Loading chunk 512 failed."),
          ("ReferenceError", "checkout is not defined")),
}  # fmt: skip


@dataclass(slots=True)
class DemoSummary:
    users: int = 0
    events_accepted: int = 0
    events_rejected: int = 0
    # A user who logs in does so on each of their installations (one Identify each), and one
    # who logs out does so on one of them: people and devices are counted apart.
    users_logged_in: int = 0
    installations_logged_in: int = 0
    users_logged_out: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        """The summary `profiles demo` prints: each figure says what it counts."""
        return (
            f"{self.users} users: {self.events_accepted} events stored,"
            f" {self.events_rejected} rejected; {self.users_logged_in} of them logged in (on"
            f" {self.installations_logged_in} installations), {self.users_logged_out} logged out"
        )


@dataclass(slots=True)
class User:
    index: int
    custom_id: str
    installations: list[tuple[str, int]]  # (installation ID, platform)
    logs_in: bool
    logs_out: bool
    live: bool
    first_name: str
    last_name: str
    place: tuple[str, str, str]  # (country lived in, language, time zone)
    region: str  # the country they come from (ISO 3166-1 alpha-2)
    phone: str  # E.164
    lives_in: Place

    @property
    def number(self) -> int:
        """N of user-N: what the person's email carries too."""
        return self.index + 1


class EventFactory:
    """Builds one user's events with deterministic IDs."""

    def __init__(self, rng: random.Random, tag: str, now: datetime) -> None:
        self._rng = rng
        self._tag = tag
        self._now = now
        self._count = 0
        self._releases = [(now - timedelta(days=days), version) for version, days in RELEASES]

    def _event(
        self, installation_id: str, platform: int, time: datetime, session: str = ""
    ) -> pb.Event:
        self._count += 1
        event = pb.Event(
            event_id=str(
                uuid.uuid5(uuid.NAMESPACE_URL, f"{self._tag}/{installation_id}/{self._count}")
            ),
            installation_id=installation_id,
            platform=platform,  # type: ignore[arg-type]
            session_id=session,
        )
        event.event_time.FromDatetime(time)
        return event

    def _release_at(self, moment: datetime) -> str:
        """The newest app release out at `moment`."""
        out = [version for time, version in self._releases if time <= moment]
        return out[-1] if out else RELEASES[0][0]

    def history(self, user: User) -> list[pb.Event]:
        rng = self._rng
        events: list[pb.Event] = []
        _, language, timezone = user.place
        first, last = user.first_name, user.last_name
        for number, (installation_id, platform) in enumerate(user.installations):
            start = self._now - timedelta(days=rng.uniform(3, HISTORY_DAYS))
            setup = self._event(installation_id, platform, start)
            update = setup.installation_update
            app_version = self._release_at(start)
            update.app_version = app_version
            if platform == WEB:
                browsers = [(b, o) for b, o, _ in BROWSERS]
                browser, os_name = rng.choices(browsers, [w for *_, w in BROWSERS])[0]
                update.device_model, update.os_version = browser, os_name
                os_index = newest_os = 0
            else:
                # Newer OS versions are likelier (each twice the one before it): about half
                # the devices run the newest their model can.
                model, oldest, newest_os = rng.choice(MODELS[platform])
                runs = range(oldest, newest_os + 1)
                os_index = rng.choices(runs, [2**i for i in range(len(runs))])[0]
                update.device_model = model
                update.os_version = OS_VERSIONS[platform][os_index]
            update.language = language
            update.timezone = timezone
            if platform != WEB:
                update.push_token = uuid.UUID(int=rng.getrandbits(128)).hex * 2
                update.push_opt_in = rng.random() < 0.7
            events.append(setup)
            if number == 0:
                profile = self._event(installation_id, platform, start + timedelta(seconds=1))
                ops = profile.attribute_operations.operations
                email = _ascii(f"{first}.{last}.{user.number}@example.com".lower())
                source = rng.choice(("ads", "seo", "friend"))
                _operation(ops, "SET", native=types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME, text=first)
                _operation(ops, "SET", native=types_pb2.NATIVE_ATTRIBUTE_LAST_NAME, text=last)
                # Where the person is from (the overview's Region table): home, even for
                # those living abroad, whose sessions come from elsewhere.
                _operation(ops, "SET", native=types_pb2.NATIVE_ATTRIBUTE_REGION, text=user.region)
                _operation(ops, "SET_ONCE", custom="signup_source", text=source)
                if user.logs_in:
                    _operation(ops, "SET", native=types_pb2.NATIVE_ATTRIBUTE_EMAIL, text=email)
                if user.logs_in and user.index % 2:
                    # Half the people who log in gave a phone number: the overview's SMS reach.
                    _operation(ops, "SET", native=types_pb2.NATIVE_ATTRIBUTE_PHONE, text=user.phone)
                events.append(profile)
            session_time = start + timedelta(minutes=5)
            while session_time < self._now - timedelta(hours=1):
                events += self._session(installation_id, platform, session_time, user)
                session_time += timedelta(hours=rng.expovariate(1 / 40))
            events += self._updates(
                installation_id, platform, start, app_version, (os_index, newest_os)
            )
            # Marketing consent on email and SMS, given or refused on some devices: the
            # overview's subscription rates and reach have something to show.
            # (At a moment of the device's history: `session_time` has run past now, and an
            # event after now is dropped below.)
            for channel, share in ((types_pb2.CHANNEL_EMAIL, 0.5), (types_pb2.CHANNEL_SMS, 0.3)):
                if rng.random() < share:
                    moment = start + (self._now - timedelta(hours=1) - start) * rng.random()
                    consent = self._event(installation_id, platform, moment)
                    consent.subscription_change.channel = channel
                    consent.subscription_change.kind = types_pb2.SUBSCRIPTION_KIND_MARKETING
                    consent.subscription_change.subscribed = rng.random() < 0.7
                    events.append(consent)
        return [e for e in events if e.event_time.ToDatetime(UTC) < self._now]

    def _updates(
        self,
        installation_id: str,
        platform: int,
        start: datetime,
        app_version: str,
        os: tuple[int, int],
    ) -> list[pb.Event]:
        """The installation's app updates (each to the newest release when it checks, so the
        version only moves forward) and, on some phones, the next OS version their model runs
        (`os`: the index of the version it reports and of the newest it runs)."""
        rng = self._rng
        events = []
        end = self._now - timedelta(hours=1)
        moment = start
        while True:
            moment += timedelta(days=rng.expovariate(1 / UPDATE_CHECK_DAYS[platform]))
            if moment >= end:
                break
            newest = self._release_at(moment)
            if newest != app_version:
                update = self._event(installation_id, platform, moment)
                update.installation_update.app_version = app_version = newest
                events.append(update)
        reported, newest_os = os
        if reported < newest_os and rng.random() < OS_UPDATE_SHARE:
            moment = start + (end - start) * rng.random()
            update = self._event(installation_id, platform, moment)
            update.installation_update.os_version = OS_VERSIONS[platform][reported + 1]
            events.append(update)
        return events

    def _session(
        self, installation_id: str, platform: int, start: datetime, user: User
    ) -> list[pb.Event]:
        rng = self._rng
        session = uuid.UUID(int=rng.getrandbits(128)).hex[:16]
        begin = self._event(installation_id, platform, start, session)
        begin.session_start.country = user.place[0]
        events = [begin]

        def shop(name: str, item: tuple[str, float], moment: datetime) -> None:
            # The item at its price where the person lives, in that currency.
            event = self._event(installation_id, platform, moment, session)
            event.custom.name = name
            event.custom.attributes["item"].string_value = item[0]
            event.custom.attributes["price"].number_value = _price(item[1], user.lives_in)
            event.custom.attributes["currency"].string_value = user.lives_in.currency
            events.append(event)

        # Browsing: a few items viewed, sometimes one of them added to the cart, and sometimes
        # what was added bought (the funnel view_item -> add_to_cart -> purchase, in order).
        moment = start
        viewed = []
        for _ in range(rng.randint(1, 4)):
            moment += timedelta(seconds=rng.randint(5, 120))
            viewed.append(rng.choice(CATALOG))
            shop("view_item", viewed[-1], moment)
        if rng.random() < 0.35:
            item = rng.choice(viewed)
            moment += timedelta(seconds=rng.randint(5, 60))
            shop("add_to_cart", item, moment)
            if rng.random() < 0.45:
                moment += timedelta(seconds=rng.randint(30, 300))
                shop("purchase", item, moment)
                spend = self._event(installation_id, platform, moment, session)
                spend.attribute_operations.operations.add(
                    kind=types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT, custom_attribute="purchases"
                ).value.number_value = 1
                events.append(spend)
        if rng.random() < 0.03:
            crash = self._event(installation_id, platform, moment, session)
            crash.crash.name, crash.crash.reason = rng.choice(CRASHES[platform])
            # A web page's error leaves the page running; an app's crash may end it.
            crash.crash.fatal = platform != WEB and rng.random() < 0.5
            events.append(crash)
            return events
        duration = moment - start + timedelta(seconds=rng.randint(5, 60))
        beat = self._event(installation_id, platform, start + duration / 2, session)
        beat.session_heartbeat.duration.FromTimedelta(duration / 2)
        end = self._event(installation_id, platform, start + duration, session)
        end.session_end.duration.FromTimedelta(duration)
        return [*events, beat, end]

    def live(self, user: User) -> list[pb.Event]:
        installation_id, platform = user.installations[0]
        start = self._now - timedelta(minutes=self._rng.randint(1, 8))
        events = self._session(installation_id, platform, start, user)
        # No end yet (an open session), and nothing after now: a session's steps can run on
        # past the present, and a demo user seen in the future looks broken.
        return [e for e in events[:-1] if e.event_time.ToDatetime(UTC) <= self._now]


def _price(euros: float, place: Place) -> float:
    """A shop price in the place's currency: 97.99 rather than 97.9, whole hundreds of yen."""
    amount = euros * place.rate
    if place.currency == "JPY":
        return float(round(amount, -2))
    return round(math.ceil(amount) - 0.01, 2)


def _operation(operations: Any, kind: str, *, native: int = 0, custom: str = "", text: str) -> None:
    operation = operations.add(kind=getattr(types_pb2, f"ATTRIBUTE_OPERATION_KIND_{kind}"))
    if native:
        operation.native_attribute = native
    else:
        operation.custom_attribute = custom
    operation.value.string_value = text


def _pick(rng: random.Random, weighted: Weighted) -> str:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def _platforms(rng: random.Random, shares: Sequence[float], count: int) -> list[int]:
    """`count` different platforms, each drawn by the place's shares of the ones left."""
    left = list(zip(PLATFORMS, shares, strict=True))
    chosen = []
    for _ in range(count):
        platform = rng.choices([p for p, _ in left], [s for _, s in left])[0]
        chosen.append(platform)
        left = [(p, s) for p, s in left if p != platform]
    return chosen


def make_users(count: int, rng: random.Random, tag: str) -> list[User]:
    """The run's users. Who user-N is (name, country, whether they log in) depends on N alone,
    so every run, whatever its seed, describes the same people (a second run must not turn
    user-1 into someone else); their devices and histories come from the run's seed."""
    users = []
    for index in range(count):
        person = random.Random(f"demo-person-{index}")
        # The first user always logs in and stays logged in: user-1 is the README's example.
        logs_in = index == 0 or person.random() < 0.6
        logs_out = logs_in and index > 0 and person.random() < 0.15
        home = person.choices(PLACES, [p.share for p in PLACES])[0]
        lives_in = home
        if person.random() < ABROAD:
            elsewhere = [p for p in PLACES if p is not home]
            lives_in = person.choices(elsewhere, [p.share for p in elsewhere])[0]
        language = _pick(person, home.languages)
        time_zone = _pick(person, lives_in.time_zones)
        phone = "".join(
            str(person.randrange(10)) if c == "#" else c for c in person.choice(home.phones)
        )
        first_name, last_name = person.choice(home.first_names), person.choice(home.last_names)
        # People with an account use it on more of their devices than anonymous visitors do.
        devices = 2 if rng.random() < (TWO_DEVICES_LOGGED_IN if logs_in else TWO_DEVICES) else 1
        platforms = _platforms(rng, lives_in.platforms, devices)
        installations = [(f"demo-{tag}-{index}-{p}", p) for p in platforms]
        users.append(
            User(
                index=index,
                custom_id=f"user-{index + 1}",
                installations=installations,
                logs_in=logs_in,
                logs_out=logs_out,
                live=rng.random() < 0.3,
                first_name=first_name,
                last_name=last_name,
                place=(lives_in.country, language, time_zone),
                region=home.country,
                phone=phone,
                lives_in=lives_in,
            )
        )
    return users


async def run_demo(
    users: int,
    ingest_address: str,
    identity_address: str,
    sdk_key: str,
    admin_key: str,
    *,
    seed: int | None = None,
    now: datetime | None = None,
    quiet: bool = False,
) -> DemoSummary:
    """Sends the traffic of `users` synthetic users; returns what was stored."""
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    tag = f"{seed:x}"
    now = now or datetime.now(UTC)
    factory = EventFactory(rng, tag, now)
    people = make_users(users, rng, tag)
    summary = DemoSummary(users=users)
    progress = None if quiet else Progress(3 * users, f"demo: {users} users")
    async with (
        open_channel(ingest_address, admin_key) as admin_channel,
        open_channel(ingest_address, sdk_key) as sdk_channel,
        open_channel(identity_address, sdk_key) as identity_channel,
    ):
        importer = pb_grpc.IngestServiceStub(admin_channel)
        tracker = pb_grpc.IngestServiceStub(sdk_channel)
        identity = identity_grpc.IdentityServiceStub(identity_channel)
        slots = asyncio.BoundedSemaphore(CONCURRENCY)

        def count(results: Sequence[pb.EventResult], accepted: int, rejected: int) -> None:
            summary.events_accepted += accepted
            summary.events_rejected += rejected
            for result in results:
                if result.reason:
                    summary.reasons[result.reason] = summary.reasons.get(result.reason, 0) + 1

        async def backfill(batch: list[pb.Event], done_users: int) -> None:
            # The caller took a slot before building the next batch: memory stays bounded.
            try:
                reply = await importer.ImportEvents(pb.ImportEventsRequest(events=batch))
            finally:
                slots.release()
            count(reply.results, reply.accepted_count, reply.rejected_count)
            if progress is not None:
                progress.advance(done_users, f"{summary.events_accepted} events")

        async def login(user: User) -> None:
            async with slots:
                if user.logs_in:
                    for installation_id, _ in user.installations:
                        await identity.Identify(
                            identity_pb.IdentifyRequest(
                                installation_id=installation_id,
                                custom_id=user.custom_id,
                                request_id=f"demo-{installation_id}",
                            )
                        )
                        summary.installations_logged_in += 1
                    summary.users_logged_in += 1
                if user.logs_out:
                    installation_id = user.installations[-1][0]
                    await identity.Logout(
                        identity_pb.LogoutRequest(
                            installation_id=installation_id,
                            request_id=f"demo-out-{installation_id}",
                        )
                    )
                    summary.users_logged_out += 1
            if progress is not None:
                progress.advance(1, f"{summary.users_logged_in} users logged in")

        async def live(user: User) -> None:
            events = factory.live(user) if user.live else []
            if events:
                async with slots:
                    reply = await tracker.TrackEvents(pb.TrackEventsRequest(events=events))
                count(reply.results, reply.accepted_count, reply.rejected_count)
            if progress is not None:
                progress.advance(1, f"{summary.events_accepted} events")

        async with asyncio.TaskGroup() as group:
            pending: list[pb.Event] = []
            waiting_users = 0
            for user in people:
                pending += factory.history(user)
                waiting_users += 1
                while len(pending) >= BATCH_SIZE:
                    await slots.acquire()
                    group.create_task(backfill(pending[:BATCH_SIZE], waiting_users))
                    pending, waiting_users = pending[BATCH_SIZE:], 0
            if pending:
                await slots.acquire()
                group.create_task(backfill(pending, waiting_users))
        async with asyncio.TaskGroup() as group:
            for user in people:
                group.create_task(login(user))
        async with asyncio.TaskGroup() as group:
            for user in people:
                group.create_task(live(user))
    if progress is not None:
        progress.close(
            f"{summary.events_accepted} events, {summary.users_logged_in} users logged in"
        )
    return summary


__all__ = ["DemoSummary", "run_demo"]


def _ascii(text: str) -> str:
    """ "chloé" -> "chloe": demo addresses stay plain ASCII, which every validator accepts."""
    decomposed = unicodedata.normalize("NFKD", text)
    return decomposed.encode("ascii", "ignore").decode()
