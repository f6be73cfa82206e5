"""Which platform an SDK message gets: from its OS, else its library, else the dialect's default.

One table per signal, read by every dialect; see docs/edge.md. No message is rejected for a
missing platform: a server-side library, or no sign at all, is PLATFORM_API.
"""

from __future__ import annotations

from profiles.common.v1 import types_pb2

IOS = types_pb2.PLATFORM_IOS
ANDROID = types_pb2.PLATFORM_ANDROID
WEB = types_pb2.PLATFORM_WEB
API = types_pb2.PLATFORM_API

# Lower-cased OS names as the SDKs report them (context.os.name, $os, Countly's _os).
OS_PLATFORMS: dict[str, int] = {
    "ios": IOS,
    "ipados": IOS,
    "iphone os": IOS,
    "tvos": IOS,
    "watchos": IOS,
    "android": ANDROID,
}

# Lower-cased library names (Segment's context.library.name, PostHog's $lib), by prefix.
LIBRARY_PLATFORMS: tuple[tuple[str, int], ...] = (
    ("analytics.js", WEB),
    ("analytics-next", WEB),
    ("@segment/analytics-next", WEB),
    ("web", WEB),
    ("posthog-js", WEB),
    ("analytics-ios", IOS),
    ("analytics-swift", IOS),
    ("posthog-ios", IOS),
    ("analytics-android", ANDROID),
    ("analytics-kotlin", ANDROID),
    ("posthog-android", ANDROID),
)


def platform_of(os_name: object, library: object, default: int = API) -> int:
    """The platform for an OS name and a library name (either may be missing or not a string).

    A browser library wins (posthog-js in an iPhone's Safari reports $os "iOS": that is a
    web visit, not the app); then the OS (a React Native app reports its real OS); then the
    library; then `default`."""
    library_platform = _library_platform(library)
    if library_platform == WEB:
        return WEB
    if isinstance(os_name, str):
        found = OS_PLATFORMS.get(os_name.strip().lower())
        if found is not None:
            return found
    return default if library_platform is None else library_platform


def _library_platform(library: object) -> int | None:
    if isinstance(library, str):
        lowered = library.strip().lower()
        for prefix, platform in LIBRARY_PLATFORMS:
            if lowered.startswith(prefix):
                return platform
    return None
