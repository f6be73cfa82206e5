"""Countly's mobile SDKs (countly-sdk-ios and countly-sdk-android 26.1.2) against a real edge:
their requests rebuilt byte for byte from the SDKs' sources (iOS CountlyConnectionManager.m,
CountlyCrashReporter.m; Android ConnectionQueue.java, ConnectionProcessor.java,
DeviceInfo.java), sent from a queue the way the SDKs send theirs, and judged by their rule:
a request not answered 2xx with a JSON `result` stays at the head of the queue, resent forever,
and nothing queued after it is sent. What arrives is read back through the query API."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

import grpc
import requests

from profiles.query.v1 import query_service_pb2 as query_pb
from tests.conftest import eventually
from tests.edge.conftest import Edge


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class SdkAnswer:
    status: int
    body: str

    @property
    def accepted(self) -> bool:
        """iOS `isRequestSuccessful`, Android `ConnectionProcessor`: 2xx and a JSON object
        with `result`; anything else keeps the request at the head of the queue."""
        if not 200 <= self.status < 300:
            return False
        try:
            parsed = json.loads(self.body)
        except ValueError:
            return False
        return isinstance(parsed, dict) and "result" in parsed


@dataclass(slots=True)
class MobileApp:
    """One install of the iOS or Android SDK: its current device ID and its request queue (one
    request per action, as the SDKs queue them)."""

    url: str
    app_key: str
    platform: str  # "ios" or "android"
    device_id: str
    queue: list[str] = field(default_factory=list)
    # Request and event timestamps: milliseconds, unique, ten minutes ago onwards.
    clock: Iterator[int] = field(
        default_factory=lambda: itertools.count(int(time.time() * 1000) - 600_000, 1_000)
    )

    def escape(self, text: str) -> str:
        if self.platform == "ios":
            return quote(text, safe="-._~")  # cly_URLEscaped
        return quote_plus(text, safe="*-._")  # java.net.URLEncoder

    def essentials(self) -> str:
        """iOS `queryEssentials`, Android `prepareCommonRequestData`."""
        stamp = next(self.clock)
        device = self.escape(self.device_id)
        if self.platform == "ios":
            return (
                f"app_key={self.app_key}&device_id={device}&t=0&timestamp={stamp}&hour=14"
                "&dow=3&tz=120&sdk_version=26.1.2&sdk_name=objc-native-ios"
            )
        return (
            f"app_key={self.app_key}&device_id={device}&timestamp={stamp}"
            "&sdk_version=26.1.2&sdk_name=java-native-android&av=3.4.0&hour=14&dow=3&tz=60"
        )

    def event(self, key: str, **segmentation: Any) -> dict[str, Any]:
        """An event as both SDKs record it."""
        body: dict[str, Any] = {"key": key, "count": 1, "sum": 0, "dur": 0}
        body |= {"timestamp": next(self.clock), "hour": 14, "dow": 3, "id": uuid.uuid4().hex}
        if segmentation:
            body["segmentation"] = segmentation
        return body

    def add(self, parameters: str) -> str:
        request = self.essentials() + parameters
        self.queue.append(request)
        return request

    def begin_session(self) -> None:
        metrics = {"_os": "iOS" if self.platform == "ios" else "Android", "_app_version": "2.5"}
        self.add(f"&begin_session=1&metrics={self.escape(_compact(metrics))}&location=")

    def heartbeat(self, seconds: int) -> None:
        self.add(f"&session_duration={seconds}")

    def end_session(self, seconds: int) -> None:
        self.add(f"&end_session=1&session_duration={seconds}")

    def events(self, *events: dict[str, Any]) -> None:
        self.add("&events=" + self.escape(_compact(list(events))))

    def user_details(self, details: dict[str, Any]) -> None:
        self.add("&user_details=" + self.escape(_compact(details)))

    def crash(self, report: dict[str, Any]) -> None:
        self.add("&crash=" + self.escape(_compact(report)))

    def change_id_with_merge(self, new_id: str) -> str:
        """iOS `changeDeviceIDWithMerge`, Android `changeDeviceIdWithMerge`: the login. Returns
        the queued request, which a test may queue again as the SDK's retry."""
        old_id, self.device_id = self.device_id, new_id
        return self.add("&old_device_id=" + self.escape(old_id))

    def enrol_in_ab_tests(self, keys: list[str]) -> None:
        """iOS `sendEnrollABRequestForKeys`, Android `enrollToKeys`: queued, for `/o/sdk`."""
        self.add(f"&method=ab&keys={self.escape(_compact(keys))}&new_end_point=/o/sdk")

    def _send(self, request: str, remaining: int) -> SdkAnswer:
        endpoint = "/i"
        if "&new_end_point=" in request:
            request, _, endpoint = request.partition("&new_end_point=")
        data = f"{request}&rr={remaining}"
        if self.platform == "android":
            data += "&checksum256=" + hashlib.sha256(data.encode()).hexdigest()
            if "&crash=" in data or len(data) >= 2048:
                form = {"Content-Type": "application/x-www-form-urlencoded"}
                reply = requests.post(self.url + endpoint, data=data, headers=form, timeout=15)
                return SdkAnswer(reply.status_code, reply.text)
        elif len(data) > 2048:
            reply = requests.post(self.url + endpoint, data=data, timeout=15)
            return SdkAnswer(reply.status_code, reply.text)
        reply = requests.get(f"{self.url}{endpoint}?{data}", timeout=15)
        return SdkAnswer(reply.status_code, reply.text)

    def flush(self) -> list[SdkAnswer]:
        """Sends the queue in order, as the SDK does: stops at the first answer it does not
        accept, which stays queued."""
        answers = []
        while self.queue:
            answer = self._send(self.queue[0], len(self.queue) - 1)
            answers.append(answer)
            if not answer.accepted:
                break
            self.queue.pop(0)
        return answers


def app(edge: Edge, platform: str, device_id: str) -> MobileApp:
    return MobileApp(edge.url, edge.sdk_key, platform, device_id)


async def send(mobile: MobileApp) -> list[SdkAnswer]:
    """Sends the app's queue; the edge runs on this test's loop."""
    answers = await asyncio.to_thread(mobile.flush)
    assert not mobile.queue, answers
    assert all(answer.accepted for answer in answers), answers
    return answers


async def custom_names(edge: Edge, profile_id: str) -> list[str]:
    return sorted(e.custom.name for e in await edge.events(profile_id) if e.HasField("custom"))


async def profile_with(edge: Edge, names: list[str], **lookup: str) -> Any:
    """The profile of `lookup` once its custom events are exactly `names`."""

    async def arrived() -> bool:
        try:
            profile = await edge.profile(**lookup)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return await custom_names(edge, profile.summary.profile_id) == sorted(names)

    await eventually(arrived)
    return await edge.profile(**lookup)


IOS_RANGE_EXCEPTION = {
    "_os": "iOS",
    "_app_version": "2.5",
    "_error": "0   CoreFoundation   0x00000001804f0d88 __exceptionPreprocess + 164\n"
    "1   MyApp            0x0000000102a1b2c4 -[ViewController buy:] + 96",
    "_name": "*** -[__NSArrayM objectAtIndex:]: index 5 beyond bounds [0 .. 2]",
    "_type": "NSRangeException",
    "_nonfatal": True,
    "_custom": {"screen": "cart"},
}

ANDROID_CRASH = {
    "_os": "Android",
    "_app_version": "3.4.0",
    "_error": "java.lang.IllegalStateException: cart is empty\n"
    "\tat com.example.shop.CartActivity.checkout(CartActivity.java:42)",
    "_nonfatal": "true",
    "_logs": "opened cart\n",
}


async def test_an_ios_logout_back_to_the_pre_login_id_starts_a_new_anonymous_profile(
    edge: Edge,
) -> None:
    """iOS's `changeDeviceIDWithoutMerge(nil)` returns to the stored NSUUID: the very ID the
    device had before the login. What follows the logout must not land on the user."""
    anonymous_id = str(uuid.uuid4()).upper()
    user_id = f"user-{uuid.uuid4().hex[:8]}"
    ios = app(edge, "ios", anonymous_id)
    ios.begin_session()
    ios.events(ios.event("Browse"))
    ios.user_details({"email": "ada@example.com"})
    merge = ios.change_id_with_merge(user_id)
    ios.queue.append(merge)  # the login's answer was lost: the SDK sends it again
    ios.begin_session()  # the user's own ID starting a session stays logged in
    ios.events(ios.event("Checkout"))
    ios.end_session(30)
    ios.device_id = anonymous_id  # the logout
    ios.begin_session()
    ios.events(ios.event("After Logout"))
    ios.crash(IOS_RANGE_EXCEPTION)
    ios.end_session(10)
    ios.queue.append(merge)  # a late retry of the login changes nothing either
    await send(ios)

    user = await profile_with(edge, ["browse", "checkout"], custom_id=user_id)
    assert not user.summary.anonymous
    assert user.native_attributes.email == "ada@example.com"
    assert [i.installation_id for i in user.installations] == [user_id]
    assert user.counters.crash_count == 0
    after = await profile_with(edge, ["after_logout"], installation_id=anonymous_id)
    assert after.summary.anonymous
    assert after.summary.profile_id != user.summary.profile_id
    assert not after.native_attributes.email
    assert after.counters.crash_count == 1
    # The logout happened at the session start, not at the login: the login left no empty
    # anonymous profile behind.
    mine = {user.summary.profile_id, after.summary.profile_id}

    async def listed_alone() -> bool:
        listed = await edge.query.ListProfiles(
            query_pb.ListProfilesRequest(page_size=500), metadata=edge.read()
        )
        return {r.profile_id for r in listed.profiles} == mine

    await eventually(listed_alone)


async def test_an_ios_exception_is_stored_by_its_class_with_its_message(edge: Edge) -> None:
    device_id = str(uuid.uuid4()).upper()
    ios = app(edge, "ios", device_id)
    ios.begin_session()
    ios.events(ios.event("Browse"))
    ios.crash(IOS_RANGE_EXCEPTION)
    ios.end_session(10)
    await send(ios)

    stored = await profile_with(edge, ["browse"], installation_id=device_id)
    assert stored.counters.crash_count == 1
    # The exception's class is the crash's name, its message the reason.
    crash = stored.counters.last_crash
    assert (crash.name, crash.reason) == ("NSRangeException", IOS_RANGE_EXCEPTION["_name"])


async def test_a_queued_ab_test_enrolment_does_not_block_the_queue(edge: Edge) -> None:
    for platform in ("ios", "android"):
        device_id = f"ab-{platform}-{uuid.uuid4().hex[:8]}"
        mobile = app(edge, platform, device_id)
        mobile.enrol_in_ab_tests(["button_color"])
        mobile.events(mobile.event("After Enrolment"))

        enrolment, after = await send(mobile)

        assert (enrolment.status, json.loads(enrolment.body)) == (200, {"result": "Success"})
        assert after.accepted
        profile = await profile_with(edge, ["after_enrolment"], installation_id=device_id)
        kinds = {e.WhichOneof("details") for e in await edge.events(profile.summary.profile_id)}
        assert kinds == {"custom"}  # the enrolment stored nothing
    assert await edge.rejected() == []
    # Its key is judged as on /i: a wrong or missing one is refused (Countly's 400).
    for key, status in (("prf_wrong_key", 400), ("", 400)):
        reply = await asyncio.to_thread(
            requests.get,
            f"{edge.url}/o/sdk",
            params={"app_key": key, "device_id": "d", "method": "ab", "keys": '["x"]'},
            timeout=10,
        )
        assert reply.status_code == status, reply.text
        assert reply.json() != {"result": "Success"}


async def test_events_crashes_and_user_details_join_the_devices_open_session(
    edge: Edge,
) -> None:
    device_id = uuid.uuid4().hex[:16]
    android = app(edge, "android", device_id)
    android.begin_session()
    android.events(android.event("A"), android.event("B"))
    android.heartbeat(60)
    android.events(android.event("C"))
    android.user_details({"custom": {"plan": "pro"}})
    android.crash(ANDROID_CRASH)
    android.end_session(10)
    # After the end no session is open: the event is stored without one, not refused.
    android.events(android.event("After End"))
    await send(android)

    profile = await profile_with(edge, ["a", "after_end", "b", "c"], installation_id=device_id)
    (session,) = await edge.sessions(profile.summary.profile_id)
    events = await edge.events(profile.summary.profile_id)
    by_session = {(e.WhichOneof("details"), e.custom.name): e.session_id for e in events}
    for joined in (("custom", "a"), ("custom", "b"), ("custom", "c"), ("crash", "")):
        assert by_session[joined] == session.session_id, joined
    assert by_session[("attribute_change", "")] == session.session_id
    assert by_session[("custom", "after_end")] == ""
    # start, heartbeat, end, three events, the user detail and the crash
    assert session.event_count == 8
    crash = profile.counters.last_crash
    assert (crash.name, crash.reason, crash.fatal) == (
        "java.lang.IllegalStateException",
        "cart is empty",
        False,
    )
