"""Settings from environment variables: one table, read once at start-up.

`SETTINGS` is the single source of the README's configuration table and of the docker-compose
check, so a variable cannot be documented, composed or read under two different names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Self

SERVICE_NAMES = ("ingest", "identity", "segments", "query")
DEFAULT_PORTS = {"ingest": 50051, "identity": 50052, "segments": 50053, "query": 50054}
DEFAULT_METRICS_PORTS = {"ingest": 9451, "identity": 9452, "segments": 9453, "query": 9454}
# How long the bus keeps a message (PROFILES_BUS_RETENTION_HOURS) unless told otherwise: a week.
DEFAULT_BUS_RETENTION_HOURS = 168
# A year at most: the bus retention is what bounds how long an erasure takes to reach the bus.
BUS_RETENTION_MOST_HOURS = 8760
# A day at most: the sweep bounds how long an erasure whose notice was lost takes to reach
# segments' and query's tables.
ERASURE_SWEEP_MOST_MINUTES = 1440


@dataclass(frozen=True, slots=True)
class Setting:
    env: str
    default: str
    description: str


def _service_settings() -> list[Setting]:
    rows = []
    for name in SERVICE_NAMES:
        upper = name.upper()
        rows.append(
            Setting(f"PROFILES_{upper}_PORT", str(DEFAULT_PORTS[name]), f"gRPC port of {name}")
        )
        rows.append(
            Setting(
                f"PROFILES_{upper}_METRICS_PORT",
                str(DEFAULT_METRICS_PORTS[name]),
                f"Prometheus /metrics port of {name}; 0 turns it off",
            )
        )
        rows.append(
            Setting(
                f"PROFILES_{upper}_ADDRESS",
                f"127.0.0.1:{DEFAULT_PORTS[name]}",
                f"where the other services reach {name} (host:port)",
            )
        )
    return rows


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "PROFILES_DATABASE_URL",
        "",
        "PostgreSQL URL; empty: `profiles up` starts an embedded PostgreSQL",
    ),
    Setting(
        "PROFILES_REDIS_URL",
        "",
        "Redis URL (`redis://host:port/0`, `unix:///path`), or a Redis Cluster as"
        " `redis+cluster://host:port,host:port` (seed nodes; `rediss+cluster://` for TLS);"
        " empty: `profiles up` starts an embedded Redis",
    ),
    Setting("PROFILES_REDIS_PREFIX", "profiles", "prefix of every Redis key of this suite"),
    Setting(
        "PROFILES_INTERNAL_TOKEN",
        "",
        "credential the services use to call each other; `profiles up` generates one",
    ),
    Setting("PROFILES_BIND_ADDRESS", "127.0.0.1", "address the gRPC and metrics servers bind"),
    *_service_settings(),
    Setting("PROFILES_LOG_LEVEL", "info", "debug, info, warning or error"),
    Setting("PROFILES_DATA_DIR", "~/.profiles", "`profiles up`: embedded databases and keys"),
    Setting("PROFILES_DB_POOL_SIZE", "10", "most PostgreSQL connections per service process"),
    Setting("PROFILES_SHUTDOWN_GRACE_SECONDS", "10", "time in-flight calls get on shutdown"),
    Setting(
        "PROFILES_RESTART_DELAY_SECONDS",
        "0.5",
        "`profiles up`: a service (or its embedded PostgreSQL or Redis) that died is started"
        " again after this long, twice as long after each further death within a minute (at"
        " most 8 s); the fifth stops everything",
    ),
    Setting("PROFILES_MAX_CONCURRENT_RPCS", "1000", "calls a server runs at once; more wait"),
    Setting("PROFILES_MAX_STREAMS", "100", "long-lived streams a server keeps open at once"),
    Setting(
        "PROFILES_CLAIM_IDLE_SECONDS",
        "30",
        "a bus entry a replica took and has not acked for this long is taken over by another"
        " replica of its service (how long a crashed replica's work waits); above the slowest"
        " handler",
    ),
    Setting(
        "PROFILES_BUS_WAIT_SECONDS",
        "2",
        "how long a bus consumer's read waits for new entries before it looks again for work that"
        " comes otherwise (entries handed back to its group, a dead replica's to claim); above 0",
    ),
    Setting(
        "PROFILES_BUS_RETENTION_HOURS",
        "168",
        "bus messages and dead letters (Redis streams) older than this many hours are removed,"
        " within a minute, by the services' outbox relays: how long an erased person's data"
        " stays on the bus (segment changes stay as long as a project may read them); a"
        " consumer stopped for longer loses messages (docs/running.md); 1 to 8760",
    ),
    Setting(
        "PROFILES_ERASURE_SWEEP_MINUTES",
        "10",
        "segments and query: how often each purges what it still keeps of the profiles identity"
        " erased (on start, then every this many minutes), for an erasure whose ProfileDeleted"
        " it never handled (docs/identity.md); 1 to 1440",
    ),
    Setting(
        "PROFILES_EVENTS_RETENTION_DAYS",
        "0",
        "ingest: events (and rejected events) older than this many days are dropped, a whole"
        " monthly partition at a time; 0 keeps them forever (docs/partitions.md)",
    ),
    Setting(
        "PROFILES_INGEST_WRITE_PARTITIONS",
        "2",
        "ingest: a project's profiles are split into this many partitions, each with its own"
        " writers, so that concurrent transactions never wait for each other's profile locks;"
        " 2 with one writer each stored 13% more in bench.ingest than 1 with two"
        " (docs/ingest.md)",
    ),
    Setting(
        "PROFILES_INGEST_GROUP_WRITERS",
        "1",
        "ingest: transactions a partition's events run at once; events arriving meanwhile are"
        " stored together by the next (group commit, docs/ingest.md)",
    ),
    Setting("PROFILES_EDGE_PORT", "8340", "HTTP port of the edge gateway (SDK traffic)"),
    Setting(
        "PROFILES_EDGE_METRICS_PORT", "9455", "Prometheus /metrics port of the edge; 0 turns it off"
    ),
    Setting(
        "PROFILES_EDGE_RATE_LIMIT",
        "500",
        "edge: requests per second allowed per SDK key; 0 turns it off",
    ),
    Setting("PROFILES_EDGE_RATE_BURST", "1000", "edge: requests an SDK key may burst above it"),
    Setting(
        "PROFILES_EDGE_POSTHOG_ASSET_URL",
        "https://us-assets.i.posthog.com",
        "edge: where `GET /static/...` (posthog-js's library and extensions) redirects; a host"
        " of your own serves posthog-js's `dist/` files under `/static/` (docs/edge.md)",
    ),
    Setting("PROFILES_CONSOLE_PORT", "8341", "HTTP port of the web console"),
    Setting(
        "PROFILES_CONSOLE_METRICS_PORT",
        "9456",
        "Prometheus /metrics port of the console; 0 turns it off",
    ),
    Setting(
        "PROFILES_CONSOLE_FORWARDED_ALLOW_IPS",
        "127.0.0.1",
        "console: addresses (comma-separated IPs or networks, `*` for any) of the TLS proxies"
        " whose X-Forwarded-Proto and X-Forwarded-For it believes: behind one, its cookies are"
        " Secure (docs/console.md)",
    ),
    Setting(
        "PROFILES_CONSOLE_SECURE_COOKIES",
        "false",
        "console: `true` sends its cookies Secure whatever the scheme a request came by (TLS"
        " ends at a proxy; the console is then reached over https only)",
    ),
)


class SettingInvalid(ValueError):
    """A PROFILES_* variable whose value the setting cannot take; the message names it."""


def _flag(env: str, text: str) -> bool:
    """A yes/no setting: true, 1, yes or on is yes; false, 0, no, off or empty is no (any
    case); anything else is refused, as a number setting that is no number is."""
    word = text.strip().lower()
    if word in ("true", "1", "yes", "on"):
        return True
    if word in ("false", "0", "no", "off", ""):
        return False
    raise SettingInvalid(f"{env} must be true or false, not {text!r}")


def _whole(env: str, text: str, *, least: int = 0, most: int | None = None) -> int:
    """A whole-number setting from least to most."""
    try:
        number = int(text.strip())
    except ValueError:
        raise SettingInvalid(f"{env} must be a whole number, not {text!r}") from None
    if number < least or (most is not None and number > most):
        bounds = f"from {least}" + ("" if most is None else f" to {most}")
        raise SettingInvalid(f"{env} must be {bounds}, not {number}")
    return number


def _port(env: str, text: str, *, off_allowed: bool = False) -> int:
    """A TCP port: 1 to 65535 (0 too where it turns the listener off: metrics)."""
    return _whole(env, text, least=0 if off_allowed else 1, most=65535)


def _decimal(env: str, text: str) -> float:
    """A non-negative number setting (seconds, a rate)."""
    try:
        number = float(text.strip())
    except ValueError:
        raise SettingInvalid(f"{env} must be a number, not {text!r}") from None
    if not 0 <= number < float("inf"):
        raise SettingInvalid(f"{env} must be a number from 0, not {text!r}")
    return number


def _positive_decimal(env: str, text: str) -> float:
    """A number setting above 0 (a wait of 0 would mean "forever" to Redis' BLOCK)."""
    number = _decimal(env, text)
    if number <= 0:
        raise SettingInvalid(f"{env} must be a number above 0, not {text!r}")
    return number


def _base_url(env: str, text: str) -> str:
    """An http(s) URL that paths are appended to, without its trailing `/`."""
    url = text.strip().rstrip("/")
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest or any(c.isspace() for c in url):
        raise SettingInvalid(f"{env} must be an http(s) URL, not {text!r}")
    return url


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = ""
    redis_url: str = ""
    redis_prefix: str = "profiles"
    internal_token: str = ""
    bind_address: str = "127.0.0.1"
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    metrics_ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    addresses: Mapping[str, str] = field(
        default_factory=lambda: {n: f"127.0.0.1:{p}" for n, p in DEFAULT_PORTS.items()}
    )
    log_level: str = "info"
    data_dir: Path = field(default_factory=lambda: Path("~/.profiles").expanduser())
    db_pool_size: int = 10
    shutdown_grace_seconds: float = 10.0
    restart_delay_seconds: float = 0.5
    max_concurrent_rpcs: int = 1000
    max_streams: int = 100
    claim_idle_seconds: float = 30.0
    bus_wait_seconds: float = 2.0
    bus_retention_hours: int = DEFAULT_BUS_RETENTION_HOURS
    erasure_sweep_minutes: int = 10
    edge_port: int = 8340
    edge_metrics_port: int = 9455
    edge_rate_limit: float = 500.0
    edge_rate_burst: int = 1000
    edge_posthog_asset_url: str = "https://us-assets.i.posthog.com"
    console_port: int = 8341
    console_metrics_port: int = 9456
    console_forwarded_allow_ips: str = "127.0.0.1"
    console_secure_cookies: bool = False
    events_retention_days: int = 0
    ingest_write_partitions: int = 2
    ingest_group_writers: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        env = os.environ if environ is None else environ
        values = {s.env: env.get(s.env, s.default) for s in SETTINGS}
        for name in SERVICE_NAMES:
            # A moved port moves the address the other services use, unless that is set too.
            upper = name.upper()
            if f"PROFILES_{upper}_ADDRESS" not in env:
                values[f"PROFILES_{upper}_ADDRESS"] = (
                    f"127.0.0.1:{values[f'PROFILES_{upper}_PORT']}"
                )

        def per_service(kind: str) -> dict[str, str]:
            return {n: values[f"PROFILES_{n.upper()}_{kind}"] for n in SERVICE_NAMES}

        return cls(
            database_url=values["PROFILES_DATABASE_URL"],
            redis_url=values["PROFILES_REDIS_URL"],
            redis_prefix=values["PROFILES_REDIS_PREFIX"],
            internal_token=values["PROFILES_INTERNAL_TOKEN"],
            bind_address=values["PROFILES_BIND_ADDRESS"],
            ports={
                n: _port(f"PROFILES_{n.upper()}_PORT", v) for n, v in per_service("PORT").items()
            },
            metrics_ports={
                n: _port(f"PROFILES_{n.upper()}_METRICS_PORT", v, off_allowed=True)
                for n, v in per_service("METRICS_PORT").items()
            },
            addresses=per_service("ADDRESS"),
            log_level=values["PROFILES_LOG_LEVEL"],
            data_dir=Path(values["PROFILES_DATA_DIR"]).expanduser(),
            db_pool_size=_whole("PROFILES_DB_POOL_SIZE", values["PROFILES_DB_POOL_SIZE"], least=1),
            shutdown_grace_seconds=_decimal(
                "PROFILES_SHUTDOWN_GRACE_SECONDS", values["PROFILES_SHUTDOWN_GRACE_SECONDS"]
            ),
            restart_delay_seconds=_decimal(
                "PROFILES_RESTART_DELAY_SECONDS", values["PROFILES_RESTART_DELAY_SECONDS"]
            ),
            max_concurrent_rpcs=_whole(
                "PROFILES_MAX_CONCURRENT_RPCS", values["PROFILES_MAX_CONCURRENT_RPCS"], least=1
            ),
            max_streams=_whole("PROFILES_MAX_STREAMS", values["PROFILES_MAX_STREAMS"], least=1),
            claim_idle_seconds=_decimal(
                "PROFILES_CLAIM_IDLE_SECONDS", values["PROFILES_CLAIM_IDLE_SECONDS"]
            ),
            bus_wait_seconds=_positive_decimal(
                "PROFILES_BUS_WAIT_SECONDS", values["PROFILES_BUS_WAIT_SECONDS"]
            ),
            bus_retention_hours=_whole(
                "PROFILES_BUS_RETENTION_HOURS",
                values["PROFILES_BUS_RETENTION_HOURS"],
                least=1,
                most=BUS_RETENTION_MOST_HOURS,
            ),
            erasure_sweep_minutes=_whole(
                "PROFILES_ERASURE_SWEEP_MINUTES",
                values["PROFILES_ERASURE_SWEEP_MINUTES"],
                least=1,
                most=ERASURE_SWEEP_MOST_MINUTES,
            ),
            edge_port=_port("PROFILES_EDGE_PORT", values["PROFILES_EDGE_PORT"]),
            edge_metrics_port=_port(
                "PROFILES_EDGE_METRICS_PORT", values["PROFILES_EDGE_METRICS_PORT"], off_allowed=True
            ),
            edge_rate_limit=_decimal(
                "PROFILES_EDGE_RATE_LIMIT", values["PROFILES_EDGE_RATE_LIMIT"]
            ),
            edge_rate_burst=_whole("PROFILES_EDGE_RATE_BURST", values["PROFILES_EDGE_RATE_BURST"]),
            edge_posthog_asset_url=_base_url(
                "PROFILES_EDGE_POSTHOG_ASSET_URL", values["PROFILES_EDGE_POSTHOG_ASSET_URL"]
            ),
            console_port=_port("PROFILES_CONSOLE_PORT", values["PROFILES_CONSOLE_PORT"]),
            events_retention_days=_whole(
                "PROFILES_EVENTS_RETENTION_DAYS", values["PROFILES_EVENTS_RETENTION_DAYS"]
            ),
            ingest_write_partitions=_whole(
                "PROFILES_INGEST_WRITE_PARTITIONS",
                values["PROFILES_INGEST_WRITE_PARTITIONS"],
                least=1,
            ),
            ingest_group_writers=_whole(
                "PROFILES_INGEST_GROUP_WRITERS", values["PROFILES_INGEST_GROUP_WRITERS"], least=1
            ),
            console_metrics_port=_port(
                "PROFILES_CONSOLE_METRICS_PORT",
                values["PROFILES_CONSOLE_METRICS_PORT"],
                off_allowed=True,
            ),
            console_forwarded_allow_ips=values["PROFILES_CONSOLE_FORWARDED_ALLOW_IPS"],
            console_secure_cookies=_flag(
                "PROFILES_CONSOLE_SECURE_COOKIES", values["PROFILES_CONSOLE_SECURE_COOKIES"]
            ),
        )

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {
            "PROFILES_DATABASE_URL": self.database_url,
            "PROFILES_REDIS_URL": self.redis_url,
            "PROFILES_REDIS_PREFIX": self.redis_prefix,
            "PROFILES_INTERNAL_TOKEN": self.internal_token,
            "PROFILES_BIND_ADDRESS": self.bind_address,
            "PROFILES_LOG_LEVEL": self.log_level,
            "PROFILES_DATA_DIR": str(self.data_dir),
            "PROFILES_DB_POOL_SIZE": str(self.db_pool_size),
            "PROFILES_SHUTDOWN_GRACE_SECONDS": str(self.shutdown_grace_seconds),
            "PROFILES_RESTART_DELAY_SECONDS": str(self.restart_delay_seconds),
            "PROFILES_MAX_CONCURRENT_RPCS": str(self.max_concurrent_rpcs),
            "PROFILES_MAX_STREAMS": str(self.max_streams),
            "PROFILES_CLAIM_IDLE_SECONDS": str(self.claim_idle_seconds),
            "PROFILES_BUS_WAIT_SECONDS": str(self.bus_wait_seconds),
            "PROFILES_BUS_RETENTION_HOURS": str(self.bus_retention_hours),
            "PROFILES_ERASURE_SWEEP_MINUTES": str(self.erasure_sweep_minutes),
            "PROFILES_EDGE_PORT": str(self.edge_port),
            "PROFILES_EDGE_METRICS_PORT": str(self.edge_metrics_port),
            "PROFILES_EDGE_RATE_LIMIT": str(self.edge_rate_limit),
            "PROFILES_EDGE_RATE_BURST": str(self.edge_rate_burst),
            "PROFILES_EDGE_POSTHOG_ASSET_URL": self.edge_posthog_asset_url,
            "PROFILES_CONSOLE_PORT": str(self.console_port),
            "PROFILES_CONSOLE_METRICS_PORT": str(self.console_metrics_port),
            "PROFILES_CONSOLE_FORWARDED_ALLOW_IPS": self.console_forwarded_allow_ips,
            "PROFILES_CONSOLE_SECURE_COOKIES": "true" if self.console_secure_cookies else "false",
            "PROFILES_EVENTS_RETENTION_DAYS": str(self.events_retention_days),
            "PROFILES_INGEST_WRITE_PARTITIONS": str(self.ingest_write_partitions),
            "PROFILES_INGEST_GROUP_WRITERS": str(self.ingest_group_writers),
        }
        for name in SERVICE_NAMES:
            upper = name.upper()
            env[f"PROFILES_{upper}_PORT"] = str(self.ports[name])
            env[f"PROFILES_{upper}_METRICS_PORT"] = str(self.metrics_ports[name])
            env[f"PROFILES_{upper}_ADDRESS"] = self.addresses[name]
        return env

    @property
    def bus_retention_ms(self) -> int:
        """The bus retention as shared.bus.Bus takes it."""
        return self.bus_retention_hours * 3_600_000

    def with_changes(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
