"""Prometheus metrics common to every service; each service adds its own counters beside these."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RPC_TOTAL = Counter(
    "profiles_rpc_total", "RPCs handled, by full method name and status code", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "profiles_rpc_seconds",
    "RPC latency in seconds, by full method name",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def start_metrics_server(port: int, address: str) -> None:
    """Serves /metrics on a thread of its own; port 0 means metrics are off."""
    if port:
        start_http_server(port, addr=address)
