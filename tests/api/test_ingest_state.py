"""Profile state kept by TrackEvents: attributes, subscriptions and installations by event time."""

from __future__ import annotations

from datetime import timedelta

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from tests.support.ingest import NOW, Ingest, attribute_event, op, stamp

T = [NOW - timedelta(hours=10 - i) for i in range(10)]


async def attributes(ingest: Ingest) -> dict[str, object]:
    rows = await ingest.fetch("SELECT name, value FROM profile_attributes")
    return {r["name"]: None if r["value"] is None else r["value"]["value"] for r in rows}


async def test_attribute_operations_follow_event_time_not_arrival_order(ingest: Ingest) -> None:
    await ingest.track(
        attribute_event(
            "i1", [op("set", "plan", "pro"), op("set_once", "source", "ad")], time=T[5]
        ),
        attribute_event("i1", [op("increment", "visits", 2)], time=T[6]),
    )
    # Late arrivals, older in event time.
    reply = await ingest.track(
        attribute_event(
            "i1", [op("set", "plan", "free"), op("set_once", "source", "seo")], time=T[2]
        ),
        attribute_event("i1", [op("increment", "visits", 3)], time=T[1]),
        attribute_event("i1", [op("set", "EMAIL", "Ann@Example.com")], time=T[3]),
    )
    assert reply.accepted_count == 3
    assert await attributes(ingest) == {
        "plan": "pro",  # the newer set wins
        "source": "seo",  # the earliest set-once wins
        "visits": 5.0,  # increments add up
        "email": "ann@example.com",
    }


async def test_unset_and_list_operations(ingest: Ingest) -> None:
    await ingest.track(
        attribute_event("i1", [op("append", "tags", ["a", "b"])], time=T[1]),
        attribute_event("i1", [op("append", "tags", ["c"])], time=T[3]),
        attribute_event("i1", [op("set", "nick", "x")], time=T[1]),
        attribute_event("i1", [op("unset", "nick")], time=T[4]),
    )
    await ingest.track(
        attribute_event("i1", [op("remove", "tags", "a")], time=T[2]),  # replayed in place
        attribute_event("i1", [op("set", "nick", "old")], time=T[2]),  # older than the unset
    )
    assert await attributes(ingest) == {"tags": ["b", "c"], "nick": None}


def fifty_attributes(time: object) -> list[pb.Event]:
    return [
        attribute_event("i1", [op("set", f"a{i}_{j}", "v") for j in range(10)], time=time)
        for i in range(5)
    ]


async def test_a_late_unset_that_the_replay_overtakes_frees_no_place_for_the_51st(
    ingest: Ingest,
) -> None:
    # The unset at T[1] is followed in the replay by a0_0's set at T[2]: a0_0 stays, so the new
    # attribute would be the 51st. (Judged on arrival without event time, it was accepted.)
    assert (await ingest.track(*fifty_attributes(T[2]))).accepted_count == 5
    reply = await ingest.track(
        attribute_event("i1", [op("unset", "a0_0"), op("set", "extra", "v")], time=T[1])
    )
    assert reply.results[0].reason == "PROFILE_ATTRIBUTE_LIMIT"
    held = await attributes(ingest)
    assert len([v for v in held.values() if v is not None]) == 50
    assert "extra" not in held


async def test_a_late_set_that_the_replay_unsets_takes_no_place(ingest: Ingest) -> None:
    # `extra` set at T[1] is unset at T[2] in the replay: the profile keeps 50, so the event is
    # accepted. (Judged on arrival without event time, it was refused.)
    unset_later = attribute_event("i1", [op("unset", "extra")], time=T[2])
    assert (await ingest.track(*fifty_attributes(T[2]), unset_later)).accepted_count == 6
    reply = await ingest.track(attribute_event("i1", [op("set", "extra", "v")], time=T[1]))
    assert reply.results[0].outcome == pb.EVENT_OUTCOME_ACCEPTED
    held = await attributes(ingest)
    assert len([v for v in held.values() if v is not None]) == 50
    assert held["extra"] is None


async def test_the_51st_custom_attribute_is_refused_and_its_event_not_stored(
    ingest: Ingest,
) -> None:
    batch = [
        attribute_event("i1", [op("set", f"a{i}_{j}", "v") for j in range(10)], time=T[1])
        for i in range(5)
    ]
    first = await ingest.track(*batch)
    assert first.accepted_count == 5
    reply = await ingest.track(
        attribute_event("i1", [op("set", "a0_0", "changed")], time=T[2]),
        attribute_event("i1", [op("set", "one_more", "v")], event_id="too-many", time=T[2]),
    )
    assert [r.outcome for r in reply.results] == [
        pb.EVENT_OUTCOME_ACCEPTED,
        pb.EVENT_OUTCOME_REJECTED,
    ]
    assert reply.results[1].reason == "PROFILE_ATTRIBUTE_LIMIT"
    assert await ingest.fetch("SELECT 1 FROM events WHERE event_id = 'too-many'") == []
    kept = await ingest.fetch("SELECT reason FROM rejected_events")
    assert [r["reason"] for r in kept] == ["PROFILE_ATTRIBUTE_LIMIT"]
    assert "one_more" not in await attributes(ingest)


def subscription(installation_id: str, subscribed: bool, time: object) -> pb.Event:
    event = pb.Event(
        event_id=f"sub-{subscribed}-{time}",
        installation_id=installation_id,
        platform=types_pb2.PLATFORM_WEB,
        event_time=stamp(time),  # type: ignore[arg-type]
    )
    event.subscription_change.channel = types_pb2.CHANNEL_EMAIL
    event.subscription_change.kind = types_pb2.SUBSCRIPTION_KIND_MARKETING
    event.subscription_change.subscribed = subscribed
    return event


async def test_the_latest_subscription_change_by_event_time_wins(ingest: Ingest) -> None:
    await ingest.track(subscription("i1", True, T[5]))
    await ingest.track(subscription("i1", False, T[3]))  # late and older: ignored
    rows = await ingest.fetch(
        "SELECT channel, kind, subscribed, change_time FROM profile_subscriptions"
    )
    assert [(r["channel"], r["kind"], r["subscribed"], r["change_time"]) for r in rows] == [
        ("email", "marketing", True, T[5])
    ]
    await ingest.track(subscription("i1", False, T[7]))
    rows = await ingest.fetch("SELECT subscribed FROM profile_subscriptions")
    assert [r["subscribed"] for r in rows] == [False]


def update(installation_id: str, time: object, **fields: object) -> pb.Event:
    event = pb.Event(
        event_id=f"upd-{time}",
        installation_id=installation_id,
        platform=types_pb2.PLATFORM_ANDROID,
        event_time=stamp(time),  # type: ignore[arg-type]
    )
    event.installation_update.SetInParent()
    for name, value in fields.items():
        setattr(event.installation_update, name, value)
    return event


async def test_installation_updates_keep_the_latest_value_of_each_field(ingest: Ingest) -> None:
    await ingest.track(
        update("i1", T[5], app_version="2.0", push_token="secret-123", push_opt_in=True),
        update("i1", T[6], uninstalled=True),
    )
    await ingest.track(update("i1", T[2], app_version="1.0", language="fr"))
    rows = await ingest.fetch(
        "SELECT platform, app_version, push_token, push_opt_in, language, uninstalled,"
        " first_seen, last_seen FROM installation_details"
    )
    assert dict(rows[0]) == {
        "platform": types_pb2.PLATFORM_ANDROID,
        "app_version": "2.0",
        "push_token": "secret-123",
        "push_opt_in": True,
        "language": "fr",
        "uninstalled": True,
        "first_seen": T[2],
        "last_seen": T[6],
    }
    # A later session clears the uninstall.
    start = pb.Event(
        event_id="start",
        installation_id="i1",
        platform=types_pb2.PLATFORM_ANDROID,
        event_time=stamp(T[8]),
        session_id="s1",
    )
    start.session_start.country = "fr"
    await ingest.track(start)
    rows = await ingest.fetch("SELECT uninstalled FROM installation_details")
    assert rows[0]["uninstalled"] is False
    events = await ingest.fetch("SELECT payload FROM events WHERE event_id = 'start'")
    assert events[0]["payload"] == {"country": "FR"}
    # The push token stays out of the stored event.
    stored = await ingest.fetch("SELECT payload FROM events WHERE kind = 7 ORDER BY event_time")
    assert [r["payload"].get("push_token_present") for r in stored] == [None, True, None]
    assert "secret-123" not in str([r["payload"] for r in stored])
