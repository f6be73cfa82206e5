"""The project's modules compiled once for the Python processes a test starts.

A test of `profiles up` starts seven Python processes (the supervisor and six services), and each
`profiles` command one more. Where PYTHONDONTWRITEBYTECODE is set (as on the machine the suite is
timed on), no process writes the bytecode it compiles, so every one compiled the project's
modules from source again: a quarter of a second of CPU each, while six of them start at once.
Written once into the packages' __pycache__ (which git ignores), the bytecode is read by every
later process; Python checks it against its source's time and size, so an edit recompiles.
"""

from __future__ import annotations

import compileall
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What `profiles` commands and services import from the checkout (the installed packages come
# with their bytecode).
PACKAGES = ("profiles", "profiles_cli", "services", "shared")


@functools.cache
def compile_project() -> None:
    """Compiles what is not compiled yet or changed since (once per test session)."""
    for package in PACKAGES:
        compileall.compile_dir(ROOT / package, quiet=1)
