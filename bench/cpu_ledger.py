"""Where a bench run's CPU goes, process by process, and what a target ratio leaves of it.

On a machine whose cores the client, the services, PostgreSQL and Redis share, the rate is
bounded by the CPU all of them spend per event: the ledger reads each one's cumulative CPU
seconds (user and system) at the start of a window and at its end, and prints what each spent
per event. The budget says how much CPU per event a target rate leaves the cores, so a figure
far from its goal shows by how much the work per event must shrink, not only that it must.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import psutil
from redis.asyncio import Redis


@dataclass(frozen=True, slots=True)
class ProcessCpu:
    """One process (or process tree) of the run, and how to read its CPU seconds so far."""

    label: str
    read: Callable[[], float]


class CpuLedger:
    """The CPU seconds each process spent between `start()` and `spent()`."""

    def __init__(self, processes: Sequence[ProcessCpu]) -> None:
        self._processes = list(processes)
        self._at_start: dict[str, float] = {}

    def start(self) -> None:
        self._at_start = {p.label: p.read() for p in self._processes}

    def spent(self) -> dict[str, float]:
        return {p.label: p.read() - self._at_start[p.label] for p in self._processes}


def cpu_seconds_of(process: psutil.Process) -> float:
    """The CPU seconds (user and system, all threads) the process has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


def this_process_cpu_seconds() -> float:
    """The bench process's own CPU (its load clients run here), all threads."""
    return cpu_seconds_of(psutil.Process())


def process_cpu_seconds(pid: int) -> Callable[[], float]:
    process = psutil.Process(pid)
    return lambda: cpu_seconds_of(process)


async def redis_server_pid(redis_url: str) -> int | None:
    """The pid of the Redis server behind redis_url when it runs on this machine (INFO's
    process_id names a live local process), else None: a remote server's CPU is not ours to
    read."""
    client = Redis.from_url(redis_url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    pid = int(info.get("process_id", 0))
    with contextlib.suppress(psutil.Error):
        if pid > 0 and "redis" in psutil.Process(pid).name():
            return pid
    return None


def local_redis_pid(redis_url: str) -> int | None:
    return asyncio.run(redis_server_pid(redis_url))


def cpu_table(spent: Mapping[str, float], events: int) -> str:
    """A Markdown table: each process's CPU seconds, per event and share, then all of them."""
    total = sum(spent.values()) or 1.0
    lines = ["| process | CPU s | us per event | share |", "|---|---:|---:|---:|"]
    for label, seconds in spent.items():
        lines.append(
            f"| {label} | {seconds:.1f} | {seconds * 1e6 / max(1, events):.0f}"
            f" | {100 * seconds / total:.0f}% |"
        )
    lines.append(f"| **all** | **{total:.1f}** | **{total * 1e6 / max(1, events):.0f}** | 100% |")
    return "\n".join(lines)


def budget_us_per_event(target_rate: float, cores: int, busy_share: float) -> float:
    """The CPU per event that `cores` busy `busy_share` of the time can spend at target_rate
    events/s (a run's own busy share: what the machine gave the run when it measured)."""
    return cores * busy_share * 1e6 / max(1e-9, target_rate)
