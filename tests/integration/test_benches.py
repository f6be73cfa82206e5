"""Every benchmark under bench/ runs end to end at its --smoke size (seconds) on the tests'
PostgreSQL and Redis, so a bench that breaks fails CI. Nothing is asserted about the figures:
only that the bench exits 0 and ends with its JSON lines."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[2]
# A deadline against a hung bench, not a timing: a smoke run takes seconds.
BENCH_TIMEOUT_S = 240.0
FIGURE_KEYS = ["bench", "metric", "value", "unit", "baseline", "baseline_value", "ratio", "quick"]


def benches() -> list[str]:
    """The runnable benchmarks: every module of bench/ with a main (a new one is picked up)."""
    return sorted(
        path.stem for path in (ROOT / "bench").glob("*.py") if "run_main(main)" in path.read_text()
    )


def test_every_bench_is_found() -> None:
    assert {"echo", "identity", "ingest", "query", "segments"} <= set(benches())


async def bench_keys(redis_url: str) -> set[bytes]:
    client = Redis.from_url(redis_url)
    try:
        return {key async for key in client.scan_iter(match="bench-*", count=1000)}
    finally:
        await client.aclose()


async def run_bench(name: str, *args: str) -> str:
    """Runs `python -m bench.<name> args...`; its standard output, once it exited 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"bench.{name}",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(BENCH_TIMEOUT_S):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = stdout.decode(errors="replace")
    assert process.returncode == 0, output[-3000:] + stderr.decode(errors="replace")[-3000:]
    return output


@pytest.mark.parametrize("name", benches())
async def test_the_bench_runs_at_its_smoke_size(
    name: str, database_url: str, redis_url: str
) -> None:
    before = await bench_keys(redis_url)
    try:
        output = await run_bench(
            name, "--smoke", "--database-url", database_url, "--redis-url", redis_url
        )
    finally:
        # The bench's Redis keys (its own random prefix) go with it.
        client = Redis.from_url(redis_url)
        try:
            left = await bench_keys(redis_url) - before
            if left:
                await client.delete(*left)
        finally:
            await client.aclose()
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, output[-3000:]
    assert output.rstrip().endswith(lines[-1])  # the JSON lines come last
    for line in lines:
        figure = json.loads(line)
        assert list(figure) == FIGURE_KEYS
        assert figure["bench"] == name
        assert figure["quick"] is True


async def test_the_ingest_bench_prints_where_each_batch_spends_its_database_time() -> None:
    """On its own embedded PostgreSQL (the tests' server does not preload pg_stat_statements),
    the ingest bench breaks a batch's database time down by statement, the events insert
    among them."""
    output = await run_bench("ingest", "--smoke")
    assert "database time per batch of 500 (pg_stat_statements" in output, output[-3000:]
    rows = [line for line in output.splitlines() if line.startswith("| `")]
    assert any("INSERT INTO events" in row and "| top |" in row for row in rows), rows
    assert any("| nested |" in row for row in rows), rows


async def test_the_ingest_cpu_bench_prints_each_stage_against_parsing_the_batch() -> None:
    """No servers: it times ingest's own per-batch work, stage by stage, in "parses" of the
    same batches."""
    output = await run_bench("ingest_cpu", "--smoke")
    figures = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    stages = ["validate", "outbox", "notices", "columns", "respond", "total"]
    assert [f["metric"] for f in figures] == [f"ingest_cpu_{s}_us_per_event" for s in stages]
    assert all(f["baseline"] == "parse_us_per_event" for f in figures)
    assert all(f["value"] > 0 and f["ratio"] > 0 for f in figures)
    assert figures[-1]["value"] >= max(f["value"] for f in figures[:-1])


async def test_the_partitions_bench_removes_a_cold_pair_of_months_on_its_own_server() -> None:
    """On its own embedded PostgreSQL, the partitions bench restarts the server and drops the
    cold months' files from the kernel's page cache before removing them, and reports both
    pairs; on the tests' shared server it measures the hot pair only (the run above)."""
    output = await run_bench("partitions", "--smoke")
    assert "cold months:" in output, output[-3000:]
    evicted = [line for line in output.splitlines() if line.startswith("server restarted;")]
    if evicted:  # fincore (util-linux) tells how much of the files stayed cached
        before, after = (float(n) for n in re.findall(r"([0-9.]+) MB", evicted[0]))
        assert before > 0, evicted
        assert after < before, evicted
    metrics = [json.loads(line)["metric"] for line in output.splitlines() if line[:1] == "{"]
    hot = [m for m in metrics if not m.startswith("cold_")]
    assert metrics == hot + [f"cold_{m}" for m in hot]
