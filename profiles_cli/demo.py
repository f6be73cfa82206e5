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
"""

from __future__ import annotations

import asyncio
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

FIRST_NAMES = ("Ana", "Ben", "Chloé", "Dev", "Emma", "Farid", "Greta", "Hugo", "Ines", "Jun")
LAST_NAMES = ("Martin", "Smith", "Rossi", "Müller", "Tanaka", "Silva", "Dubois", "Khan")
COUNTRIES = (("FR", "fr", "Europe/Paris"), ("US", "en", "America/New_York"),
             ("DE", "de", "Europe/Berlin"), ("BR", "pt", "America/Sao_Paulo"),
             ("JP", "ja", "Asia/Tokyo"), ("GB", "en", "Europe/London"))  # fmt: skip
PLATFORMS: tuple[int, ...] = (
    types_pb2.PLATFORM_IOS,
    types_pb2.PLATFORM_ANDROID,
    types_pb2.PLATFORM_WEB,
)
DEVICES: dict[int, tuple[str, ...]] = {
    types_pb2.PLATFORM_IOS: ("iPhone15,2", "iPhone14,5", "iPad13,1"),
    types_pb2.PLATFORM_ANDROID: ("Pixel 8", "SM-S918B", "CPH2449"),
    types_pb2.PLATFORM_WEB: ("Chrome", "Firefox", "Safari"),
}
ITEMS = ("sneakers", "jacket", "headphones", "backpack", "watch", "lamp", "mug")


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
    place: tuple[str, str, str]  # (country, language, time zone)


class EventFactory:
    """Builds one user's events with deterministic IDs."""

    def __init__(self, rng: random.Random, tag: str, now: datetime) -> None:
        self._rng = rng
        self._tag = tag
        self._now = now
        self._count = 0

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

    def history(self, user: User) -> list[pb.Event]:
        rng = self._rng
        events: list[pb.Event] = []
        country, language, timezone = user.place
        first, last = user.first_name, user.last_name
        for number, (installation_id, platform) in enumerate(user.installations):
            start = self._now - timedelta(days=rng.uniform(3, HISTORY_DAYS))
            setup = self._event(installation_id, platform, start)
            update = setup.installation_update
            update.app_version = rng.choice(("4.1.0", "4.2.0", "4.2.1"))
            update.os_version = rng.choice(("17.4", "14", "125"))
            update.device_model = rng.choice(DEVICES[platform])
            update.language = language
            update.timezone = timezone
            if platform != types_pb2.PLATFORM_WEB:
                update.push_token = uuid.UUID(int=rng.getrandbits(128)).hex * 2
                update.push_opt_in = rng.random() < 0.7
            events.append(setup)
            if number == 0:
                profile = self._event(installation_id, platform, start + timedelta(seconds=1))
                ops = profile.attribute_operations.operations
                email = _ascii(f"{first}.{last}.{user.index}@example.com".lower())
                source = rng.choice(("ads", "seo", "friend"))
                _operation(ops, "SET", native=types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME, text=first)
                _operation(ops, "SET", native=types_pb2.NATIVE_ATTRIBUTE_LAST_NAME, text=last)
                _operation(ops, "SET_ONCE", custom="signup_source", text=source)
                if user.logs_in:
                    _operation(ops, "SET", native=types_pb2.NATIVE_ATTRIBUTE_EMAIL, text=email)
                if user.logs_in and user.index % 2:
                    # Half the people who log in gave a phone number: the overview's SMS reach.
                    phone = f"+1555{user.index:07d}"
                    _operation(ops, "SET", native=types_pb2.NATIVE_ATTRIBUTE_PHONE, text=phone)
                events.append(profile)
            session_time = start + timedelta(minutes=5)
            while session_time < self._now - timedelta(hours=1):
                events += self._session(installation_id, platform, session_time, country)
                session_time += timedelta(hours=rng.expovariate(1 / 40))
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

    def _session(
        self, installation_id: str, platform: int, start: datetime, country: str
    ) -> list[pb.Event]:
        rng = self._rng
        session = uuid.UUID(int=rng.getrandbits(128)).hex[:16]
        begin = self._event(installation_id, platform, start, session)
        begin.session_start.country = country
        events = [begin]
        moment = start
        for _ in range(rng.randint(1, 5)):
            moment += timedelta(seconds=rng.randint(5, 120))
            item = rng.choice(ITEMS)
            name = rng.choices(("view_item", "add_to_cart", "purchase"), (6, 2, 1))[0]
            custom = self._event(installation_id, platform, moment, session)
            custom.custom.name = name
            custom.custom.attributes["item"].string_value = item
            custom.custom.attributes["price"].number_value = round(rng.uniform(5, 200), 2)
            events.append(custom)
            if name == "purchase":
                spend = self._event(installation_id, platform, moment, session)
                spend.attribute_operations.operations.add(
                    kind=types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT, custom_attribute="purchases"
                ).value.number_value = 1
                events.append(spend)
        if rng.random() < 0.03:
            crash = self._event(installation_id, platform, moment, session)
            crash.crash.name = rng.choice(("NullPointerException", "SIGABRT", "TypeError"))
            crash.crash.reason = "unexpected state"
            crash.crash.fatal = rng.random() < 0.5
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
        events = self._session(installation_id, platform, start, "")
        # No end yet (an open session), and nothing after now: a session's steps can run on
        # past the present, and a demo user seen in the future looks broken.
        return [e for e in events[:-1] if e.event_time.ToDatetime(UTC) <= self._now]


def _operation(operations: Any, kind: str, *, native: int = 0, custom: str = "", text: str) -> None:
    operation = operations.add(kind=getattr(types_pb2, f"ATTRIBUTE_OPERATION_KIND_{kind}"))
    if native:
        operation.native_attribute = native
    else:
        operation.custom_attribute = custom
    operation.value.string_value = text


def make_users(count: int, rng: random.Random, tag: str) -> list[User]:
    """The run's users. Who user-N is (name, country, whether they log in) depends on N alone,
    so every run, whatever its seed, describes the same people (a second run must not turn
    user-1 into someone else); their devices and histories come from the run's seed."""
    users = []
    for index in range(count):
        person = random.Random(f"demo-person-{index}")
        platforms = rng.sample(PLATFORMS, rng.choice((1, 1, 2)))
        installations = [(f"demo-{tag}-{index}-{p}", p) for p in platforms]
        # The first user always logs in and stays logged in: user-1 is the README's example.
        logs_in = index == 0 or person.random() < 0.6
        users.append(
            User(
                index=index,
                custom_id=f"user-{index + 1}",
                installations=installations,
                logs_in=logs_in,
                logs_out=logs_in and index > 0 and person.random() < 0.15,
                live=rng.random() < 0.3,
                first_name=person.choice(FIRST_NAMES),
                last_name=person.choice(LAST_NAMES),
                place=person.choice(COUNTRIES),
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
