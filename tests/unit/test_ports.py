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


def unused_pairs(offset: int, count: int) -> list[int]:
    """Ports that, with the port `offset` above, are free, not offered yet and below the
    ephemeral range."""
    low, _ = ephemeral_range()
    found: list[int] = []
    for port in range(LOWEST_PORT, low - offset):
        pair = [port, port + offset]
        if ports._offered.intersection(pair) or not all(map(bindable, pair)):
            continue
        found.append(port)
        if len(found) == count:
            return found
    raise AssertionError("not enough free pairs below the ephemeral range")


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_paired_port_is_offered_only_with_its_pair_free(monkeypatch: pytest.MonkeyPatch) -> None:
    offset = 10000
    blocked, chosen = unused_pairs(offset, 2)
    with socket.socket() as server:
        server.bind(("127.0.0.1", blocked + offset))
        server.listen(1)
        monkeypatch.setattr(ports, "_random", Draws(blocked, chosen))
        assert free_port(paired_offset=offset) == chosen
    # Both ports of the pair are spoken for now.
    assert {chosen, chosen + offset} <= ports._offered


def test_both_ports_of_a_pair_are_below_the_ephemeral_range() -> None:
    offset = 10000
    low, _ = ephemeral_range()
    for _ in range(50):
        port = free_port(paired_offset=offset)
        assert LOWEST_PORT <= port < port + offset < low
