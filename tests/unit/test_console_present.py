"""How the console words and lays out contract messages: pure functions, no server."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf import duration_pb2, timestamp_pb2

from profiles.common.v1 import types_pb2
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.query.v1 import overview_pb2, profile_pb2, timeline_pb2
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import filters_pb2
from services.console import present
from services.console.errors import BadInput
from services.console.pages import (
    _safe_next,
    dropped_title,
    export_member,
    lookups,
    names_searched,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_person_is_named_by_name_then_custom_id_then_as_anonymous() -> None:
    assert present.display_name("Ana", "Lopez", "u-1", "p") == "Ana Lopez"
    assert present.display_name("", "", "u-1", "p") == "u-1"
    assert present.display_name("", "", "", "0123456789") == "Anonymous 01234567"


def test_durations_and_values_read_as_a_person_expects() -> None:
    assert present.span(duration_pb2.Duration(seconds=3725)) == "1 h 02 min"
    assert present.span(65) == "1 min 05 s"
    assert [present.count_of(n, "session") for n in (0, 1, 2)] == [
        "0 sessions",
        "1 session",
        "2 sessions",
    ]
    assert present.attribute_value(types_pb2.AttributeValue(number_value=3.0)) == "3"
    assert present.attribute_value(types_pb2.AttributeValue(bool_value=False)) == "false"
    listed = types_pb2.AttributeValue(string_list_value=types_pb2.StringList(values=["a", "b"]))
    assert present.attribute_value(listed) == "a, b"


def test_a_time_reads_the_same_from_a_timestamp_and_a_datetime() -> None:
    moment = datetime(2026, 12, 2, 20, 31, 5, 987_000, tzinfo=UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    assert present.when(stamp) == present.when(moment) == "2026-12-02 20:31:05 UTC"
    before_1970 = timestamp_pb2.Timestamp(seconds=-86_400)
    assert present.when(before_1970) == "1969-12-31 00:00:00 UTC"
    assert present.when(timestamp_pb2.Timestamp()) == present.when(None) == "—"


def test_a_users_table_row_marks_user_details_without_a_custom_id() -> None:
    def row(**fields: object) -> query_pb.ProfileRow:
        return query_pb.ProfileRow(profile_id="0123456789abcdef", **fields)  # type: ignore[arg-type]

    email_only = row(anonymous=True, has_user_details=True)
    named = row(anonymous=True, first_name="Ana", has_user_details=True)
    identified = row(custom_id="u-1", first_name="Ana", has_user_details=True)
    bare = row(anonymous=True)
    marked = [
        r.details_without_id for r in present.user_rows([email_only, named, identified, bare])
    ]
    assert marked == [True, True, False, False]
    full = row(
        anonymous=True,
        first_name="Ana",
        last_name="Lopez",
        device_model="Pixel 8",
        platform=types_pb2.PLATFORM_ANDROID,
        session_count=3,
        total_time_spent=duration_pb2.Duration(seconds=65),
        smart_segment=3,
        smart_segment_flag=3,
    )
    (line,) = present.user_rows([full])
    assert (line.name, line.device, line.platform, line.sessions) == (
        "Ana Lopez",
        "Pixel 8",
        "Android",
        3,
    )
    assert (line.last_seen, line.time_spent) == ("—", "1 min 05 s")
    assert line.segment == "Engaged · Risky Engaged"
    (nothing,) = present.user_rows([bare])
    assert (nothing.name, nothing.device, nothing.platform) == ("Anonymous 01234567", "—", "")


def test_a_native_segment_value_reads_as_words() -> None:
    assert present.breakdown_value(overview_pb2.ValueCount(value="PLATFORM_WEB")) == "Web"
    version = overview_pb2.ValueCount(value="4.2.0", platform=types_pb2.PLATFORM_IOS)
    assert present.breakdown_value(version) == "4.2.0 (iOS)"
    assert present.breakdown_value(overview_pb2.ValueCount(value="fr")) == "fr"


def test_a_segment_definition_reads_as_a_sentence() -> None:
    ios = filters_pb2.Condition(
        platform=filters_pb2.PlatformCondition(platforms=[types_pb2.PLATFORM_IOS])
    )
    recent = filters_pb2.Condition(last_seen=filters_pb2.TimeWindow(within_last_days=7))
    node = filters_pb2.FilterNode(
        group=filters_pb2.FilterGroup(
            operator=filters_pb2.GROUP_OPERATOR_AND,
            children=[
                filters_pb2.FilterNode(condition=ios),
                filters_pb2.FilterNode(condition=recent),
            ],
        )
    )
    assert present.filter_words(node) == "(platform is iOS and last seen within the last 7 days)"


def test_an_event_title_names_what_happened() -> None:
    event = timeline_pb2.TimelineEvent(custom=timeline_pb2.CustomEventDetails(name="purchase"))
    assert present.event_title(event) == "purchase"


def test_search_guesses_the_kind_of_identifier() -> None:
    assert lookups(" a@b.co ", "auto") == [{"email": "a@b.co"}]
    assert lookups("+33612345678", "auto") == [{"phone": "+33612345678"}]
    uuid_text = "6f1e2c1a-0d7e-4a51-9b55-1d7c7d3f0a11"
    assert lookups(uuid_text, "auto")[0] == {"profile_id": uuid_text}
    assert lookups("user-42", "auto") == [{"custom_id": "user-42"}, {"installation_id": "user-42"}]
    assert lookups("x", "installation_id") == [{"installation_id": "x"}]
    assert lookups("Ana Lopez", "name") == []
    # Copied without its dashes or in capitals, a UUID is still the profile ID it names.
    assert lookups(uuid_text.replace("-", "").upper(), "auto")[0] == {"profile_id": uuid_text}
    assert lookups(uuid_text.upper(), "profile_id") == [{"profile_id": uuid_text}]
    assert lookups("user-1", "profile_id") == [{"profile_id": "user-1"}]


def test_a_refused_request_is_told_in_the_words_of_the_box_never_the_contract_s() -> None:
    too_long = BadInput("name_prefix must hold at most 100 characters", "REQUEST_INVALID",
                        fields=("name_prefix",))  # fmt: skip
    assert present.refusal(too_long, {"name_prefix": "name"}) == present.Refusal(
        "name", "A name search holds at most 100 characters."
    )
    reason = BadInput("reasons[0] must hold 1 to 64 characters", fields=("reasons[0]",))
    assert present.refusal(reason, {"reasons": "reason"}).box == "reason"
    stale = BadInput("page_token is invalid", "PAGE_TOKEN_INVALID", fields=("page_token",))
    assert present.refusal(stale, {"page_token": "x"}) == present.Refusal(
        "", present.PAGE_LINK_STALE
    )
    unknown = BadInput("weird_field must be odd", fields=("weird_field",))
    assert present.refusal(unknown) == present.Refusal("", present.REFUSED)
    assert present.problem_text(unknown) == present.REFUSED  # never the service's own words
    for words in [*present.FIELD_WORDS.values(), present.REFUSED, present.PAGE_LINK_STALE]:
        assert not re.search(r"\b[a-z]+_[a-z_]+\b|\[\d", words), words


def test_what_a_page_repeats_of_a_typed_text_is_shortened() -> None:
    assert present.shorten("short") == "short"
    assert present.shorten("x" * 5000) == "x" * 39 + "…"
    assert len(present.shorten("word " * 20)) <= present.ECHO_MAX


def test_a_typed_reason_reads_as_the_code_it_means() -> None:
    assert present.reason_code("  name_invalid ") == "NAME_INVALID"
    assert present.reason_code("event time in-future") == "EVENT_TIME_IN_FUTURE"
    assert present.reason_code("") == ""


def test_the_offered_reasons_are_those_the_contract_lists() -> None:
    proto = ROOT / "protos/profiles/ingest/v1/ingest_service.proto"
    text = proto.read_text()
    listed = text[text.index("// Rejection reasons") : text.index("service IngestService")]
    codes = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", listed)) - {"UPPER_SNAKE"}
    codes |= {"UNTRANSLATED", "ERASED"}  # one-word codes the comment names
    assert set(present.REJECTION_REASONS) == codes
    assert "INVALID_EVENT_TIME" not in codes


def test_a_live_value_is_typed_as_the_attributes_table_types_it() -> None:
    listed = types_pb2.AttributeValue(string_list_value=types_pb2.StringList(values=["a"]))
    assert present.value_type(listed) == present.attribute_type(6) == "string list"
    assert present.value_type(types_pb2.AttributeValue(url_value="https://a.b")) == "url"
    assert present.value_type(types_pb2.AttributeValue()) == "—"


def test_a_search_no_identifier_answered_goes_on_to_names_only_for_what_could_be_a_name() -> None:
    assert names_searched("Ana Lopez", "auto")
    assert names_searched("ana", "name")
    assert names_searched("a@b.co", "name")  # asked for: the text is searched as a name
    assert not names_searched("a@b.co", "auto")
    assert not names_searched("+33612345678", "auto")
    assert not names_searched("6f1e2c1a-0d7e-4a51-9b55-1d7c7d3f0a11", "auto")
    assert not names_searched("Ana", "custom_id")


def test_sign_in_only_returns_to_a_page_of_the_console() -> None:
    assert _safe_next("/users?tab=anonymous") == "/users?tab=anonymous"
    assert _safe_next("//evil.example/") == "/overview"
    assert _safe_next("https://evil.example/") == "/overview"


def test_charts_scale_to_the_largest_value() -> None:
    bars = present.bar_chart([("a", 5, ""), ("b", 10, "")], width=100, height=50)
    assert [b.height for b in bars] == [25.0, 50.0]
    assert present.gauge_arc(0).endswith("10.00 60.00")


def test_the_users_table_says_which_rows_it_shows_of_how_many() -> None:
    assert present.shown_rows(1, 50, 50, 2345, at_least=False) == "Profiles 1 to 50 of 2,345"
    assert present.shown_rows(2, 50, 50, 10_000, at_least=True) == ("Profiles 51 to 100 of 10,000+")
    assert present.shown_rows(3, 50, 7, 107, at_least=False) == "Profiles 101 to 107 of 107"
    assert present.shown_rows(1, 50, 0, 0, at_least=False) == "No profile"
    assert present.shown_rows(4, 50, 0, 120, at_least=False) == "No profile past 150"


def test_a_funnel_step_converts_from_the_previous_step_and_the_first() -> None:
    steps = present.funnel_figures(["open", "cart", "pay"], [200, 50, 10])
    assert [(s.event_name, s.reached) for s in steps] == [("open", 200), ("cart", 50), ("pay", 10)]
    assert [s.from_previous for s in steps] == ["—", "25.0 %", "20.0 %"]
    assert [s.from_first for s in steps] == ["100.0 %", "25.0 %", "5.0 %"]
    assert [(s.dropped, s.dropped_share) for s in steps] == [
        (0, "—"),
        (150, "75.0 %"),
        (40, "80.0 %"),
    ]


def test_a_funnel_nobody_entered_has_no_rates_rather_than_a_division_by_zero() -> None:
    steps = present.funnel_figures(["open", "pay"], [0, 0])
    assert [(s.from_previous, s.from_first, s.dropped, s.dropped_share) for s in steps] == [
        ("—", "—", 0, "—"),
        ("—", "—", 0, "—"),
    ]
    # A later step nobody reached, after one somebody did: 0 %, everybody dropped.
    (_, last) = present.funnel_figures(["open", "pay"], [3, 0])
    assert (last.from_previous, last.from_first, last.dropped, last.dropped_share) == (
        "0.0 %",
        "0.0 %",
        3,
        "100.0 %",
    )
    # Counts that do not match the steps (a reply without them) give no figures at all.
    assert present.funnel_figures(["open", "pay"], []) == []


def test_rejected_reasons_are_chips_with_counts_every_reason_whatever_the_filter() -> None:
    counts = [
        query_pb.RejectedReasonCount(reason="EVENT_TIME_TOO_OLD", count=1200),
        query_pb.RejectedReasonCount(reason="NAME_INVALID", count=3),
    ]
    chips = present.reason_chips(counts, at_least=False, selected="NAME_INVALID")
    assert [(c.reason, c.label, c.count, c.selected) for c in chips] == [
        ("", "All reasons", "1,203", False),
        ("EVENT_TIME_TOO_OLD", "EVENT_TIME_TOO_OLD", "1,200", False),
        ("NAME_INVALID", "NAME_INVALID", "3", True),
    ]
    # Past the service's cap each count is a lower bound; a chosen reason the range does not
    # hold still shows, at 0; no reason chosen marks "All reasons".
    bounded = present.reason_chips(counts, at_least=True, selected="ERASED")
    assert [c.count for c in bounded] == ["at least 1,203", "at least 1,200", "at least 3", "0"]
    assert [c.reason for c in bounded if c.selected] == ["ERASED"]
    assert [
        c.label for c in present.reason_chips([], at_least=False, selected="") if c.selected
    ] == ["All reasons"]


def test_an_overview_figure_links_to_the_users_table_filtered_alike() -> None:
    assert present.users_url(platform="all") == "/users"
    assert present.users_url(tab="identified", platform="ios") == (
        "/users?tab=identified&platform=ios"
    )
    assert present.users_url(language="fr", platform="all") == "/users?language=fr"
    assert present.users_url(segment="smart:3") == "/users?segment=smart%3A3"
    assert present.language_code(" FR ") == "fr"
    assert present.country_code("fr") == "FR"
    assert present.language_code("french") == present.country_code("F1") == ""
    chips = present.filter_chips(language="fr", country="FR", reach="sms")
    assert [(c.label, c.parameter) for c in chips] == [
        ("Language: fr", "language"),
        ("Country: FR", "country"),
        ("Reachable by SMS", "reach"),
    ]
    assert set(present.REACH.values()) == {
        types_pb2.CHANNEL_EMAIL,
        types_pb2.CHANNEL_SMS,
        types_pb2.CHANNEL_PUSH,
    }


def test_a_filtered_timeline_says_what_it_shows() -> None:
    assert present.timeline_filter_words("", "") == ""
    assert present.timeline_filter_words("crash", "") == "crashes"
    assert present.timeline_filter_words("", "purchase") == "custom events named “purchase”"
    assert present.timeline_filter_words("custom", "purchase") == ("custom events named “purchase”")
    assert present.timeline_filter_words("session", "purchase") == (
        "sessions and custom events named “purchase”"
    )
    kinds = {k for _, listed in present.TIMELINE_KINDS.values() for k in listed}
    assert kinds == set(timeline_pb2.TimelineEventKind.values()) - {0}


def test_an_installation_update_tells_its_push_token_opt_in_and_uninstall() -> None:
    def update(**fields: object) -> timeline_pb2.TimelineEvent:
        return timeline_pb2.TimelineEvent(
            installation_update=timeline_pb2.InstallationUpdateDetails(**fields)  # type: ignore[arg-type]
        )

    assert present.event_details(
        update(app_version="5.1", push_token_present=True, push_opt_in=True)
    ) == [("app version", "5.1"), ("push token", "registered"), ("push opt-in", "on")]
    assert present.event_details(
        update(push_token_present=False, push_opt_in=False, uninstalled=True)
    ) == [("push token", "removed"), ("push opt-in", "off"), ("app", "uninstalled")]
    # Not carried by the update: not told (an unset optional is no "off").
    assert present.event_details(update(language="fr")) == [("language", "fr")]


def test_a_timeline_entry_tells_where_it_came_from_and_all_its_payload() -> None:
    event = timeline_pb2.TimelineEvent(
        installation_id="inst-9",
        platform=types_pb2.PLATFORM_ANDROID,
        session_id="s-1",
        imported=True,
        merged_from_profile_id="6f1e2c1a-0d7e-4a51-9b55-1d7c7d3f0a11",
        custom=timeline_pb2.CustomEventDetails(name="purchase", label="spring sale"),
    )
    assert present.event_title(event) == "purchase"
    assert ("label", "spring sale") in present.event_details(event)
    assert present.event_origin(event) == [
        ("installation", "inst-9"),
        ("platform", "Android"),
        ("session", "s-1"),
        ("imported", "yes, by an import (not sent live)"),
        ("merged from profile", "6f1e2c1a-0d7e-4a51-9b55-1d7c7d3f0a11"),
    ]
    assert present.event_origin(timeline_pb2.TimelineEvent()) == []
    crash = timeline_pb2.TimelineEvent(
        crash=timeline_pb2.CrashDetails(name="E", reason="r", stack_trace="at <main>\n  at x")
    )
    assert present.stack_trace(crash) == "at <main>\n  at x"
    assert present.stack_trace(event) == ""
    merge = timeline_pb2.TimelineEvent(
        identity_change=profile_pb2.IdentityChange(
            kind=profile_pb2.IDENTITY_CHANGE_KIND_MERGE,
            cause=profile_pb2.IDENTITY_CHANGE_CAUSE_OPERATOR_MERGE,
            source_profile_id="a",
            target_profile_id="b",
            installation_ids=["i1", "i2"],
            alias_custom_id="old-id",
        )
    )
    assert present.event_details(merge) == [
        ("from", "a"),
        ("into", "b"),
        ("installations", "i1, i2"),
        ("custom ID kept as an alias", "old-id"),
    ]


def test_an_imported_token_not_yet_seen_reads_so_rather_than_a_last_seen_time() -> None:
    seen = profile_pb2.Installation(last_seen_time=timestamp_pb2.Timestamp(seconds=86_400))
    imported = profile_pb2.Installation(
        imported=True, last_seen_time=timestamp_pb2.Timestamp(seconds=86_400)
    )
    assert present.installation_last_seen(seen) == "1970-01-02 00:00:00 UTC"
    assert present.installation_last_seen(imported) == "imported, not seen yet"


def test_a_phone_typed_with_spaces_dashes_dots_or_brackets_is_looked_up_in_e164() -> None:
    for typed in ("+1 555 000 0003", "+1 (555) 000-0003", "+1.555.000.0003", " +15550000003 "):
        assert lookups(typed, "auto") == [{"phone": "+15550000003"}], typed
    assert lookups("+1 555-000-0003", "phone") == [{"phone": "+15550000003"}]
    # Not a phone: as before.
    assert lookups("+ abc", "auto") == [{"custom_id": "+ abc"}, {"installation_id": "+ abc"}]
    assert present.phone_number("555 000") == ""


def test_the_users_table_tells_rows_of_the_same_name_apart() -> None:
    rows = present.user_rows(
        [
            query_pb.ProfileRow(profile_id="11111111-x", first_name="Ana", custom_id="crm-1"),
            query_pb.ProfileRow(profile_id="22222222-x", first_name="Ana", anonymous=True),
            query_pb.ProfileRow(profile_id="33333333-x", custom_id="crm-3"),
            query_pb.ProfileRow(profile_id="44444444-x", anonymous=True),
            query_pb.ProfileRow(
                profile_id="55555555-x", first_name="Ana", custom_id="crm-5", email="a@x.io"
            ),
            query_pb.ProfileRow(
                profile_id="66666666-x", first_name="Ana", anonymous=True, email="b@x.io"
            ),
        ]
    )
    assert [(r.name, r.also) for r in rows] == [
        ("Ana", "crm-1"),
        ("Ana", "profile 22222222"),
        ("crm-3", ""),
        ("Anonymous 44444444", ""),
        ("Ana", "crm-5"),  # the email has a column of its own
        ("Ana", "profile 66666666"),
    ]
    assert [r.email for r in rows] == ["—", "—", "—", "—", "a@x.io", "b@x.io"]


def test_the_identity_history_is_newest_first_and_marks_this_profile() -> None:
    def change(seconds: int, change_id: str, source: str, target: str) -> object:
        return profile_pb2.IdentityChange(
            change_id=change_id,
            kind=profile_pb2.IDENTITY_CHANGE_KIND_MERGE,
            cause=profile_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY,
            change_time=timestamp_pb2.Timestamp(seconds=seconds),
            source_profile_id=source,
            target_profile_id=target,
        )

    rows = present.history_rows(
        [change(10, "a", "old", "me"), change(20, "b", "me", "new"), change(20, "c", "x", "me")],
        "me",
    )
    assert [(r.source, r.target) for r in rows] == [("x", "me"), ("me", "new"), ("old", "me")]
    assert [(r.source_is_here, r.target_is_here) for r in rows] == [
        (False, True),
        (True, False),
        (False, True),
    ]
    assert rows[0].installations == "—"


def test_the_activity_table_lists_each_day_newest_first_in_a_named_zone() -> None:
    days = [
        timeline_pb2.DayActivity(date="2026-12-01", session_count=1, event_count=4),
        timeline_pb2.DayActivity(
            date="2026-12-02",
            session_count=2,
            event_count=9,
            time_spent=duration_pb2.Duration(seconds=65),
        ),
    ]
    assert present.activity_days(days) == [
        present.ActivityDay("2026-12-02", 2, 9, "1 min 05 s"),
        present.ActivityDay("2026-12-01", 1, 4, "0 s"),
    ]
    assert present.activity_zone("") == "UTC"
    assert present.activity_zone("Europe/Paris") == "Europe/Paris"


def test_export_members_are_the_sections_in_lower_camel_case_and_unknown_ones_are_kept() -> None:
    assert export_member(identity_pb.EXPORT_SECTION_REJECTED_EVENTS) == "rejectedEvents"
    assert export_member(identity_pb.EXPORT_SECTION_FUNNEL_PROGRESS) == "funnelProgress"
    assert export_member(99) == "section99"


def test_a_gap_of_unknown_size_says_some_updates_may_be_missing() -> None:
    assert dropped_title(0).startswith("Live updates were interrupted and some may be missing")
    assert dropped_title(1) == "1 live item was lost; refresh to see everything"
    assert dropped_title(3) == "3 live items were lost; refresh to see everything"
