"""One user's story through all four services over real gRPC channels: installs on iOS and Web,
browses anonymously, logs in on both, opts in to email marketing, logs out on Web, crashes once.
The profile view, the timeline, the overview and the segments then show exactly that."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import profile_pb2, timeline_pb2
from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from profiles.segments.v1 import filters_pb2, funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from shared.clock import FrozenClock
from tests.support.identity import Identity
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    crash,
    custom_event,
    direct_overview,
    installation_update,
    op,
    overview_figures,
    round_trip,
    session_end,
    session_start,
    subscription,
)

IOS, WEB = types_pb2.PLATFORM_IOS, types_pb2.PLATFORM_WEB
EMAIL, MARKETING = types_pb2.CHANNEL_EMAIL, types_pb2.SUBSCRIPTION_KIND_MARKETING
TIMELINE = timeline_pb2
GROUPS = ("query", "segments")


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Any:  # type: ignore[no-untyped-def]
    clock = FrozenClock(NOW)
    handles = await start_services("identity", clock=clock)
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    rest = await start_services("ingest", "segments", "query", settings=settings, clock=clock)
    suite = Suite(
        query=query_grpc.QueryServiceStub(rest["query"].channel),
        ingest=ingest_grpc.IngestServiceStub(rest["ingest"].channel),
        identity=Identity(handles["identity"].channel, project),
        project=project,
        database_url=database_url,
        clock=clock,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
    )
    return suite, segments_grpc.SegmentsServiceStub(rest["segments"].channel)


def web(event: Any) -> Any:
    event.platform = WEB
    return event


async def test_a_user_on_ios_and_web_is_shown_exactly_as_they_behaved(suite: Any) -> None:
    suite, segments = suite
    clock = suite.clock
    t0 = clock.now()
    # An operator defines two custom segments and a funnel beforehand.
    admin = suite.project.metadata("admin")
    segment_ids = {}
    for name, condition in (
        (
            "Web users",
            filters_pb2.Condition(platform=filters_pb2.PlatformCondition(platforms=[WEB])),
        ),
        (
            "Email marketing",
            filters_pb2.Condition(
                subscription=filters_pb2.SubscriptionCondition(
                    channel=EMAIL, kind=MARKETING, subscribed=True
                )
            ),
        ),
    ):
        created = await segments.CreateSegment(
            segments_pb.CreateSegmentRequest(
                display_name=name, filter=filters_pb2.FilterNode(condition=condition)
            ),
            metadata=admin,
        )
        segment_ids[name] = created.segment.segment_id
    hour = Duration()
    hour.FromTimedelta(timedelta(hours=1))
    await segments.CreateFunnel(
        segments_pb.CreateFunnelRequest(
            display_name="Checkout",
            steps=[
                funnels_pb2.FunnelStep(event_name="view_item"),
                funnels_pb2.FunnelStep(event_name="purchase"),
            ],
            conversion_window=hour,
        ),
        metadata=admin,
    )
    # Installs on iOS (push allowed) and on the Web, browses anonymously on both.
    await suite.track(
        installation_update(
            "ios-1", t0, IOS, app_version="2.0", push_token="tok-1", push_opt_in=True
        ),
        session_start("ios-1", "s-ios", t0, country="FR", platform=IOS),
        custom_event("ios-1", name="view_item", time=t0 + timedelta(minutes=1)),
        session_end("ios-1", "s-ios", t0 + timedelta(minutes=5), 300, platform=IOS),
        installation_update("web-1", t0, WEB, language="fr"),
        session_start("web-1", "s-web", t0, country="FR", platform=WEB),
        web(custom_event("web-1", name="browse", time=t0 + timedelta(minutes=1))),
        session_end("web-1", "s-web", t0 + timedelta(minutes=2), 120, platform=WEB),
    )
    web_anonymous = await suite.identity.profile_of("web-1")
    ios_anonymous = await suite.identity.profile_of("ios-1")
    # Logs in on both: the web visitor is merged into the iOS profile, now alice's.
    clock.advance(timedelta(minutes=10))
    await suite.identity.identify("ios-1", "alice")
    clock.advance(timedelta(minutes=1))
    await suite.identity.identify("web-1", "alice")
    alice = await suite.identity.profile_of_custom_id("alice")
    assert alice == ios_anonymous
    # Opts in to email marketing.
    clock.advance(timedelta(minutes=1))
    t1 = clock.now()
    await suite.track(
        attribute_event("ios-1", [op("set", "EMAIL", "alice@example.com")], time=t1),
        subscription("ios-1", EMAIL, MARKETING, True, t1),
    )
    # Logs out on the Web (the browser starts a new anonymous profile), crashes once on iOS.
    clock.advance(timedelta(minutes=1))
    await suite.identity.logout("web-1")
    web_after = await suite.identity.profile_of("web-1")
    clock.advance(timedelta(minutes=1))
    await suite.track(crash("ios-1", clock.now(), name="OutOfMemory"))
    await suite.settle(groups=GROUPS)

    # The profile view.
    profile = (await suite.get(custom_id="alice")).profile
    assert profile.summary.profile_id == alice
    assert profile.summary.custom_id == "alice"
    assert not profile.summary.anonymous
    assert profile.summary.last_session_country == "FR"
    assert profile.native_attributes.email == "alice@example.com"
    assert [i.installation_id for i in profile.installations] == ["ios-1"]
    (ios,) = profile.installations
    assert (ios.platform, ios.app_version, ios.push_token_present, ios.push_opt_in) == (
        IOS,
        "2.0",
        True,
        True,
    )
    assert not ios.imported
    subscribed = {(s.channel, s.kind) for s in profile.subscriptions if s.subscribed}
    assert subscribed == {(EMAIL, MARKETING)}
    assert profile.counters.session_count == 2  # the web session came with the merge
    assert profile.counters.crash_count == 1
    assert profile.counters.last_crash.name == "OutOfMemory"
    assert profile.counters.total_time_spent.ToTimedelta() == timedelta(seconds=420)
    changes = [(c.kind, c.cause) for c in profile.identity_changes]
    assert changes == [
        (profile_pb2.IDENTITY_CHANGE_KIND_SPLIT, profile_pb2.IDENTITY_CHANGE_CAUSE_LOGOUT),
        (profile_pb2.IDENTITY_CHANGE_KIND_MERGE, profile_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY),
    ]
    assert profile.identity_changes[0].target_profile_id == web_after
    assert profile.identity_changes[1].source_profile_id == web_anonymous
    # Two sessions (3.5 minutes on average) on one day: 2 x 2 x 1.
    assert (profile.engagement.score1, profile.engagement.score2) == (2.0, 2)
    assert (profile.engagement.score3, profile.engagement.score) == (1, 4.0)
    assert profile.smart_segment.segment == types_pb2.SMART_SEGMENT_NEW
    assert profile.smart_segment.flag == types_pb2.SMART_SEGMENT_FLAG_UNSPECIFIED
    # Custom segments as the events left them (no periodic evaluation needed): alice opted in,
    # and the Web installation left with the logout for the new anonymous profile.
    assert [m.display_name for m in profile.segment_memberships] == ["Email marketing"]
    web_view = (await suite.get(profile_id=web_after)).profile
    assert [m.segment_id for m in web_view.segment_memberships] == [segment_ids["Web users"]]
    (checkout,) = profile.funnels
    assert [(s.event_name, s.status) for s in checkout.steps] == [
        ("view_item", profile_pb2.FUNNEL_STEP_STATUS_COMPLETED),
        ("purchase", profile_pb2.FUNNEL_STEP_STATUS_NOT_COMPLETED),
    ]
    assert checkout.steps[0].complete_time.ToDatetime(tzinfo=t0.tzinfo) == t0 + timedelta(minutes=1)

    # The timeline, newest first: the crash, the split, the consent, the merge, the browsing.
    timeline = await suite.call("ListEvents", pb.ListEventsRequest(profile_id=alice, page_size=100))
    kinds = [e.kind for e in timeline.events]
    assert kinds[:3] == [
        TIMELINE.TIMELINE_EVENT_KIND_CRASH,
        TIMELINE.TIMELINE_EVENT_KIND_SPLIT,
        TIMELINE.TIMELINE_EVENT_KIND_CONSENT_CHANGE,
    ]
    assert TIMELINE.TIMELINE_EVENT_KIND_MERGE in kinds
    assert not timeline.next_page_token
    sent = [e for e in timeline.events if not e.HasField("identity_change")]
    from_web = [e for e in sent if e.installation_id == "web-1"]
    assert len(from_web) == 4  # installation update, session start and end, browse
    for event in timeline.events:
        expected = web_anonymous if event in from_web else ""
        assert event.merged_from_profile_id == expected, event

    # The overview: two installations, one identified profile reachable by email and push, one
    # anonymous browser with no session yet; alice is New.
    overview = (await suite.call("GetOverview", pb.GetOverviewRequest(top_values=100))).overview
    assert overview_figures(overview) == await direct_overview(suite)
    assert (overview.install_count, overview.push_token_count, overview.push_opt_in_count) == (
        2,
        1,
        1,
    )
    assert (overview.identified_profile_count, overview.anonymous_profile_count) == (1, 1)
    assert overview.sessionless_profile_count == 1
    reach = {r.channel: r.reachable_profile_count for r in overview.channel_reaches}
    assert reach == {EMAIL: 1, types_pb2.CHANNEL_SMS: 0, types_pb2.CHANNEL_PUSH: 1}
    smart = {s.segment: s.profile_count for s in overview.smart_segments}
    assert smart == {
        types_pb2.SMART_SEGMENT_NEW: 1,
        types_pb2.SMART_SEGMENT_ONE_TIME: 0,
        types_pb2.SMART_SEGMENT_ENGAGED: 0,
        types_pb2.SMART_SEGMENT_DORMANT: 0,
    }
    assert [(v.value, v.count) for v in overview.platforms.top_values] == [
        ("PLATFORM_IOS", 1),
        ("PLATFORM_WEB", 1),
    ]

    # Segments agree with the profile view.
    metadata = suite.project.metadata("read")
    smart_segment = await segments.GetSmartSegment(
        segments_pb.GetSmartSegmentRequest(profile_id=alice), metadata=metadata, timeout=10
    )
    round_trip(smart_segment)
    assert (smart_segment.segment, smart_segment.flag) == (
        profile.smart_segment.segment,
        profile.smart_segment.flag,
    )
    assert smart_segment.session_count == 2
    engagement = await segments.GetEngagement(
        segments_pb.GetEngagementRequest(profile_id=alice), metadata=metadata, timeout=10
    )
    round_trip(engagement)
    assert (engagement.score1, engagement.score2, engagement.score3, engagement.score) == (
        profile.engagement.score1,
        profile.engagement.score2,
        profile.engagement.score3,
        profile.engagement.score,
    )
    assert engagement.percentage == profile.engagement.percentage
