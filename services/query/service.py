"""Query's use cases: each resolves the profile asked for, reads one consistent view through the
repository and pages it. Query owns no business rule; the only logic here is lookup
resolution, paging (keysets and snapshots) and arithmetic over what was read."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from uuid import UUID
from zoneinfo import ZoneInfo

from profiles.common.v1 import types_pb2
from services.query import paging, rollup
from services.query.errors import AmbiguousLookup, ProfileNotFound, SegmentNotFound
from services.query.paging import MAX_BIGINT, MAX_UUID, NEG_INFINITY, NIL_UUID, POS_INFINITY
from services.query.repository import QueryReads, QueryRepository
from services.query.rollup import NamedEvents
from services.query.views import (
    BreakdownView,
    DayCountView,
    DayView,
    EventNameView,
    EventView,
    IdentityChangeView,
    OverviewView,
    Page,
    ProfileRowView,
    ProfileView,
    ReasonCounts,
    RejectedView,
    Resolved,
    SessionView,
    SubscriptionRateView,
    TimelineItem,
    TotalSize,
    UsersTableFilters,
)
from shared.clock import Clock
from shared.settings import DEFAULT_BUS_RETENTION_HOURS
from shared.time_zones import is_time_zone

LookupKind = Literal["profile_id", "custom_id", "email", "phone", "installation_id"]

# The identity history a profile view carries (ListEvents pages through all of it).
MAX_IDENTITY_CHANGES = 50
# The identity changes read to tell which profile each timeline event was first attached to.
MAX_ATTRIBUTED = 1000
# AMBIGUOUS_LOOKUP names at most this many profiles.
MAX_AMBIGUOUS_IDS = 10
# ListProfiles counts the matches up to this many (the count reads every one it counts): past
# it, a person reads "10,000+", not a figure to the unit.
TOTAL_SIZE_LIMIT = 10_000
# How many rejected events ListRejectedEvents(include_reason_counts) reads at most.
REASON_COUNT_LIMIT = 100_000
# How long ListEventNames' batch markers are kept (0067): the bus retention (after which no
# delivery of the message can come) and a day more (clocks, the retention's rounds, a dead letter
# replayed near its end). app.py passes the setting's value plus that day.
MARKER_MARGIN_HOURS = 24
DEFAULT_BATCH_MARKER_HOURS = DEFAULT_BUS_RETENTION_HOURS + MARKER_MARGIN_HOURS
# ProfileIdentityFilter values whose size the rollups count.
IDENTIFIED_ONLY = 1
ANONYMOUS_ONLY = 2

# The position each list's page token holds, field by field: decode_token refuses any token
# whose fields are not what these RPCs write (see the encode_token call of each).
EVENTS_TOKEN: paging.TokenShape = {
    "t": paging.micros,  # the last item's time
    "k": paging.one_of(0, 1),  # 0 an event, 1 an identity change
    "s": paging.int64,  # the event's event_seq; 0 for a change
    "c": paging.text,  # the change's ID; "" for an event
    "ms": paging.int64,  # the snapshot's newest event_seq
    "mc": paging.nullable(paging.micros),  # the snapshot's newest change time; null for none
}
SESSIONS_TOKEN: paging.TokenShape = {
    "t": paging.micros,
    "i": paging.text,
    "s": paging.text,
    "ms": paging.micros,
}
REJECTED_TOKEN: paging.TokenShape = {"t": paging.micros, "s": paging.int64, "ms": paging.int64}
# ListEventNames' position: the last name listed.
EVENT_NAMES_TOKEN: paging.TokenShape = {"n": paging.text}
# ListProfiles' sort value per ProfileOrderBy (null for a profile never seen), then the ID.
PROFILES_TOKEN: dict[int, paging.TokenShape] = {
    order_by: {"k": paging.nullable(parse), "p": paging.uuid}
    for order_by, parse in (
        (1, paging.micros),
        (2, paging.int64),
        (3, paging.int64),
        (4, paging.text),
    )
}


# TimelineEventKind -> the EventKind numbers stored in events.kind.
EVENT_KINDS_OF: dict[int, tuple[int, ...]] = {
    1: (1,),
    2: (2, 3, 4),
    3: (5,),
    4: (6,),
    5: (7,),
    6: (8,),
}
# Every kind of event ingest stores: asking for all of them puts no condition on kinds.
EVERY_EVENT_KIND = sorted({k for kinds in EVENT_KINDS_OF.values() for k in kinds})
# The stored kind of a session heartbeat (EventKind EVENT_KIND_SESSION_HEARTBEAT), which
# `exclude_heartbeats` leaves out: a condition on kinds, as a kind filter is.
HEARTBEAT_EVENT_KIND = 3
# TimelineEventKind -> identity_changes.kind.
CHANGE_KINDS_OF: dict[int, str] = {7: "merge", 8: "split"}
ALL_TIMELINE_KINDS = (1, 2, 3, 4, 5, 6, 7, 8)

CHANNELS = rollup.CHANNELS
SUBSCRIPTION_KINDS = rollup.SUBSCRIPTION_KINDS
# Counter metrics whose value may be "" (unknown) and still belong to a breakdown.
VALUED_METRICS = frozenset(
    {rollup.LANGUAGE, rollup.REGION, rollup.COUNTRY, rollup.LIVE_PLATFORM, rollup.APP_VERSION}
)


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
    exclude_heartbeats: bool = False  # leave out session heartbeats (stored kind 3)


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
    include_reason_counts: bool = False
    profile_id: UUID | None = None  # only this profile's (or its survivor's); None for all


@dataclass(frozen=True, slots=True)
class EventNamesQuery:
    page_size: int
    page_token: str
    name_prefix: str = ""  # lower-case, a contract name's characters; "" for every name


@dataclass(frozen=True, slots=True)
class ProfilesQuery:
    page_size: int
    page_token: str
    filters: UsersTableFilters = field(default_factory=UsersTableFilters)
    order_by: int = 1  # ProfileOrderBy: 1 last seen, 2 sessions, 3 time spent, 4 name
    ascending: bool = False
    include_total_size: bool = False


@dataclass(frozen=True, slots=True)
class Activity:
    profile_id: UUID
    time_zone: str
    days: tuple[DayView, ...]


def counted_by_rollups(filters: UsersTableFilters) -> bool:
    """Whether the rollups' counters hold the users table's size for these filters: the
    identity tabs (all, identified, anonymous) on all or one platform, nothing else."""
    return filters.identity_filter in (0, IDENTIFIED_ONLY, ANONYMOUS_ONLY) and filters == (
        UsersTableFilters(identity_filter=filters.identity_filter, platform=filters.platform)
    )


def _micros(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


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
        """The full view of the profile `lookup` names, read by one statement (one round trip,
        one snapshot) from the source tables, so it shows every write committed before the
        call. Raises ProfileNotFound, AmbiguousLookup (an email or phone held by several
        profiles)."""
        now = self._clock.now()
        value: str | UUID = UUID(lookup.value) if lookup.kind == "profile_id" else lookup.value
        async with self._repository.reads() as reads:
            read = await reads.profile_view(
                project_id, lookup.kind, value, now, MAX_IDENTITY_CHANGES
            )
        if read is None:
            raise _not_found()
        holders = read.holders
        if len(holders) > 1:
            shown = ",".join(str(h) for h in holders[:MAX_AMBIGUOUS_IDS])
            raise AmbiguousLookup(
                f"{len(holders) if len(holders) <= MAX_AMBIGUOUS_IDS else 'over 10'} "
                f"profiles have this {lookup.kind}; look one up by profile ID",
                metadata={"profile_ids": shown, "field": lookup.kind},
            )
        if read.view is None:
            raise _not_found()
        view = read.view
        return view, Resolved(view.profile_id, read.resolved_from)

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
            # Only in tokens of requests that exclude them: a token issued before the field
            # existed (or without it) keeps its fingerprint.
            *(("exclude_heartbeats",) if query.exclude_heartbeats else ()),
        )
        kinds = query.kinds or ALL_TIMELINE_KINDS
        event_kinds: list[int] | None = sorted(
            {k for t in kinds for k in EVENT_KINDS_OF.get(t, ())}
            - ({HEARTBEAT_EVENT_KIND} if query.exclude_heartbeats else set())
        )
        if event_kinds == EVERY_EVENT_KIND:
            event_kinds = None  # no condition on kinds
        change_kinds = sorted({CHANGE_KINDS_OF[t] for t in kinds if t in CHANGE_KINDS_OF})
        if query.names or query.session_id:
            # Names match custom events only, and merges and splits belong to no session.
            change_kinds = []
        start = query.start or NEG_INFINITY
        end = query.end or POS_INFINITY
        if query.page_token:
            position = paging.decode_token(query.page_token, bound_to, EVENTS_TOKEN)
            max_seq = position["ms"]
            bound = position["mc"]
            cursor_time = position["t"]
            if position["k"] == 0:
                if position["c"] != "":
                    raise paging.not_a_token()
                event_after = (cursor_time, position["s"])
                change_after = (cursor_time, NIL_UUID)
            else:
                if position["s"] != 0:
                    raise paging.not_a_token()
                event_after = (cursor_time, MAX_BIGINT)
                change_after = (cursor_time, paging.uuid(position["c"]))
        else:
            # One statement reads the page and fixes the snapshot: nothing newer is visible to
            # it, so the first page needs no bound.
            max_seq, bound = MAX_BIGINT, POS_INFINITY
            event_after = (POS_INFINITY, MAX_BIGINT)
            change_after = (POS_INFINITY, MAX_UUID)
        async with self._repository.reads() as reads:
            read = await reads.timeline_page(
                project_id,
                query.profile_id,
                first_page=not query.page_token,
                max_seq=max_seq,
                after=event_after,
                start=start,
                end=end,
                kinds=event_kinds,
                names=query.names,
                session_id=query.session_id,
                limit=size + 1,
                change_kinds=change_kinds,
                max_change_time=bound,
                change_after=change_after,
                # Asked on every page: the statement skips it for a profile with no merge or
                # split now (read in the same snapshot). A merge after the first page brings
                # the merged profile's earlier events into the pages to come, which must say
                # where they came from, as a fresh walk does.
                attribute=True,
                max_attributed=MAX_ATTRIBUTED,
            )
        if read is None:
            raise _not_found()
        profile_id = read.profile_id
        max_seq = read.max_seq
        max_change_time = read.max_change_time if not query.page_token else bound
        events = read.events
        if read.attribution_changes:
            events = merged_from(
                events, read.attribution_changes, read.installation_profiles, profile_id
            )
        items: list[TimelineItem] = [*events, *read.changes]
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
                position = paging.decode_token(query.page_token, bound_to, SESSIONS_TOKEN)
                max_start = position["ms"]
                after = (position["t"], position["i"], position["s"])
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
            zone_name = time_zone or await reads.profile_timezone(project_id, live)
            if not is_time_zone(zone_name):
                # None, or a name stored before the suite refused it (`localtime`): UTC.
                zone_name = "UTC"
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

    async def list_rejected(
        self,
        project_id: UUID,
        query: RejectedQuery,
        *,
        size_of: Callable[[RejectedView], int],
        byte_budget: int,
    ) -> tuple[Page[RejectedView], ReasonCounts | None]:
        """A page of rejected events, newest received first, within the first page's snapshot.
        The page also ends before the row that would take the sum of `size_of` (a row's share
        of the reply) over `byte_budget`, though it always holds one row: raw payloads reach
        1 MB, and the server could not send a reply over its maximum message size. With
        `include_reason_counts`, also the time range's counts by reason in the same snapshot.
        With a profile, only its rejected events (a merged-away ID reads its survivor's, which
        hold the merged profile's), resolved on every page. Raises PageTokenInvalid,
        ProfileNotFound."""
        size = paging.page_size(query.page_size)
        bound_to = paging.fingerprint(
            "rejected",
            project_id,
            sorted(query.reasons),
            query.start and _micros(query.start),
            query.end and _micros(query.end),
            # Only with a profile, so that the tokens of pages without one stay as they were.
            *((str(query.profile_id),) if query.profile_id is not None else ()),
        )
        rows: list[tuple[int, RejectedView]] = []
        more = False
        async with self._repository.snapshot() as reads:
            profile_id = None
            if query.profile_id is not None:
                profile_id = await self._live_profile(reads, project_id, query.profile_id)
            if query.page_token:
                position = paging.decode_token(query.page_token, bound_to, REJECTED_TOKEN)
                max_seq = position["ms"]
                after = (position["t"], position["s"])
            else:
                max_seq = await reads.rejected_snapshot(project_id)
                after = (POS_INFINITY, MAX_BIGINT)
            used = 0
            async for seq, view in reads.rejected_rows(
                project_id,
                max_seq=max_seq,
                after=after,
                start=query.start or NEG_INFINITY,
                end=query.end or POS_INFINITY,
                reasons=query.reasons,
                limit=size + 1,
                profile_id=profile_id,
            ):
                if len(rows) == size:
                    more = True
                    break
                used += size_of(view)
                if rows and used > byte_budget:
                    more = True
                    break
                rows.append((seq, view))
            counts = None
            if query.include_reason_counts:
                counts = await reads.rejected_reason_counts(
                    project_id,
                    max_seq=max_seq,
                    start=query.start or NEG_INFINITY,
                    end=query.end or POS_INFINITY,
                    limit=REASON_COUNT_LIMIT,
                    profile_id=profile_id,
                )
        token = ""
        if more:
            seq, last = rows[-1]
            token = paging.encode_token(
                bound_to, {"t": _micros(last.receive_time), "s": seq, "ms": max_seq}
            )
        return Page(tuple(view for _, view in rows), token), counts

    # -- ListEventNames ----------------------------------------------------------------------

    async def list_event_names(
        self, project_id: UUID, query: EventNamesQuery
    ) -> Page[EventNameView]:
        """A page of the project's custom event names in code point order, each with its
        counted events' count and latest event time, from the counts query's rollup consumer
        keeps (0067: as of the last message it handled, so it lags writes by the bus lag; no
        snapshot: a name first counted while a client pages shows up if it sorts after its
        position). Keyset on the name. Raises RequestInvalid (page size), PageTokenInvalid."""
        size = paging.page_size(query.page_size)
        bound_to = paging.fingerprint("event_names", project_id, query.name_prefix)
        after = ""
        if query.page_token:
            after = paging.decode_token(query.page_token, bound_to, EVENT_NAMES_TOKEN)["n"]
        async with self._repository.reads() as reads:
            rows = await reads.event_names(
                project_id, after=after, prefix=query.name_prefix, limit=size + 1
            )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = paging.encode_token(bound_to, {"n": rows[-1].name})
        return Page(tuple(rows), token)

    # -- ListProfiles ------------------------------------------------------------------------

    async def list_profiles(
        self, project_id: UUID, query: ProfilesQuery
    ) -> tuple[Page[ProfileRowView], TotalSize | None]:
        """A page of the users table, read from query's projection (it lags writes by the bus
        lag). Keyset on (sort value, profile ID), profiles never seen last: a profile is never
        repeated, though one whose sort value changes meanwhile may be skipped. With a segment,
        only its members as segments stored them (custom_segment_members: current after the
        last event segments handled, time-driven changes at most one sweep behind). With
        `include_total_size`, also how many profiles match, counted up to TOTAL_SIZE_LIMIT in
        the page's read. Raises PageTokenInvalid, SegmentNotFound."""
        size = paging.page_size(query.page_size)
        filters = query.filters
        bound_to = paging.fingerprint(
            # Tokens of the direct-SQL users table (sort keys negated) are not valid here.
            "profiles-projection",
            project_id,
            filters.identity_filter,
            filters.smart_segment,
            filters.smart_segment_flag,
            filters.platform,
            filters.country,
            query.order_by,
            query.ascending,
            filters.segment_id,
            # Only when set: tokens issued before the filter existed stay valid without it.
            *((filters.name_prefix,) if filters.name_prefix else ()),
            *(("language", filters.language) if filters.language else ()),
            *(("reach", filters.reachable_channel) if filters.reachable_channel else ()),
            *(("id", filters.profile_id_prefix) if filters.profile_id_prefix else ()),
            *(("custom_id", filters.custom_id_prefix) if filters.custom_id_prefix else ()),
            *(("email", filters.email_prefix) if filters.email_prefix else ()),
        )
        after: tuple[int | datetime | str | None, UUID] | None = None
        if query.page_token:
            position = paging.decode_token(
                query.page_token, bound_to, PROFILES_TOKEN[query.order_by]
            )
            after = (position["k"], position["p"])
        async with self._repository.reads() as reads:
            if filters.segment_id is not None and not await reads.segment_exists(
                project_id, filters.segment_id
            ):
                raise SegmentNotFound(
                    "no such custom segment in this project", metadata={"field": "segment_id"}
                )
            now = self._clock.now()
            rows = await reads.profile_rows_page(
                project_id,
                filters,
                now=now,
                order_by=query.order_by,
                ascending=query.ascending,
                after=after,
                limit=size + 1,
            )
            total = None
            if query.include_total_size and counted_by_rollups(filters):
                profiles, identified = await reads.profile_counters(project_id, filters.platform)
                total = TotalSize(
                    {IDENTIFIED_ONLY: identified, ANONYMOUS_ONLY: profiles - identified}.get(
                        filters.identity_filter, profiles
                    ),
                    at_least=False,
                )
            elif query.include_total_size:
                counted = await reads.profile_rows_count(
                    project_id, filters, now=now, limit=TOTAL_SIZE_LIMIT + 1
                )
                total = TotalSize(
                    min(counted, TOTAL_SIZE_LIMIT), at_least=counted > TOTAL_SIZE_LIMIT
                )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            last_value, last = rows[-1]
            key = last_value if not isinstance(last_value, datetime) else _micros(last_value)
            token = paging.encode_token(bound_to, {"k": key, "p": str(last.profile_id)})
        return Page(tuple(view for _, view in rows), token), total

    # -- GetProfileRows ----------------------------------------------------------------------

    async def profile_rows(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> tuple[list[ProfileRowView], list[UUID]]:
        """The users table's rows of the live profiles among `profile_ids` (each once, in
        their order), and the IDs that name none: unknown, merged away or erased."""
        async with self._repository.reads() as reads:
            found = await reads.profile_rows_by_id(project_id, profile_ids, now=self._clock.now())
        rows = [found[i] for i in profile_ids if i in found]
        return rows, [i for i in profile_ids if i not in found]

    # -- GetOverview -------------------------------------------------------------------------

    async def overview(
        self, project_id: UUID, platform: int, top: int, trend_days: int = 0
    ) -> OverviewView:
        """The userbase figures of the project (or one platform): the rollups' counters (as of
        the last message the projection handled), the smart segment distribution exact as of
        now, and every custom segment's size. Reads a few hundred rows at most, whatever the
        number of profiles. With `trend_days`, also the active and new profiles of each of
        the last `trend_days` UTC days, today included, from the daily counters (two rows a
        day at most)."""
        as_of = self._clock.now()
        daily: tuple[DayCountView, ...] = ()
        async with self._repository.reads() as reads:
            read = await reads.overview(project_id, platform, as_of)
            if trend_days:
                first = as_of.astimezone(UTC).date() - timedelta(days=trend_days - 1)
                counts = await reads.daily_trend(project_id, platform, first, trend_days)
                daily = tuple(
                    DayCountView(
                        datetime.combine(first + timedelta(days=n), time(), UTC), active, new
                    )
                    for n, (active, new) in enumerate(counts)
                )
        rows, distribution = read.counters, read.distribution
        single: dict[str, int] = {}
        valued: dict[str, dict[str, int]] = {}
        for metric, value, count in rows:
            if value or metric in VALUED_METRICS:
                valued.setdefault(metric, {})[value] = count
            else:
                single[metric] = count
        profiles = single.get(rollup.PROFILES, 0)
        identified = single.get(rollup.IDENTIFIED, 0)
        addressable = valued.get(rollup.ADDRESSABLE, {})
        subscribed = valued.get(rollup.SUBSCRIBED, {})
        reachable = valued.get(rollup.REACHABLE, {})
        live_platforms = dict(valued.get(rollup.LIVE_PLATFORM, {}))
        platform_unknown = live_platforms.pop("0", 0)
        app_versions = dict(valued.get(rollup.APP_VERSION, {}))
        version_unknown = app_versions.pop("", 0)
        smart: dict[int, dict[int, int]] = {s: {} for s in (1, 2, 3, 4)}
        for segment, flag, count in distribution:
            flags = smart.setdefault(segment, {})
            flags[flag] = flags.get(flag, 0) + count

        def by_value(metric: str) -> BreakdownView:
            counts = dict(valued.get(metric, {}))
            unknown = counts.pop("", 0)
            return _breakdown([(v, c, 0) for v, c in counts.items()], top, unknown)

        versions = []
        for key, count in app_versions.items():
            number, _, version = key.partition(":")
            versions.append((version, count, int(number)))
        return OverviewView(
            platform=platform,
            as_of=as_of,
            install_count=single.get(rollup.INSTALLS, 0),
            push_token_count=single.get(rollup.PUSH_TOKENS, 0),
            push_opt_in_count=single.get(rollup.PUSH_OPT_INS, 0),
            imported_unseen_token_count=single.get(rollup.IMPORTED_UNSEEN, 0),
            subscription_rates=tuple(
                SubscriptionRateView(
                    c, k, addressable.get(f"{c}:{k}", 0), subscribed.get(f"{c}:{k}", 0)
                )
                for c in CHANNELS
                for k in SUBSCRIPTION_KINDS
            ),
            reach={c: reachable.get(c, 0) for c in CHANNELS},
            identified_count=identified,
            anonymous_count=profiles - identified,
            sessionless_count=single.get(rollup.SESSIONLESS, 0),
            smart_segments=smart,
            platforms=_breakdown(
                [(_platform_name(int(n)), c, 0) for n, c in live_platforms.items()],
                top,
                platform_unknown,
            ),
            languages=by_value(rollup.LANGUAGE),
            regions=by_value(rollup.REGION),
            countries=by_value(rollup.COUNTRY),
            app_versions=_breakdown(versions, top, version_unknown),
            segment_sizes=tuple(read.segment_sizes),
            daily=daily,
        )

    async def profile_version(self, project_id: UUID, profile_id: UUID) -> int | None:
        async with self._repository.reads() as reads:
            return await reads.profile_version(project_id, profile_id)

    async def resolve_live(self, project_id: UUID, profile_id: UUID) -> UUID:
        """The live profile for `profile_id` (itself or its survivor); raises ProfileNotFound."""
        async with self._repository.reads() as reads:
            return await self._live_profile(reads, project_id, profile_id)


def merged_from(
    events: Sequence[EventView],
    changes: Sequence[IdentityChangeView],
    current: Mapping[str, UUID],
    profile_id: UUID,
) -> list[EventView]:
    """Each event with `merged_from_profile_id` set when the profile it was first attached to
    is not `profile_id`. An event joined the profile its installation belonged to when it was
    received; that is the source of the installation's first merge or split after the event
    (identity records each with the installations it moved), else the installation's current
    profile (`current`). Server-side events (no installation) are left unmarked."""
    moves: dict[str, list[IdentityChangeView]] = {}
    for change in sorted(changes, key=lambda c: (c.change_time, c.change_id)):
        for installation_id in change.installation_ids:
            moves.setdefault(installation_id, []).append(change)
    marked = []
    for event in events:
        first: UUID | None = None
        if event.installation_id:
            history = moves.get(event.installation_id, ())
            move = next((c for c in history if c.change_time > event.receive_time), None)
            first = move.source_profile_id if move else current.get(event.installation_id)
        if first is not None and first != profile_id:
            event = replace(event, merged_from_profile_id=first)
        marked.append(event)
    return marked


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


class RollupService:
    """Keeps query's projection (0006) up to date: every bus message names the profiles and
    installations it touched, and each is recounted from the source tables. EventsIngested's
    custom events are also added to ListEventNames' counts (0067), once per message, and the
    other messages (ProfileDeleted, through the erasure sweep too) take erased profiles' events
    out of them."""

    def __init__(
        self,
        repository: QueryRepository,
        clock: Clock,
        *,
        batch_marker_hours: int = DEFAULT_BATCH_MARKER_HOURS,
    ) -> None:
        self._repository = repository
        self._clock = clock
        self._batch_marker_age = timedelta(hours=batch_marker_hours)

    async def recount(
        self,
        project_id: UUID,
        profile_ids: Iterable[UUID],
        installation_ids: Iterable[str],
        names: NamedEvents | None = None,
    ) -> int:
        """Recounts the profiles and installations in one short transaction and moves the
        counters by the difference with the stored facts. Idempotent: a second recount of
        unchanged data moves nothing. With `names` (an EventsIngested's custom events), folds
        them into the event name counts in the same transaction, unless that batch was folded
        before; without, takes the events of those of the profiles identity erased out of
        them (a second time, there is nothing left to take). Returns how many counters and
        names moved."""
        profiles = sorted(set(profile_ids))
        installations = sorted(set(installation_ids))
        if not profiles and not installations:
            return 0
        keys = [f"p:{p}" for p in profiles] + [f"i:{i}" for i in installations]
        async with self._repository.rollup_writes() as writes:
            await writes.lock(project_id, keys)
            now = self._clock.now()
            old_profiles = await writes.stored_profiles(project_id, profiles)
            old_installations = await writes.stored_installations(project_id, installations)
            new_profiles = await writes.recount_profiles(project_id, profiles, now)
            new_installations = await writes.recount_installations(project_id, installations)
            changes = rollup.counter_changes(
                [*old_profiles.values(), *old_installations.values()],
                [*new_profiles.values(), *new_installations.values()],
            )
            await writes.move_counters(project_id, changes)
            # Last: the names' rows, which every message of a common name updates, stay locked
            # only for the end of the transaction.
            moved = 0
            if names is None:
                if profiles:
                    moved = await writes.purge_erased_event_names(project_id, profiles)
            elif names.events:
                moved = await writes.fold_event_names(
                    project_id, names, now, now - self._batch_marker_age
                )
        return len(changes) + moved

    async def rebuild(self, project_id: UUID) -> None:
        """Recounts the whole project (bench loads, operators). Run it while no recount of the
        project is under way: it replaces the projection's rows without the recount locks."""
        async with self._repository.rollup_writes() as writes:
            await writes.rebuild(project_id, self._clock.now())
