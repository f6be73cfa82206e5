"""The README's tables and docker-compose.yml agree with the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from shared.auth_policy import POLICY
from shared.settings import DEFAULT_PORTS, SERVICE_NAMES, SETTINGS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_readme_role_table_has_every_rpc_with_its_roles() -> None:
    for method, roles in POLICY.items():
        service, name = method.lstrip("/").split("/")
        short = service.split(".")[1]
        ordered = ", ".join(r for r in ("sdk", "read", "admin", "internal") if r in roles)
        row = f"| `{short}` | `{name}` | {ordered} |"
        assert row in README, f"README role table lacks: {row}"


def test_readme_configuration_table_has_every_setting() -> None:
    for setting in SETTINGS:
        assert f"| `{setting.env}` | `{setting.default}` |" in README, setting.env


def test_readme_tables_name_nothing_the_code_does_not_know() -> None:
    documented = set(re.findall(r"^\| `(PROFILES_[A-Z_]+)` \|", README, re.M))
    assert documented == {s.env for s in SETTINGS}


def test_compose_runs_the_four_services_on_their_ports() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", *SERVICE_NAMES} <= set(services)
    for name in SERVICE_NAMES:
        service = services[name]
        assert service["command"] == ["serve", name]
        port = DEFAULT_PORTS[name]
        assert f"{port}:{port}" in service["ports"]
        assert str(port) in " ".join(service["healthcheck"]["test"])


def test_compose_sets_only_documented_variables() -> None:
    known = {s.env for s in SETTINGS}
    for name in SERVICE_NAMES:
        environment = _compose()["services"][name]["environment"]
        assert set(environment) <= known, set(environment) - known
        assert {"PROFILES_DATABASE_URL", "PROFILES_REDIS_URL"} <= set(environment)
        identity_address = environment["PROFILES_IDENTITY_ADDRESS"]
        assert identity_address == f"identity:{DEFAULT_PORTS['identity']}"


def test_the_edge_examples_use_identities_the_demo_never_makes() -> None:
    # `profiles demo` makes custom IDs user-1, user-2, ... and installations demo-...: an
    # example run after it would merge into the demo's people.
    edge = (ROOT / "docs" / "edge.md").read_text()
    blocks = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", edge, re.M | re.S))
    assert "sdk-device-1" in blocks  # the blocks were found
    assert re.findall(r"\buser-\d+\b|\bdemo-", blocks) == []


def test_the_docs_say_ci_recreates_the_venv_and_admin_commands_take_a_data_dir() -> None:
    running = (ROOT / "docs" / "running.md").read_text()
    for text in (README, running):
        assert "recreates the clone's `.venv`" in text
    admin = running.split("## Projects, keys and settings", 1)[1].split("Per-project", 1)[0]
    assert "--data-dir" in admin
