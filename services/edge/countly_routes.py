"""Countly's write API on the edge: `/i` and `/i/bulk`, GET and POST, parameters in the query
string, a form (urlencoded or multipart, as the Node.js SDK's picture upload sends) or a JSON
object. The handler reads and merges them, the translator (dialects/countly.py) does the rest;
answers are Countly's: 200 {"result": "Success"} once ingest has the data, 400 {"result": ...}
for a request that can never succeed (an unknown app key: "App does not exist"), 503 with
Retry-After when the suite cannot take it (every Countly SDK keeps the request and retries)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.edge import json_text
from services.edge.dialects import countly
from services.edge.handlers import (
    FORBIDDEN_MESSAGE,
    UNREADABLE,
    Answer,
    Gateway,
    Translate,
    read_refusal,
)
from services.edge.steps import RequestInvalid, Translation

# Countly's server limits a request to 1 MB by default; so does the edge.
MAX_REQUEST_BYTES = 1024 * 1024
# Countly requests hold a dozen parameters; far more is a hostile query string.
MAX_PARAMETERS = 200

COUNTLY = Answer(
    ok=(200, {"result": "Success"}),
    invalid=lambda message: (400, {"result": message}),
    unauthenticated=(400, {"result": "App does not exist"}),
    forbidden=(403, {"result": FORBIDDEN_MESSAGE}),
    # Countly's SDKs read `result` from every answer; they retry any status but 200.
    rate_limited=(429, {"result": "Too many requests"}),
    unavailable=(503, {"result": "Try again later"}),
)


def _pairs(text: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(
            text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_PARAMETERS
        )
    except ValueError as exc:
        raise RequestInvalid("Too many parameters") from exc


# What a multipart body may hold. python-multipart reads the body in one pass, each byte looked
# at a bounded number of times, so the work is linear in the body (at most MAX_REQUEST_BYTES);
# these limits refuse, early, the shapes no Countly SDK sends:
# - MAX_PARTS, parts of any kind, named or not: countly-sdk-ios sends its dozen parameters as
#   parts beside the picture, countly-sdk-android the picture alone (its parameters in the
#   URL); MAX_PARAMETERS named fields plus a few files is more than any SDK sends, and a body of
#   thousands of empty parts is refused before they are all read.
# - MAX_PART_HEADER_BYTES, one header line of a part (name, colon and value): an SDK's longest
#   is its Content-Disposition, a field name and a file name (~100 bytes); 4 KB leaves room for
#   a long file name and refuses a header of thousands of parameters.
# - MAX_PART_HEADERS, header lines of a part: the SDKs send at most three (Content-Disposition,
#   Content-Type, Content-Transfer-Encoding).
MAX_PARTS = MAX_PARAMETERS + 8
MAX_PART_HEADER_BYTES = 4096
MAX_PART_HEADERS = 8
UNREADABLE_MULTIPART = "The multipart body is unreadable"


def _multipart(data: bytes, content_type: str) -> dict[str, Any]:
    """The text fields of a multipart form, by name, utf-8 (a bad byte replaced); file parts
    (a `filename`, the SDK's picture) and parts without a name are left out: the contract takes
    a picture's URL, not its bytes. A part is bytes whatever its Content-Type: a multipart/mixed
    inside a form's part is not parsed (RFC 7578 has none), its bytes are the value of the
    part's name, if it has one; nor is a Content-Transfer-Encoding applied (RFC 7578 deprecates
    it; the SDKs send `binary` only). A body that is not a whole form (no boundary, text before
    the first one, no closing one) or is over the limits above is unreadable."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise RequestInvalid(UNREADABLE_MULTIPART)
    fields: dict[str, Any] = {}
    parts = 0
    name: list[bytes] = []  # of the part's current header line
    text: list[bytes] = []  # its value
    disposition = b""
    value: list[bytes] = []  # the part's bytes
    ended = False

    def part_begin() -> None:
        nonlocal parts, disposition
        parts += 1
        if parts > MAX_PARTS:
            raise RequestInvalid(UNREADABLE_MULTIPART)
        disposition = b""
        value.clear()

    def header_begin() -> None:
        name.clear()
        text.clear()

    def header_end() -> None:
        nonlocal disposition
        if b"".join(name).lower() == b"content-disposition":
            disposition = b"".join(text)

    def part_end() -> None:
        _, params = parse_options_header(disposition)
        field = params.get(b"name", b"").decode("utf-8", "replace")
        if not field or b"filename" in params:
            return
        if len(fields) >= MAX_PARAMETERS:
            raise RequestInvalid("Too many parameters")
        fields[field] = b"".join(value).decode("utf-8", "replace")

    def end() -> None:
        nonlocal ended
        ended = True

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": part_begin,
                "on_header_begin": header_begin,
                "on_header_field": lambda chunk, start, stop: name.append(chunk[start:stop]),
                "on_header_value": lambda chunk, start, stop: text.append(chunk[start:stop]),
                "on_header_end": header_end,
                "on_part_data": lambda chunk, start, stop: value.append(chunk[start:stop]),
                "on_part_end": part_end,
                "on_end": end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )
        parser.write(data)
    except FormParserError as exc:
        raise RequestInvalid(UNREADABLE_MULTIPART) from exc
    if not ended:
        raise RequestInvalid(UNREADABLE_MULTIPART)
    return fields


def parameters(query: str, body: bytes, content_type: str) -> dict[str, Any]:
    """The request's parameters: the query string's, then the body's (a body parameter wins,
    as in Countly's server). A JSON body is an object whose values may be objects already."""
    params: dict[str, Any] = dict(_pairs(query))
    if not body.strip():
        return params
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json" or (not kind and body.lstrip().startswith(b"{")):
        parsed = json_text.loads(body)
        if not isinstance(parsed, dict):
            raise RequestInvalid("The body is not a JSON object")
        if len(parsed) > MAX_PARAMETERS:
            raise RequestInvalid("Too many parameters")
        params.update(parsed)
    elif kind == "multipart/form-data":
        params.update(_multipart(body, content_type))
    elif kind in ("application/x-www-form-urlencoded", "text/plain", ""):
        params.update(_pairs(body.decode()))
    else:
        raise RequestInvalid(f"Unsupported content type {kind[:40]!r}")
    return params


async def read_parameters(gateway: Gateway, request: Request) -> dict[str, Any]:
    """The parameters of a request to `/i`, `/i/bulk` or `/o/sdk`, read alike: a POST's body
    within MAX_REQUEST_BYTES, decoded by its Content-Encoding (Gateway.body), then `parameters`.
    Raises what Gateway.run refuses as unreadable (handlers.UNREADABLE)."""
    body = b""
    if request.method == "POST":
        body = await gateway.body(request, MAX_REQUEST_BYTES)
    return parameters(request.url.query, body, request.headers.get("content-type", ""))


def countly_handler(gateway: Gateway, bulk: bool) -> Callable[[Request], Any]:
    """The handler of `/i` (`bulk` False) or `/i/bulk`."""

    async def handle(request: Request) -> Response:
        async def read() -> tuple[str, Translate]:
            params = await read_parameters(gateway, request)
            key = countly.request_app_key(params)
            # What the translator refuses as a whole is refused before anything is sent.
            if bulk:
                countly.check_bulk(params)
            else:
                countly.check_request(params)

            def translate(now: datetime, ip: str) -> Translation:
                run = countly.translate_bulk if bulk else countly.translate
                return run(params, receive_time=now, client_ip=ip)

            return key, translate

        return await gateway.run(request, countly.DIALECT, COUNTLY, read)

    return handle


# `/o/sdk` methods the mobile SDKs put in their request queue rather than fetch directly: the
# A/B test enrolment of countly-sdk-ios (`sendEnrollABRequestForKeys`) and countly-sdk-android
# (`enrollToKeys`), sent as `method=ab&keys=[...]`. A queued request not answered 2xx with a
# JSON `result` is resent forever and holds back everything queued after it, so these are
# answered as Countly's server answers them; the suite has no A/B tests, so nothing is stored.
# (`ab_opt_out` is queued too, but to `/i`, which answers it.)
QUEUED_SDK_METHODS = frozenset({"ab"})

# `/o/sdk` read methods the SDKs fetch directly, answered as Countly's server answers an app
# that has none of what they ask for (the suite keeps no remote config, A/B experiments or
# feedback widgets), once the app key is judged good. A refusal would cost the SDK's callback an
# error (countly-sdk-nodejs: `err` set) and the page a console error on every load
# (countly-sdk-web fetches its remote config at init when `remote_config` is set):
# - `fetch_remote_config` (countly-sdk-nodejs, countly-sdk-web's default, the older mobile SDKs)
#   and `rc` (countly-sdk-web's explicit RC API, the 23.x+ mobile SDKs): the remote config, an
#   object of key -> value; `{}` is none, which the SDKs store as their (empty) config;
# - `ab_fetch_variants` (mobile SDKs): an object of key -> variants; `{}` is none;
# - `ab_fetch_experiments` (mobile SDKs): a list of experiments; `[]` is none;
# - `feedback` (countly-sdk-web `get_available_feedback_widgets`, mobile SDKs): the widgets in
#   `result`, which the SDKs read (`response.result || []`; a request without a truthy
#   `result` is a failure to countly-sdk-web's check); `{"result": []}` is none.
# Other methods (`ab_enroll_variant`, `queue`, anything unknown) are refused 400.
EMPTY_SDK_READS: dict[str, Any] = {
    "fetch_remote_config": {},
    "rc": {},
    "ab_fetch_variants": {},
    "ab_fetch_experiments": [],
    "feedback": {"result": []},
}

NO_SUCH_METHOD = "This server offers no such SDK method"


def sdk_read_answer(method: str) -> tuple[int, Any]:
    """The status and JSON body `/o/sdk` answers for `method`, once its key is judged good for
    a queued method (QUEUED_SDK_METHODS) or a read of nothing (EMPTY_SDK_READS)."""
    if method == "sc":
        return 200, {}
    if method in QUEUED_SDK_METHODS:
        return COUNTLY.ok
    if method in EMPTY_SDK_READS:
        return 200, EMPTY_SDK_READS[method]
    return 400, {"result": NO_SUCH_METHOD}


def countly_sdk_read(gateway: Gateway) -> Callable[[Request], Any]:
    """`/o/sdk`, Countly's read API for SDKs. countly-sdk-web asks it for its server config
    (`method=sc`) on every page load: the answer is what Countly's server gives an app with no
    SDK behaviour settings, an empty object, which leaves the SDK's own settings as they are
    (a 404 would be a console error on every page). Methods the mobile SDKs queue
    (QUEUED_SDK_METHODS) are answered as `/i` answers a request with nothing to store: 200
    {"result": "Success"}; remote config, A/B variants and feedback widgets (EMPTY_SDK_READS)
    as an app with none; both once the app key is judged good (refused as on `/i` otherwise).
    Other methods are not offered: 400 {"result": ...}, Countly's shape of a refusal. Its
    parameters are read as `/i` reads them (read_parameters), and an unreadable request
    refused as `/i` refuses it."""

    async def handle(request: Request) -> Response:
        try:
            params = await read_parameters(gateway, request)
        except UNREADABLE as exc:
            outcome, status, body = read_refusal(countly.DIALECT, COUNTLY, exc)
            return gateway.refuse(request, countly.DIALECT, outcome, status, body)
        # A JSON body's `method` may be any value: only text names a method.
        method = params.get("method")
        method = method if isinstance(method, str) else ""
        status, answer = sdk_read_answer(method)
        if method not in QUEUED_SDK_METHODS and method not in EMPTY_SDK_READS:
            return JSONResponse(answer, status)

        async def read() -> tuple[str, Translate]:
            return countly.request_app_key(params), lambda now, ip: Translation()

        # The key is judged as on `/i` (an unknown one: 400 "App does not exist"); nothing is
        # stored, and a good key gets the method's answer.
        return await gateway.run(
            request, countly.DIALECT, replace(COUNTLY, ok=(status, answer)), read
        )

    return handle


def countly_routes(gateway: Gateway) -> list[Route]:
    """`/i` and `/i/bulk`; no state between requests (ingest keeps the sessions); `/o/sdk`, the
    SDKs' reads."""
    methods = ["GET", "POST"]
    return [
        Route("/i", countly_handler(gateway, bulk=False), methods=methods),
        Route("/i/bulk", countly_handler(gateway, bulk=True), methods=methods),
        Route("/o/sdk", countly_sdk_read(gateway), methods=methods),
    ]


__all__ = ["COUNTLY", "countly_routes", "parameters"]
