"""Free ports for servers started in other processes: outside the kernel's ephemeral range
(which outgoing connections take their local ports from), free, and never offered twice."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from shared import ports
from shared.ports import LOWEST_PORT, ephemeral_range, free_port, free_ports


class Draws:
    """Stands in for the module's random source: hands out the given ports in turn."""

    def __init__(self, *draws: int) -> None:
        self._draws: Iterator[int] = iter(draws)

    def randint(self, low: int, high: int) -> int:
        draw = next(self._draws)
        assert low <= draw <= high
        return draw


def unused_ports_below_ephemeral_range(count: int) -> list[int]:
    """Ports of the range free_port offers, free and not offered yet, found without it."""
    low, _ = ephemeral_range()
    found: list[int] = []
    for port in range(low - 1, LOWEST_PORT, -1):
        if port in ports._offered:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise AssertionError("not enough free ports below the ephemeral range")


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound() -> None:
    low, _ = ephemeral_range()
    for port in free_ports(50):
        assert LOWEST_PORT <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_no_port_is_offered_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = unused_ports_below_ephemeral_range(2)
    monkeypatch.setattr(ports, "_random", Draws(first, first, second))
    assert free_ports(2) == [first, second]


def test_a_port_a_server_listens_on_is_not_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    taken, other = unused_ports_below_ephemeral_range(2)
    with socket.socket() as server:
        server.bind(("127.0.0.1", taken))
        server.listen(1)
        monkeypatch.setattr(ports, "_random", Draws(taken, other))
        assert free_port() == other
