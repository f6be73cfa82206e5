"""The data directory of `profiles up`: embedded databases, the default project's keys, the
internal service credential and the service logs, all readable by their owner only.

    <data dir>/postgres/        embedded PostgreSQL (PGDATA)
    <data dir>/redis/           embedded Redis (append-only file)
    <data dir>/keys.json        plain keys of the default project, role -> key (0600)
    <data dir>/internal_token   credential the services use to call each other (0600)
    <data dir>/logs/<name>.log  each service's JSON log
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FailedPrecondition


class NoStoredKeys(FailedPrecondition):
    reason = "NO_STORED_KEYS"


@dataclass(frozen=True, slots=True)
class DataDir:
    path: Path

    @property
    def postgres(self) -> Path:
        return self.path / "postgres"

    @property
    def redis(self) -> Path:
        return self.path / "redis"

    @property
    def keys_file(self) -> Path:
        return self.path / "keys.json"

    @property
    def token_file(self) -> Path:
        return self.path / "internal_token"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def create(self) -> None:
        """Creates the directory owner-only. (As root the embedded PostgreSQL runs as another
        user, which later gets search permission, never listing, to reach its own PGDATA.)"""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Keeps a search bit granted earlier to the PostgreSQL user; it reveals no file names.
        self.path.chmod(0o700 | (self.path.stat().st_mode & 0o011))
        self.logs.mkdir(mode=0o700, exist_ok=True)

    def has_keys(self) -> bool:
        return self.keys_file.exists()

    def read_keys(self) -> dict[str, str]:
        """role -> plain key of the default project, as `profiles up` stored them."""
        try:
            keys: dict[str, str] = json.loads(self.keys_file.read_text())
        except FileNotFoundError as exc:
            raise NoStoredKeys(
                f"no keys in {self.path}: `profiles up` creates them on its first run"
            ) from exc
        except OSError as exc:  # a file given as the data directory, a directory of another user
            raise NoStoredKeys(
                f"cannot read the keys in --data-dir {self.path}: {exc.strerror or exc}"
            ) from exc
        return keys

    def write_keys(self, keys: dict[str, str]) -> None:
        _write_private(self.keys_file, json.dumps(keys, indent=2) + "\n")

    def internal_token(self) -> str:
        """The stored internal service credential, generated on first use."""
        if self.token_file.exists():
            return self.token_file.read_text().strip()
        token = secrets.token_urlsafe(32)
        _write_private(self.token_file, token + "\n")
        return token


def _write_private(path: Path, text: str) -> None:
    """Writes text to path with mode 0600 from the first byte, replacing it atomically."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
