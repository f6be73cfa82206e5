"""Countly's `/i` with hostile multipart bodies, found by a hostile-input audit: a form nesting
multipart/mixed parts 1,200 deep answered 500 (the email package's parser recursed too deep),
and a sub-1 MB header of 200,000 parameters held the edge's event loop for a minute (its header
parsing is superlinear). The forms the Countly SDKs send (countly-sdk-ios: the picture and
each parameter as a part; countly-sdk-android: the picture alone) read as before. Pure
`parameters` first, then over HTTP against the edge."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import pytest
import requests

from services.edge.countly_routes import MAX_PARAMETERS, parameters
from services.edge.steps import RequestInvalid
from tests.conftest import eventually
from tests.edge.conftest import Edge

UNREADABLE = {"result": "The multipart body is unreadable"}


def form(boundary: str, *parts: bytes) -> bytes:
    """A multipart body of `parts` (each its headers, a blank line and its bytes)."""
    mark = f"--{boundary}".encode()
    return b"".join(mark + b"\r\n" + part + b"\r\n" for part in parts) + mark + b"--\r\n"


def field(name: str, value: bytes, extra: bytes = b"") -> bytes:
    return f'Content-Disposition: form-data; name="{name}"'.encode() + extra + b"\r\n\r\n" + value


def nested(depth: int) -> bytes:
    """The audit's body: each part a multipart/mixed whose only part opens the next level."""
    return b"".join(
        f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n".encode()
        for i in range(depth)
    )


def many_parameters(count: int) -> bytes:
    """The audit's body: a Content-Disposition of `count` parameters before the field's name."""
    disposition = b"Content-Disposition: form-data" + b";a=b" * count + b'; name="device_id"'
    return b"--x\r\n" + disposition + b"\r\n\r\nv\r\n--x--\r\n"


def unnamed_parts(size: int) -> bytes:
    part = b"--x\r\nContent-Type: text/plain\r\n\r\n\r\n"
    return part * (size // len(part)) + b"--x--\r\n"


def multipart(boundary: str) -> str:
    return f"multipart/form-data; boundary={boundary}"


def calls(run: Callable[[], Any]) -> int:
    """The number of Python and C function calls `run` makes: a measure of its work that does
    not depend on the machine's speed."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        run()
    except RequestInvalid:
        pass
    finally:
        sys.setprofile(None)
    return count


def test_the_forms_of_the_sdks_and_of_a_browser_read_as_before() -> None:
    ios = form(
        "0cae04a8b698d63ff6ea55d168993f21",
        b'Content-Disposition: form-data; name="pictureFile"; filename="me.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--0cae\r\n",
        field("app_key", b"k", extra=b";"),
        field("device_id", b"d", extra=b";"),
        field("user_details", '{"name": "Zoë"}'.encode(), extra=b";"),
    )
    android = form(
        "18f3a",
        b'Content-Disposition: form-data; name="binaryFile"; filename="p.jpg"\r\n'
        b"Content-Type: image/jpeg\r\nContent-Transfer-Encoding: binary\r\n\r\n\xff\xd8\xff",
    )
    browser = form(
        "----WebKitFormBoundaryx",
        field("events", b'[{"key": "Tap"}]'),
        b"Content-Type: text/plain; charset=utf-8\r\n" + field("comment", b"line 1\r\nline 2\r\n"),
        field("bad", b"\xff ok"),
        b"content-disposition: form-data; name=lower\r\n\r\n",
        b"Content-Type: text/plain\r\n\r\nno name",
    )

    assert parameters("", ios, multipart("0cae04a8b698d63ff6ea55d168993f21")) == {
        "app_key": "k",
        "device_id": "d",
        "user_details": '{"name": "Zoë"}',
    }
    assert parameters("app_key=k&device_id=d", android, multipart("18f3a")) == {
        "app_key": "k",
        "device_id": "d",
    }
    assert parameters("", browser, 'multipart/form-data; boundary="----WebKitFormBoundaryx"') == {
        "events": '[{"key": "Tap"}]',
        "comment": "line 1\r\nline 2\r\n",
        "bad": "\ufffd ok",
        "lower": "",
    }


def test_a_multipart_mixed_inside_a_field_is_its_value_and_unnamed_it_is_skipped() -> None:
    inner = b"--y\r\n" + field("inner", b"z") + b"\r\n--y--"
    mixed = b"Content-Type: multipart/mixed; boundary=y\r\n"
    named = b'Content-Disposition: form-data; name="outer"\r\n' + mixed + b"\r\n" + inner
    body = form("x", named, mixed + b"\r\n" + inner, field("device_id", b"d"))

    assert parameters("", body, multipart("x")) == {"outer": inner.decode(), "device_id": "d"}


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (nested(1200), multipart("b0")),
        (many_parameters(200_000), multipart("x")),
        (many_parameters(2_000), multipart("x")),
        (unnamed_parts(1_000_000), multipart("x")),
        (b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n", multipart("x")),
        (form("x", field("a", b"v")), "multipart/form-data"),
    ],
    ids=["nested", "200k-params", "2k-params", "unnamed-parts", "no-closing", "no-boundary"],
)
def test_a_hostile_or_broken_form_is_unreadable(body: bytes, content_type: str) -> None:
    with pytest.raises(RequestInvalid) as refused:
        parameters("app_key=k&device_id=d", body, content_type)

    assert refused.value.message == UNREADABLE["result"]


def test_more_named_fields_than_parameters_are_too_many() -> None:
    body = form("x", *(field(f"p{i}", b"1") for i in range(MAX_PARAMETERS + 1)))

    with pytest.raises(RequestInvalid, match="Too many parameters"):
        parameters("", body, multipart("x"))


def test_the_work_on_a_hostile_header_does_not_grow_with_it() -> None:
    # Counted in calls, not seconds: four times the parameters, the same work (the header is
    # refused at its size limit, in one pass); the email package's work grew with them.
    small = calls(lambda: parameters("", many_parameters(2_000), multipart("x")))
    large = calls(lambda: parameters("", many_parameters(8_000), multipart("x")))

    assert large == small


async def post(url: str, body: bytes, content_type: str) -> requests.Response:
    return await asyncio.to_thread(
        requests.post, url, data=body, headers={"Content-Type": content_type}, timeout=120
    )


async def test_the_nested_form_is_refused_in_countlys_words_and_the_edge_serves_on(
    edge: Edge,
) -> None:
    refused = await post(f"{edge.url}/i", nested(1200), multipart("b0"))
    assert (refused.status_code, refused.json()) == (400, UNREADABLE)

    # Then countly-sdk-ios's picture upload: the picture and each parameter a part.
    body = form(
        "0cae04a8b698d63ff6ea55d168993f21",
        b'Content-Disposition: form-data; name="pictureFile"; filename="me.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG",
        field("app_key", edge.sdk_key.encode(), extra=b";"),
        field("device_id", b"cly-multipart-1", extra=b";"),
        field("events", b'[{"key": "Picture Set", "count": 1}]', extra=b";"),
    )
    answered = await post(f"{edge.url}/i", body, multipart("0cae04a8b698d63ff6ea55d168993f21"))
    assert (answered.status_code, answered.json()) == (200, {"result": "Success"})

    async def stored() -> bool:
        try:
            profile = await edge.profile(installation_id="cly-multipart-1")
        except Exception:  # not stored yet: NOT_FOUND
            return False
        events = await edge.events(profile.summary.profile_id)
        return [e.custom.name for e in events if e.HasField("custom")] == ["picture_set"]

    await eventually(stored)


async def test_a_form_costly_to_the_email_package_is_refused(edge: Edge) -> None:
    # With a good key and device in the query string, only the body can be refused.
    url = f"{edge.url}/i?app_key={edge.sdk_key}&device_id=cly-multipart-2"
    for body in (many_parameters(200_000), unnamed_parts(1_000_000)):
        refused = await post(url, body, multipart("x"))
        assert (refused.status_code, refused.json()) == (400, UNREADABLE)
