"""Benchmarks, one per service, run as `python -m bench.<name>`; shared parts in bench.common."""
