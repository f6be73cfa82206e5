"""Query's use cases: each resolves the profile asked for, reads one consistent view through the
repository and pages it. Query owns no business rule; the only logic here is lookup
resolution, paging (keysets and snapshots) and arithmetic over what was read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal
from uuid import UUID
from zoneinfo import ZoneInfo

from profiles.common.v1 import types_pb2
from services.query import paging
from services.query.errors import AmbiguousLookup, ProfileNotFound, SegmentNotFound
from services.query.repository import MAX_BIGINT, QueryReads, QueryRepository
from services.query.views import (
    BreakdownView,
    DayView,
    EventView,
    IdentityChangeView,
    OverviewView,
    Page,
    ProfileRowView,
    ProfileView,
    RejectedView,
    Resolved,
    SessionView,
    SubscriptionRateView,
    TimelineItem,
)
from shared.clock import Clock

LookupKind = Literal["profile_id", "custom_id", "email", "phone", "installation_id"]

# The identity history a profile view carries (ListEvents pages through all of it).
MAX_IDENTITY_CHANGES = 50
# AMBIGUOUS_LOOKUP names at most this many profiles.
MAX_AMBIGUOUS_IDS = 10

NEG_INFINITY = datetime(1, 1, 1, tzinfo=UTC)
POS_INFINITY = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
NIL_UUID = UUID(int=0)
MAX_UUID = UUID(int=(1 << 128) - 1)

# TimelineEventKind -> the EventKind numbers stored in events.kind.
EVENT_KINDS_OF: dict[int, tuple[int, ...]] = {
    1: (1,),
    2: (2, 3, 4),
    3: (5,),
    4: (6,),
    5: (7,),
    6: (8,),
}
# TimelineEventKind -> identity_changes.kind.
CHANGE_KINDS_OF: dict[int, str] = {7: "merge", 8: "split"}
ALL_TIMELINE_KINDS = (1, 2, 3, 4, 5, 6, 7, 8)

CHANNELS = ("email", "sms", "push")
SUBSCRIPTION_KINDS = ("marketing", "transactional")


@dataclass(frozen=True, slots=True)
class Lookup:
    kind: LookupKind
    value: str  # a canonical UUID string for profile_id; lower-case for email


@dataclass(frozen=True, slots=True)
class EventsQuery:
    profile_id: UUID
    page_size: int
    page_token: str
    session_id: str = ""
    names: tuple[str, ...] = ()
    kinds: tuple[int, ...] = ()  # TimelineEventKind numbers; empty for all
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class SessionsQuery:
    profile_id: UUID
    page_size: int
    page_token: str
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class RejectedQuery:
    page_size: int
    page_token: str
    reasons: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class ProfilesQuery:
    page_size: int
    page_token: str
    identity_filter: int = 0
    smart_segment: int = 0
    smart_segment_flag: int = 0
    platform: int = 0
    country: str = ""
    segment_id: UUID | None = None
    order_by: int = 1  # ProfileOrderBy: 1 last seen, 2 sessions, 3 time spent
    ascending: bool = False


@dataclass(frozen=True, slots=True)
class Activity:
    profile_id: UUID
    time_zone: str
    days: tuple[DayView, ...]


def _micros(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)


def _timeline_key(item: TimelineItem) -> tuple[datetime, int, int, int]:
    """The order of a timeline, newest first: event time, then identity changes before events
    of the same instant, then arrival (event_seq) or change ID."""
    if isinstance(item, EventView):
        return (item.event_time, 0, item.event_seq, 0)
    return (item.change_time, 1, 0, item.change_id.int)


class QueryService:
    def __init__(self, repository: QueryRepository, clock: Clock) -> None:
        self._repository = repository
        self._clock = clock

    # -- GetProfile --------------------------------------------------------------------------

    async def get_profile(self, project_id: UUID, lookup: Lookup) -> tuple[ProfileView, Resolved]:
        """The full view of the profile `lookup` names, read in one snapshot. Raises
        ProfileNotFound, AmbiguousLookup (an email or phone held by several profiles)."""
        async with self._repository.snapshot() as reads:
            resolved = await self._resolve(reads, project_id, lookup)
            view = await self._profile_view(reads, project_id, resolved.profile_id)
        return view, resolved

    async def _resolve(self, reads: QueryReads, project_id: UUID, lookup: Lookup) -> Resolved:
        if lookup.kind == "profile_id":
            found = await reads.profile_exists(project_id, UUID(lookup.value))
            if found is None:
                raise _not_found()
            live, merged = found
            return Resolved(live, UUID(lookup.value) if merged else None)
        if lookup.kind == "custom_id":
            profile_id = await reads.resolve_custom_id(project_id, lookup.value)
        elif lookup.kind == "installation_id":
            profile_id = await reads.resolve_installation(project_id, lookup.value)
        else:
            holders = await reads.resolve_native_value(project_id, lookup.kind, lookup.value)
            if len(holders) > 1:
                shown = ",".join(str(h) for h in holders[:MAX_AMBIGUOUS_IDS])
                raise AmbiguousLookup(
                    f"{len(holders) if len(holders) <= MAX_AMBIGUOUS_IDS else 'over 10'} "
                    f"profiles have this {lookup.kind}; look one up by profile ID",
                    metadata={"profile_ids": shown, "field": lookup.kind},
                )
            profile_id = holders[0] if holders else None
        if profile_id is None:
            raise _not_found()
        return Resolved(profile_id)

    async def _profile_view(
        self, reads: QueryReads, project_id: UUID, profile_id: UUID
    ) -> ProfileView:
        row = await reads.profile(project_id, profile_id)
        if row is None:
            raise _not_found()
        return ProfileView(
            profile_id=profile_id,
            custom_id=row["custom_id"] or "",
            version=row["version"],
            first_seen=row["first_seen"],
            last_seen=row["last_seen"],
            last_session_country=await reads.last_session_country(project_id, profile_id),
            installations=await reads.installations(project_id, profile_id),
            attributes=await reads.attributes(project_id, profile_id),
            subscriptions=await reads.subscriptions(project_id, profile_id),
            counters=await reads.counters(
                project_id, profile_id, row["event_count"], row["crash_count"]
            ),
            identity_changes=await reads.identity_changes(
                project_id, profile_id, MAX_IDENTITY_CHANGES
            ),
            smart_segment=await reads.smart_segment(project_id, profile_id, self._clock.now()),
        )

    async def _live_profile(self, reads: QueryReads, project_id: UUID, profile_id: UUID) -> UUID:
        found = await reads.profile_exists(project_id, profile_id)
        if found is None:
            raise _not_found()
        return found[0]

    # -- ListEvents --------------------------------------------------------------------------

    async def list_events(
        self, project_id: UUID, query: EventsQuery
    ) -> tuple[UUID, Page[TimelineItem]]:
        """A page of the profile's timeline, newest first, within the snapshot the first page
        fixed. Raises ProfileNotFound, PageTokenInvalid."""
        size = paging.page_size(query.page_size)
        bound_to = paging.fingerprint(
            "events",
            project_id,
            query.profile_id,
            query.session_id,
            sorted(query.names),
            sorted(query.kinds),
            query.start and _micros(query.start),
            query.end and _micros(query.end),
        )
        kinds = query.kinds or ALL_TIMELINE_KINDS
        event_kinds = sorted({k for t in kinds for k in EVENT_KINDS_OF.get(t, ())})
        change_kinds = sorted({CHANGE_KINDS_OF[t] for t in kinds if t in CHANGE_KINDS_OF})
        if query.names or query.session_id:
            # Names match custom events only, and merges and splits belong to no session.
            change_kinds = []
        start = query.start or NEG_INFINITY
        end = query.end or POS_INFINITY
        async with self._repository.snapshot() as reads:
            profile_id = await self._live_profile(reads, project_id, query.profile_id)
            if query.page_token:
                position = paging.decode_token(
                    query.page_token, bound_to, ("t", "k", "s", "c", "ms", "mc")
                )
                max_seq = int(position["ms"])
                max_change = position["mc"]
                max_change_time = None if max_change is None else from_micros(int(max_change))
                cursor_time = from_micros(int(position["t"]))
                cursor_kind = int(position["k"])
                event_after = (cursor_time, int(position["s"]) if cursor_kind == 0 else MAX_BIGINT)
                change_after = (
                    cursor_time,
                    UUID(str(position["c"])) if cursor_kind == 1 else NIL_UUID,
                )
            else:
                max_seq, max_change_time = await reads.timeline_snapshot(project_id, profile_id)
                event_after = (POS_INFINITY, MAX_BIGINT)
                change_after = (POS_INFINITY, MAX_UUID)
            items: list[TimelineItem] = []
            if event_kinds:
                items.extend(
                    await reads.events_page(
                        project_id,
                        profile_id,
                        max_seq=max_seq,
                        after=event_after,
                        start=start,
                        end=end,
                        kinds=event_kinds,
                        names=query.names,
                        session_id=query.session_id,
                        limit=size + 1,
                    )
                )
            if change_kinds and max_change_time is not None:
                items.extend(
                    await reads.changes_page(
                        project_id,
                        profile_id,
                        kinds=change_kinds,
                        max_change_time=max_change_time,
                        after=change_after,
                        start=start,
                        end=end,
                        limit=size + 1,
                    )
                )
        items.sort(key=_timeline_key, reverse=True)
        token = ""
        if len(items) > size:
            items = items[:size]
            last = items[-1]
            key = _timeline_key(last)
            token = paging.encode_token(
                bound_to,
                {
                    "t": _micros(key[0]),
                    "k": key[1],
                    "s": last.event_seq if isinstance(last, EventView) else 0,
                    "c": str(last.change_id) if isinstance(last, IdentityChangeView) else "",
                    "ms": max_seq,
                    "mc": None if max_change_time is None else _micros(max_change_time),
                },
            )
        return profile_id, Page(tuple(items), token)

    # -- ListSessions ------------------------------------------------------------------------

    async def list_sessions(
        self, project_id: UUID, query: SessionsQuery
    ) -> tuple[UUID, Page[SessionView]]:
        """A page of the profile's sessions, newest start first, within the first page's
        snapshot (its newest start).
        Raises ProfileNotFound, PageTokenInvalid."""
        size = paging.page_size(query.page_size)
        bound_to = paging.fingerprint(
            "sessions",
            project_id,
            query.profile_id,
            query.start and _micros(query.start),
            query.end and _micros(query.end),
        )
        async with self._repository.snapshot() as reads:
            profile_id = await self._live_profile(reads, project_id, query.profile_id)
            if query.page_token:
                position = paging.decode_token(query.page_token, bound_to, ("t", "i", "s", "ms"))
                max_start = from_micros(int(position["ms"]))
                after = (from_micros(int(position["t"])), str(position["i"]), str(position["s"]))
            else:
                max_start = await reads.sessions_snapshot(project_id, profile_id) or NEG_INFINITY
                # Above every installation ID and session ID.
                after = (POS_INFINITY, "\U0010ffff", "\U0010ffff")
            sessions = await reads.sessions_page(
                project_id,
                profile_id,
                max_start=max_start,
                after=after,
                start=query.start or NEG_INFINITY,
                end=query.end or POS_INFINITY,
                limit=size + 1,
            )
        token = ""
        if len(sessions) > size:
            sessions = sessions[:size]
            last = sessions[-1]
            token = paging.encode_token(
                bound_to,
                {
                    "t": _micros(last.start_time),
                    "i": last.installation_id,
                    "s": last.session_id,
                    "ms": _micros(max_start),
                },
            )
        return profile_id, Page(tuple(sessions), token)

    # -- GetActivity -------------------------------------------------------------------------

    async def get_activity(
        self, project_id: UUID, profile_id: UUID, first: date, last: date, time_zone: str
    ) -> Activity:
        """Sessions and events per day from `first` to `last` (inclusive) in `time_zone`, else
        the profile's time zone, else UTC. Raises ProfileNotFound."""
        async with self._repository.snapshot() as reads:
            live = await self._live_profile(reads, project_id, profile_id)
            zone_name = time_zone or await reads.profile_timezone(project_id, live) or "UTC"
            zone = ZoneInfo(zone_name)
            start = datetime.combine(first, datetime.min.time(), zone)
            end = datetime.combine(last + timedelta(days=1), datetime.min.time(), zone)
            found = await reads.activity(project_id, live, zone_name, start, end)
        days = []
        day = first
        while day <= last:
            text = day.isoformat()
            days.append(found.get(text, DayView(text, 0, 0, 0)))
            day += timedelta(days=1)
        return Activity(live, zone_name, tuple(days))

    # -- ListRejectedEvents ------------------------------------------------------------------

    async def list_rejected(self, project_id: UUID, query: RejectedQuery) -> Page[RejectedView]:
        """A page of rejected events, newest received first, within the first page's snapshot.
        Raises PageTokenInvalid."""
        size = paging.page_size(query.page_size)
        bound_to = paging.fingerprint(
            "rejected",
            project_id,
            sorted(query.reasons),
            query.start and _micros(query.start),
            query.end and _micros(query.end),
        )
        async with self._repository.snapshot() as reads:
            if query.page_token:
                position = paging.decode_token(query.page_token, bound_to, ("t", "s", "ms"))
                max_seq = int(position["ms"])
                after = (from_micros(int(position["t"])), int(position["s"]))
            else:
                max_seq = await reads.rejected_snapshot(project_id)
                after = (POS_INFINITY, MAX_BIGINT)
            rows = await reads.rejected_page(
                project_id,
                max_seq=max_seq,
                after=after,
                start=query.start or NEG_INFINITY,
                end=query.end or POS_INFINITY,
                reasons=query.reasons,
                limit=size + 1,
            )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            seq, last = rows[-1]
            token = paging.encode_token(
                bound_to, {"t": _micros(last.receive_time), "s": seq, "ms": max_seq}
            )
        return Page(tuple(view for _, view in rows), token)

    # -- ListProfiles ------------------------------------------------------------------------

    async def list_profiles(self, project_id: UUID, query: ProfilesQuery) -> Page[ProfileRowView]:
        """A page of the users table. Keyset on (sort value, profile ID): a profile is never
        repeated, though one whose sort value changes meanwhile may be skipped. Raises
        PageTokenInvalid, SegmentNotFound."""
        size = paging.page_size(query.page_size)
        if query.segment_id is not None:
            # Custom segments are the segments service's unfinished work: no definitions table
            # exists to read yet, so every segment ID is unknown.
            raise SegmentNotFound(
                "no such custom segment in this project", metadata={"field": "segment_id"}
            )
        bound_to = paging.fingerprint(
            "profiles",
            project_id,
            query.identity_filter,
            query.smart_segment,
            query.smart_segment_flag,
            query.platform,
            query.country,
            query.order_by,
            query.ascending,
        )
        if query.page_token:
            position = paging.decode_token(query.page_token, bound_to, ("k", "p"))
            after = (int(position["k"]), UUID(str(position["p"])))
        else:
            after = (-MAX_BIGINT - 1, NIL_UUID)
        async with self._repository.reads() as reads:
            rows = await reads.profile_rows_page(
                project_id,
                now=self._clock.now(),
                identity_filter=query.identity_filter,
                platform=query.platform,
                country=query.country,
                smart_segment=query.smart_segment,
                smart_segment_flag=query.smart_segment_flag,
                order_by=query.order_by,
                ascending=query.ascending,
                after=after,
                limit=size + 1,
            )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            key, last = rows[-1]
            token = paging.encode_token(bound_to, {"k": key, "p": str(last.profile_id)})
        return Page(tuple(view for _, view in rows), token)

    # -- GetOverview -------------------------------------------------------------------------

    async def overview(self, project_id: UUID, platform: int, top: int) -> OverviewView:
        """The userbase figures of the project (or one platform), from one snapshot."""
        as_of = self._clock.now()
        async with self._repository.snapshot() as reads:
            installs = await reads.installation_figures(project_id, platform)
            profiles = await reads.profile_figures(project_id, platform)
            distribution = await reads.segment_distribution(project_id, platform, as_of)
        install_count = sum(r["installs"] for r in installs)
        platforms: dict[str, int] = {}
        app_versions: dict[tuple[str, int], int] = {}
        platform_unknown = version_unknown = 0
        for r in installs:
            if r["uninstalled"]:
                continue
            if r["platform"]:
                name = _platform_name(r["platform"])
                platforms[name] = platforms.get(name, 0) + r["installs"]
            else:
                platform_unknown += r["installs"]
            if r["app_version"] and r["platform"]:
                key = (r["app_version"], r["platform"])
                app_versions[key] = app_versions.get(key, 0) + r["installs"]
            else:
                version_unknown += r["installs"]
        rates = {
            (c, k): [0, 0] for c in CHANNELS for k in SUBSCRIPTION_KINDS
        }  # addressable, subscribed
        reach = dict.fromkeys(CHANNELS, 0)
        identified = anonymous = sessionless = 0
        languages: dict[str, int] = {}
        regions: dict[str, int] = {}
        countries: dict[str, int] = {}
        unknown = {"language": 0, "region": 0, "country": 0}
        for r in profiles:
            n = r["profiles"]
            if r["identified"]:
                identified += n
            else:
                anonymous += n
            if not r["has_session"]:
                sessionless += n
            address = {"email": r["has_email"], "sms": r["has_phone"], "push": r["has_token"]}
            for channel in CHANNELS:
                for kind in SUBSCRIPTION_KINDS:
                    if address[channel]:
                        rates[(channel, kind)][0] += n
                        if r[f"{channel}_{kind}"]:
                            rates[(channel, kind)][1] += n
            if r["has_email"] and r["email_marketing"]:
                reach["email"] += n
            if r["has_phone"] and r["sms_marketing"]:
                reach["sms"] += n
            if r["push_reachable"]:
                reach["push"] += n
            for name, counts in (
                ("language", languages),
                ("region", regions),
                ("country", countries),
            ):
                value = r[name]
                if value:
                    counts[value] = counts.get(value, 0) + n
                else:
                    unknown[name] += n
        smart: dict[int, dict[int, int]] = {s: {} for s in (1, 2, 3, 4)}
        for segment, flag, count in distribution:
            flags = smart.setdefault(segment, {})
            flags[flag] = flags.get(flag, 0) + count
        return OverviewView(
            platform=platform,
            as_of=as_of,
            install_count=install_count,
            push_token_count=sum(r["push_tokens"] for r in installs),
            push_opt_in_count=sum(r["push_opt_ins"] for r in installs),
            # Imported tokens are ingest's part 2 (ImportTokens): none can be told apart yet.
            imported_unseen_token_count=0,
            subscription_rates=tuple(
                SubscriptionRateView(c, k, v[0], v[1]) for (c, k), v in rates.items()
            ),
            reach=reach,
            identified_count=identified,
            anonymous_count=anonymous,
            sessionless_count=sessionless,
            smart_segments=smart,
            platforms=_breakdown(
                [(name, count, 0) for name, count in platforms.items()], top, platform_unknown
            ),
            languages=_breakdown(
                [(v, c, 0) for v, c in languages.items()], top, unknown["language"]
            ),
            regions=_breakdown([(v, c, 0) for v, c in regions.items()], top, unknown["region"]),
            countries=_breakdown(
                [(v, c, 0) for v, c in countries.items()], top, unknown["country"]
            ),
            app_versions=_breakdown(
                [(v, c, p) for (v, p), c in app_versions.items()], top, version_unknown
            ),
        )

    async def profile_version(self, project_id: UUID, profile_id: UUID) -> int | None:
        async with self._repository.reads() as reads:
            return await reads.profile_version(project_id, profile_id)

    async def resolve_live(self, project_id: UUID, profile_id: UUID) -> UUID:
        """The live profile for `profile_id` (itself or its survivor); raises ProfileNotFound."""
        async with self._repository.reads() as reads:
            return await self._live_profile(reads, project_id, profile_id)


def _breakdown(values: Sequence[tuple[str, int, int]], top: int, unknown: int) -> BreakdownView:
    ordered = sorted(values, key=lambda v: (-v[1], v[0], v[2]))
    return BreakdownView(
        top_values=tuple(ordered[:top]),
        other_count=sum(v[1] for v in ordered[top:]),
        unknown_count=unknown,
    )


def _platform_name(number: int) -> str:
    try:
        return types_pb2.Platform.Name(number)  # type: ignore[arg-type]
    except ValueError:
        return f"PLATFORM_{number}"


def _not_found() -> ProfileNotFound:
    return ProfileNotFound("no such profile in this project")
