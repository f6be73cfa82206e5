"""Generates the Python code of the contract from protos/ into the `profiles` package.

    python protos/generate.py            # regenerate profiles/<package>/v1/*_pb2*.py(i)
    python protos/generate.py --check    # exit 1 if the committed code differs from protos/

The generated code is committed, so that a plain `pip install` from a fresh clone can import it
without grpcio-tools; a test runs `--check` so it never drifts from protos/.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
# The contract's descriptors with their comments (source info), which the generated modules
# leave out: the servers answer reflection from it, so `grpcurl describe` shows the comments.
SOURCE_DESCRIPTORS = Path("profiles") / "descriptors.binpb"


def _include_dir(module: str, levels_up: int) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{module} is not installed: pip install -e '.[dev]' -c constraints.txt")
    path = Path(spec.origin)
    for _ in range(levels_up):
        path = path.parent
    return path


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("profiles/**/*.proto"))


def include_paths() -> list[Path]:
    """protos/, protoc's well-known types, and google/rpc/*.proto from googleapis-common-protos."""
    well_known = _include_dir("grpc_tools", 1) / "_proto"
    googleapis = _include_dir("google.rpc.status_pb2", 3)
    return [PROTO_ROOT, well_known, googleapis]


def _plugin(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' -c constraints.txt")
    return found


def generate(out_dir: Path) -> None:
    (out_dir / SOURCE_DESCRIPTORS).parent.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        *(f"-I{p}" for p in include_paths()),
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        f"--descriptor_set_out={out_dir / SOURCE_DESCRIPTORS}",
        "--include_source_info",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    # protoc runs in a child process: grpc_tools.protoc.main is not re-entrant across calls.
    code = "import sys; from grpc_tools import protoc; sys.exit(protoc.main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=PROTO_ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed with exit code {result.returncode}")
    for generated in out_dir.glob("profiles/**/*_pb2.py"):
        package = generated.parent
        while package != out_dir:
            (package / "__init__.py").touch()
            package = package.parent


def generated_files(root: Path) -> set[Path]:
    found = {
        p.relative_to(root)
        for p in root.glob("profiles/**/*")
        if p.name.endswith(GENERATED_SUFFIXES)
    }
    return found | ({SOURCE_DESCRIPTORS} if (root / SOURCE_DESCRIPTORS).exists() else set())


def check() -> list[str]:
    """Returns the generated files that are missing, stale or extra in the committed tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = generated_files(fresh_root)
        committed = generated_files(REPO_ROOT)
        problems = [f"missing: {p}" for p in sorted(fresh - committed)]
        problems += [f"extra: {p}" for p in sorted(committed - fresh)]
        problems += [
            f"stale: {p}"
            for p in sorted(fresh & committed)
            if not filecmp.cmp(fresh_root / p, REPO_ROOT / p, shallow=False)
        ]
        return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    if parser.parse_args().check:
        problems = check()
        for problem in problems:
            print(problem)
        raise SystemExit(1 if problems else 0)
    for stale in generated_files(REPO_ROOT):
        (REPO_ROOT / stale).unlink()
    generate(REPO_ROOT)


if __name__ == "__main__":
    main()
