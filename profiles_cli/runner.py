"""Maps service names to their builders: the one place that knows all four services."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping

from shared.server import Build, serve_forever
from shared.settings import SERVICE_NAMES, Settings


def builder(name: str) -> Build:
    """The builder of service `name`. Only that service's modules are imported: a process runs
    one service, and the other three's would cost every start of it tenths of a second of CPU
    (four such processes start at once under `profiles up`)."""
    if name == "ingest":
        from services.ingest import app as ingest_app

        return ingest_app.build
    if name == "identity":
        from services.identity import app as identity_app

        return identity_app.build
    if name == "segments":
        from services.segments import app as segments_app

        return segments_app.build
    if name == "query":
        from services.query import app as query_app

        return query_app.build
    raise KeyError(name)


class _Builders(Mapping[str, Build]):
    """Every service's builder by name, each imported when it is looked up."""

    def __getitem__(self, name: str) -> Build:
        return builder(name)

    def __iter__(self) -> Iterator[str]:
        return iter(SERVICE_NAMES)

    def __len__(self) -> int:
        return len(SERVICE_NAMES)


BUILDERS: Mapping[str, Build] = _Builders()


def run_service(name: str, settings: Settings) -> None:
    """Runs one service until SIGTERM/SIGINT (what `profiles serve NAME` does)."""
    asyncio.run(serve_forever(name, settings, builder(name)))
