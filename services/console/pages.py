"""The console's request handlers: parse the query string, call the contract, render a template.

Every page is a URL with its filters and sort in the query string (shareable deep links). A
handler that needs a signed-in person is wrapped by `signed_in`, which also turns the console's
errors into pages: a refused key signs out, a down service names itself, a slow one says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Container,
    Coroutine,
    Iterable,
    Mapping,
)
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlencode

import structlog
from redis.exceptions import RedisError
from starlette.datastructures import FormData, QueryParams
from starlette.requests import Request
from starlette.responses import (
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Match, Route

from profiles.common.v1 import types_pb2
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.query.v1 import profile_pb2 as profile_pb
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import timeline_pb2 as timeline_pb
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from services.console import definitions, present
from services.console.backend import DEFINITION_WRITE_TIMEOUT_SECONDS, Backend
from services.console.errors import (
    BadInput,
    BodyTooLarge,
    Forbidden,
    NotFound,
    ServiceDown,
    SignedOut,
)
from services.console.live import Ended, LiveHub
from services.console.sessions import (
    COOKIE,
    EXPIRED,
    KEY_REFUSED,
    SIGNED_IN_AGAIN,
    SIGNED_OUT,
    SIGNIN_CSRF_COOKIE,
    ConsoleSession,
    SessionStore,
    new_token,
    tokens_match,
)
from shared.convert import set_timestamp

log = structlog.get_logger(__name__)

T = TypeVar("T")
Handler = Callable[[Request, ConsoleSession], Awaitable[Response]]

SORTS = {"last_seen": 1, "sessions": 2, "time_spent": 3, "name": 4}
TABS = {
    "all": query_pb.PROFILE_IDENTITY_FILTER_UNSPECIFIED,
    "identified": query_pb.PROFILE_IDENTITY_FILTER_IDENTIFIED,
    "anonymous": query_pb.PROFILE_IDENTITY_FILTER_ANONYMOUS,
    "details": query_pb.PROFILE_IDENTITY_FILTER_HAS_USER_DETAILS,
}
# The users table's rows per page, unless its filter form's `rows` chose another of
# USERS_PAGE_SIZES (ListProfiles takes up to 500; 200 rows keep a page light).
USERS_PAGE_SIZE = 50
USERS_PAGE_SIZES = (25, 50, 100, 200)
# The users table pages back through the page tokens that led to the page, kept in its URL
# (`trail`, the first page's as FIRST_PAGE): the service's cursors only go forward. At most
# this many (a token is about 110 characters; the server refuses request lines over 16 KB):
# past them, "First page" remains.
TRAIL_LIMIT = 30
FIRST_PAGE = "0"
HEARTBEAT_SECONDS = 15.0
# The profile's activity chart: this many days, ending today in the zone it counts days in.
ACTIVITY_DAYS = 30
# The overview's daily trend: active and new profiles per UTC day (GetOverview trend_days).
TREND_DAYS = 30
# The rejected events a profile page shows (the newest; a link lists them all).
PROFILE_REJECTED_ROWS = 5
# How often an open live feed re-reads its session (a sign-out in another tab ends it) and
# re-tries its key with the services (a revoked key ends it).
SESSION_CHECK_SECONDS = 2.0
KEY_CHECK_SECONDS = 5.0
# How long a segments feed waits before looking up again the people GetProfileRows did not
# list: the users table lags writes by the bus (under a second normally), so a person whose
# first events made them enter a segment is often not in it yet when the change arrives.
PEOPLE_RETRY_SECONDS = 1.5
# A reconnecting live feed re-reads the events received since its cursor less this margin
# (the console's and the services' clocks, the time from receipt to storage); the page drops
# what it already shows by event ID. Small: an event received within it before the page was
# read, with an event time past the page's first events, shows in the feed as new.
RESYNC_MARGIN = timedelta(seconds=10)
# TrackEvents refuses events over 30 days old: one received since the cursor is no older.
TRACKED_MAX_AGE = timedelta(days=31)
RESYNC_PAGE_SIZE = 500
RESYNC_PAGES = 4
# The most fields the small forms (sign-in, sign-out, erasure, deletion) may post; they have 1
# to 3.
SMALL_FORM_FIELDS = 20


@dataclass(frozen=True, slots=True)
class LiveChecks:
    """How often an open live feed checks its session and key, and looks up again the people
    its segments feed could not name: the constants above unless set (a test sets shorter
    ones rather than sit through them)."""

    session_seconds: float = SESSION_CHECK_SECONDS
    key_seconds: float = KEY_CHECK_SECONDS
    people_retry_seconds: float = PEOPLE_RETRY_SECONDS


class Console:
    """What the handlers share: the backend, the session store, the live hub, templates."""

    def __init__(
        self,
        backend: Backend,
        sessions: SessionStore,
        hub: LiveHub,
        templates: Any,
        *,
        secure_cookies: bool = False,
        live_checks: LiveChecks | None = None,
    ) -> None:
        self.backend = backend
        self.sessions = sessions
        self.hub = hub
        self.templates = templates
        self.live_checks = live_checks or LiveChecks()
        # Cookies Secure whatever scheme the request came by (settings.console_secure_cookies:
        # TLS ends at a proxy whose forwarded headers the console does not read).
        self.secure_cookies = secure_cookies


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    session: ConsoleSession | None = None,
    status: int = 200,
) -> Response:
    context = {"request": request, "session": session, "notices": [], **context}
    return console_of(request).templates.TemplateResponse(
        request, template, context, status_code=status
    )


def require_admin(session: ConsoleSession, action: str) -> None:
    """Raises Forbidden, naming `action` and the role that may, unless the key is an admin's:
    the console's own rule, checked before any call (a forged form never reaches a service)."""
    if not session.admin:
        raise Forbidden(action=action, roles=("admin",))


def _secure(request: Request) -> bool:
    """Whether cookies are sent with Secure: the request came by https (directly, or through a
    proxy trusted to say so, see `app.server_config`), or the settings say to always."""
    return console_of(request).secure_cookies or request.url.scheme == "https"


async def small_form(request: Request) -> FormData:
    """A small form's fields: no file (an upload is refused, never spooled to disk), a few
    fields; the body's size is capped before (app.Guard)."""
    return await request.form(max_files=0, max_fields=SMALL_FORM_FIELDS)


def signed_in(
    handler: Handler, *, renew: bool = True
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """The handler with the request's session; without one, a redirect to sign in. `renew`
    False reads the session without renewing its idle expiry: a request no person made."""

    async def wrapped(request: Request) -> Response:
        console = console_of(request)
        cookie = request.cookies.get(COOKIE, "")
        session = await console.sessions.get(cookie, renew=renew)
        if session is None:
            # A cookie without its session: expired, or ended by a live feed that found the
            # key refused; the sign-in page says which, and leads back here.
            why = await console.sessions.why_ended(cookie)
            await console.sessions.delete(cookie)
            return _to_sign_in(request, why)
        try:
            return await handler(request, session)
        except SignedOut:
            # Ended rather than deleted: a live feed of this session in another tab says why.
            await console.sessions.end(session.session_id, KEY_REFUSED)
            return _to_sign_in(request, KEY_REFUSED)
        except ServiceDown as down:
            return render(request, "problem.html", {"down": down}, session=session, status=503)
        except NotFound:
            return render(request, "problem.html", {"missing": True}, session=session, status=404)
        except Forbidden as refused:
            context = {"forbidden": refused, "roles_needed": _roles_needed(refused, session)}
            return render(request, "problem.html", context, session=session, status=403)
        except BadInput as bad:
            return render(request, "problem.html", {"bad": bad}, session=session, status=400)

    return wrapped


def _to_sign_in(request: Request, why: str) -> Response:
    """A redirect to sign in, back to this page after (`next`), saying why the session ended
    (`expired`: EXPIRED or KEY_REFUSED; "" when there was none), the cookie removed."""
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    query = {"next": target, **({"expired": why} if why else {})}
    response = RedirectResponse("/signin?" + urlencode(query), status_code=303)
    if why:
        response.delete_cookie(COOKIE, path="/")
    return response


def _roles_needed(refused: Forbidden, session: ConsoleSession) -> tuple[str, ...]:
    """The roles that may do what was refused: the console's rule's, or, for a service's
    refusal of a read key, admin (the console knows no other role above read)."""
    if refused.roles:
        return refused.roles
    return () if session.admin else ("admin",)


async def no_such_page(request: Request, exc: Exception) -> Response:
    """A path no route serves: the console's own page, not the framework's bare text. Signed
    in, the page has the header (the pages, the search) and links the nearest page above the
    address (`/profiles/<id>` for `/profiles/<id>/typo`); the session is only read, not renewed,
    and a session store away leaves the page without the header rather than fail."""
    session: ConsoleSession | None = None
    cookie = request.cookies.get(COOKIE, "")
    if cookie and hasattr(request.app.state, "console"):
        try:
            session = await console_of(request).sessions.get(cookie, renew=False)
        except RedisError:
            session = None
    context = {"unknown_page": request.url.path, "nearest": _nearest_page(request)}
    return render(request, "problem.html", context, session=session, status=404)


def _nearest_page(request: Request) -> str:
    """The longest parent of the request's path that a route serves to a GET ("" when none
    but the overview): where someone who mistyped the end of an address meant to go."""
    parts = request.url.path.rstrip("/").split("/")
    for end in range(len(parts) - 1, 1, -1):
        path = "/".join(parts[:end])
        scope = {"type": "http", "path": path, "method": "GET", "root_path": ""}
        for route in request.app.routes:
            if isinstance(route, Route) and route.matches(scope)[0] == Match.FULL:
                return path
    return ""


async def body_too_large(request: Request, exc: Exception) -> Response:
    """A request body over the console's limit (app.Guard), refused unread: the console's own
    page, with 413. The connection closes after it: kept open, the server would go on reading
    (and dropping) the rest of the body."""
    limit = exc.limit if isinstance(exc, BodyTooLarge) else 0
    response = render(request, "problem.html", {"too_large": present.byte_size(limit)}, status=413)
    response.headers["Connection"] = "close"
    return response


async def both(first: Awaitable[T], *others: Awaitable[Any]) -> list[Any]:
    """Runs calls concurrently; re-raises the first failure as itself (not a group)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_wrap(c)) for c in (first, *others)]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def _wrap(call: Awaitable[T]) -> T:
    return await call


# -- sign-in and sign-out -------------------------------------------------------------------------


def _safe_next(target: str) -> str:
    # Only paths of this console: never another site (an open redirect).
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/overview"


# What the sign-in page says of a session that ended, by why (`expired`): any other value
# reads as expired.
SESSION_ENDED = {
    EXPIRED: "Your session expired; sign in again.",
    KEY_REFUSED: "The key you signed in with is no longer valid (revoked or unknown): sign in"
    " again with a valid key.",
    SIGNED_OUT: "You signed out (in another tab or window); sign in again.",
    SIGNED_IN_AGAIN: "You signed in again since, in another tab or window; sign in again here.",
}


def _signin_page(
    request: Request, target: str, *, expired: str = "", error: str = "", status: int = 200
) -> Response:
    """The sign-in form with a fresh CSRF token, set as a cookie only /signin reads."""
    token = new_token()
    response = render(
        request,
        "signin.html",
        {
            "csrf_token": token,
            "next": target,
            "ended": SESSION_ENDED.get(expired, SESSION_ENDED[EXPIRED] if expired else ""),
            "error": error,
        },
        status=status,
    )
    response.set_cookie(
        SIGNIN_CSRF_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/signin",
    )
    return response


async def signin_form(request: Request) -> Response:
    """The sign-in form; it says why a session ended, from `expired` or, without it, from the
    cookie this browser still holds (a live feed's "Sign in again" link)."""
    target = _safe_next(request.query_params.get("next", "/overview"))
    why = request.query_params.get("expired", "")
    cookie = request.cookies.get(COOKIE, "")
    if not why and cookie:
        console = console_of(request)
        if await console.sessions.get(cookie, renew=False) is None:
            why = await console.sessions.why_ended(cookie)
    return _signin_page(request, target, expired=why)


@dataclass(frozen=True, slots=True)
class SignedInKey:
    role: str  # read or admin
    project_id: str


# The console's roles by the contract's: an sdk key (or a role this console does not know)
# signs nobody in.
_CONSOLE_ROLES = {types_pb2.ROLE_READ: "read", types_pb2.ROLE_ADMIN: "admin"}


async def key_to_sign_in(backend: Backend, key: str) -> SignedInKey:
    """The key's role and project, from GetCaller; raises SignedOut for an unknown or revoked
    key, Forbidden for a key the console does not take (an sdk key)."""
    caller = await backend.call(key, "query", "GetCaller", query_pb.GetCallerRequest())
    role = _CONSOLE_ROLES.get(caller.role)
    if role is None:
        raise Forbidden("the console needs a read or admin key")
    return SignedInKey(role, caller.project_id)


async def signin(request: Request) -> Response:
    console = console_of(request)
    form = await small_form(request)
    given = str(form.get("csrf_token", ""))
    key = str(form.get("key", "")).strip()
    target = _safe_next(str(form.get("next", "/overview")))

    def again(error: str, status: int) -> Response:
        return _signin_page(request, target, error=error, status=status)

    if not tokens_match(request.cookies.get(SIGNIN_CSRF_COOKIE, ""), given):
        return again("The form expired; please sign in again.", 403)
    if not key:
        return again("Enter a project key.", 400)
    try:
        signed_in = await key_to_sign_in(console.backend, key)
    except SignedOut:
        log.info("console_signin_refused", why="unknown_key")
        return again("This key is not valid: unknown or revoked.", 401)
    except Forbidden:
        log.info("console_signin_refused", why="sdk_key")
        return again("This is an SDK key; the console needs a read or admin key.", 403)
    except ServiceDown as down:
        return again(f"The {down.service} service is not answering; try again shortly.", 503)
    # A new session ID at every sign-in (no fixation); the previous session of this browser
    # ends, leaving the new one's role and project in its place: its live feeds, open in
    # other tabs, say the person signed in again (with a key of another role, maybe).
    cookie = request.cookies.get(COOKIE, "")
    previous = await console.sessions.get(cookie, renew=False)
    session = await console.sessions.create(key, signed_in.role, signed_in.project_id)
    if previous is not None:
        await console.sessions.end(previous.session_id, SIGNED_IN_AGAIN, successor=session)
    else:
        await console.sessions.delete(cookie)
    log.info("console_signed_in", role=signed_in.role)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        session.session_id,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/",
    )
    response.delete_cookie(SIGNIN_CSRF_COOKIE, path="/signin")
    return response


async def signout(request: Request) -> Response:
    console = console_of(request)
    cookie = request.cookies.get(COOKIE, "")
    response = RedirectResponse("/signin", status_code=303)
    if not cookie:
        # Nothing to sign out of, or a post from another site, which the browser sent without
        # the SameSite=Strict cookie: the cookie it holds is left alone (another site's page
        # must not sign the person out), and the form is not read.
        return response
    session = await console.sessions.get(cookie)
    if session is not None:
        form = await small_form(request)
        if not tokens_match(session.csrf_token, str(form.get("csrf_token", ""))):
            # A form of an earlier session (signed in again since, in another tab) or of
            # another site: nothing is removed without this session's own token, which the
            # page offers, so a person is one click from signing out.
            return render(request, "signout.html", {"csrf_token": session.csrf_token}, status=403)
        # Ended rather than deleted: its live feeds, open in other tabs, say the person
        # signed out.
        await console.sessions.end(session.session_id, SIGNED_OUT)
    response.delete_cookie(COOKIE, path="/")
    return response


async def healthz(request: Request) -> Response:
    try:
        async with asyncio.timeout(2):
            await request.app.state.redis.ping()
    except (OSError, TimeoutError, RedisError):
        return PlainTextResponse("redis unavailable", status_code=503)
    return PlainTextResponse("ok")


async def session_store_down(request: Request, exc: Exception) -> Response:
    """Redis, where sign-ins live, is away (restarting, loading, failing over) while a page
    reads or writes a session: the console's 503 page, to retry shortly, not a bare 500."""
    log.warning("console_session_store_unavailable", error=type(exc).__name__)
    response = render(request, "problem.html", {"session_store_down": True}, status=503)
    response.headers["Retry-After"] = "2"
    return response


async def home(request: Request) -> Response:
    return RedirectResponse("/overview", status_code=303)


# -- overview -----------------------------------------------------------------------------------


def _known(
    params: Mapping[str, str],
    name: str,
    choices: Container[str],
    default: str,
    instead: str,
    notices: list[str],
) -> str:
    """The query parameter `name` when it is one of `choices` (`default` when absent or empty).
    An unknown value gives way to `default`, and the page says so in `notices`: a shared URL
    must not show other figures than it names without a word."""
    given = params.get(name, "")
    if not given or given in choices:
        return given or default
    notices.append(f"Unknown {name} “{present.shorten(given)}”: {instead}.")
    return default


def _code(
    params: Mapping[str, str],
    name: str,
    read: Callable[[str], str],
    instead: str,
    notices: list[str],
) -> str:
    """The query parameter `name` as `read` makes it a code ("" when absent). A value that cannot
    be one is named in `notices` and dropped, as `_known` does for a closed list."""
    given = params.get(name, "")
    code = read(given)
    if given and not code:
        notices.append(f"Unknown {name} “{present.shorten(given)}”: {instead}.")
    return code


def _platform(
    request: Request, notices: list[str], params: Mapping[str, str] | None = None
) -> tuple[str, int]:
    given = request.query_params if params is None else params
    name = _known(given, "platform", present.PLATFORMS, "all", "showing all platforms", notices)
    return name, present.PLATFORMS[name]


async def _overview_context(request: Request, session: ConsoleSession) -> dict[str, Any]:
    notices: list[str] = []
    name, value = _platform(request, notices)
    reply = await console_of(request).backend.call(
        session.key,
        "query",
        "GetOverview",
        query_pb.GetOverviewRequest(
            platform=value,  # type: ignore[arg-type]
            top_values=10,
            trend_days=TREND_DAYS,
        ),
    )
    overview = reply.overview
    # The last 30 UTC days, oldest first: a chart per figure, and their table.
    trend = [
        (
            d.start_time.ToDatetime(tzinfo=UTC).date().isoformat(),
            d.active_profile_count,
            d.new_profile_count,
        )
        for d in overview.daily
    ]
    trend_charts = [
        (
            figure,
            max((day[n] for day in trend), default=0),
            present.bar_chart(
                [
                    (day[0][5:], day[n], f"{day[0]}: {present.count_of(day[n], noun)}")
                    for day in trend
                ],
                width=600,
                height=100,
            ),
        )
        for n, figure, noun in ((1, "active", "active profile"), (2, "new", "new profile"))
    ]
    smart = []
    for count in overview.smart_segments:
        flags = [(present.smart_flag(f.flag), f.profile_count) for f in count.flags]
        smart.append((present.smart_segment(count.segment), count.profile_count, flags))
    chart = present.bar_chart(
        [
            (
                label,
                total,
                f"{label}: {total}" + "".join(f"; {flag}: {n}" for flag, n in flags if n),
            )
            for label, total, flags in smart
        ],
        width=480,
        height=140,
    )
    # The table's rows with the users table's segment value of each figure.
    smart_rows = [
        (
            present.smart_segment(count.segment),
            count.profile_count,
            f"smart:{count.segment}",
            [(present.smart_flag(f.flag), f.profile_count, f"flag:{f.flag}") for f in count.flags],
        )
        for count in overview.smart_segments
    ]
    return {
        "platform": name,
        "platforms": list(present.PLATFORMS),
        "overview": overview,
        "smart": smart,
        "smart_rows": smart_rows,
        # On one platform the overview classifies profiles by their sessions there, the users
        # table by all their sessions: a link would open a list of another size than its figure.
        "smart_linked": name == "all",
        "chart": chart,
        "trend": trend,
        "trend_charts": trend_charts,
        "notices": notices,
    }


@signed_in
async def overview_page(request: Request, session: ConsoleSession) -> Response:
    context = await _overview_context(request, session)
    return render(request, "overview.html", context, session=session)


async def _overview_fragment(request: Request, session: ConsoleSession) -> Response:
    context = await _overview_context(request, session)
    return render(request, "_overview_body.html", context, session=session)


# The overview page's automatic refresh (every 10 s): no one's use of the console, so it does
# not renew the session's idle expiry (an open tab would keep a session alive for good).
overview_fragment = signed_in(_overview_fragment, renew=False)


# -- users --------------------------------------------------------------------------------------


def _page_number(text: str, trail_length: int) -> int:
    """The users table's page number from its URL (1 for the first page): as given when it is
    a number no smaller than the pages the trail leads back through, else the trail's."""
    number = int(text) if text.isdigit() and len(text) < 9 else 0
    return max(number, trail_length + 1)


def _paging(params: Mapping[str, str], first: str = FIRST_PAGE) -> tuple[str, list[str], int]:
    """A paged list's page token, the trail of tokens that led to it, and its page number,
    from its URL. A trail that cannot have led to the page is ignored (an altered or
    hand-made link): any on the first page (no token), and one that does not start at the
    first page (`first`, and only there) unless cut to TRAIL_LIMIT; the first page is
    page 1 whatever `page` says."""
    page_token = params.get("page_token", "")
    if not page_token:
        return "", [], 1
    given = [t for t in params.get("trail", "").split(",") if t]
    trail = given[-TRAIL_LIMIT:]
    cut = len(given) > len(trail) or len(trail) == TRAIL_LIMIT
    starts = cut or (bool(trail) and trail[0] == first)
    if not starts or first in trail[1:] or page_token in trail:
        trail = []
    return page_token, trail, _page_number(params.get("page", ""), len(trail))


def _users_page_size(given: str, notices: list[str]) -> int:
    """The users table's rows per page from its URL's `rows`: one of USERS_PAGE_SIZES, else
    USERS_PAGE_SIZE, and another value is named in `notices`."""
    if given.strip() in {str(size) for size in USERS_PAGE_SIZES}:
        return int(given)
    if given:
        choices = ", ".join(str(size) for size in USERS_PAGE_SIZES[:-1])
        notices.append(
            f"Unknown number of rows a page “{present.shorten(given)}”: showing"
            f" {USERS_PAGE_SIZE} ({choices} or {USERS_PAGE_SIZES[-1]} may be chosen)."
        )
    return USERS_PAGE_SIZE


def _users_trail_start(page_size: int) -> str:
    """The users table's first page in its trail: FIRST_PAGE, followed by the page size when
    it is not the default ("0.100"). A page token holds for any page size (it is a position),
    but the pages a trail leads back through, and the page's number, are those of the size it
    was made with: a trail of another size cannot have led to the page."""
    return FIRST_PAGE if page_size == USERS_PAGE_SIZE else f"{FIRST_PAGE}.{page_size}"


def _users_trail_size(trail: str) -> int:
    """The page size a users table's trail was made with (its first entry's), or 0 when it
    names none of USERS_PAGE_SIZES (cut to TRAIL_LIMIT, altered)."""
    start = trail.split(",", 1)[0]
    for size in USERS_PAGE_SIZES:
        if start == _users_trail_start(size):
            return size
    return 0


def _segment_filter(value: str) -> dict[str, Any]:
    """'smart:3', 'flag:1' or 'custom:<uuid>' as ListProfiles fields."""
    kind, _, rest = value.partition(":")
    if kind == "smart" and rest.isdigit() and int(rest) in present.SMART_SEGMENTS:
        return {"smart_segment": int(rest)}
    if kind == "flag" and rest.isdigit() and int(rest) in present.SMART_FLAGS:
        return {"smart_segment_flag": int(rest)}
    if kind == "custom" and rest:
        return {"segment_id": rest}
    return {}


# The users table's filter boxes by the ListProfiles field they fill: a refusal is told beside
# its box.
USERS_BOXES = {
    "name_prefix": "name",
    "segment_id": "segment",
    "custom_id_prefix": "custom_id",
    "email_prefix": "email",
}
# The users table's parameters whose value "all" is their default (left out of its links).
DEFAULT_ALL = ("tab", "platform")


def _users_filters(
    request: Request, notices: list[str], params: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The users table's filters and sort from its URL (what the page and its CSV share), or
    from `params` (the new-segment form's copy of them): the values the page's links keep,
    and the ListProfiles fields they make (`request_fields`)."""
    params = request.query_params if params is None else params
    tab = _known(params, "tab", TABS, "all", "showing all profiles", notices)
    sort = _known(params, "sort", SORTS, "last_seen", "sorted by last seen", notices)
    order = _known(params, "order", ("asc", "desc"), "desc", "sorted descending", notices)
    segment = params.get("segment", "")
    segment_fields = _segment_filter(segment)
    if segment and not segment_fields:
        notices.append(f"Unknown segment “{present.shorten(segment)}”: showing every profile.")
        segment = ""
    platform_name, platform_value = _platform(request, notices, params)
    # The filters an overview figure opens (its language, country or channel reach): shown as
    # chips, each with a link that lifts it.
    language = _code(params, "language", present.language_code, "showing every language", notices)
    country = _code(params, "country", present.country_code, "showing every country", notices)
    reach = _known(params, "reach", present.REACH, "", "showing every profile", notices)
    # The start of a profile ID (`id=dcae577b`): what a search for one opens when several
    # profiles' IDs start with it.
    id_prefix = present.profile_id_prefix(params.get("id", ""), "profile_id")
    if params.get("id") and not id_prefix:
        notices.append(
            f"Not the start of a profile ID “{present.shorten(params['id'])}”:"
            " showing every profile."
        )
    name = " ".join(params.get("name", "").split())
    # The start of a custom ID (case-sensitive, as custom IDs are) and of an email (any case):
    # what the boxes of the same names hold, and what a search opens when several profiles'
    # custom IDs or emails start with the text. No custom ID or email starts or ends with a
    # space, so the surrounding ones are left out.
    custom_id = params.get("custom_id", "").strip()
    email = params.get("email", "").strip()
    request_fields = {
        "identity_filter": TABS[tab],
        "platform": platform_value,
        "order_by": SORTS[sort],
        "sort_order": 1 if order == "asc" else 2,
        "name_prefix": name,
        "language": language,
        "country": country,
        "reachable_channel": present.REACH.get(reach, 0),
        "profile_id_prefix": id_prefix,
        "custom_id_prefix": custom_id,
        "email_prefix": email,
        **segment_fields,
    }
    if SORTS[sort] not in query_pb.ProfileOrderBy.values():
        request_fields["order_by"] = 1
    return {
        "tab": tab,
        "sort": sort,
        "order": order,
        "segment": segment,
        "platform": platform_name,
        "name": name,
        "language": language,
        "country": country,
        "reach": reach,
        "id_prefix": id_prefix,
        "custom_id": custom_id,
        "email": email,
        "request_fields": request_fields,
    }


@signed_in
async def users_page(request: Request, session: ConsoleSession) -> Response:
    console = console_of(request)
    params = request.query_params
    notices: list[str] = []
    filters = _users_filters(request, notices)
    tab, sort, order, segment = (
        filters["tab"],
        filters["sort"],
        filters["order"],
        filters["segment"],
    )
    platform_name, name = filters["platform"], filters["name"]
    language, country, reach = filters["language"], filters["country"], filters["reach"]
    id_prefix, custom_id, email = filters["id_prefix"], filters["custom_id"], filters["email"]
    rows = _users_page_size(params.get("rows", ""), notices)
    first = _users_trail_start(rows)
    page_token, trail, page_number = _paging(params, first)
    # A link whose page size was changed by hand: its trail leads back through pages of
    # another size (ignored above), and the rows before this one are counted in that size.
    numbered_by = rows
    if page_token and not trail:
        numbered_by = _users_trail_size(params.get("trail", "")) or rows
    request_fields = {
        "page_size": rows,
        "include_total_size": True,
        "page_token": page_token,
        **filters["request_fields"],
    }
    segments: list[Any] = []
    segments_down: ServiceDown | None = None
    refused: present.Refusal | None = None

    async def list_segments() -> list[Any]:
        nonlocal segments_down
        try:
            reply = await console.backend.call(
                session.key,
                "segments",
                "ListSegments",
                segments_pb.ListSegmentsRequest(page_size=100),
            )
        except ServiceDown as down:
            segments_down = down  # the table still works; only the segment list is missing
            return []
        return list(reply.segments)

    async def list_profiles() -> Any:
        nonlocal refused
        if present.name_control_characters(name):
            # Control characters are no part of a name: refused here, in the box's words.
            refused = present.Refusal("name", present.name_refusal(name))
            return query_pb.ListProfilesResponse()
        try:
            return await console.backend.call(
                session.key, "query", "ListProfiles", query_pb.ListProfilesRequest(**request_fields)
            )
        except NotFound:
            refused = present.Refusal("segment", present.FIELD_WORDS["segment_id"])
        except BadInput as bad:
            refused = present.refusal(bad, USERS_BOXES)
            if refused.box == "name":
                refused = present.Refusal("name", present.name_refusal(name))
        return query_pb.ListProfilesResponse()

    segments, reply = await both(list_segments(), list_profiles())
    past_the_count = (page_number - 1) * numbered_by + len(reply.profiles) > reply.total_size
    if past_the_count and not reply.total_size_is_lower_bound:
        page_number = len(trail) + 1  # an edited `page`: the trail's number is the right one

    def link(**changes: str) -> str:
        state = {
            "tab": tab,
            "sort": sort,
            "order": order,
            "segment": segment,
            "platform": platform_name,
            "name": name,
            "language": language,
            "country": country,
            "reach": reach,
            "id": id_prefix,
            "custom_id": custom_id,
            "email": email,
            # The page size, kept by every link of the page but the CSV's (whole, not paged).
            "rows": "" if rows == USERS_PAGE_SIZE else str(rows),
        }
        state.update(changes)
        # "all" is the tab's and the platform's default; a typed filter "all" is kept.
        return "/users?" + urlencode(
            {k: v for k, v in state.items() if v and not (v == "all" and k in DEFAULT_ALL)}
        )

    def next_link() -> str:
        if not reply.next_page_token:
            return ""
        return link(
            page_token=reply.next_page_token,
            trail=",".join([*trail, page_token or first][-TRAIL_LIMIT:]),
            page=str(page_number + 1),
        )

    def previous_link() -> str:
        if not trail or refused is not None:
            return ""
        token = "" if trail[-1] == first else trail[-1]
        return link(page_token=token, trail=",".join(trail[:-1]), page=str(page_number - 1))

    def sort_link(column: str) -> str:
        if sort == column:
            return link(sort=column, order="asc" if order == "desc" else "desc")
        # A first click sorts names A to Z, and figures largest or latest first.
        return link(sort=column, order="asc" if column == "name" else "desc")

    return render(
        request,
        "users.html",
        {
            "tab": tab,
            "sort": sort,
            "order": order,
            "segment": segment,
            "platform": platform_name,
            "platforms": list(present.PLATFORMS),
            "name": name,
            "language": language,
            "country": country,
            "reach": reach,
            "reaches": present.REACH_LABELS,
            "id_prefix": id_prefix,
            "custom_id": custom_id,
            "email": email,
            "tab_caption": present.TAB_CAPTIONS[tab],
            "caption": present.users_caption(
                segment=segment,
                custom_segments={s.segment_id: s.display_name for s in segments},
                platform=platform_name,
                country=country,
                language=language,
                reach=reach,
                id_prefix=id_prefix,
                custom_id=custom_id,
                email=email,
                name=name,
            ),
            "chips": present.filter_chips(
                language=language,
                country=country,
                reach=reach,
                id_prefix=id_prefix,
                custom_id=custom_id,
                email=email,
            ),
            "rows": present.user_rows(reply.profiles),
            "next_page": next_link(),
            "previous_page": previous_link(),
            "first_page": link() if page_token else "",
            "shown": present.shown_rows(
                page_number,
                numbered_by,
                len(reply.profiles),
                reply.total_size,
                at_least=reply.total_size_is_lower_bound,
            ),
            "page_size": rows,
            "page_sizes": USERS_PAGE_SIZES,
            "link": link,
            "csv_link": "/users.csv" + link(rows="").removeprefix("/users"),
            # "Save as segment" (admins): the new-segment form filled from these filters.
            "segment_link": "/segments/new?"
            + "&".join(
                ["from=users", link(sort="", order="", rows="").removeprefix("/users?")]
            ).rstrip("&"),
            "sort_link": sort_link,
            "segments": segments,
            "segments_down": segments_down,
            "refused": refused,
            "notices": notices,
            "name_sort": SORTS["name"] in query_pb.ProfileOrderBy.values(),
        },
        session=session,
    )


# The users table's CSV export: at most this many rows (said beside its link), read through
# ListProfiles' cursors in pages of its maximum size.
CSV_ROW_CAP = 10_000
CSV_PAGE_SIZE = 500


@signed_in
async def users_csv(request: Request, session: ConsoleSession) -> Response:
    """The users table of the URL's filters and sort as CSV, every page of it up to the cap."""
    console = console_of(request)
    filters = _users_filters(request, [])
    if present.name_control_characters(filters["name"]):
        raise BadInput(present.name_refusal(filters["name"]))

    async def page(token: str) -> Any:
        return await console.backend.call(
            session.key,
            "query",
            "ListProfiles",
            query_pb.ListProfilesRequest(
                page_size=CSV_PAGE_SIZE, page_token=token, **filters["request_fields"]
            ),
        )

    # The first page before any byte is sent: a refused filter or a down service is a page.
    first = await page("")

    def cells(rows: Any) -> list[list[str]]:
        return definitions.csv_rows(
            rows, platforms=present.PLATFORM_LABELS, segment_of=present.segment_label
        )

    async def body() -> AsyncIterator[bytes]:
        reply, sent = first, 0
        yield definitions.csv_text([], header=True).encode()
        while True:
            rows = list(reply.profiles)[: CSV_ROW_CAP - sent]
            sent += len(rows)
            yield definitions.csv_text(cells(rows)).encode()
            if sent >= CSV_ROW_CAP or not reply.next_page_token:
                return
            try:
                reply = await page(reply.next_page_token)
            except (ServiceDown, BadInput, SignedOut) as failed:
                # Mid-download: the status is sent already; the file says it stops short.
                log.warning("console_csv_cut_short", why=type(failed).__name__, rows=sent)
                yield definitions.csv_text([[definitions.CSV_CUT_SHORT]]).encode()
                return

    log.info("console_users_csv")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return StreamingResponse(
        body(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="users-{stamp}.csv"'},
    )


# -- search -------------------------------------------------------------------------------------


def lookups(text: str, kind: str) -> list[dict[str, str]]:
    """The GetProfile lookups to try, in order, for what was typed into the search box (none
    for a name: names are not identifiers, see `names_searched`)."""
    text = text.strip()
    if kind == "profile_id":
        return [{kind: canonical_uuid(text) or text}]
    if kind == "phone":
        return [{kind: present.phone_number(text) or text}]
    if kind in ("email", "custom_id", "installation_id"):
        return [{kind: text}]
    if kind == "name":
        return []
    if "@" in text:
        return [{"email": text}]
    if present.phone_number(text):
        return [{"phone": present.phone_number(text)}]
    profile_id = canonical_uuid(text)
    if not profile_id:
        return [{"custom_id": text}, {"installation_id": text}]
    return [{"profile_id": profile_id}, {"custom_id": text}, {"installation_id": text}]


def canonical_uuid(text: str) -> str:
    """`text` as the UUID form the contract reads (lower-case, with dashes), or "" when it is no
    UUID: one copied without its dashes or in capitals is the same ID."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return ""


def names_searched(text: str, kind: str) -> bool:
    """Whether a search no identifier answered goes on to names (`_open_by_name`): when asked
    for, or when the text could be a name (what `lookups` tries as a custom ID or an
    installation ID, not an email, a phone, a UUID, nor the users table's "Anonymous
    dcae577b")."""
    if kind != "auto":
        return kind == "name"
    return not present.shows_a_profile_id(text) and [
        key for lookup in lookups(text, kind) for key in lookup
    ] == ["custom_id", "installation_id"]


@signed_in
async def search(request: Request, session: ConsoleSession) -> Response:
    console = console_of(request)
    text = request.query_params.get("q", "").strip()
    kind = request.query_params.get("by", "auto")
    context: dict[str, Any] = {
        "q": text,
        "by": kind,
        "ambiguous": [],
        "message": "",
        "hint": "",
        "misses": [],
        "starts": [],  # (what a start lists, its users table) when several kinds found some
    }
    # What each lookup that found nothing was, said under "No profile matches": a custom ID
    # nobody has is told as plainly as the name search that follows it.
    misses: list[str] = context["misses"]
    if text:
        tries = lookups(text, kind)
        # The start of a profile ID the text may be ("Anonymous dcae577b"), looked up once the
        # identifiers found nothing; a whole one was looked up as an ID already.
        prefix = "" if canonical_uuid(text) else present.profile_id_prefix(text, kind)
        if kind == "auto" and "@" in text:
            # Custom IDs are often emails too: tried after the email, and said so when found.
            tries.append({"custom_id": text})
        for lookup in tries:
            try:
                reply = await console.backend.call(
                    session.key, "query", "GetProfile", query_pb.GetProfileRequest(**lookup)
                )
            except NotFound:
                ((looked_for, value),) = lookup.items()
                misses.append(present.search_miss(looked_for, value))
                continue
            except BadInput as bad:
                if bad.reason == "AMBIGUOUS_LOOKUP":
                    ids = bad.metadata.get("profile_ids", "")
                    context["ambiguous"] = [i for i in ids.split(",") if i]
                    context["message"] = "Several profiles have this address:"
                    break
                # Text this identifier cannot be (an email without its domain, an ID too
                # long): no profile has it. What it should look like is a hint, for the kinds a
                # person writes by hand (not for the start of a profile ID, searched below).
                hinted = {"email", "phone"} | (set() if prefix else {"profile_id"})
                if not context["hint"] and set(lookup) & hinted:
                    context["hint"] = present.refusal(bad).text
                continue
            target = f"/profiles/{reply.profile.summary.profile_id}"
            # Text with an "@" is an email first: found as a custom ID, the page says so.
            if kind == "auto" and "custom_id" in lookup and "@" in text:
                target += "?" + urlencode({"found": "custom_id"})
            return RedirectResponse(target, 303)
        else:
            if prefix:
                found = await _open_by_id_prefix(console, session, prefix)
                if found is not None:
                    return found
                misses.append(present.search_miss("id_prefix", prefix))
            starts = await _starts(console, session, text, kind)
            found = _open_by_start(starts)
            if found is not None:
                return found
            context["starts"] = [
                (present.START_LISTS[start.kind].format(present.shorten(start.value)), start.url)
                for start in starts
                if start.profile_ids
            ]
            if context["starts"]:
                context["message"] = (
                    f"Several kinds of value start with “{present.shorten(text)}”: which do you"
                    " mean?"
                )
                return render(request, "search.html", context, session=session)
            misses.extend(
                present.search_miss(start.kind, start.value)
                for start in starts
                if start.profile_ids is not None
            )
            context["message"] = f"No profile matches “{present.shorten(text)}”."
            if any("phone" in lookup for lookup in tries):
                context["hint"] = present.PHONE_MATCHING
    return render(request, "search.html", context, session=session)


# The starts of values a search that no identifier answered looks for, in the order its misses
# are told (a name's last): the users table's parameter, the ListProfiles field, the longest
# text the field takes (a longer one starts no value: not looked for, nor said).
STARTS = {
    "custom_id_prefix": ("custom_id", "custom_id_prefix", 512),
    "email_prefix": ("email", "email_prefix", 254),
    "name": ("name", "name_prefix", present.NAME_SEARCH_MAX),
}


@dataclass(frozen=True, slots=True)
class Start:
    """The start of a value a search looked for: `kind` (a key of STARTS), the text as looked
    for, the IDs of the first two profiles found (None when the service refused the text), and
    the users table filtered by it."""

    kind: str
    value: str
    profile_ids: list[str] | None
    url: str


def starts_searched(text: str, kind: str) -> list[str]:
    """What a search no identifier answered goes on to (STARTS' keys, in order): the start of a
    custom ID when the text was looked up as one (and is not the users table's "Anonymous
    dcae577b"), of an email when it also has no space (or searched "by email"), of a name when
    `names_searched`."""
    text = text.strip()
    if kind in ("custom_id", "email"):
        return [f"{kind}_prefix"]
    searched = []
    if kind == "auto" and not present.shows_a_profile_id(text) and not present.phone_number(text):
        searched.append("custom_id_prefix")
        if not any(character.isspace() for character in text):
            searched.append("email_prefix")
    if names_searched(text, kind):
        searched.append("name")
    return searched


async def _starts(console: Console, session: ConsoleSession, text: str, kind: str) -> list[Start]:
    """The profiles (two at most) each start `starts_searched` names finds, looked up at once."""
    searched = []
    for start in starts_searched(text, kind):
        parameter, field, longest = STARTS[start]
        value = " ".join(text.split()) if start == "name" else text.strip()
        if len(value) <= longest:
            searched.append((start, parameter, field, value))

    async def look(field: str, value: str) -> list[str] | None:
        request = query_pb.ListProfilesRequest(page_size=2)
        setattr(request, field, value)
        try:
            reply = await console.backend.call(session.key, "query", "ListProfiles", request)
        except BadInput:
            return None
        return [row.profile_id for row in reply.profiles]

    if not searched:
        return []
    found = await both(*(look(field, value) for _, _, field, value in searched))
    return [
        Start(start, value, ids, present.users_url(**{parameter: value}))
        for (start, parameter, _, value), ids in zip(searched, found, strict=True)
    ]


def _open_by_start(starts: list[Start]) -> Response | None:
    """Where the starts found lead: the profile when they found one and the same (a custom ID
    and an email of one person), else the users table filtered by the one start that found
    several; None when none found any, or several kinds did (the page asks which)."""
    found = [start for start in starts if start.profile_ids]
    people = {profile_id for start in found for profile_id in start.profile_ids or ()}
    if len(people) == 1:
        return RedirectResponse(f"/profiles/{people.pop()}", 303)
    if len(found) == 1:
        return RedirectResponse(found[0].url, 303)
    return None


async def _open_by_id_prefix(
    console: Console, session: ConsoleSession, prefix: str
) -> Response | None:
    """The one profile whose ID starts with `prefix` (hex digits), else the users table of
    those that do (several); None when none does."""
    reply = await console.backend.call(
        session.key,
        "query",
        "ListProfiles",
        query_pb.ListProfilesRequest(profile_id_prefix=prefix, page_size=2),
    )
    if len(reply.profiles) == 1:
        return RedirectResponse(f"/profiles/{reply.profiles[0].profile_id}", 303)
    if not reply.profiles:
        return None
    return RedirectResponse(present.users_url(id=prefix), 303)


# -- profile ------------------------------------------------------------------------------------


@signed_in
async def profile_page(request: Request, session: ConsoleSession) -> Response:
    console = console_of(request)
    profile_id = request.path_params["profile_id"]
    params = request.query_params
    session_id = params.get("session", "")
    events_token = params.get("events_page", "")
    sessions_token = params.get("sessions_page", "")
    notices: list[str] = []
    # The timeline's filter, kept by every link of the page (paging, sessions).
    kind = _known(params, "kind", present.TIMELINE_KINDS, "", "showing every kind", notices)
    event_name = " ".join(params.get("event_name", "").split())
    first_text = params.get("from", "").strip()
    last_text = params.get("to", "").strip()
    heartbeats = _known(params, "heartbeats", ("hide",), "", "showing them", notices)
    kept = {
        "kind": kind,
        "event_name": event_name,
        "from": first_text,
        "to": last_text,
        "heartbeats": heartbeats,
    }
    first_day, last_day, days_refused = _timeline_days(first_text, last_text)
    start_time, end_time = present.day_bounds(first_day, last_day)
    listing = query_pb.ListEventsRequest(
        profile_id=profile_id,
        page_size=50,
        session_id=session_id,
        page_token=events_token,
        kinds=present.TIMELINE_KINDS[kind][1] if kind else (),
        event_names=[event_name] if event_name else [],
        exclude_heartbeats=heartbeats == "hide",
    )
    if start_time is not None:
        set_timestamp(listing.start_time, start_time)
    if end_time is not None:
        set_timestamp(listing.end_time, end_time)
    found_by = present.FOUND_BY.get(params.get("found", ""), "")
    # The live feed's cursor: from before the page's reads, so that an event stored while they
    # run is re-read by the feed (the page drops what it shows already).
    loaded = datetime.now(UTC)
    today = loaded.date()
    try:
        (
            profile_reply,
            (sessions_reply, sessions_refused),
            (events_reply, events_refused),
            activity,
            rejected_reply,
        ) = await both(
            console.backend.call(
                session.key,
                "query",
                "GetProfile",
                query_pb.GetProfileRequest(profile_id=profile_id),
            ),
            _a_page(
                console.backend.call(
                    session.key,
                    "query",
                    "ListSessions",
                    query_pb.ListSessionsRequest(
                        profile_id=profile_id, page_size=20, page_token=sessions_token
                    ),
                ),
                query_pb.ListSessionsResponse(),
            ),
            # Days the console cannot read are told beside their box, without asking.
            _refused_page(query_pb.ListEventsResponse(), days_refused)
            if days_refused
            else _a_page(
                console.backend.call(session.key, "query", "ListEvents", listing),
                query_pb.ListEventsResponse(),
                {
                    "event_names": "event-name",
                    "session_id": "session",
                    "start_time": "events-from",
                    "end_time": "events-to",
                },
            ),
            console.backend.call(
                session.key,
                "query",
                "GetActivity",
                # The days of every zone (UTC-12 to UTC+14) around UTC's today: the profile's
                # zone is known with the answer, which `present.last_days` trims to its own
                # last 30 days.
                query_pb.GetActivityRequest(
                    profile_id=profile_id,
                    start_date=(today - timedelta(days=30)).isoformat(),
                    end_date=(today + timedelta(days=1)).isoformat(),
                ),
            ),
            # The newest few events ingest refused of this person (why an app's events never
            # showed up); the rejected events page lists them all.
            console.backend.call(
                session.key,
                "query",
                "ListRejectedEvents",
                query_pb.ListRejectedEventsRequest(
                    profile_id=profile_id, page_size=PROFILE_REJECTED_ROWS
                ),
            ),
        )
    except NotFound:
        return _no_such_profile(request, session, profile_id)
    except BadInput as bad:
        # Not a profile ID at all (`/profiles/user-1`): to a person, just no such profile.
        if "profile_id" in bad.fields:
            return _no_such_profile(request, session, profile_id)
        raise
    profile = profile_reply.profile
    canonical = profile.summary.profile_id
    if canonical != profile_id:
        # A merged-away ID opens its survivor, which says so: the ID it was opened by goes
        # along (the page checks it before saying anything).
        merged = profile_reply.resolved_from_profile_id or profile_id
        return RedirectResponse(
            f"/profiles/{canonical}?" + urlencode({"merged_from": merged}), status_code=303
        )
    merged_from = await _merged_into(console, session, params.get("merged_from", ""), canonical)
    # The profile an operator's merge (this console's merge form) just merged into this one,
    # checked with the service as `merged_from` is.
    merge_done = await _merged_into(console, session, params.get("merged", ""), canonical)
    session_refused = events_refused is not None and events_refused.box == "session"
    days = present.last_days(activity.days, activity.time_zone, loaded, ACTIVITY_DAYS)
    chart = present.bar_chart(
        [
            (
                day.date[5:],
                day.event_count,
                f"{day.date}: {present.count_of(day.session_count, 'session')},"
                f" {present.count_of(day.event_count, 'event')}, {present.span(day.time_spent)}",
            )
            for day in days
        ],
        width=600,
        height=100,
    )
    events = list(events_reply.events)
    # A name that matched nothing: the names this profile's custom events have (a typo,
    # "purchse", is otherwise just an empty list).
    name_miss = None
    if event_name and not events and not events_token and events_refused is None:
        name_miss = await _name_miss(console, session, canonical, event_name)
    # Each list pages on its own; a link keeps the other list where it is.
    next_events = ""
    if events_reply.next_page_token:
        next_events = _query_string(
            session=session_id,
            sessions_page=sessions_token,
            events_page=events_reply.next_page_token,
            **kept,
        )
    next_sessions = ""
    if sessions_reply.next_page_token:
        next_sessions = _query_string(
            session=session_id, sessions_page=sessions_reply.next_page_token, **kept
        )
    return render(
        request,
        "profile.html",
        {
            "profile": profile,
            "summary": profile.summary,
            "native": present.native_attributes(profile.native_attributes),
            "sessions": sessions_reply.sessions,
            "events": events,
            "selected_session": session_id,
            # The session's heading leads with when it started, its ID after.
            "session_started": present.session_started(session_id, sessions_reply.sessions, events)
            if session_id
            else "",
            # A session's link keeps the sessions' page it is on, so the session stays listed.
            "sessions_page": sessions_token,
            "next_events": next_events,
            "latest_events": _query_string(session=session_id, sessions_page=sessions_token, **kept)
            if events_token
            else "",
            "next_sessions": next_sessions,
            "newest_sessions": _query_string(session=session_id, **kept) if sessions_token else "",
            "chart": chart,
            "activity_zone": present.activity_zone(activity.time_zone),
            "activity_days": present.activity_days(days),
            "activity_top": max((day.event_count for day in days), default=0),
            # The version the page shows: a feed that opens with nothing written since
            # re-reads nothing (events received just before the page, beyond its first
            # timeline page, were shown as live).
            "live_since": live_cursor(profile.version, loaded),
            # The live feed shows every kind: it is for the whole, unfiltered timeline.
            "live_enabled": not events_token and not session_id and not any(kept.values()),
            "loaded": present.when(datetime.now(UTC)),
            "events_refused": events_refused,
            "sessions_refused": sessions_refused,
            # A refused session ID is not kept by the link that starts the timeline again.
            "first_events": _query_string(
                session="" if session_refused else session_id, sessions_page=sessions_token, **kept
            ),
            "first_sessions": _query_string(session=session_id, events_page=events_token, **kept),
            "kind": kind,
            "event_name": event_name,
            "first_day": first_text,
            "last_day": last_text,
            "hide_heartbeats": heartbeats == "hide",
            "timeline_filter": present.timeline_filter_words(
                kind,
                event_name,
                first_day=first_day,
                last_day=last_day,
                without_heartbeats=heartbeats == "hide",
            ),
            "name_miss": name_miss,
            # What a name of the miss links to: the same filters with that name.
            "named_query": urlencode(
                {k: v for k, v in kept.items() if v and k != "event_name"}
                | ({"session": session_id} if session_id else {})
            ),
            # The names the name box offers: the custom events shown, or those of the miss.
            "event_names": sorted(
                set(name_miss.names if name_miss else ())
                | {e.custom.name for e in events if e.WhichOneof("details") == "custom"}
            ),
            "push_devices": present.push_devices(profile.installations),
            # What a session's link and "Show every event" add to keep the filter.
            "filter_query": urlencode({k: v for k, v in kept.items() if v}),
            "notices": notices,
            "found_by": found_by,
            "merged_from": merged_from,
            "merge_done": merge_done,
            # The last crash opens itself in the timeline; the Crashes tab lists every crash.
            "last_crash_link": present.crash_link(canonical, profile.counters.last_crash)
            if profile.counters.HasField("last_crash")
            else "",
            "crashes_link": f"/profiles/{canonical}?" + urlencode({"kind": "crash"}) + "#events",
            # A crash entry tells the app version its installation runs now.
            "app_versions": {i.installation_id: i.app_version for i in profile.installations},
            "history": present.history_rows(profile.identity_changes, canonical),
            "erased_profile_id": present.ERASED_PROFILE_ID,
            "rejected": [(r, present.rejection_text(r)) for r in rejected_reply.rejected_events],
            "all_rejected": present.rejected_link(profile=canonical),
        },
        session=session,
    )


def _timeline_days(
    first_text: str, last_text: str
) -> tuple[date | None, date | None, present.Refusal | None]:
    """The timeline's first and last days (`from` and `to`, UTC, both included), or what is
    wrong with them, told beside the box at fault."""
    first = present.calendar_day(first_text) if first_text else None
    last = present.calendar_day(last_text) if last_text else None
    if first_text and first is None:
        return None, None, present.Refusal("events-from", present.NOT_A_DAY)
    if last_text and last is None:
        return None, None, present.Refusal("events-to", present.NOT_A_DAY)
    if first and last and last < first:
        return None, None, present.Refusal("events-to", present.LAST_DAY_BEFORE_FIRST)
    return first, last, None


async def _refused_page(empty: T, refused: present.Refusal) -> tuple[T, present.Refusal]:
    """A list the page does not ask for, its filter refused by the console itself."""
    return empty, refused


# The custom events read to tell the names a profile has, when a name filter matched nothing.
NAME_MISS_EVENTS = 500


async def _name_miss(
    console: Console, session: ConsoleSession, profile_id: str, typed: str
) -> present.NameMiss:
    """The names of the profile's newest custom events, against the name `typed` that matched
    nothing (one more ListEvents, only then: a page that found what it asked for reads none)."""
    reply = await console.backend.call(
        session.key,
        "query",
        "ListEvents",
        query_pb.ListEventsRequest(
            profile_id=profile_id,
            page_size=NAME_MISS_EVENTS,
            kinds=[timeline_pb.TIMELINE_EVENT_KIND_CUSTOM],
        ),
    )
    names = (e.custom.name for e in reply.events)
    return present.name_miss(typed, names, partial=bool(reply.next_page_token))


async def _merged_into(
    console: Console, session: ConsoleSession, merged_from: str, canonical: str
) -> str:
    """`merged_from` (the `merged_from` parameter: the ID a merged-away profile was opened by)
    when the service resolves it to `canonical`, else "": an altered link claims no merge."""
    merged_from = canonical_uuid(merged_from)
    if not merged_from or merged_from == canonical:
        return ""
    try:
        reply = await console.backend.call(
            session.key, "query", "GetProfile", query_pb.GetProfileRequest(profile_id=merged_from)
        )
    except (NotFound, BadInput):
        return ""
    resolved = reply.resolved_from_profile_id == merged_from
    return merged_from if resolved and reply.profile.summary.profile_id == canonical else ""


async def _a_page(
    call: Awaitable[T], empty: T, boxes: Mapping[str, str] | None = None
) -> tuple[T, present.Refusal | None]:
    """One list of a page that pages on its own: a stale or altered page link of that list, or
    a refused filter of its own (a request field of `boxes`, told beside that box), empties it
    with a word (and the rest of the page stays), instead of failing the page."""
    try:
        return await call, None
    except BadInput as bad:
        refused = {path.split("[")[0].split(".")[0] for path in bad.fields}
        if bad.reason != "PAGE_TOKEN_INVALID" and not refused & set(boxes or {}):
            raise
        return empty, present.refusal(bad, boxes)


def _no_such_profile(request: Request, session: ConsoleSession, profile_id: str) -> Response:
    return render(
        request,
        "problem.html",
        {"no_profile": present.shorten(profile_id)},
        session=session,
        status=404,
    )


def _query_string(**parameters: str) -> str:
    """`?a=1&b=2` of the non-empty parameters; `?` alone when none is (the page as it opens)."""
    return "?" + urlencode({k: v for k, v in parameters.items() if v})


@signed_in
async def profile_export(request: Request, session: ConsoleSession) -> Response:
    require_admin(session, "download a profile's data export")
    console = console_of(request)
    profile_id = request.path_params["profile_id"]
    chunks = console.backend.stream(
        session.key,
        "identity",
        "ExportProfile",
        identity_pb.ExportProfileRequest(profile_id=profile_id),
    )
    # The first chunk before any byte is sent, so an unknown profile is a 404 page, not a
    # broken download.
    first = await anext(chunks)

    async def body() -> AsyncIterator[bytes]:
        open_array = False
        section_index = 0
        async for chunk in _prepend(first, chunks):
            member = export_member(chunk.section)
            if chunk.section_chunk_index == 0:
                separator = "{" if section_index == 0 else ","
                section_index += 1
                yield f"{separator}{json.dumps(member)}:".encode()
            text = chunk.json.strip()
            if text.startswith("["):
                inner = text[1:-1].strip()
                if chunk.section_chunk_index == 0:
                    yield b"["
                    open_array = False
                if inner:
                    if open_array:
                        yield b","
                    yield inner.encode()
                    open_array = True
                if chunk.section_end:
                    yield b"]"
            else:
                yield text.encode()
        yield b"}"

    log.info("console_export", profile_id=profile_id)
    return StreamingResponse(
        body(),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="profile-{profile_id}.json"'},
    )


def export_member(section: int) -> str:
    """The export document's member of a section: its name in lower camel case ("rejectedEvents"
    for EXPORT_SECTION_REJECTED_EVENTS). A section this build does not know (an identity newer
    than the console) is kept as "section<N>", not a download broken halfway."""
    try:
        name = identity_pb.ExportSection.Name(section)  # type: ignore[arg-type]
    except ValueError:
        return f"section{section}"
    return _camel(name.removeprefix("EXPORT_SECTION_").lower())


# -- erasure (GDPR) -------------------------------------------------------------------------------


async def _erasure_page(
    request: Request,
    session: ConsoleSession,
    profile_id: str,
    *,
    request_id: str,
    refused: str = "",
    status: int = 200,
) -> Response:
    """The confirmation step: whom the erasure is of, what goes, and the word to type."""
    console = console_of(request)
    try:
        reply = await console.backend.call(
            session.key, "query", "GetProfile", query_pb.GetProfileRequest(profile_id=profile_id)
        )
    except NotFound:
        return _no_such_profile(request, session, profile_id)
    except BadInput as bad:
        if "profile_id" in bad.fields:
            return _no_such_profile(request, session, profile_id)
        raise
    summary = reply.profile.summary
    return render(
        request,
        "erase.html",
        {
            "summary": summary,
            "confirmation": present.erasure_word(summary.custom_id, summary.profile_id),
            "confirmation_instead": present.erasure_word_instead(summary.custom_id),
            "installations": len(reply.profile.installations),
            "events": reply.profile.counters.event_count,
            "csrf_token": session.csrf_token,
            "request_id": request_id,
            "refused": refused,
        },
        session=session,
        status=status,
    )


@signed_in
async def profile_erase_form(request: Request, session: ConsoleSession) -> Response:
    require_admin(session, "erase a profile")
    profile_id = request.path_params["profile_id"]
    # The idempotency key travels with the form: a second click or a reload of the answer
    # returns the first erasure's answer instead of "no such profile".
    return await _erasure_page(request, session, profile_id, request_id=str(uuid.uuid4()))


@signed_in
async def profile_erase(request: Request, session: ConsoleSession) -> Response:
    # A read key never sees the form; a forged post gets 403 all the same.
    require_admin(session, "erase a profile")
    console = console_of(request)
    profile_id = request.path_params["profile_id"]
    form = await small_form(request)
    request_id = str(form.get("request_id", ""))[:64] or str(uuid.uuid4())
    if not tokens_match(session.csrf_token, str(form.get("csrf_token", ""))):
        return await _erasure_page(
            request,
            session,
            profile_id,
            request_id=request_id,
            refused=present.FORM_EXPIRED,
            status=403,
        )
    typed = str(form.get("confirmation", ""))
    name = ""
    try:
        before = await console.backend.call(
            session.key, "query", "GetProfile", query_pb.GetProfileRequest(profile_id=profile_id)
        )
    except (NotFound, BadInput):
        # Gone already (this form sent twice): the service answers a retry of its request_id
        # with the first erasure, anything else with NOT_FOUND; there is nothing to confirm.
        pass
    else:
        summary = before.profile.summary
        if summary.profile_id != canonical_uuid(profile_id):
            # Merged into another profile since the page was shown: that is someone else now.
            return await _erasure_page(
                request,
                session,
                profile_id,
                request_id=str(uuid.uuid4()),
                refused=present.ERASURE_MERGED,
                status=409,
            )
        expected = present.erasure_word(summary.custom_id, summary.profile_id)
        if not present.erasure_confirmed(expected, typed):
            return await _erasure_page(
                request,
                session,
                profile_id,
                request_id=request_id,
                refused=present.erasure_refusal(expected, typed),
                status=400,
            )
        name = present.display_name(
            summary.first_name, summary.last_name, summary.custom_id, summary.profile_id
        )
    try:
        reply = await console.backend.call(
            session.key,
            "identity",
            "DeleteProfile",
            # Exact: the person confirmed above, never the survivor of a merge since (a login
            # between the check and this call would otherwise erase someone else).
            identity_pb.DeleteProfileRequest(
                profile_id=profile_id, request_id=request_id, exact=True
            ),
        )
    except NotFound:
        return _no_such_profile(request, session, profile_id)
    except BadInput as refused:
        if refused.reason != "PROFILE_MERGED":
            raise
        return await _erasure_page(
            request,
            session,
            profile_id,
            request_id=str(uuid.uuid4()),
            refused=present.ERASURE_MERGED,
            status=409,
        )
    log.info("console_erasure", profile_id=reply.profile_id)
    return render(request, "erased.html", {"reply": reply, "name": name}, session=session)


# -- operator merge -------------------------------------------------------------------------------


async def _profile_or_none(
    console: Console, session: ConsoleSession, profile_id: str
) -> query_pb.GetProfileResponse | None:
    """GetProfile of a profile ID (a merged-away one answers its survivor); None when no
    profile of the project has it (erased, or no profile ID at all)."""
    try:
        reply: query_pb.GetProfileResponse = await console.backend.call(
            session.key, "query", "GetProfile", query_pb.GetProfileRequest(profile_id=profile_id)
        )
    except NotFound:
        return None
    except BadInput as bad:
        if "profile_id" in bad.fields:
            return None
        raise
    return reply


async def _merge_lookup(
    console: Console, session: ConsoleSession, text: str, by: str
) -> tuple[query_pb.GetProfileResponse | None, list[str]]:
    """The profile `text` names (`present.merge_lookups`, tried in order), and what each
    lookup that found nothing was."""
    misses: list[str] = []
    for lookup in present.merge_lookups(text, by):
        try:
            reply = await console.backend.call(
                session.key, "query", "GetProfile", query_pb.GetProfileRequest(**lookup)
            )
        except (NotFound, BadInput):
            # BadInput: text this identifier cannot be (a custom ID over 512 characters, a
            # profile ID that is none): no profile has it either.
            ((looked_for, value),) = lookup.items()
            misses.append(present.search_miss(looked_for, value))
            continue
        return reply, misses
    return None, misses


def _merge_choice(
    request: Request,
    session: ConsoleSession,
    target: Any,
    *,
    other: str = "",
    by: str = "auto",
    refused: str = "",
    misses: Iterable[str] = (),
    done: str = "",
    notices: Iterable[str] = (),
    survivor: str = "",
    status: int = 200,
) -> Response:
    """The merge's first step: which profile to merge into this one (`target`), with why the
    last choice was refused, if it was (and the profile a merged-away one is now: `survivor`)."""
    return render(
        request,
        "merge.html",
        {
            "summary": target.summary,
            "other": other,
            "by": by,
            "lookups": present.MERGE_LOOKUPS,
            "refused": refused,
            "misses": list(misses),
            "done": done,
            "notices": list(notices),
            "survivor": survivor,
        },
        session=session,
        status=status,
    )


def _merge_confirmation(
    request: Request,
    session: ConsoleSession,
    target: Any,
    source: Any,
    *,
    request_id: str,
    refused: str = "",
    allow_alias: bool = False,
    survivor: str = "",
    status: int = 200,
) -> Response:
    """The confirmation step: both profiles side by side, what the merge does, and the POST
    that does it (the session's CSRF token, an idempotency key); with a refusal, the profile
    a merged-away one is now (`survivor`), if that was why."""
    return render(
        request,
        "merge_confirm.html",
        {
            "target": present.merge_side(target),
            "source": present.merge_side(source),
            "custom_ids": present.merge_custom_ids(
                source.summary.custom_id, target.summary.custom_id
            ),
            "csrf_token": session.csrf_token,
            "request_id": request_id,
            "refused": refused,
            "allow_alias": allow_alias,
            "survivor": survivor,
        },
        session=session,
        status=status,
    )


@signed_in
async def profile_merge_form(request: Request, session: ConsoleSession) -> Response:
    """Choosing the other profile (`other`, looked up `by`), then the confirmation."""
    require_admin(session, "merge profiles")
    console = console_of(request)
    profile_id = request.path_params["profile_id"]
    params = request.query_params
    notices: list[str] = []
    by = _known(
        params, "by", present.MERGE_LOOKUPS, "auto", "looking it up as any of them", notices
    )
    this = await _profile_or_none(console, session, profile_id)
    if this is None:
        return _no_such_profile(request, session, profile_id)
    target = this.profile
    canonical = target.summary.profile_id
    if canonical != profile_id:
        # A merged-away ID: the merge is into the profile it opens, which the page names.
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"/profiles/{canonical}/merge{query}", status_code=303)
    if "other" not in params:
        return _merge_choice(request, session, target, by=by, notices=notices)
    other = params["other"]
    if not other.strip():
        return _merge_choice(
            request, session, target, by=by, refused=present.MERGE_EMPTY, status=400
        )
    found, misses = await _merge_lookup(console, session, other, by)
    shown = present.shorten(other.strip())
    if found is None:
        return _merge_choice(
            request,
            session,
            target,
            other=other,
            by=by,
            refused=present.MERGE_NO_MATCH.format(shown),
            misses=misses,
            notices=notices,
            status=404,
        )
    source = found.profile
    if source.summary.profile_id == canonical:
        # This profile itself, or one merged into it already (its ID opens this one).
        words = present.MERGE_ALREADY if found.resolved_from_profile_id else present.MERGE_SAME
        return _merge_choice(
            request,
            session,
            target,
            other=other,
            by=by,
            refused=words.format(shown),
            notices=notices,
            status=409,
        )
    # The idempotency key travels with the form: a second click, or the form sent again,
    # answers the first merge instead of telling the two profiles one already.
    return _merge_confirmation(request, session, target, source, request_id=str(uuid.uuid4()))


@signed_in
async def profile_merge(request: Request, session: ConsoleSession) -> Response:
    """The confirmed merge: MergeProfiles of the other profile (`source`) into this one, then
    the survivor's page; each refusal of the contract is told on the form."""
    # A read key never sees the form; a forged post gets 403 all the same.
    require_admin(session, "merge profiles")
    console = console_of(request)
    profile_id = request.path_params["profile_id"]
    form = await small_form(request)
    request_id = str(form.get("request_id", ""))[:64] or str(uuid.uuid4())
    source_id = canonical_uuid(str(form.get("source", "")))
    allow_alias = form.get("allow_alias") == "yes"
    this = await _profile_or_none(console, session, profile_id)
    if this is None:
        return _no_such_profile(request, session, profile_id)
    target = this.profile
    canonical = target.summary.profile_id
    # The other profile as it is now: None when erased since (or no profile ID was posted).
    now = await _profile_or_none(console, session, source_id) if source_id else None
    source = now.profile if now is not None else None
    if not tokens_match(session.csrf_token, str(form.get("csrf_token", ""))):
        if source is not None and source.summary.profile_id != canonical:
            return _merge_confirmation(
                request,
                session,
                target,
                source,
                request_id=request_id,
                refused=present.MERGE_FORM_EXPIRED,
                allow_alias=allow_alias,
                status=403,
            )
        return _merge_choice(
            request, session, target, refused=present.MERGE_FORM_EXPIRED, status=403
        )
    if canonical != profile_id:
        # This profile was merged into another since the confirmation: that one is shown.
        return _merge_choice(
            request,
            session,
            target,
            refused=present.MERGE_TARGET_MOVED,
            survivor=canonical,
            status=409,
        )
    if source is None:
        if not source_id:  # a form that names no profile: never the console's own
            return _merge_choice(request, session, target, refused=present.MERGE_EMPTY, status=400)
        return _merge_choice(
            request, session, target, refused=present.MERGE_SOURCE_GONE, status=409
        )
    now_id = source.summary.profile_id
    if now_id not in (source_id, canonical):
        # Merged into a third profile since it was shown: merging it now would merge that
        # one, someone the operator did not confirm. (Merged into this one, it is this form
        # sent twice, or a merge by someone else: the service tells which.)
        return _merge_confirmation(
            request,
            session,
            target,
            source,
            request_id=str(uuid.uuid4()),
            refused=present.MERGE_SOURCE_MOVED,
            survivor=now_id,
            status=409,
        )
    try:
        reply = await console.backend.call(
            session.key,
            "identity",
            "MergeProfiles",
            # Exact: the two profiles confirmed above, never the survivor of a merge since (a
            # login between the reads above and this call would otherwise merge someone else).
            identity_pb.MergeProfilesRequest(
                source_profile_id=source_id,
                target_profile_id=canonical,
                allow_custom_id_conflict=allow_alias,
                request_id=request_id,
                exact=True,
            ),
        )
    except NotFound:
        # One of the two was erased between the reads above and the merge.
        if await _profile_or_none(console, session, canonical) is None:
            return _no_such_profile(request, session, profile_id)
        return _merge_choice(
            request, session, target, refused=present.MERGE_SOURCE_GONE, status=409
        )
    except BadInput as refused:
        if refused.reason == "PROFILE_MERGED":
            return await _merged_since(request, session, target, source_id, refused.metadata)
        if refused.reason == "MERGE_INTO_ITSELF":
            return _merge_choice(
                request,
                session,
                target,
                refused=present.MERGE_SAME.format(source_id),
                status=409,
            )
        words = {
            "CUSTOM_ID_CONFLICT": present.MERGE_CONFLICT.format(
                present.shorten(source.summary.custom_id)
            ),
            "CONCURRENT_CHANGE": present.MERGE_RACE,
            "REQUEST_ID_REUSED": present.MERGE_REQUEST_REUSED,
        }.get(refused.reason)
        if words is None:
            raise
        if now_id == canonical:
            return _merge_choice(
                request,
                session,
                target,
                refused=present.MERGE_ALREADY.format(source_id),
                status=409,
            )
        return _merge_confirmation(
            request,
            session,
            target,
            source,
            # A reused key is spent: the next confirmation sends a new one.
            request_id=str(uuid.uuid4()) if refused.reason == "REQUEST_ID_REUSED" else request_id,
            refused=words,
            allow_alias=allow_alias,
            status=409,
        )
    if reply.already_merged:
        # Not this form's merge (that one would be answered as it was): someone merged them.
        return _merge_choice(
            request,
            session,
            target,
            done=present.MERGE_ALREADY_ONE.format(reply.source_profile_id),
        )
    log.info(
        "console_merge",
        source_profile_id=reply.source_profile_id,
        target_profile_id=reply.target_profile_id,
        change_id=reply.change_id,
    )
    return RedirectResponse(
        f"/profiles/{reply.target_profile_id}?" + urlencode({"merged": reply.source_profile_id}),
        status_code=303,
    )


async def _merged_since(
    request: Request,
    session: ConsoleSession,
    target: Any,
    source_id: str,
    metadata: dict[str, str],
) -> Response:
    """The service's PROFILE_MERGED refusal of an exact merge: one of the two was merged into
    another profile (`metadata["survivor"]`) after the reads before the call; nothing merged.
    Told as the same moves found by those reads are."""
    console = console_of(request)
    canonical = target.summary.profile_id
    survivor = canonical_uuid(metadata.get("survivor", ""))
    # The survivor as it is now (merged on since, it answers its own survivor).
    moved = await _profile_or_none(console, session, survivor) if survivor else None
    if metadata.get("field") == "target_profile_id":
        # This profile is that survivor's now: its merge form is shown, as on the check above.
        if moved is None:  # erased since, with its tombstones: this one too
            return _no_such_profile(request, session, canonical)
        return _merge_choice(
            request,
            session,
            moved.profile,
            refused=present.MERGE_TARGET_MOVED,
            survivor=moved.profile.summary.profile_id,
            status=409,
        )
    if moved is None:
        return _merge_choice(
            request, session, target, refused=present.MERGE_SOURCE_GONE, status=409
        )
    if moved.profile.summary.profile_id == canonical:
        # Merged into this one by someone else meanwhile: the two are one already.
        return _merge_choice(
            request, session, target, done=present.MERGE_ALREADY_ONE.format(source_id)
        )
    # Merged into a third profile: someone else, shown for a new confirmation with a new key
    # (and no consent to an alias carried over to them).
    return _merge_confirmation(
        request,
        session,
        target,
        moved.profile,
        request_id=str(uuid.uuid4()),
        refused=present.MERGE_SOURCE_MOVED,
        survivor=moved.profile.summary.profile_id,
        status=409,
    )


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def _camel(name: str) -> str:
    head, *tail = name.split("_")
    return head + "".join(part.title() for part in tail)


# -- live feeds (server-sent events) --------------------------------------------------------------


def sse(data: dict[str, Any], *, event: str = "message", event_id: str = "") -> bytes:
    lines = [f"event: {event}"]
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def live_item(item: Any) -> dict[str, Any] | None:
    """A WatchProfileResponse as the JSON the page renders (as text, never as HTML).

    Only items with a "title" are entries of the live feed. An attribute or subscription change
    is the new state an event of the same notice caused, and that event is in the feed already
    (as the timeline shows it after a reload): the state updates the page's Attributes and
    Subscriptions instead of showing the change twice."""
    kind = item.WhichOneof("item")
    if kind == "started":
        return {"kind": "started"}
    if kind == "event":
        return event_json(item.event)
    if kind == "attribute_change":
        change = item.attribute_change
        return {
            "kind": "attribute",
            "name": change.name,
            "native": change.native,
            "label": present.NATIVE_LABELS.get(change.name, change.name),
            "removed": not change.HasField("value"),
            "type": present.value_type(change.value),
            "value": present.attribute_value(change.value),
            "time": present.when(change.update_time),
        }
    if kind == "subscription_change":
        change = item.subscription_change
        return {
            "kind": "consent",
            "channel": present.CHANNELS.get(change.channel, "?"),
            "channel_kind": present.KINDS.get(change.kind, "?"),
            "state": "subscribed" if change.subscribed else "unsubscribed",
            "time": present.when(change.change_time),
        }
    if kind == "identity_change":
        return identity_json(item.identity_change)
    if kind == "segment_change":
        change = item.segment_change
        verb = "Entered" if change.transition == 1 else "Left"
        return {"kind": "segment", "title": f"{verb} {change.display_name}",
                "time": present.when(change.change_time)}  # fmt: skip
    if kind == "dropped":
        return {"kind": "dropped", "title": dropped_title(item.dropped.dropped_count),
                "time": present.when(item.publish_time)}  # fmt: skip
    return None


def identity_json(change: Any) -> dict[str, Any]:
    """A live merge or split as the timeline shows it after a reload: the timeline's event of
    the change (its ID, time, title, profiles, installations and alias)."""
    event = timeline_pb.TimelineEvent(
        event_id=change.change_id,
        kind=(
            timeline_pb.TIMELINE_EVENT_KIND_MERGE
            if change.kind == profile_pb.IDENTITY_CHANGE_KIND_MERGE
            else timeline_pb.TIMELINE_EVENT_KIND_SPLIT
        ),
        # As the timeline names a split's installation (query's `identity_change_to_event`).
        installation_id=(
            change.installation_ids[0]
            if change.kind == profile_pb.IDENTITY_CHANGE_KIND_SPLIT and change.installation_ids
            else ""
        ),
        identity_change=change,
    )
    event.event_time.CopyFrom(change.change_time)
    return {**event_json(event), "kind": "identity"}


def identity_notice(change: Any, here: str) -> str:
    """What a merge into this profile or a split of one of its installations leaves stale on
    its page (the figures live items do not update), said beside a link to reload it."""
    if change.kind == profile_pb.IDENTITY_CHANGE_KIND_MERGE:
        return (
            f"Profile {change.source_profile_id[:8]} was merged into this one: its devices,"
            " sessions, counters and earlier events, and the merge history, show here after a"
            " reload."
        )
    moved = "left this profile" if change.source_profile_id == here else "joined this profile"
    return (
        f"An installation {moved}: the devices, sessions, counters and split history as they"
        " are now show after a reload."
    )


async def merged_into(console: Console, session: ConsoleSession, survivor: str) -> bytes:
    """The end of a live feed whose profile was merged away: the survivor's ID and the name its
    page is headed by (its short ID when the service cannot say), for the page's notice. The
    upstream stream follows the survivor from there; the page shows no more of it as its own."""
    survivor = canonical_uuid(survivor) or survivor
    name = f"profile {survivor[:8]}"
    with contextlib.suppress(ServiceDown, SignedOut, Forbidden):
        reply = await _profile_or_none(console, session, survivor)
        if reply is not None:
            summary = reply.profile.summary
            survivor = summary.profile_id
            name = present.display_name(
                summary.first_name, summary.last_name, summary.custom_id, summary.profile_id
            )
    return sse({"reason": "merged", "profile_id": survivor, "name": name}, event="ended")


def dropped_title(count: int) -> str:
    """What a gap in a live feed says: a count when the service knows it, else (0: the bus was
    away for a while, and how much was missed is unknown) that some may be missing."""
    if count == 0:
        return "Live updates were interrupted and some may be missing; refresh to see everything"
    return f"{present.count_of(count, 'live item', 'was', 'were')} lost; refresh to see everything"


def event_json(event: Any) -> dict[str, Any]:
    return {
        "kind": "event",
        "event_id": event.event_id,
        "title": present.event_title(event),
        "time": present.when(event.event_time),
        "iso": present.iso(event.event_time),
        "details": present.event_details(event),
        "origin": present.event_origin(event),
        "stack_trace": present.stack_trace(event),
    }


def live_stream(handler: Handler) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """`signed_in` for a live feed: an EventSource cannot read a redirect or an error page (it
    closes for good on any answer that is not a stream), so every refusal is a stream of one
    `ended` item whose reason the page tells: signed_out, gone (no such profile: erased),
    forbidden, or unavailable (the page retries)."""

    async def wrapped(request: Request) -> Response:
        console = console_of(request)
        cookie = request.cookies.get(COOKIE, "")
        session = await console.sessions.get(cookie)
        if session is None:
            return _ended_stream(await signed_out_item(console, cookie))
        try:
            return await handler(request, session)
        except SignedOut:
            await console.sessions.end(session.session_id, KEY_REFUSED)
            return _ended_stream(await signed_out_item(console, cookie, session))
        except (NotFound, BadInput):
            return _ended_stream("gone")
        except Forbidden:
            return _ended_stream("forbidden")
        except ServiceDown:
            return _ended_stream("unavailable")

    return wrapped


def _ended_stream(reason: str | dict[str, str]) -> Response:
    item = reason if isinstance(reason, dict) else {"reason": reason}
    return StreamingResponse(
        iter([b"retry: 2000\n\n", sse(item, event="ended")]),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store"},
    )


# What a live feed's status line says after "Live updates stopped: " when its session ended,
# by why (sessions.SessionEnding), as the sign-in page says it of a full page (SESSION_ENDED).
LIVE_SIGNED_OUT = {
    EXPIRED: "your session expired.",
    KEY_REFUSED: "the key you signed in with is no longer valid (revoked or unknown).",
    SIGNED_OUT: "you signed out in another tab or window.",
}
SIGN_IN_AGAIN = {"link": "Sign in again", "to": "signin"}


def _a_role(role: str) -> str:
    return f"an {role} key" if role[:1] in "aeiou" else f"a {role} key"


async def signed_out_item(
    console: Console, session_id: str, session: ConsoleSession | None = None
) -> dict[str, str]:
    """The `ended` item of a live feed whose session no longer holds: why (the reason its
    end left in the store), what the page says, and the way on (`to`: sign in again, reload
    the page with the session that replaced it, or open the overview of another project).
    `session`, when the feed knows it, is the session as it was: signing in again with a
    key of another role or project is told so."""
    ending = await console.sessions.ending(session_id)
    item = {"reason": "signed_out", "why": ending.why, **SIGN_IN_AGAIN}
    if ending.why != SIGNED_IN_AGAIN:
        item["text"] = LIVE_SIGNED_OUT.get(ending.why, "you are signed out.")
        return item
    text = "you signed in again in another tab or window"
    if session is not None and ending.project_id and ending.project_id != session.project_id:
        item |= {"text": text + ", with a key of another project.", "link": "Open the overview"}
        item["to"] = "overview"
        return item
    if session is not None and ending.role and ending.role != session.role:
        text += f", with {_a_role(ending.role)} (this page was opened with {_a_role(session.role)})"
    return item | {"text": text + ".", "link": "Reload this page", "to": "here"}


class SessionGuard:
    """Ends a live feed once its session does: signed out (in any tab), expired, or its key
    revoked. The session is re-read from the store at every check (every
    LiveChecks.session_seconds and before each delivery), the key re-tried with `check` (a
    cheap call the feed's page needs) every LiveChecks.key_seconds: the upstream stream may run
    on another tab's key, and a service does not refuse a stream already open."""

    def __init__(
        self, console: Console, session: ConsoleSession, check: Callable[[], Awaitable[Any]]
    ) -> None:
        self._console = console
        self._session = session
        self._check = check
        self._key_seconds = console.live_checks.key_seconds
        self._next_key_check = asyncio.get_running_loop().time() + self._key_seconds

    async def ended(self) -> dict[str, str] | None:
        """The `ended` item of a feed that must end (its reason "signed_out", with why, or
        "forbidden", "gone"), or None while it may go on."""
        session_id = self._session.session_id
        if not await self._console.sessions.alive(session_id):
            return await signed_out_item(self._console, session_id, self._session)
        now = asyncio.get_running_loop().time()
        if now < self._next_key_check:
            return None
        self._next_key_check = now + self._key_seconds
        try:
            await self._check()
        except SignedOut:
            await self._console.sessions.end(session_id, KEY_REFUSED)
            return await signed_out_item(self._console, session_id, self._session)
        except Forbidden:
            return {"reason": "forbidden"}
        except NotFound:
            return {"reason": "gone"}
        except (ServiceDown, BadInput):
            pass  # a service slow for a moment: the next check tries again
        return None


def live_cursor(version: int, received: datetime | None) -> str:
    """A live feed's position, sent as each item's SSE id (the browser's Last-Event-ID): the
    profile's version after the last item delivered, and the newest receive time of the events
    delivered (a time as the service's clock read it)."""
    return f"{version}~{received.isoformat() if received else ''}"


def parse_live_cursor(text: str) -> tuple[int, datetime | None]:
    """A cursor of `live_cursor` (an ISO time alone counts as version 0: a re-read from it)."""
    version, _, moment = text.rpartition("~")
    return (int(version) if version.isdigit() else 0), _parse_iso(moment) if moment else None


async def missed_events(
    console: Console, session: ConsoleSession, profile_id: str, since: datetime
) -> tuple[list[Any], bool]:
    """The events received since `since` (less RESYNC_MARGIN for clocks and storage lag),
    oldest event time first, and whether that is all of them.

    ListEvents orders by event time, not arrival, and an event received during a gap can be
    30 days older than any shown (a device sending late): the re-read walks the timeline down
    to there and keeps what arrived since. At most RESYNC_PAGES pages; past them the page is
    told some may be missing."""
    received_since = since - RESYNC_MARGIN
    request = query_pb.ListEventsRequest(profile_id=profile_id, page_size=RESYNC_PAGE_SIZE)
    set_timestamp(request.start_time, received_since - TRACKED_MAX_AGE)
    found: list[Any] = []
    for _ in range(RESYNC_PAGES):
        reply = await console.backend.call(session.key, "query", "ListEvents", request)
        found += [
            e for e in reply.events if (present.ts(e.receive_time) or since) >= received_since
        ]
        if not reply.next_page_token:
            found.sort(key=lambda e: (e.event_time.seconds, e.event_time.nanos))
            return found, True
        request.page_token = reply.next_page_token
    found.sort(key=lambda e: (e.event_time.seconds, e.event_time.nanos))
    return found, False


@live_stream
async def profile_live(request: Request, session: ConsoleSession) -> Response:
    console = console_of(request)
    profile_id = request.path_params["profile_id"]
    version, received = parse_live_cursor(
        request.headers.get("last-event-id") or request.query_params.get("since", "")
    )

    async def check() -> Any:
        return await console.backend.call(
            session.key,
            "query",
            "ListEvents",
            query_pb.ListEventsRequest(profile_id=profile_id, page_size=1),
        )

    # Checks the person may read the profile (the shared upstream may run on another key).
    await check()
    guard = SessionGuard(console, session, check)

    here = canonical_uuid(profile_id)

    async def stream() -> AsyncIterator[bytes]:
        nonlocal version, received
        yield b"retry: 2000\n\n"
        async with console.hub.follow(session.key, session.project_id, profile_id) as queue:
            if queue is None:
                yield sse({}, event="paused")
                return
            # Subscribed first, then the re-read: whatever arrives meanwhile is in the queue,
            # and the page drops what it already shows by event ID. The re-read waits for the
            # upstream watch to be live (its `started`, which every follower gets, with the
            # profile's version then): an event stored after the re-read but before query
            # subscribed would reach neither (seen under load).
            early: list[Any] = []
            while not early or not _opens_or_ends(early[-1]):
                early.append(await queue.get())
            started = early[-1]
            if not isinstance(started, Ended) and canonical_uuid(started.profile_id) != here:
                # Merged away while the page was not following (the stream resolved the ID to
                # its survivor): none of the survivor's items are this page's.
                yield await merged_into(console, session, started.profile_id)
                return
            # Nothing was written since the cursor's version: nothing to re-read.
            if received is not None and not isinstance(started, Ended):
                if not version or started.version > version:
                    try:
                        missed, complete = await missed_events(
                            console, session, profile_id, received
                        )
                    except ServiceDown:
                        yield sse({"reason": "unavailable"}, event="ended")
                        return
                    except NotFound:
                        yield sse({"reason": "gone"}, event="ended")
                        return
                    for event in missed:
                        received = max(received, present.ts(event.receive_time) or received)
                        yield sse(event_json(event), event_id=live_cursor(version, received))
                    if not complete:
                        gap = {"kind": "dropped", "title": "Some events stored while live"
                               " updates were away may be missing here; refresh to see them all",
                               "time": present.when(datetime.now(UTC))}  # fmt: skip
                        yield sse(gap, event_id=live_cursor(version, received))
                version = max(version, started.version)
            quiet_since = asyncio.get_running_loop().time()
            while True:
                item: Any = None
                if early:
                    item = early.pop(0)
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(console.live_checks.session_seconds):
                            item = await queue.get()
                ended = await guard.ended()
                if ended:
                    yield sse(ended, event="ended")
                    return
                now = asyncio.get_running_loop().time()
                if item is None:
                    if now - quiet_since >= HEARTBEAT_SECONDS:
                        quiet_since = now
                        yield b": heartbeat\n\n"
                    continue
                if isinstance(item, Ended):
                    yield sse({"reason": item.reason}, event="ended")
                    return
                moved = item.profile_id and canonical_uuid(item.profile_id) != here
                if item.WhichOneof("item") == "event":
                    item.event.CopyFrom(
                        await with_stack_trace(console, session, profile_id, item.event)
                    )
                live = None if moved and not _merged_away(item, here) else live_item(item)
                if live is not None and live["kind"] == "identity" and not moved:
                    live["notice"] = identity_notice(item.identity_change, here)
                if moved:
                    # This profile was merged away: its merge is its page's last item, and the
                    # stream, which follows the survivor from here, ends for this page.
                    if live is not None:
                        yield sse(live, event_id=live_cursor(version, received))
                    yield await merged_into(console, session, item.profile_id)
                    return
                if live is None:
                    continue
                quiet_since = now
                if live["kind"] == "started":
                    yield sse(live, event="started", event_id=live_cursor(version, received))
                    continue
                if live["kind"] == "event":
                    moment = present.ts(item.event.receive_time)
                    if moment is not None:
                        received = max(received, moment) if received else moment
                if item.version:
                    version = max(version, item.version)
                yield sse(live, event_id=live_cursor(version, received))

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


async def with_stack_trace(
    console: Console, session: ConsoleSession, profile_id: str, event: Any
) -> Any:
    """A live crash with its stack trace, as the timeline shows it: the live notice leaves the
    trace out (it may be large), the stored event has it. The event as it came when the
    service cannot say."""
    if event.WhichOneof("details") != "crash" or event.crash.stack_trace:
        return event
    moment = present.ts(event.event_time)
    if moment is None:
        return event
    request = query_pb.ListEventsRequest(
        profile_id=profile_id, page_size=50, kinds=[timeline_pb.TIMELINE_EVENT_KIND_CRASH]
    )
    set_timestamp(request.start_time, moment - timedelta(milliseconds=1))
    set_timestamp(request.end_time, moment + timedelta(milliseconds=1))
    try:
        reply = await console.backend.call(session.key, "query", "ListEvents", request)
    except (ServiceDown, BadInput, NotFound):
        return event
    return next((e for e in reply.events if e.event_id == event.event_id), event)


def _merged_away(item: Any, here: str) -> bool:
    """Whether a live item is the merge of the page's profile into another."""
    if item.WhichOneof("item") != "identity_change":
        return False
    change = item.identity_change
    return (
        change.kind == profile_pb.IDENTITY_CHANGE_KIND_MERGE
        and canonical_uuid(change.source_profile_id) == here
    )


def _opens_or_ends(item: Any) -> bool:
    """The upstream watch's `started` (it is live) or the end of the feed."""
    return isinstance(item, Ended) or item.WhichOneof("item") == "started"


def _parse_iso(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- segments and funnels -------------------------------------------------------------------------


@signed_in
async def segments_page(request: Request, session: ConsoleSession) -> Response:
    console = console_of(request)
    segments, funnels = await both(
        console.backend.call(
            session.key, "segments", "ListSegments", segments_pb.ListSegmentsRequest(page_size=100)
        ),
        console.backend.call(
            session.key, "segments", "ListFunnels", segments_pb.ListFunnelsRequest(page_size=100)
        ),
    )
    created = present.created_notice(
        request.query_params.get("created", ""), segments.segments, funnels.funnels
    )
    # A definition just saved, found as a created one is (an altered link announces nothing).
    edited = present.created_notice(
        request.query_params.get("edited", ""), segments.segments, funnels.funnels
    )
    deleted = request.query_params.get("deleted", "")
    # The live table's segment (the users table's form of the parameter): WatchSegmentChanges
    # streams that segment's changes only. One the project does not have is named, not hidden.
    typed = request.query_params.get("segment", "")
    live = present.live_segment(typed, segments.segments)
    unknown_segment = present.shorten(typed) if typed and live is None else ""
    source = "/live/segments" + (f"?{urlencode({'segment': live.value})}" if live else "")
    return render(
        request,
        "segments.html",
        {
            "created": created,
            "edited": edited,
            "deleted": present.DELETED.get(deleted, ""),
            "segments": segments.segments,
            "funnels": [
                (
                    funnel,
                    present.funnel_figures(
                        [step.event_name for step in funnel.steps], funnel.reached_profile_counts
                    ),
                    present.conversion_window(funnel.conversion_window),
                )
                for funnel in funnels.funnels
            ],
            "live": live,
            "live_source": source,
            "unknown_segment": unknown_segment,
        },
        session=session,
    )


# -- the profiles behind a funnel step ----------------------------------------------------------

# A funnel step's list of people: rows per page (the users table's), and ListFunnelProfiles'
# page size for its CSV (GetProfileRows names as many at once).
FUNNEL_PEOPLE_PAGE_SIZE = USERS_PAGE_SIZE
FUNNEL_CSV_PAGE_SIZE = 500
# The CSV's columns: the profile, when its best attempt completed the step and when that
# attempt's window closes, then the users table's (its profile_id left out: it leads).
FUNNEL_CSV_COLUMNS = (
    "profile_id",
    "step_complete_time_utc",
    "attempt_deadline_utc",
    *definitions.CSV_COLUMNS[1:],
)
# What a list says instead of a page its link no longer leads to.
FUNNEL_TOKEN_REFUSED = {
    "PAGE_INVALID": "This page link is not one of this list's: showing its first page.",
    "FUNNEL_CHANGED": (
        "The funnel's steps or conversion window changed since this list's first page:"
        " showing the first page by the funnel as it is now."
    ),
}


@dataclass(frozen=True, slots=True)
class FunnelStepChoice:
    """A funnel step's list as its URL names it: the funnel (GetFunnel's, with its counts),
    the step (from 1) and which people ("reached" or "dropped")."""

    funnel: Any
    step: int
    people: str

    def request_fields(self) -> dict[str, Any]:
        return {
            "funnel_id": self.funnel.funnel_id,
            "step_number": self.step,
            "selection": present.FUNNEL_PEOPLE[self.people],
        }

    def query_string(self, **more: str) -> str:
        state = {"step": str(self.step), "people": self.people, **more}
        return urlencode({k: v for k, v in state.items() if v})


async def _funnel_step_choice(
    request: Request, session: ConsoleSession, notices: list[str]
) -> FunnelStepChoice:
    """The list the URL names. A step the funnel has not, or a drop-off after its last step,
    gives way to a list it has, and the page says so; a funnel ID that is no funnel's is the
    missing page."""
    console = console_of(request)
    ident = request.path_params["ident"]
    try:
        reply = await console.backend.call(
            session.key, "segments", "GetFunnel", segments_pb.GetFunnelRequest(funnel_id=ident)
        )
    except BadInput:
        raise NotFound(ident) from None  # not a UUID: no funnel has it
    funnel = reply.funnel
    params = request.query_params
    text = params.get("step", "")
    step = int(text) if text.isdigit() and len(text) < 4 else 0
    if not text:
        step = 1
    elif not 1 <= step <= len(funnel.steps):
        notices.append(f"No step “{present.shorten(text)}” in this funnel: showing step 1.")
        step = 1
    people = _known(
        params, "people", present.FUNNEL_PEOPLE, "reached", "showing who reached the step", notices
    )
    if people == "dropped" and step == len(funnel.steps):
        notices.append(
            "Nobody drops off after the last step (whoever reached it converted):"
            " showing who reached it."
        )
        people = "reached"
    return FunnelStepChoice(funnel, step, people)


async def _users_of(
    console: Console, session: ConsoleSession, profile_ids: list[str]
) -> tuple[dict[str, query_pb.ProfileRow], bool]:
    """The users table's rows of these people (GetProfileRows, as the live segment table names
    its people), and whether query answered: when it does not, the list names them by ID."""
    if not profile_ids:
        return {}, True
    try:
        reply = await console.backend.call(
            session.key,
            "query",
            "GetProfileRows",
            query_pb.GetProfileRowsRequest(profile_ids=profile_ids),
        )
    except ServiceDown:
        return {}, False
    return {row.profile_id: row for row in reply.profiles}, True


@signed_in
async def funnel_profiles_page(request: Request, session: ConsoleSession) -> Response:
    """The people behind one count of a funnel: who reached a step, or who dropped off after
    it (ListFunnelProfiles), named as the users table names them, a page at a time."""
    console = console_of(request)
    notices: list[str] = []
    choice = await _funnel_step_choice(request, session, notices)
    params = request.query_params
    page_token, trail, page_number = _paging(params)

    async def listed(token: str) -> Any:
        return await console.backend.call(
            session.key,
            "segments",
            "ListFunnelProfiles",
            segments_pb.ListFunnelProfilesRequest(
                page_size=FUNNEL_PEOPLE_PAGE_SIZE, page_token=token, **choice.request_fields()
            ),
        )

    try:
        reply = await listed(page_token)
    except BadInput as bad:
        if not page_token or bad.reason not in FUNNEL_TOKEN_REFUSED:
            raise
        # An altered link, or a funnel edited since the first page: that page again.
        notices.append(FUNNEL_TOKEN_REFUSED[bad.reason])
        page_token, trail, page_number = "", [], 1
        reply = await listed("")
    ids = [p.profile_id for p in reply.profiles]
    rows, answered = await _users_of(console, session, ids)
    if not answered:
        notices.append("The query service is not answering: people are shown by their ID.")
    users = {row.profile_id: row for row in present.user_rows(rows.values())}
    base = f"/funnels/{choice.funnel.funnel_id}/profiles"

    def link(**more: str) -> str:
        return f"{base}?{choice.query_string(**more)}"

    next_page = ""
    if reply.next_page_token:
        next_page = link(
            page_token=reply.next_page_token,
            trail=",".join([*trail, page_token or FIRST_PAGE][-TRAIL_LIMIT:]),
            page=str(page_number + 1),
        )
    previous_page = ""
    if trail:
        token = "" if trail[-1] == FIRST_PAGE else trail[-1]
        back = ",".join(trail[:-1])
        previous_page = link(page_token=token, trail=back, page=str(page_number - 1))
    counts = list(choice.funnel.reached_profile_counts)
    total = present.funnel_step_total(counts, choice.step, choice.people)
    return render(
        request,
        "funnel_profiles.html",
        {
            "funnel": choice.funnel,
            "step": choice.step,
            "people": choice.people,
            "step_count": len(choice.funnel.steps),
            "total": total,
            "rows": present.funnel_person_rows(reply.profiles, users, reply.as_of_time),
            "as_of": reply.as_of_time,
            "named": answered,
            "link": link,
            "shown": present.shown_rows(
                page_number, FUNNEL_PEOPLE_PAGE_SIZE, len(ids), total, at_least=False
            ),
            "first_page": link() if page_token else "",
            "previous_page": previous_page,
            "next_page": next_page,
            "csv_link": f"{base}.csv?{choice.query_string()}",
            "notices": notices,
        },
        session=session,
    )


@signed_in
async def funnel_profiles_csv(request: Request, session: ConsoleSession) -> Response:
    """A funnel step's list as CSV: every page of it up to the cap, one moment for all (the
    first page's), each person with the users table's columns when it lists them."""
    console = console_of(request)
    choice = await _funnel_step_choice(request, session, [])

    async def page(token: str) -> Any:
        return await console.backend.call(
            session.key,
            "segments",
            "ListFunnelProfiles",
            segments_pb.ListFunnelProfilesRequest(
                page_size=FUNNEL_CSV_PAGE_SIZE, page_token=token, **choice.request_fields()
            ),
        )

    async def cells(profiles: list[Any]) -> list[list[str]]:
        rows, _ = await _users_of(console, session, [p.profile_id for p in profiles])
        found = []
        for item in profiles:
            row = rows.get(item.profile_id)
            users = (
                []
                if row is None
                else definitions.csv_rows(
                    [row], platforms=present.PLATFORM_LABELS, segment_of=present.segment_label
                )
            )
            rest = users[0][1:] if users else [""] * (len(FUNNEL_CSV_COLUMNS) - 3)
            times = [present.iso(item.complete_time), present.iso(item.attempt_deadline_time)]
            found.append([definitions.csv_cell(item.profile_id), *times, *rest])
        return found

    # The first page before any byte is sent: a refusal or a down service is a page.
    first = await page("")

    async def body() -> AsyncIterator[bytes]:
        reply, sent = first, 0
        yield definitions.csv_text([], header=True, columns=FUNNEL_CSV_COLUMNS).encode()
        while True:
            profiles = list(reply.profiles)[: CSV_ROW_CAP - sent]
            sent += len(profiles)
            yield definitions.csv_text(await cells(profiles)).encode()
            if sent >= CSV_ROW_CAP or not reply.next_page_token:
                return
            try:
                reply = await page(reply.next_page_token)
            except (ServiceDown, BadInput, NotFound, SignedOut) as failed:
                # Mid-download: the status is sent already; the file says it stops short.
                log.warning("console_csv_cut_short", why=type(failed).__name__, rows=sent)
                yield definitions.csv_text([[definitions.CSV_CUT_SHORT]]).encode()
                return

    log.info("console_funnel_profiles_csv", people=choice.people)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = f"funnel-step{choice.step}-{choice.people}-{stamp}.csv"
    return StreamingResponse(
        body(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# -- defining and deleting segments and funnels (admin) -------------------------------------------

TAKEN = {
    "segment": "Another segment already has this name (names are compared ignoring case).",
    "funnel": "Another funnel already has this name (names are compared ignoring case).",
}
LIMIT = {
    "segment": "The project has 100 segments, the most it can hold: delete one first.",
    "funnel": "The project has 50 funnels, the most it can hold: delete one first.",
}


# The event names a segment or funnel form suggests (a <datalist> beside each event name box):
# the first page of the project's custom event names, asked with the person's key as the form
# renders. Query answers it from an index in a few milliseconds; a short deadline keeps a slow
# or absent query from holding the form, which then works without suggestions.
EVENT_NAME_SUGGESTIONS = 200
EVENT_NAMES_TIMEOUT_SECONDS = 2.0


async def _event_name_suggestions(request: Request, session: ConsoleSession) -> list[str]:
    """The first EVENT_NAME_SUGGESTIONS of the project's custom event names, in name order;
    none when the call fails (a refused key still signs the person out, as on every page)."""
    try:
        reply = await console_of(request).backend.call(
            session.key,
            "query",
            "ListEventNames",
            query_pb.ListEventNamesRequest(page_size=EVENT_NAME_SUGGESTIONS),
            deadline_s=EVENT_NAMES_TIMEOUT_SECONDS,
        )
    except (ServiceDown, BadInput, Forbidden, NotFound):
        return []
    return [name.name for name in reply.event_names]


async def _definition_page(
    request: Request,
    session: ConsoleSession,
    what: str,
    form: Any,
    request_id: str,
    refusals: definitions.Refusals | None = None,
    status: int = 200,
    *,
    previewing: bool = False,
    preview: Any = None,
    editing: Any = None,
    editable: bool = True,
    etag: str = "",
    moves: tuple[int, int] | None = None,
    stale: bool = False,
    from_users: definitions.FromUsers | None = None,
    users_query: str = "",
) -> Response:
    """The form as typed, with the service's refusals beside their boxes, or with what it
    would create now (`preview`: the Segment or Funnel a validate_only call answered). With
    `editing` (the stored Segment or Funnel), the same form edits it: `editable` says whether
    it holds its conditions (steps), `etag` is the version shown, a preview of a segment
    tells `moves`, the profiles that would enter and leave, and `stale` says the definition
    changed since the page was shown."""
    figures = []
    if preview is not None and what == "funnel":
        figures = present.funnel_figures(
            [step.event_name for step in preview.steps], preview.reached_profile_counts
        )
    return render(
        request,
        f"{what}_form.html",
        {
            "form": form,
            "event_names": await _event_name_suggestions(request, session),
            "request_id": request_id,
            "refused": (refusals or definitions.Refusals()).boxes,
            "csrf_token": session.csrf_token,
            "d": definitions,
            "previewing": previewing,
            "preview": preview,
            "preview_figures": figures,
            "editing": editing,
            "editable": editable,
            "etag": etag,
            "moves": moves,
            "stale": stale,
            "from_users": from_users,
            "users_query": users_query,
        },
        session=session,
        status=status,
    )


# The most of a users table's query string a new-segment form posts back (hidden): its ten
# filters, each far shorter.
MAX_USERS_QUERY = 8192
# The users table's parameters that "Save as segment" carries to the new-segment form: its
# filters (not its sort, page or page size).
USERS_FILTER_PARAMETERS = (
    "tab",
    "segment",
    "platform",
    "name",
    "language",
    "country",
    "reach",
    "id",
    "custom_id",
    "email",
)


async def _from_users(
    request: Request, session: ConsoleSession, users_query: str
) -> definitions.FromUsers:
    """The new-segment form filled from the users table's filters in `users_query` (its query
    string): the conditions carried over and the filters left, read as the users table reads
    them. A custom segment filter is read with GetSegment, its conditions copied."""
    params = QueryParams(users_query)
    filters = _users_filters(request, [], params)
    custom = None
    kind, _, segment_id = filters["segment"].partition(":")
    if kind == "custom":
        try:
            custom = await _definition_named(console_of(request), session, "segment", segment_id)
        except (NotFound, BadInput):
            custom = None  # deleted since (or never one): the form says it is not carried
    return definitions.segment_form_from_users(
        definitions.UsersFilters(
            tab=filters["tab"],
            segment=filters["segment"],
            platform=filters["platform"],
            country=filters["country"],
            language=filters["language"],
            reach=filters["reach"],
            id_prefix=filters["id_prefix"],
            custom_id=filters["custom_id"],
            email=filters["email"],
            name=filters["name"],
        ),
        custom,
    )


def users_filter_query(params: Mapping[str, str]) -> str:
    """The users table's filters of `params` as a query string (see USERS_FILTER_PARAMETERS)."""
    return urlencode({k: params[k] for k in USERS_FILTER_PARAMETERS if params.get(k)})


@signed_in
async def segment_new_form(request: Request, session: ConsoleSession) -> Response:
    """The new-segment form; `from=users` (the users table's "Save as segment") fills it
    with conditions equivalent to the table's filters, also given in the query string, and
    names those it cannot carry over."""
    require_admin(session, "define a segment")
    form = definitions.SegmentForm()
    from_users, users_query = None, ""
    if request.query_params.get("from") == "users":
        users_query = users_filter_query(request.query_params)
        from_users = await _from_users(request, session, users_query)
        form = from_users.form
    return await _definition_page(
        request,
        session,
        "segment",
        form,
        str(uuid.uuid4()),
        from_users=from_users,
        users_query=users_query,
    )


@signed_in
async def funnel_new_form(request: Request, session: ConsoleSession) -> Response:
    require_admin(session, "define a funnel")
    return await _definition_page(
        request, session, "funnel", definitions.FunnelForm(), str(uuid.uuid4())
    )


async def _definition_post(request: Request, session: ConsoleSession, what: str) -> Response:
    """The segment or funnel form posted: a row added or removed (the page again, as typed),
    a preview (the form again, with what the service would create now: CreateSegment or
    CreateFunnel with validate_only, which stores nothing), or the definition created (the
    segments page) or refused (the form, each refusal beside its box)."""
    require_admin(session, f"define a {what}")
    # No file; the fields of the largest form (31 conditions) are under Starlette's 1,000.
    posted = await request.form(max_files=0)

    def get(name: str) -> list[str]:
        return [str(value) for value in posted.getlist(name)]

    request_id = str(posted.get("request_id", ""))[:64] or str(uuid.uuid4())
    action = str(posted.get("action", "create"))
    form: Any
    if what == "segment":
        form = definitions.read_segment_form(get)
        rows = len(form.conditions)
    else:
        form = definitions.read_funnel_form(get)
        rows = len(form.steps)
    # A form filled from the users table (hidden: its filters' query string) goes on naming
    # what was not carried over, whatever is added, removed or previewed.
    users_query = ""
    if what == "segment":
        users_query = users_filter_query(
            QueryParams(str(posted.get("from_users", ""))[:MAX_USERS_QUERY])
        )
    from_users = await _from_users(request, session, users_query) if users_query else None

    async def page(form: Any, *args: Any, **kwargs: Any) -> Response:
        return await _definition_page(
            request,
            session,
            what,
            form,
            request_id,
            *args,
            from_users=from_users,
            users_query=users_query,
            **kwargs,
        )

    if not tokens_match(session.csrf_token, str(posted.get("csrf_token", ""))):
        expired = definitions.Refusals({"": present.FORM_EXPIRED_KEPT})
        return await page(form, expired, status=403)
    if action == "add":
        form = definitions.add_condition(form) if what == "segment" else definitions.add_step(form)
        return await page(form)
    if action.startswith("remove-") and action[7:].isdigit():
        index = int(action[7:])
        if what == "segment":
            form = definitions.remove_condition(form, index)
        else:
            form = definitions.remove_step(form, index)
        return await page(form)
    built: Any
    if what == "segment":
        built, refusals = definitions.segment_request(form, request_id)
    else:
        built, refusals = definitions.funnel_request(form, request_id)
    previewing = action == "preview"
    if refusals:
        return await page(form, refusals, status=400, previewing=previewing)
    method = "CreateSegment" if what == "segment" else "CreateFunnel"
    # A preview is the same request, checked and counted by the service but not stored: its
    # refusals are a creation's, told the same way. The request_id is kept for the creation.
    built.validate_only = previewing
    try:
        reply = await console_of(request).backend.call(
            session.key, "segments", method, built, deadline_s=DEFINITION_WRITE_TIMEOUT_SECONDS
        )
    except BadInput as bad:
        if bad.reason == "DISPLAY_NAME_TAKEN":
            refusals = definitions.Refusals({"name": TAKEN[what]})
        elif bad.reason == "DEFINITION_LIMIT_REACHED":
            refusals = definitions.Refusals({"": LIMIT[what]})
        elif what == "segment":
            refusals = definitions.segment_refusals(bad.violations, rows)
        else:
            refusals = definitions.funnel_refusals(bad.violations, rows)
        if not refusals:
            refusals = definitions.Refusals({"": present.problem_text(bad)})
        return await page(form, refusals, status=400, previewing=previewing)
    if previewing:
        preview = reply.segment if what == "segment" else reply.funnel
        return await page(form, preview=preview)
    created = reply.segment.segment_id if what == "segment" else reply.funnel.funnel_id
    log.info("console_definition_created", kind=what, id=created)
    return RedirectResponse(f"/segments?created={what}:{created}", status_code=303)


@signed_in
async def segment_create(request: Request, session: ConsoleSession) -> Response:
    return await _definition_post(request, session, "segment")


@signed_in
async def funnel_create(request: Request, session: ConsoleSession) -> Response:
    return await _definition_post(request, session, "funnel")


# An update refused because the definition changed since its form was shown (ETAG_MISMATCH).
CHANGED = {
    "segment": "Someone changed this segment since this page was shown: nothing was saved.",
    "funnel": "Someone changed this funnel since this page was shown: nothing was saved.",
}


async def _definition_edit(request: Request, session: ConsoleSession, what: str) -> Response:
    """A segment's or funnel's form filled with its definition (GET), and that form posted: a
    row added or removed (the page again, as typed), a preview (UpdateSegment or UpdateFunnel
    with validate_only: what the change would leave, a segment's entries and exits, nothing
    stored), or the change saved (the segments page) or refused (the form, each refusal
    beside its box). The form carries the etag of the definition it showed: a definition
    changed by someone else since is not overwritten. A filter (steps) the form cannot hold
    is shown, not edited, and never sent."""
    require_admin(session, f"change a {what}")
    console = console_of(request)
    ident = request.path_params["ident"]
    try:
        stored = await _definition_named(console, session, what, ident)
    except BadInput:
        raise NotFound(ident) from None
    initial: Any
    if what == "segment":
        initial, editable = definitions.segment_form_of(stored)
    else:
        initial, editable = definitions.funnel_form_of(stored)

    async def page(form: Any, etag: str, **extra: Any) -> Response:
        return await _definition_page(
            request, session, what, form, "", editing=stored, editable=editable, etag=etag, **extra
        )

    if request.method == "GET":
        return await page(initial, stored.etag)
    # No file; the fields of the largest form (31 conditions) are under Starlette's 1,000.
    posted = await request.form(max_files=0)

    def get(name: str) -> list[str]:
        return [str(value) for value in posted.getlist(name)]

    etag = str(posted.get("etag", ""))[:64]
    action = str(posted.get("action", "save"))
    form: Any
    if what == "segment":
        form = definitions.read_segment_form(get)
        rows = len(form.conditions)
    else:
        form = definitions.read_funnel_form(get)
        rows = len(form.steps)
    if not editable:
        form = definitions.keep_rows(form, initial)
    if not tokens_match(session.csrf_token, str(posted.get("csrf_token", ""))):
        expired = definitions.Refusals({"": present.FORM_EXPIRED_KEPT})
        return await page(form, etag, refusals=expired, status=403)
    if action == "add" and editable:
        form = definitions.add_condition(form) if what == "segment" else definitions.add_step(form)
        return await page(form, etag)
    if action.startswith("remove-") and action[7:].isdigit() and editable:
        index = int(action[7:])
        if what == "segment":
            form = definitions.remove_condition(form, index)
        else:
            form = definitions.remove_step(form, index)
        return await page(form, etag)
    built: Any
    if what == "segment":
        built, refusals = definitions.segment_update_request(
            form, initial, filter_editable=editable, segment_id=ident, etag=etag
        )
    else:
        built, refusals = definitions.funnel_update_request(
            form, initial, steps_editable=editable, funnel_id=ident, etag=etag
        )
    previewing = action == "preview"
    if refusals:
        return await page(form, etag, refusals=refusals, status=400, previewing=previewing)
    method = "UpdateSegment" if what == "segment" else "UpdateFunnel"
    # A preview is the same request, checked and counted by the service but not stored.
    built.validate_only = previewing
    try:
        reply = await console.backend.call(
            session.key, "segments", method, built, deadline_s=DEFINITION_WRITE_TIMEOUT_SECONDS
        )
    except BadInput as bad:
        if bad.reason == "ETAG_MISMATCH":
            changed = definitions.Refusals({"": CHANGED[what]})
            return await page(form, etag, refusals=changed, status=409, stale=True)
        if bad.reason == "DISPLAY_NAME_TAKEN":
            refusals = definitions.Refusals({"name": TAKEN[what]})
        elif what == "segment":
            violations = definitions.update_violations(bad.violations, "segment")
            refusals = definitions.segment_refusals(violations, rows)
        else:
            violations = definitions.update_violations(bad.violations, "funnel")
            refusals = definitions.funnel_refusals(violations, rows)
        if not refusals:
            refusals = definitions.Refusals({"": present.problem_text(bad)})
        return await page(form, etag, refusals=refusals, status=400, previewing=previewing)
    if previewing:
        if what == "segment":
            moves = (reply.entered_profile_count, reply.left_profile_count)
            return await page(form, etag, preview=reply.segment, moves=moves)
        return await page(form, etag, preview=reply.funnel)
    log.info("console_definition_updated", kind=what, id=ident)
    return RedirectResponse(f"/segments?edited={what}:{ident}", status_code=303)


@signed_in
async def segment_edit(request: Request, session: ConsoleSession) -> Response:
    return await _definition_edit(request, session, "segment")


@signed_in
async def funnel_edit(request: Request, session: ConsoleSession) -> Response:
    return await _definition_edit(request, session, "funnel")


async def _definition_named(
    console: Console, session: ConsoleSession, what: str, ident: str
) -> Any:
    """The segment or funnel `ident` of the project (NotFound when none)."""
    if what == "segment":
        reply = await console.backend.call(
            session.key, "segments", "GetSegment", segments_pb.GetSegmentRequest(segment_id=ident)
        )
        return reply.segment
    reply = await console.backend.call(
        session.key, "segments", "GetFunnel", segments_pb.GetFunnelRequest(funnel_id=ident)
    )
    return reply.funnel


async def _definition_delete(request: Request, session: ConsoleSession, what: str) -> Response:
    require_admin(session, f"delete a {what}")
    console = console_of(request)
    ident = request.path_params["ident"]
    try:
        definition = await _definition_named(console, session, what, ident)
    except BadInput:
        raise NotFound(ident) from None
    status, refused = 200, ""
    if request.method == "POST":
        posted = await small_form(request)
        if tokens_match(session.csrf_token, str(posted.get("csrf_token", ""))):
            if what == "segment":
                call = segments_pb.DeleteSegmentRequest(segment_id=ident, allow_missing=True)
                await console.backend.call(session.key, "segments", "DeleteSegment", call)
            else:
                gone = segments_pb.DeleteFunnelRequest(funnel_id=ident, allow_missing=True)
                await console.backend.call(session.key, "segments", "DeleteFunnel", gone)
            log.info("console_definition_deleted", kind=what, id=ident)
            return RedirectResponse(f"/segments?deleted={what}", status_code=303)
        status, refused = 403, present.FORM_EXPIRED_KEPT
    return render(
        request,
        "definition_delete.html",
        {
            "what": what,
            "definition": definition,
            "csrf_token": session.csrf_token,
            "refused": refused,
        },
        session=session,
        status=status,
    )


@signed_in
async def segment_delete(request: Request, session: ConsoleSession) -> Response:
    return await _definition_delete(request, session, "segment")


@signed_in
async def funnel_delete(request: Request, session: ConsoleSession) -> Response:
    return await _definition_delete(request, session, "funnel")


# The people a segments feed has named, kept per feed up to this many (then forgotten at once:
# a feed open for hours re-reads the people it shows again).
FEED_PEOPLE_LIMIT = 2_000
# GetProfile calls of one retry, for the people the users table still does not list (merged
# away or erased since, or a table far behind): each reads a whole profile, so past this many
# a row keeps the start of its ID.
PEOPLE_LOOKUPS_PER_RETRY = 20
# GetProfileRows' limit of IDs per call.
PROFILE_ROWS_MAX = 500


@dataclass(frozen=True, slots=True)
class Person:
    """Who a row of the live table names: `label` (a name, a custom ID, "Anonymous 1a2b3c4d",
    else the start of the ID, "profile 1a2b3c4d"); `state`: "" for a live profile, "pending"
    while the users table does not list it (looked up again shortly), "merged" (into
    `merged_into`) or "erased"; `note` says that state under the label."""

    label: str
    state: str = ""
    note: str = ""
    merged_into: str = ""
    named: bool = False  # by a name or custom ID: kept for the feed's later rows

    def json(self) -> dict[str, Any]:
        return {
            "name": self.label,
            "state": self.state,
            "note": self.note,
            "merged_into": self.merged_into,
        }


def _person_of(first_name: str, last_name: str, custom_id: str, profile_id: str) -> Person:
    return Person(
        present.display_name(first_name, last_name, custom_id, profile_id),
        named=bool(first_name or last_name or custom_id),
    )


class People:
    """The people a segments feed shows beside profile IDs. A batch's new IDs are read with
    one GetProfileRows call; the IDs it does not list show the start of the ID ("profile
    1a2b3c4d", marked as not in the users table yet) and are looked up once more after
    LiveChecks.people_retry_seconds (`retry`): GetProfileRows again (the table caught up),
    then GetProfile for those still missing, which tells a profile merged away since (and into
    whom) or erased from one the table does not list yet (named from the profile itself). What
    the retry learns goes to the page as an update of the rows it shows. Names and final states
    (merged, erased) are kept; an anonymous person is asked again at their next change (they
    may have been named since). When query cannot answer, a row keeps the start of its ID."""

    def __init__(self, console: Console, key: str) -> None:
        self._console = console
        self._key = key
        self._retry_seconds = console.live_checks.people_retry_seconds
        self._known: dict[str, Person] = {}
        # The last batch's people that are not kept (anonymous, or not listed yet).
        self._batch: dict[str, Person] = {}
        # IDs to look up again, in order, with when (each retry_seconds after its row).
        self._retry: dict[str, float] = {}

    async def learn(self, profile_ids: Iterable[str], now: float) -> None:
        new = list(dict.fromkeys(i for i in profile_ids if i not in self._known))
        if not new:
            return
        if len(self._known) + len(new) > FEED_PEOPLE_LIMIT:
            self._known.clear()
        self._batch = {}
        found, missing = await self._rows(new)
        for profile_id, person in found.items():
            self._remember(profile_id, person)
        for profile_id in missing:
            self._batch[profile_id] = Person(
                present.short_profile(profile_id),
                state="pending",
                note="not in the users table yet",
            )
            self._retry.setdefault(profile_id, now + self._retry_seconds)

    def of(self, profile_id: str) -> Person:
        return (
            self._known.get(profile_id)
            or self._batch.get(profile_id)
            or Person(present.short_profile(profile_id))
        )

    def retry_in(self, now: float) -> float | None:
        """Seconds until the people not listed are due to be looked up again; None if none."""
        return min(self._retry.values()) - now if self._retry else None

    async def retry(self, now: float) -> list[tuple[str, Person]]:
        """Looks up again the people not listed whose time came; returns what each row of them
        shows now."""
        ids = [profile_id for profile_id, due in self._retry.items() if due <= now]
        for profile_id in ids:
            del self._retry[profile_id]
        asked = ids[:PROFILE_ROWS_MAX]
        listed, missing = await self._rows(asked)
        found: dict[str, Person] = {}
        for profile_id in ids:
            if profile_id in listed:
                found[profile_id] = listed[profile_id]
            elif profile_id in missing[:PEOPLE_LOOKUPS_PER_RETRY]:
                found[profile_id] = await self._profile(profile_id)
            else:
                # Past the lookups of one retry, or query not answering: the ID's start.
                found[profile_id] = Person(present.short_profile(profile_id))
        for profile_id, person in found.items():
            self._remember(profile_id, person)
        return list(found.items())

    def _remember(self, profile_id: str, person: Person) -> None:
        """Keeps a name or a final state; an anonymous live person is asked again next time."""
        if person.named or person.state in ("merged", "erased"):
            self._known[profile_id] = person
        else:
            self._batch[profile_id] = person

    async def _rows(self, profile_ids: list[str]) -> tuple[dict[str, Person], list[str]]:
        """(the people the users table lists, the IDs it does not); nobody listed nor missing
        when query cannot answer."""
        if not profile_ids:
            return {}, []
        try:
            reply = await self._console.backend.call(
                self._key,
                "query",
                "GetProfileRows",
                query_pb.GetProfileRowsRequest(profile_ids=profile_ids),
            )
        except (ServiceDown, BadInput, NotFound):
            return {}, []
        found = {
            row.profile_id: _person_of(row.first_name, row.last_name, row.custom_id, row.profile_id)
            for row in reply.profiles
        }
        return found, list(reply.missing_profile_ids)

    async def _profile(self, profile_id: str) -> Person:
        """A person the users table does not list, from GetProfile (the source tables): merged
        away (the survivor answers for the ID), erased (no profile), or live and not in the
        table yet."""
        short = present.short_profile(profile_id)
        try:
            reply = await self._console.backend.call(
                self._key, "query", "GetProfile", query_pb.GetProfileRequest(profile_id=profile_id)
            )
        except NotFound:
            return Person(short, state="erased", note="erased")
        except (ServiceDown, BadInput):
            return Person(short)
        summary = reply.profile.summary
        survivor = _person_of(
            summary.first_name, summary.last_name, summary.custom_id, summary.profile_id
        )
        if summary.profile_id != profile_id:
            return Person(
                short,
                state="merged",
                note=f"merged into {survivor.label}",
                merged_into=summary.profile_id,
            )
        return survivor


def segment_change_json(
    change: Any, names: dict[str, str], people: People | None = None
) -> dict[str, Any]:
    which = change.WhichOneof("segment")
    if which == "smart_segment":
        segment = present.smart_segment(change.smart_segment)
    elif which == "flag":
        segment = present.smart_flag(change.flag)
    else:
        segment = names.get(change.custom_segment_id, change.custom_segment_id)
    person = people.of(change.profile_id) if people is not None else None
    return {
        "time": present.when(change.change_time),
        "profile_id": change.profile_id,
        **(person or Person(present.short_profile(change.profile_id))).json(),
        "transition": "entered" if change.transition == 1 else "left",
        "cause": present.CHANGE_CAUSES.get(change.cause, ""),
        "segment": segment,
    }


@live_stream
async def segments_live(request: Request, session: ConsoleSession) -> Response:
    console = console_of(request)

    async def check() -> Any:
        return await console.backend.call(
            session.key, "segments", "ListSegments", segments_pb.ListSegmentsRequest(page_size=100)
        )

    reply = await check()
    names = {s.segment_id: s.display_name for s in reply.segments}
    watch = segments_pb.WatchSegmentChangesRequest()
    # One segment's changes (the page's `segment` filter), filtered by the service.
    wanted = request.query_params.get("segment", "")
    if wanted:
        live = present.live_segment(wanted, reply.segments)
        if live is None:
            return _ended_stream("gone")  # deleted since the page was read
        setattr(watch, live.field, live.operand)
    people = People(console, session.key)
    guard = SessionGuard(console, session, check)
    cursor = request.headers.get("last-event-id") or request.query_params.get("since", "")
    if cursor:
        watch.start_after = cursor
    else:
        set_timestamp(watch.start_time, datetime.now(UTC) - timedelta(hours=1))

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        changes = console.backend.stream(session.key, "segments", "WatchSegmentChanges", watch)
        loop = asyncio.get_running_loop()
        # The read is not cancelled by a check's tick (that would end the gRPC stream): it
        # stays pending across ticks.
        pending: asyncio.Future[Any] | None = None
        quiet_since = loop.time()
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(changes))
                wait = console.live_checks.session_seconds
                retry_in = people.retry_in(loop.time())
                if retry_in is not None:
                    wait = max(0.0, min(wait, retry_in))
                done, _ = await asyncio.wait({pending}, timeout=wait)
                ended = await guard.ended()
                if ended:
                    yield sse(ended, event="ended")
                    return
                now = loop.time()
                retry_in = people.retry_in(now)
                if retry_in is not None and retry_in <= 0:
                    # The rows already shown of people the users table did not list yet.
                    for profile_id, person in await people.retry(now):
                        yield sse({"profile_id": profile_id, **person.json()}, event="person")
                if not done:
                    if now - quiet_since >= HEARTBEAT_SECONDS:
                        quiet_since = now
                        yield b": heartbeat\n\n"
                    continue
                quiet_since = now
                batch, pending = pending.result(), None
                await people.learn((change.profile_id for change in batch.changes), now)
                for change in batch.changes:
                    yield sse(segment_change_json(change, names, people), event_id=change.cursor)
        except StopAsyncIteration:
            yield sse({"reason": "closed"}, event="ended")
        except SignedOut:
            await console.sessions.end(session.session_id, KEY_REFUSED)
            yield sse(await signed_out_item(console, session.session_id, session), event="ended")
        except (ServiceDown, BadInput, NotFound):
            yield sse({"reason": "closed"}, event="ended")
        finally:
            if pending is not None:
                pending.add_done_callback(_outcome_seen)
                # A read still running owns the generator (aclose() would raise "already
                # running"): cancelled, it ends the generator and its gRPC call itself, on the
                # loop's next turn. Not awaited: when the browser leaves, the page's
                # cancellation is delivered again at every await here and would cut it short.
                pending.cancel()
            if pending is None or pending.done():
                await changes.aclose()

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


def _outcome_seen(read: asyncio.Future[Any]) -> None:
    """Takes a dropped read's outcome, so asyncio does not log a failure it met meanwhile (the
    stream closing as the page left) as never retrieved."""
    if not read.cancelled():
        read.exception()


# -- rejected events ----------------------------------------------------------------------------


@signed_in
async def rejected_page(request: Request, session: ConsoleSession) -> Response:
    console = console_of(request)
    params = request.query_params
    reason = present.reason_code(params.get("reason", ""))
    start = params.get("start", "").strip()
    end = params.get("end", "").strip()
    # One person's rejected events (the profile page's link): kept by every link of the page.
    profile = params.get("profile", "").strip()
    page_token = params.get("page_token", "")
    # The reasons of the whole time range are counted on every page (in the first page's
    # snapshot), whatever reason the page filters by: the chips stay while paging.
    listing = query_pb.ListRejectedEventsRequest(
        page_size=50, page_token=page_token, include_reason_counts=True, profile_id=profile
    )
    if reason:
        listing.reasons.append(reason)
    refused: present.Refusal | None = None
    if profile and not present.is_profile_id(profile):
        refused = present.Refusal("profile", present.FIELD_WORDS["profile_id"])
    for box, text, field in (("start", start, "start_time"), ("end", end, "end_time")):
        moment = _parse_iso(text) if text else None
        if moment is not None:
            set_timestamp(getattr(listing, field), moment)
        elif text and refused is None:
            refused = present.Refusal(box, present.NOT_A_TIME)
    reply = query_pb.ListRejectedEventsResponse()
    if refused is None:
        try:
            reply = await console.backend.call(session.key, "query", "ListRejectedEvents", listing)
        except NotFound:
            refused = present.Refusal("profile", present.NO_SUCH_PROFILE)
        except BadInput as bad:
            refused = present.refusal(
                bad,
                {
                    "reasons": "reason",
                    "start_time": "start",
                    "end_time": "end",
                    "profile_id": "profile",
                },
            )
    state = {"reason": reason, "start": start, "end": end, "profile": profile}
    # The boxes (datetime-local) read only their own format, UTC as the page says: a URL's
    # `...Z` or `+00:00` shown as such would leave them empty, and Filter would drop the range.
    boxes = {"start_box": present.datetime_local(start), "end_box": present.datetime_local(end)}
    filters = {k: v for k, v in state.items() if v}
    # What a reason's chip or link keeps: the time range and the profile.
    time_range = {k: v for k, v in (("start", start), ("end", end), ("profile", profile)) if v}
    next_page = ""
    if reply.next_page_token:
        next_page = present.rejected_link(**filters, page_token=reply.next_page_token)
    return render(
        request,
        "rejected.html",
        {
            **state,
            **boxes,
            # Each row with its explanation in the console's words (the attribute it is
            # about), and where its person is: its profile, else a search by installation.
            "rows": [
                (r, present.rejection_text(r), present.rejected_person(r))
                for r in reply.rejected_events
            ],
            "next_page": next_page,
            "first_page": present.rejected_link(**filters),
            # The profile's chip removes it, and keeps the other filters.
            "without_profile": present.rejected_link(reason=reason, start=start, end=end),
            "refused": refused,
            "chips": [
                (chip, "/rejected?" + urlencode({**time_range, "reason": chip.reason}))
                if chip.reason
                else (chip, "/rejected?" + urlencode(time_range))
                for chip in present.reason_chips(
                    reply.reason_counts,
                    at_least=reply.reason_counts_are_lower_bounds,
                    selected=reason,
                )
            ],
            "at_least": reply.reason_counts_are_lower_bounds,
            # A row's reason filters by it within the same time range, as its chip does.
            "reason_link": "/rejected?" + urlencode(time_range) + ("&" if time_range else ""),
        },
        session=session,
    )
