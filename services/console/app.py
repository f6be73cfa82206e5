"""Builds the console's ASGI app and runs it: `profiles serve console`.

One Starlette app: the routing table below, and one middleware that every request passes
(a cap on request bodies, security headers, request metrics by route template, never by URL: a
query string may hold an email being searched for).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jinja2
import structlog
import uvicorn
import uvloop
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.console import pages, present
from services.console.backend import DEFAULT_CALL_TIMEOUT_SECONDS, Backend
from services.console.errors import BodyTooLarge
from services.console.live import MAX_WATCHES, LiveHub
from services.console.sessions import SessionStore
from shared.logging import configure_logging
from shared.metrics import start_metrics_server
from shared.settings import Settings

log = structlog.get_logger(__name__)
HERE = Path(__file__).parent

REQUESTS = Counter(
    "profiles_console_requests_total",
    "Console HTTP requests, by route and status",
    ["route", "status"],
)
REQUEST_SECONDS = Histogram(
    "profiles_console_request_seconds",
    "Console time to the response's first byte, by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LIVE_WATCHES = Gauge("profiles_console_live_watches", "Upstream WatchProfile streams open")

# No inline script or style anywhere: everything the page runs or styles comes from /static.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]

# The most a request body may hold: the console's forms. Sign-in, sign-out and erasure forms
# are a few hundred bytes; the sign-in and sign-out forms are read before any session is
# checked, so this is all a stranger can make the console read (not a 300 MB upload).
MAX_FORM_BYTES = 64 * 1024
# The segment and funnel forms (read only once a signed-in admin posts them): the contract's
# largest definition, 31 conditions each an IN list of 64 values of 300 characters, is about
# 600,000 characters: 0.6 MB as ASCII, 7.2 MB with every character a 4-byte UTF-8 one (12
# bytes percent-encoded).
MAX_DEFINITION_FORM_BYTES = 8 * 1024 * 1024
DEFINITION_FORMS = ("/segments/new", "/funnels/new")
# The same forms editing a definition: /segments/<id>/edit, /funnels/<id>/edit.
DEFINITION_EDIT_FORM = re.compile(r"/(segments|funnels)/[^/]+/edit")


def body_limit(path: str) -> int:
    """The most bytes a request body to `path` may hold."""
    if path in DEFINITION_FORMS or DEFINITION_EDIT_FORM.fullmatch(path):
        return MAX_DEFINITION_FORM_BYTES
    return MAX_FORM_BYTES


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses such a request before it gets here
    return None


class Guard:
    """A cap on request bodies, security headers, no caching of pages, request metrics and one
    log line per request."""

    def __init__(self, app: Starlette, hub: LiveHub) -> None:
        self._app = app
        self.hub = hub  # public: tests and the benchmark read how many watches are open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        limit = body_limit(scope["path"])
        received = 0

        async def counted() -> Message:
            # A chunked body says no length up front: the bytes are counted as they arrive,
            # and the handler reading the form gets BodyTooLarge (the console's 413 page)
            # once they pass the limit, before the rest is read.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers += SECURITY_HEADERS
                if not scope["path"].startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
                route = _route_name(scope)
                REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)
                REQUESTS.labels(route, str(status)).inc()
                LIVE_WATCHES.set(self.hub.watch_count)
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            # Refused before a byte of the body is read, whatever the route would do with it.
            request = Request({**scope, "app": self._app}, receive)
            response = await pages.body_too_large(request, BodyTooLarge(limit))
            await response(scope, receive, send_with_headers)
            return
        await self._app(scope, counted, send_with_headers)


def _route_name(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "other"


def templates() -> Jinja2Templates:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value from events and attributes is text, never markup
        auto_reload=False,  # templates ship with the code: no stat() per page
        undefined=jinja2.StrictUndefined,
    )
    for name in (
        "when",
        "ago",
        "span",
        "platform",
        "smart_segment",
        "smart_flag",
        "percent",
        "attribute_value",
        "attribute_type",
        "event_title",
        "event_details",
        "event_origin",
        "stack_trace",
        "installation_last_seen",
        "identity_change",
        "funnel_step_status",
        "filter_words",
        "funnel_step_words",
        "iso",
        "gauge_arc",
        "breakdown_value",
        "count_of",
        "problem_text",
        "shorten",
        "isolated",
    ):
        environment.filters[name] = getattr(present, name)
    environment.globals["display_name"] = present.display_name
    environment.globals["hbars"] = present.hbars
    environment.globals["percent_of"] = present.percent_of
    environment.globals["users_url"] = present.users_url
    environment.globals["CSV_ROW_CAP"] = pages.CSV_ROW_CAP
    environment.globals["language_code"] = present.language_code
    environment.globals["country_code"] = present.country_code
    environment.globals["REACH_BY_CHANNEL"] = present.REACH_BY_CHANNEL
    environment.globals["TIMELINE_KINDS"] = present.TIMELINE_KINDS
    environment.globals["TOKEN_MEANING"] = present.TOKEN_MEANING
    environment.globals["SMART_SEGMENTS"] = present.SMART_SEGMENTS
    environment.globals["PLATFORM_NAMES"] = present.PLATFORM_NAMES
    environment.globals["SMART_FLAGS"] = present.SMART_FLAGS
    environment.globals["REJECTION_REASONS"] = present.REJECTION_REASONS
    environment.globals["CHANNELS"] = present.CHANNELS
    environment.globals["KINDS"] = present.KINDS
    return Jinja2Templates(env=environment)


ROUTES = [
    Route("/", pages.home),
    Route("/healthz", pages.healthz),
    Route("/signin", pages.signin_form, methods=["GET"]),
    Route("/signin", pages.signin, methods=["POST"]),
    Route("/signout", pages.signout, methods=["POST"]),
    Route("/overview", pages.overview_page),
    Route("/overview/fragment", pages.overview_fragment),
    Route("/users", pages.users_page),
    Route("/users.csv", pages.users_csv),
    Route("/search", pages.search),
    Route("/profiles/{profile_id}", pages.profile_page),
    Route("/profiles/{profile_id}/export", pages.profile_export),
    Route("/profiles/{profile_id}/delete", pages.profile_erase_form, methods=["GET"]),
    Route("/profiles/{profile_id}/delete", pages.profile_erase, methods=["POST"]),
    Route("/profiles/{profile_id}/merge", pages.profile_merge_form, methods=["GET"]),
    Route("/profiles/{profile_id}/merge", pages.profile_merge, methods=["POST"]),
    Route("/live/profiles/{profile_id}", pages.profile_live),
    Route("/segments", pages.segments_page),
    Route("/segments/new", pages.segment_new_form, methods=["GET"]),
    Route("/segments/new", pages.segment_create, methods=["POST"]),
    Route("/segments/{ident}/edit", pages.segment_edit, methods=["GET", "POST"]),
    Route("/segments/{ident}/delete", pages.segment_delete, methods=["GET", "POST"]),
    Route("/funnels/new", pages.funnel_new_form, methods=["GET"]),
    Route("/funnels/new", pages.funnel_create, methods=["POST"]),
    Route("/funnels/{ident}/edit", pages.funnel_edit, methods=["GET", "POST"]),
    Route("/funnels/{ident}/profiles", pages.funnel_profiles_page),
    Route("/funnels/{ident}/profiles.csv", pages.funnel_profiles_csv),
    Route("/funnels/{ident}/delete", pages.funnel_delete, methods=["GET", "POST"]),
    Route("/live/segments", pages.segments_live),
    Route("/rejected", pages.rejected_page),
    Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
]


def build_app(
    settings: Settings,
    *,
    call_timeout: float = DEFAULT_CALL_TIMEOUT_SECONDS,
    max_watches: int = MAX_WATCHES,
    live_checks: pages.LiveChecks | None = None,
) -> Guard:
    """The console's ASGI app; Redis and the gRPC channels open and close with its lifespan.
    `live_checks`: how often live feeds check their session and key (pages' constants unless
    set)."""
    backend = Backend(settings.addresses, call_timeout)
    hub = LiveHub(backend, max_watches)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = Redis.from_url(settings.redis_url)
        app.state.redis = redis
        app.state.console = pages.Console(
            backend,
            SessionStore(redis, settings.redis_prefix),
            hub,
            templates(),
            secure_cookies=settings.console_secure_cookies,
            live_checks=live_checks,
        )
        try:
            yield
        finally:
            await backend.close()
            await redis.aclose()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={
            404: pages.no_such_page,
            BodyTooLarge: pages.body_too_large,
            RedisConnectionError: pages.session_store_down,
            RedisTimeoutError: pages.session_store_down,
        },
    )
    return Guard(app, hub)


def server_config(settings: Settings, app: ASGIApp) -> uvicorn.Config:
    """How `profiles serve console` serves `app`."""
    return uvicorn.Config(
        app,
        host=settings.bind_address,
        port=settings.console_port,
        loop="uvloop",
        http="httptools",
        access_log=False,  # the query string may hold an email: Guard logs routes instead
        log_level="warning",
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        lifespan="on",
        # Whose X-Forwarded-Proto and X-Forwarded-For are believed: a TLS proxy's, which makes
        # the console see https (and set its cookies Secure). Not uvicorn's own default, which
        # reads FORWARDED_ALLOW_IPS from the environment: one setting, in the settings table.
        proxy_headers=True,
        forwarded_allow_ips=settings.console_forwarded_allow_ips,
    )


def run_console(settings: Settings) -> None:
    """Runs the console until SIGTERM/SIGINT (what `profiles serve console` does)."""
    configure_logging(settings.log_level, service="console")
    start_metrics_server(settings.console_metrics_port, settings.bind_address)
    server = uvicorn.Server(server_config(settings, build_app(settings)))
    log.info("console_starting", port=settings.console_port)
    # uvloop.run, not asyncio.run: Server.serve does not apply Config.loop (only Server.run
    # does), and a profile under load showed the default loop's Python code (selectors,
    # callbacks) in a fair share of every page's CPU.
    uvloop.run(server.serve())


__all__ = ["build_app", "run_console", "server_config"]
