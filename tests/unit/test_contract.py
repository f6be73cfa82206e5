"""The contract: buf lint, no breaking change, generated code up to date, a role for every RPC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from profiles.client import idempotent_methods, service_config
from profiles.diagnostics.v1 import diagnostics_service_pb2
from profiles.identity.v1 import identity_service_pb2
from profiles.ingest.v1 import ingest_service_pb2
from profiles.query.v1 import query_service_pb2
from profiles.segments.v1 import segments_service_pb2
from shared.auth_policy import POLICY

ROOT = Path(__file__).resolve().parents[2]
SERVICE_FILES = (
    ingest_service_pb2,
    identity_service_pb2,
    segments_service_pb2,
    query_service_pb2,
    diagnostics_service_pb2,
)


def _protos_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "protos" / name), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_buf_lint_and_breaking_check_are_clean() -> None:
    result = _protos_script("lint.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "contract is clean" in result.stdout


def test_generated_code_matches_the_protos() -> None:
    result = _protos_script("generate.py", "--check")
    assert result.returncode == 0, "run `python protos/generate.py`:\n" + result.stdout


def test_every_rpc_of_the_contract_has_a_role_and_nothing_else_does() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in SERVICE_FILES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == set(POLICY)


def test_reads_are_retried_by_the_client_service_config() -> None:
    retried = set(idempotent_methods())
    assert ("profiles.query.v1.QueryService", "GetProfile") in retried
    assert ("profiles.diagnostics.v1.DiagnosticsService", "Echo") in retried
    assert '"UNAVAILABLE"' in service_config()
