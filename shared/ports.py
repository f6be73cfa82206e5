"""Free TCP ports for servers started as separate processes (tests, benchmarks).

A port is chosen in one process and bound in another a moment later. Asking the kernel for
port 0 returns a port of its ephemeral range, the range it also takes the local port of every
outgoing connection from: in that moment a gRPC channel or an HTTP client of the same run could
take it, and the server then fails with "address already in use" (seen in the two-replica test,
whose 24 ports are chosen before the first replica connects anywhere). Ports below the
ephemeral range are never handed out to outgoing connections, so one found free there stays
free unless another server binds it; this process never offers the same port twice.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Linux's default ephemeral range, when /proc does not say.
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)
# The lowest port offered: above the well-known and most registered services' ports.
LOWEST_PORT = 10000
MAX_TRIES = 200

_offered: set[int] = set()
_random = random.Random()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE


def free_port(host: str = "127.0.0.1", *, paired_offset: int = 0) -> int:
    """A port no server listens on now, outside the ephemeral range, not offered before by
    this process; with `paired_offset`, the port that far above it is all that too (a Redis
    Cluster node's bus port). Without one, falls back to the kernel's choice should the range
    below be full."""
    low, _ = ephemeral_range()
    highest = low - 1 - paired_offset
    if highest > LOWEST_PORT:
        for _ in range(MAX_TRIES):
            port = _random.randint(LOWEST_PORT, highest)
            pair = [port, port + paired_offset] if paired_offset else [port]
            if not _offered.intersection(pair) and all(_bindable(host, p) for p in pair):
                _offered.update(pair)
                return port
    if paired_offset:
        raise OSError(f"no free pair of ports {paired_offset} apart below {low}")
    with socket.socket() as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
    _offered.add(chosen)
    return chosen


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different free ports."""
    return [free_port(host) for _ in range(count)]


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
