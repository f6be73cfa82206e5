"""The edge's ASGI app and process: Starlette routes on uvicorn (uvloop, httptools, HTTP/1.1
keep-alive), a client of ingest and identity only. `profiles serve edge` runs `serve`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from services.edge.backend import Backend
from services.edge.countly_routes import countly_routes
from services.edge.dialects import posthog, segment
from services.edge.handlers import (
    Gateway,
    posthog_handler,
    posthog_push_handler,
    segment_handler,
)
from services.edge.limits import RateLimiter
from shared.logging import configure_logging
from shared.metrics import start_metrics_server
from shared.settings import Settings

log = structlog.get_logger("edge")

SEGMENT_TYPES = ("track", "identify", "alias", "page", "screen", "group")
POSTHOG_PATHS = ("/batch/", "/capture/", "/e/", "/i/v0/e/")


def routes(gateway: Gateway, posthog_asset_url: str) -> list[Route]:
    """Every route of the edge, in one place."""

    async def healthz(request: Request) -> Response:
        ready = await gateway.backend.ready()
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    async def segment_settings(request: Request) -> Response:
        # The key is not checked here: the settings hold nothing secret, and the events sent
        # with it are (401 for an unknown key).
        key = request.path_params["write_key"][:200]
        api_host = f"{request.url.netloc}/v1"
        return JSONResponse(segment.browser_settings(key, api_host, request.url.scheme))

    # posthog-js asks these on every page load; 404s would fill the site's console with errors.
    async def posthog_config(request: Request) -> Response:
        return JSONResponse(posthog.remote_config(request.path_params["token"][:200]))

    async def posthog_config_script(request: Request) -> Response:
        script = posthog.remote_config_script(request.path_params["token"][:200])
        return Response(script, media_type="text/javascript")

    async def posthog_flags(request: Request) -> Response:
        return JSONResponse(posthog.NO_FLAGS)

    # posthog-js's snippet and its lazily loaded extensions (surveys.js, recorder.js...) load
    # from `{api_host}/static/`: sent on to PostHog's asset host, as its reverse-proxy guides
    # do, or to the operator's own (PROFILES_EDGE_POSTHOG_ASSET_URL).
    async def posthog_static(request: Request) -> Response:
        location = posthog.asset_location(
            posthog_asset_url, request.path_params["path"], request.url.query
        )
        return RedirectResponse(location, status_code=302)

    table = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/array/{token}/config", posthog_config, methods=["GET"]),
        Route("/array/{token}/config.js", posthog_config_script, methods=["GET"]),
        Route("/static/{path:path}", posthog_static, methods=["GET"]),
        *(
            Route(path, posthog_flags, methods=["GET", "POST"])
            for path in ("/flags/", "/flags", "/decide/", "/decide")
        ),
        Route("/v1/projects/{write_key}/settings", segment_settings, methods=["GET"]),
        Route("/v1/batch", segment_handler(gateway, ""), methods=["POST"]),
        Route("/v1/b", segment_handler(gateway, ""), methods=["POST"]),
        *(
            Route(f"/v1/{kind}", segment_handler(gateway, kind), methods=["POST"])
            for kind in SEGMENT_TYPES
        ),
        # analytics.js (analytics-next) posts to the first letter of the type: /v1/t, /v1/p...
        *(
            Route(f"/v1/{kind[0]}", segment_handler(gateway, kind), methods=["POST"])
            for kind in SEGMENT_TYPES
        ),
    ]
    table.extend(countly_routes(gateway))
    for path in POSTHOG_PATHS:
        handler = posthog_handler(gateway)
        table.append(Route(path, handler, methods=["POST"]))
        table.append(Route(path.rstrip("/"), handler, methods=["POST"]))
    push = posthog_push_handler(gateway)
    for path in ("/api/push_subscriptions/", "/api/push_subscriptions"):
        table.append(Route(path, push, methods=["POST", "DELETE"]))
    return table


def create_app(settings: Settings) -> Starlette:
    """The app, with its backend channels opened at start-up and closed at shutdown."""
    backend = Backend(settings.addresses["ingest"], settings.addresses["identity"])
    gateway = Gateway(backend, RateLimiter(settings.edge_rate_limit, settings.edge_rate_burst))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.close()

    # Browser SDKs call from any site with a public key: every origin is allowed, with the
    # headers they send (Content-Type, Content-Encoding, Authorization), and preflights are
    # cached for a day.
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=["*"],
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            max_age=86400,
        )
    ]
    table = routes(gateway, settings.edge_posthog_asset_url)
    return Starlette(routes=table, middleware=middleware, lifespan=lifespan)


def server(settings: Settings, port: int | None = None) -> uvicorn.Server:
    """A uvicorn server for the app; no access log (it would print query strings, which may
    hold keys): refusals are logged by the handlers, everything else is in the metrics."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.bind_address,
        port=settings.edge_port if port is None else port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=75,
        # On SIGTERM: stop accepting, let in-flight requests finish (each ends with ingest's
        # answer, so nothing acknowledged is lost), within the suite's grace period.
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        server_header=False,
    )
    return uvicorn.Server(config)


async def serve(settings: Settings) -> None:
    """Runs the edge until SIGTERM or SIGINT."""
    configure_logging(settings.log_level, service="edge")
    start_metrics_server(settings.edge_metrics_port, settings.bind_address)
    running = server(settings)
    log.info("service_started", service="edge", port=settings.edge_port)
    await running.serve()


def run(settings: Settings) -> None:
    """`profiles serve edge`: uvicorn installs its own SIGTERM/SIGINT handlers."""
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(settings))
