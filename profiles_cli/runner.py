"""Maps service names to their builders: the one place that knows all four services."""

from __future__ import annotations

import asyncio

from services.identity import app as identity_app
from services.ingest import app as ingest_app
from services.query import app as query_app
from services.segments import app as segments_app
from shared.server import Build, serve_forever
from shared.settings import Settings

BUILDERS: dict[str, Build] = {
    "ingest": ingest_app.build,
    "identity": identity_app.build,
    "segments": segments_app.build,
    "query": query_app.build,
}


def run_service(name: str, settings: Settings) -> None:
    """Runs one service until SIGTERM/SIGINT (what `profiles serve NAME` does)."""
    asyncio.run(serve_forever(name, settings, BUILDERS[name]))
