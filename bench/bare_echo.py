"""The baseline server of bench.echo: a bare grpc.aio server that answers Echo and nothing else.

It serves the same generated DiagnosticsService with the same servicer and the same server
options as the suite, but without the interceptor (no authentication, metrics, logs or error
mapping), without reflection and without a database or Redis behind it, so the difference to the
suite's Echo is what the suite's server stack adds to every call. Health is served only so the
benchmark can wait for it in the same way; health calls are not measured.

    python -m bench.bare_echo PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from shared import diagnostics
from shared.server import server_options


async def serve(port: int) -> None:
    """Serves on 127.0.0.1:port until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=server_options())
    full_name = diagnostics.register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"bare echo: cannot listen on 127.0.0.1:{port}")
    await server.start()
    await health.set(full_name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_echo", description=__doc__)
    parser.add_argument("port", type=int, help="TCP port on 127.0.0.1")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
