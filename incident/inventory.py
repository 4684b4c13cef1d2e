"""The inventory: the services a team runs and the systems behind them.

A YAML file validated by these models. Secrets are references, never values:
``env:NAME`` (an environment variable), ``file:/path`` (a file only the
runner can read, e.g. a mounted secret) or ``prefect-secret:block-name``.

    docker_hosts:
      lab: {base_url: "unix:///path/docker.sock"}
    ssh_hosts:
      lab: {hostname: 127.0.0.1, port: 2222, username: root,
            key_file: /path/id_ed25519, known_hosts: /path/known_hosts}
    databases:
      lab: {host: 127.0.0.1, port: 55432, dbname: app, user: app, password: "file:/path/pg_password",
            admin_user: runbooks, admin_password: "file:/path/pg_runbooks_password",
            max_idle_s: 300, connections_threshold: 0.8}
    redis:
      lab: {host: 127.0.0.1, port: 56379, ssh_host: lab,
            start_command: ["systemctl", "start", "redis-server"]}
    services:
      web:
        environment: lab
        owner: sre
        health_url: http://127.0.0.1:18080/health
        container: lab-web
        docker_host: lab
        ssh_host: lab
        database: lab
        redis: lab
        stateless: true
        severity_down: P0
        disk:                         # the disk-full runbook (over SSH on ssh_host)
          mount: /srv/app
          min_free_bytes: 1073741824  # runbook 003: critical below 1 GB
          min_free_fraction: 0.10
          cleanup:
            - {path: /srv/app/logs, older_than_days: 30, what: logs}
            - {path: /srv/app/backups, older_than_days: 60, what: backups}
        app:                          # the application runbooks (memory/CPU, upstream, deploy, logs, queue)
          metrics_url: http://127.0.0.1:18080/metrics
          admin_url: http://127.0.0.1:18080/admin
          admin_token: "file:/run/secrets/web_admin_token"
          prometheus_url: http://127.0.0.1:9090
          upstream: {name: prices, health_url: "http://127.0.0.1:18081/health",
                     probe_url: "http://127.0.0.1:18081/price"}
          required_settings: [LABWEB_UPSTREAM, LABWEB_PG, LABWEB_REDIS]
          start_dependencies: [redis]
          log: {path: /var/log/labweb/app.log, max_bytes: 104857600, keep: 5}
          queue: {redis: lab, key: jobs, consumer_container: lab-worker, max_backlog: 1000}
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from incident.errors import ConfigurationError, SecretUnavailableError, UnknownTargetError
from incident.settings import get_settings

T = TypeVar("T")

#: libyaml's loader when PyYAML was built with it (the pure-Python one takes seconds on a large
#: inventory); the same safe subset of YAML either way.
YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str | bytes) -> Any:
    """``yaml.safe_load`` with the C loader when available."""
    return yaml.load(text, Loader=YAML_LOADER)  # noqa: S506 - a safe loader


_FILES: dict[tuple[str, str], tuple[tuple[int, int], bytes, Any]] = {}
_FILES_LOCK = threading.Lock()
_PARSING = threading.Lock()


def cached_file(path: Path, kind: str, parse: Callable[[bytes], T]) -> T:
    """``parse(the file's bytes)``, parsed once and reused while the file stays the same: same
    (path, mtime_ns, size) and the same bytes (a rewrite within the clock's resolution is seen
    too). Errors are not cached; a missing file raises ``FileNotFoundError``."""
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    raw = path.read_bytes()
    key = (kind, str(path.resolve()))
    with _FILES_LOCK:
        hit = _FILES.get(key)
    if hit is not None and hit[0] == stamp and hit[1] == raw:
        return hit[2]
    with _PARSING:  # one thread parses; the others (a burst of deliveries) then find it parsed
        with _FILES_LOCK:
            hit = _FILES.get(key)
        if hit is not None and hit[0] == stamp and hit[1] == raw:
            return hit[2]
        value = parse(raw)
    with _FILES_LOCK:
        _FILES[key] = (stamp, raw, value)
        while len(_FILES) > 64:  # tests write many files; keep the newest
            _FILES.pop(next(iter(_FILES)))
    return value


class Severity(str, Enum):
    """P0 critical (production down) .. P3 low, as in the runbooks."""

    P0 = "P0"
    P1 = "P1"
    P2 = "P2"
    P3 = "P3"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Model):
    """A pointer to a secret. ``str()`` shows the reference, never the value."""

    ref: str = Field(pattern=r"^(env|file|prefect-secret):.+$")

    def __str__(self) -> str:
        return self.ref

    def resolve(self) -> SecretStr:
        kind, _, name = self.ref.partition(":")
        if kind == "env":
            value = os.environ.get(name)
            if value is None:
                raise SecretUnavailableError(
                    self.ref, "environment variable not set", "it to hold the secret",
                    f"export {name} in the environment of the Prefect worker/runner",
                )
            return SecretStr(value)
        if kind == "file":
            try:
                return SecretStr(Path(name).read_text().strip())
            except OSError as exc:
                raise SecretUnavailableError(
                    self.ref, f"file not readable ({exc.strerror})", "a readable secret file",
                    "check the path and permissions of the secret file",
                ) from None
        from prefect.blocks.system import Secret  # imported late: needs a Prefect API

        try:
            block: Any = Secret.load(name)  # a sync load here: Secret.load is sync-or-async typed
            return SecretStr(str(block.get()))
        except (ValueError, RuntimeError) as exc:
            raise SecretUnavailableError(
                self.ref, f"Prefect Secret block not loadable ({type(exc).__name__})",
                "a Secret block of that name", f"create it: Secret(value=...).save('{name}')",
            ) from None


def _secret(v: object) -> object:
    return {"ref": v} if isinstance(v, str) else v


class DockerHost(_Model):
    base_url: str = Field(description="Docker engine address: unix:///path.sock or tcp://host:port")
    timeout_s: float = 10.0


class SshHost(_Model):
    hostname: str
    port: int = 22
    username: str
    key_file: Path
    known_hosts: Path = Field(description="Pinned host keys; unknown or changed keys are refused")
    timeout_s: float = 10.0


class _WithPassword(_Model):
    """A connection whose ``password`` (and ``admin_password``) are secret reference strings."""

    password: SecretRef | None = None

    @model_validator(mode="before")
    @classmethod
    def _wrap_secret(cls, data: dict) -> dict:
        if isinstance(data, dict):
            data = {**data, **{k: _secret(data[k]) for k in ("password", "admin_password") if k in data}}
        return data


class Database(_WithPassword):
    host: str
    port: int = 5432
    dbname: str
    user: str = Field(description="The application's role: what the service itself connects as")
    connect_timeout_s: int = 5
    statement_timeout_s: int = Field(10, description="Every runbook query is cut off after this")
    admin_user: str | None = Field(
        None, description="Role the runbooks use to inspect and end sessions (pg_monitor + "
        "pg_signal_backend, not a superuser); defaults to ``user``")
    admin_password: SecretRef | None = None
    max_idle_s: int = Field(300, description="Idle sessions older than this may be ended "
                            "(runbook 002: terminate idle > 5 min)")
    connections_threshold: float = Field(0.8, gt=0, le=1, description="Connections in use / "
                                         "max_connections above this count as exhausted")
    other_databases: bool = Field(False, description="Runbooks may also end sessions of other "
                                  "databases on the same server (default: only dbname's)")
    protected_applications: list[str] = Field(
        default=["postgres_exporter", "pg_dump", "pg_basebackup", "pg_restore", "psql-maintenance"],
        description="Sessions of these application_names are never ended by a runbook")


class RedisInstance(_WithPassword):
    host: str
    port: int = 6379
    timeout_s: float = 5.0
    ssh_host: str | None = Field(None, description="The host Redis runs on (process checks, start)")
    start_command: list[str] | None = Field(
        None, description="argv that starts Redis on ssh_host if it is not running, e.g. "
        "[systemctl, start, redis-server]; quoted before it is sent")


class CleanupRule(_Model):
    """Files below ``path`` older than ``older_than_days`` may be deleted by the disk runbook."""

    path: str = Field(description="Absolute directory; nothing outside it is touched")
    older_than_days: float = Field(gt=0)
    what: str = Field(description="logs, backups, ...: how the plan names these files")


class DiskSpec(_Model):
    """The filesystem the disk-full runbook watches and may clean, on the service's ssh_host."""

    mount: str
    min_free_bytes: int = Field(1 << 30, description="Runbook 003: critical below 1 GB free")
    min_free_fraction: float = Field(0.10, ge=0, lt=1)
    cleanup: list[CleanupRule] = []


class UpstreamSpec(_Model):
    """An API the service calls on every request (runbook: upstream outage)."""

    name: str = Field(description="How the runbooks name it, e.g. prices")
    health_url: str = Field(description="The upstream's own health endpoint")
    probe_url: str = Field(description="A request like the service's own, e.g. GET /price")
    timeout_s: float = Field(2.0, gt=0)


class LogSpec(_Model):
    """The service's log file on its ssh_host (runbook: log and backlog growth)."""

    path: str = Field(description="Absolute path on the service's ssh_host")
    max_bytes: int = Field(100 * 1024**2, gt=0, description="Larger than this counts as too large")
    keep: int = Field(5, ge=1, description="Rotated, gzip-compressed copies kept (path.1.gz .. path.N.gz)")


class QueueSpec(_Model):
    """A Redis list the service produces to and a consumer container drains."""

    redis: str = Field(description="A key into ``redis:``")
    key: str = Field(description="The Redis list the service produces to")
    consumer_container: str = Field(description="The consumer's container, on the service's docker_host")
    max_backlog: int = Field(1000, gt=0, description="More queued jobs than this counts as a backlog")
    min_drain_per_s: float = Field(1.0, gt=0, description="Verify: the backlog shrinks at least this fast")


class AppSpec(_Model):
    """What the application runbooks need to know about a service's own process."""

    metrics_url: str = Field(description="The service's Prometheus metrics endpoint")
    admin_url: str = Field(description="Base URL of its admin endpoints, e.g. http://127.0.0.1:18080/admin")
    admin_token: SecretRef = Field(description="Bearer token of the admin endpoints (a secret reference)")
    prometheus_url: str | None = Field(None, description="For windowed queries (error rate)")
    upstream: UpstreamSpec | None = None
    memory_alert_fraction: float = Field(0.8, gt=0, le=1, description="RSS / limit at which memory "
                                         "counts as near the limit")
    memory_baseline_fraction: float = Field(0.5, gt=0, le=1, description="Verify: RSS back under "
                                            "this share of the limit")
    cpu_alert_cores: float = Field(0.8, gt=0, description="Sustained CPU above this counts as a spin")
    error_rate_threshold: float = Field(0.05, gt=0, le=1, description="Runbooks 001/003: roll back "
                                        "above 5 % errors")
    error_rate_window_s: int = Field(300, gt=0)
    upstream_deadline_s: int = Field(1800, gt=0, description="How long to wait for an upstream "
                                     "before escalating")
    required_settings: list[str] = Field(default=[], description="Settings the service refuses "
                                         "to start without")
    start_dependencies: list[str] = Field(default=[], description='"redis" / "database": checked '
                                          "when the service won't start")
    log: LogSpec | None = None
    queue: QueueSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _wrap_secret(cls, data: dict) -> dict:
        if isinstance(data, dict) and "admin_token" in data:
            data = {**data, "admin_token": _secret(data["admin_token"])}
        return data


class Service(_Model):
    environment: str = Field(description="production, staging, lab, drill ...")
    owner: str
    health_url: str
    container: str | None = None
    docker_host: str | None = None
    ssh_host: str | None = None
    database: str | None = None
    redis: str | None = None
    stateless: bool = Field(False, description="Safe to restart without losing data")
    severity_down: Severity = Severity.P0
    severity_degraded: Severity = Severity.P2
    disk: DiskSpec | None = None
    app: AppSpec | None = None
    drill_target: bool = Field(False, description="Drills may break this service on purpose "
                               "(flows/drill.py); the lab's and drill environments' services "
                               "always may, a production service never does")

    @property
    def drillable(self) -> bool:
        env = self.environment.lower()
        return env not in ("production", "prod") and (self.drill_target or env in ("lab", "drill"))


class Target(_Model):
    """One service with every system behind it resolved: what tasks receive."""

    name: str
    service: Service
    docker: DockerHost | None = None
    ssh: SshHost | None = None
    database: Database | None = None
    redis: RedisInstance | None = None
    redis_host: SshHost | None = Field(None, description="The SSH host Redis runs on")
    app_redis: RedisInstance | None = Field(None, description="The Redis of the service's queue "
                                            "(service.app.queue.redis)")


class Inventory(_Model):
    docker_hosts: dict[str, DockerHost] = {}
    ssh_hosts: dict[str, SshHost] = {}
    databases: dict[str, Database] = {}
    redis: dict[str, RedisInstance] = {}
    services: dict[str, Service] = {}

    @model_validator(mode="after")
    def _references_resolve(self) -> "Inventory":
        refs: list[tuple[str, str | None, dict, str]] = []
        for name, svc in self.services.items():
            refs += [
                (name, svc.docker_host, self.docker_hosts, "docker_hosts"),
                (name, svc.ssh_host, self.ssh_hosts, "ssh_hosts"),
                (name, svc.database, self.databases, "databases"),
                (name, svc.redis, self.redis, "redis"),
            ]
            if svc.container and not svc.docker_host:
                raise ValueError(f"service {name!r} names a container but no docker_host")
            if svc.disk and not svc.ssh_host:
                raise ValueError(f"service {name!r} has a disk but no ssh_host to reach it")
            if svc.app and svc.app.queue:
                refs.append((f"{name} app.queue", svc.app.queue.redis, self.redis, "redis"))
                if not svc.docker_host:
                    raise ValueError(f"service {name!r} has a queue consumer container but no docker_host")
            if svc.app and svc.app.log and not svc.ssh_host:
                raise ValueError(f"service {name!r} has an app log but no ssh_host to reach it")
        for name, r in self.redis.items():
            refs.append((f"redis {name}", r.ssh_host, self.ssh_hosts, "ssh_hosts"))
        for name, ref, table, section in refs:
            if ref is not None and ref not in table:
                raise ValueError(f"{name!r} refers to {section}.{ref}, which is not defined")
        return self

    def target(self, name: str) -> Target:
        try:
            svc = self.services[name]
        except KeyError:
            known = ", ".join(sorted(self.services)) or "(none)"
            raise UnknownTargetError(
                name, "no such service in the inventory", f"one of: {known}",
                "pick a listed service, or add it to the inventory file",
            ) from None
        redis = self.redis.get(svc.redis) if svc.redis else None
        queue = svc.app.queue if svc.app else None
        return Target(
            name=name,
            service=svc,
            docker=self.docker_hosts.get(svc.docker_host) if svc.docker_host else None,
            ssh=self.ssh_hosts.get(svc.ssh_host) if svc.ssh_host else None,
            database=self.databases.get(svc.database) if svc.database else None,
            redis=redis,
            redis_host=self.ssh_hosts.get(redis.ssh_host) if redis and redis.ssh_host else None,
            app_redis=self.redis.get(queue.redis) if queue else None,
        )


def load_inventory(path: Path | None = None) -> Inventory:
    """The inventory, validated; parsed again only when the file changed (``cached_file``)."""
    path = path or get_settings().inventory_path
    try:
        return cached_file(path, "inventory", lambda raw: _parse_inventory(path, raw))
    except FileNotFoundError:
        raise ConfigurationError(
            str(path), "inventory file does not exist", "a YAML inventory",
            "start the lab (`make up`) or set RUNBOOKS_INVENTORY to your inventory file",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(
            str(path), f"invalid YAML ({exc.__class__.__name__})", "a YAML inventory",
            "fix the syntax of the inventory file",
        ) from None


def _parse_inventory(path: Path, raw: bytes) -> Inventory:
    data = load_yaml(raw) or {}
    try:
        return Inventory.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigurationError(
            str(path), problems, "a valid inventory", "fix the listed fields of the inventory file"
        ) from None


def load_target(name: str, path: Path | None = None) -> Target:
    return load_inventory(path).target(name)


EnvironmentKind = Literal["production", "staging", "lab", "drill"]
