"""Which roles may call which RPC: the one table the auth interceptor and the README follow.

A method missing from the table is refused to everyone (fail closed); a test checks that every
RPC of the contract has a row.
"""

from __future__ import annotations

SDK, READ, ADMIN, INTERNAL = "sdk", "read", "admin", "internal"

# Health and reflection carry no tenant data; load balancers and grpcurl call them without a key.
PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_INGEST = "profiles.ingest.v1.IngestService"
_IDENTITY = "profiles.identity.v1.IdentityService"
_SEGMENTS = "profiles.segments.v1.SegmentsService"
_QUERY = "profiles.query.v1.QueryService"
_DIAGNOSTICS = "profiles.diagnostics.v1.DiagnosticsService"

_WRITE = frozenset({SDK, ADMIN})
_READ = frozenset({READ, ADMIN})
_ADMIN = frozenset({ADMIN})
_ANY_KEY = frozenset({SDK, READ, ADMIN})

POLICY: dict[str, frozenset[str]] = {
    f"/{_INGEST}/TrackEvents": _WRITE,
    f"/{_INGEST}/StreamEvents": _WRITE,
    f"/{_INGEST}/ImportEvents": _ADMIN,
    f"/{_INGEST}/ImportTokens": _ADMIN,
    # Ingest resolves every batch through identity with the internal credential.
    f"/{_IDENTITY}/ResolveProfiles": frozenset({ADMIN, INTERNAL}),
    # Ingest folds an imported push-token installation into the real one with the internal
    # credential (ImportTokens); it passes the caller's project along.
    f"/{_IDENTITY}/Identify": frozenset({SDK, ADMIN, INTERNAL}),
    f"/{_IDENTITY}/Logout": _WRITE,
    f"/{_IDENTITY}/MergeProfiles": frozenset({ADMIN, INTERNAL}),
    f"/{_IDENTITY}/DeleteProfile": _ADMIN,
    f"/{_IDENTITY}/ExportProfile": _ADMIN,
    f"/{_SEGMENTS}/GetEngagement": _READ,
    f"/{_SEGMENTS}/GetSmartSegment": _READ,
    f"/{_SEGMENTS}/CreateSegment": _ADMIN,
    f"/{_SEGMENTS}/ListSegments": _READ,
    f"/{_SEGMENTS}/GetSegment": _READ,
    f"/{_SEGMENTS}/UpdateSegment": _ADMIN,
    f"/{_SEGMENTS}/DeleteSegment": _ADMIN,
    f"/{_SEGMENTS}/WatchSegmentChanges": _READ,
    f"/{_SEGMENTS}/CreateFunnel": _ADMIN,
    f"/{_SEGMENTS}/ListFunnels": _READ,
    f"/{_SEGMENTS}/GetFunnel": _READ,
    f"/{_SEGMENTS}/UpdateFunnel": _ADMIN,
    f"/{_SEGMENTS}/DeleteFunnel": _ADMIN,
    f"/{_SEGMENTS}/GetFunnelProgress": _READ,
    f"/{_SEGMENTS}/ListFunnelProfiles": _READ,
    f"/{_SEGMENTS}/RecomputeAll": _ADMIN,
    f"/{_QUERY}/GetProfile": _READ,
    f"/{_QUERY}/ListProfiles": _READ,
    f"/{_QUERY}/GetProfileRows": _READ,
    f"/{_QUERY}/ListEvents": _READ,
    f"/{_QUERY}/ListSessions": _READ,
    f"/{_QUERY}/GetActivity": _READ,
    f"/{_QUERY}/GetOverview": _READ,
    f"/{_QUERY}/ListRejectedEvents": _READ,
    f"/{_QUERY}/ListEventNames": _READ,
    f"/{_QUERY}/WatchProfile": _READ,
    # Who the key is: every key may ask (it reads no profile data).
    f"/{_QUERY}/GetCaller": _ANY_KEY,
    f"/{_DIAGNOSTICS}/Echo": _ADMIN,
}


def service_of(method: str) -> str:
    """`/pkg.Service/Method` -> `pkg.Service`."""
    return method.lstrip("/").partition("/")[0]


def is_public(method: str) -> bool:
    return service_of(method) in PUBLIC_SERVICES


def allowed_roles(method: str) -> frozenset[str]:
    return POLICY.get(method, frozenset())
