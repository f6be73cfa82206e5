"""The linters run as part of the one test command, so CI keeps the code clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

CHECKS = {
    "ruff-check": ("ruff", "check", "."),
    "ruff-format": ("ruff", "format", "--check", "."),
    "import-linter": ("lint-imports",),
    "mypy": ("mypy",),
}
# Started once the suite is collected (tests/conftest.py), so they run while the other tests
# wait on their servers: mypy alone took 12 s of the suite's time when run in its turn.
_STARTED: dict[str, subprocess.Popen[str]] = {}


def start_checks() -> None:
    for name, command in CHECKS.items():
        if name not in _STARTED:
            _STARTED[name] = subprocess.Popen(
                [str(BIN / command[0]), *command[1:]],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )


def finished(name: str) -> tuple[int, str]:
    start_checks()  # run alone (-k): nothing started them yet
    output, _ = _STARTED[name].communicate()
    return _STARTED[name].returncode, output


@pytest.mark.parametrize("name", ["ruff-check", "ruff-format", "import-linter"])
def test_linter_is_clean(name: str) -> None:
    code, output = finished(name)
    assert code == 0, output


def test_mypy_is_clean() -> None:
    code, output = finished("mypy")
    assert code == 0, output
