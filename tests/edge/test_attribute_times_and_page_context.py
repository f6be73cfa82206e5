"""The shared value rule for dates (properties.time_of / attribute_value) and Segment's page and
campaign fields as event attributes (segment.add_context_attributes). Pure: no I/O; the same
rules over real HTTP are in test_attribute_times_and_page_context_http.py."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from segment.analytics.request import DatetimeSerializer

from profiles.common.v1 import types_pb2
from services.edge.dialects import segment
from services.edge.properties import attribute_value, sdk_text_value, time_of
from services.edge.steps import Track
from shared.convert import datetime_of

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)
# Python's datetime range, within a day of its ends so that any offset stays in range.
MOMENTS = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
OFFSETS = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


def moment_of(value: types_pb2.AttributeValue) -> datetime:
    assert value.WhichOneof("value") == "timestamp_value", value
    return datetime_of(value.timestamp_value)


@given(MOMENTS, OFFSETS)
def test_an_aware_isoformat_is_the_moment_it_names(moment: datetime, offset: timezone) -> None:
    # Python's isoformat of an aware datetime: what every Python SDK sends for one.
    assert moment_of(attribute_value(moment.astimezone(offset).isoformat())) == moment


@given(MOMENTS)
def test_a_javascript_date_is_the_moment_it_names(moment: datetime) -> None:
    # What JSON.stringify makes of a Date: milliseconds and Z ("2024-01-02T03:04:05.000Z").
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert moment_of(attribute_value(text)) == moment


@given(MOMENTS)
def test_a_naive_date_time_is_taken_as_utc(moment: datetime) -> None:
    assert moment_of(attribute_value(moment.replace(tzinfo=None).isoformat())) == moment


@given(st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)))
def test_a_bare_date_is_its_midnight_utc(day: date) -> None:
    assert moment_of(attribute_value(day.isoformat())) == datetime(
        day.year, day.month, day.day, tzinfo=UTC
    )


FIRST_SECOND = int(datetime(1, 1, 1, tzinfo=UTC).timestamp())
LAST_SECOND = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())


@given(st.text(alphabet="0123456789-:.+TtZz ", max_size=40) | st.text(max_size=40))
def test_any_text_is_a_valid_timestamp_or_stays_text(text: str) -> None:
    # Never an exception (a message lost as TRANSLATION_FAILED), never a moment ingest would
    # refuse (the event lost as VALUE_INVALID): a UTC moment within years 1 to 9999, or text.
    value = attribute_value(text)
    assert value is not None
    if value.WhichOneof("value") == "timestamp_value":
        # What ingest checks of a Timestamp before it reads it (else VALUE_INVALID): nanos
        # below a second, seconds from 0001-01-01 to 9999-12-31T23:59:59 UTC.
        stamp = value.timestamp_value
        assert 0 <= stamp.nanos < 1_000_000_000
        assert FIRST_SECOND <= stamp.seconds <= LAST_SECOND
        assert time_of(text) == datetime_of(value.timestamp_value)


def test_what_segment_analytics_python_sends_for_dates_becomes_timestamps() -> None:
    # Its request.py serializes with DatetimeSerializer: isoformat(), naive datetimes without
    # an offset.
    sent = json.loads(
        json.dumps(
            {
                "aware": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
                "naive": datetime(2024, 1, 2, 3, 4, 5),
                "micro": datetime(2024, 1, 2, 3, 4, 5, 123456),
                "day": date(1990, 5, 17),
            },
            cls=DatetimeSerializer,
        )
    )
    assert sent["naive"] == "2024-01-02T03:04:05"
    assert {k: moment_of(attribute_value(v)) for k, v in sent.items()} == {
        "aware": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "naive": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "micro": datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        "day": datetime(1990, 5, 17, tzinfo=UTC),
    }


def test_offsets_and_precisions_other_sdks_send() -> None:
    cases = {
        "2024-01-02T03:04:05+01:00": datetime(2024, 1, 2, 2, 4, 5, tzinfo=UTC),
        "2024-01-02T03:04:05+0100": datetime(2024, 1, 2, 2, 4, 5, tzinfo=UTC),  # iOS, Java
        "2024-01-02t03:04:05z": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),  # RFC 3339 allows
        "2024-01-02T03:04Z": datetime(2024, 1, 2, 3, 4, tzinfo=UTC),
        # Go's RFC3339Nano: nanoseconds, which the contract's storage keeps to microseconds.
        "2024-01-02T03:04:05.123456789Z": datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
    }
    assert {k: time_of(k) for k in cases} == cases


def test_text_that_names_no_time_stays_a_string() -> None:
    for text in [
        "20240102",  # an order number as much as a date
        "2024-W01",
        "2024-01-02 03:04:05",  # str(datetime): no T
        "2023-02-29",  # no such day
        "2024-01-02T03:04:60Z",  # leap second
        "0001-01-01T00:00:00+01:00",  # year 0 in UTC: no Timestamp holds it
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
        " 2024-01-02",
        "2024-01-02T03:04:05+25:00",
        "Tuesday",
    ]:
        assert attribute_value(text) == types_pb2.AttributeValue(string_value=text), text


def test_urls_are_urls_only_when_ingest_takes_them_for_one() -> None:
    assert attribute_value("https://x.io/p?q=1").url_value == "https://x.io/p?q=1"
    # Ingest refuses a URL value without a host, or with white space: text, not a rejection.
    for text in ["https://", "https:///path", "https://x.io/a\tb", "http://[::1"]:
        assert attribute_value(text) == types_pb2.AttributeValue(string_value=text), text


def test_sdk_text_is_cut_to_the_contracts_limits_and_never_a_time() -> None:
    long_url = "https://shop.example/" + "a" * 3000
    assert sdk_text_value(long_url) == types_pb2.AttributeValue(url_value=long_url[:2048])
    assert sdk_text_value("T" * 400) == types_pb2.AttributeValue(string_value="T" * 300)
    assert sdk_text_value("2024-01-02") == types_pb2.AttributeValue(string_value="2024-01-02")
    assert sdk_text_value("a\x00b") == types_pb2.AttributeValue(string_value="ab")
    assert [sdk_text_value(v) for v in ["", None, 3, {"a": 1}]] == [None] * 4


def custom_of(message: dict[str, Any]) -> Any:
    steps = segment.translate_batch({"batch": [message]}, NOW).steps
    (custom,) = [e for s in steps if isinstance(s, Track) for e in s.events if e.custom.name]
    return custom.custom


ANALYTICS_JS_CONTEXT = {
    "library": {"name": "analytics.js", "version": "npm:next-1.84.3"},
    "page": {
        "path": "/pricing",
        "referrer": "",
        "search": "?utm_source=news&utm_campaign=spring",
        "title": "Pricing",
        "url": "https://shop.example/pricing?utm_source=news&utm_campaign=spring",
    },
    "campaign": {"source": "news", "name": "spring", "medium": "email"},
}


def test_a_track_event_carries_its_page_and_campaign() -> None:
    custom = custom_of(
        {
            "type": "track",
            "anonymousId": "a",
            "event": "Course Clicked",
            "properties": {"title": "Intro"},
            "context": ANALYTICS_JS_CONTEXT,
        }
    )
    assert {k: v.WhichOneof("value") for k, v in custom.attributes.items()} == {
        "title": "string_value",
        "page_url": "url_value",
        "page_path": "string_value",
        "page_title": "string_value",
        "page_search": "string_value",
        "utm_source": "string_value",
        "utm_medium": "string_value",
        "utm_campaign": "string_value",
    }
    assert custom.attributes["title"].string_value == "Intro"  # the app's, not the page's
    assert custom.attributes["page_title"].string_value == "Pricing"
    assert custom.attributes["page_url"].url_value.endswith(
        "/pricing?utm_source=news&utm_campaign=spring"
    )
    assert custom.attributes["utm_campaign"].string_value == "spring"


def test_a_property_of_the_same_name_wins_over_the_context() -> None:
    custom = custom_of(
        {
            "type": "track",
            "anonymousId": "a",
            "event": "E",
            "properties": {"utm_source": "partner", "page": {"path": "/mine"}},
            "context": ANALYTICS_JS_CONTEXT,
        }
    )
    assert custom.attributes["utm_source"].string_value == "partner"
    assert custom.attributes["page_path"].string_value == "/mine"


def test_a_page_call_says_page_url_as_every_other_event() -> None:
    # analytics.js's page(): the page's fields in its properties and in context.page alike.
    page_fields = {k: v for k, v in ANALYTICS_JS_CONTEXT["page"].items()}  # type: ignore[attr-defined]
    custom = custom_of(
        {
            "type": "page",
            "anonymousId": "a",
            "name": "Pricing",
            "properties": {**page_fields, "name": "Pricing", "url": "https://shop.example/own"},
            "context": ANALYTICS_JS_CONTEXT,
        }
    )
    assert custom.label == "Pricing"
    assert sorted(custom.attributes) == sorted(
        [
            "name",
            "page_url",
            "page_path",
            "page_title",
            "page_search",
            "utm_source",
            "utm_medium",
            "utm_campaign",
        ]
    )
    # The call's own property first.
    assert custom.attributes["page_url"].url_value == "https://shop.example/own"


def test_the_context_fills_only_the_room_the_properties_leave() -> None:
    properties = {f"p{i}": i for i in range(17)}
    custom = custom_of(
        {
            "type": "track",
            "anonymousId": "a",
            "event": "Wide",
            "properties": properties,
            "context": ANALYTICS_JS_CONTEXT,
        }
    )
    # 17 properties and the first three fields present, in CONTEXT_ATTRIBUTES' order (the
    # empty referrer is none).
    assert len(custom.attributes) == 20
    assert {"page_url", "page_path", "utm_source"} <= set(custom.attributes)
    assert "page_title" not in custom.attributes
