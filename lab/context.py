"""What every part of the lab shares: its paths, its LabInfo (lab.json) and the process helper.

Each system module (docker, web, postgres, redis, sshd, alerting) is a small component
object built on one :class:`LabContext`; :class:`lab.core.Lab` wires them together.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from pydantic import BaseModel

from lab.proc import LabError, Procs, free_port

BASE_PORTS = ("web_port", "pg_port", "redis_port", "ssh_port")
# Optional in lab.json (older files lack them): chosen on first load and then persisted.
ALERTING_PORTS = ("blackbox_port", "prometheus_port", "alertmanager_port", "gateway_port",
                  "postgres_exporter_port", "redis_exporter_port", "node_exporter_port")
# The application tier's other services (lab/app.py); also filled in when lab.json lacks them.
APP_PORTS = ("upstream_port", "worker_port")
SOCK_MAX = 100  # unix socket paths are limited to ~108 bytes
#: When set (the test session sets it), every secret the lab generates carries this marker, so a
#: scan of everything the runs and logs kept can prove no secret leaked (tests/test_secrets_canary.py).
SECRET_CANARY_ENV = "RUNBOOKS_SECRET_CANARY"


def new_secret(nbytes: int = 24) -> str:
    """A new random secret of [A-Za-z0-9_-] only (safe inside a SQL literal and a Bearer header),
    prefixed with ``$RUNBOOKS_SECRET_CANARY`` when that is set."""
    value = secrets.token_urlsafe(nbytes)
    canary = os.environ.get(SECRET_CANARY_ENV, "")
    if not canary:
        return value
    if not re.fullmatch(r"[A-Za-z0-9_-]+", canary):
        raise LabError(f"lab: {SECRET_CANARY_ENV} must be [A-Za-z0-9_-] only (it goes into SQL literals)")
    return f"{canary}-{value}"


def write_secret_file(path: Path, nbytes: int = 24) -> str:
    """The secret in ``path`` (mode 0600), created with :func:`new_secret` when missing or empty.
    Never rewritten once it holds one: containers bind-mount these files."""
    value = path.read_text().strip() if path.exists() else ""
    if not value:
        value = new_secret(nbytes)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)  # no newline: sent verbatim as Bearer credentials
    os.chmod(path, 0o600)
    return value


class LabInfo(BaseModel):
    lab_dir: Path
    docker_socket: Path
    docker_base_url: str
    web_port: int
    pg_port: int
    redis_port: int
    ssh_port: int
    container_name: str = "lab-web"
    web_image: str = "lab-web:1.1"
    previous_image: str = "lab-web:1.0"
    broken_image: str = "lab-web:broken"
    errors_image: str = "lab-web:1.2-errors"  # a release answering 30 % of /api/price with 500
    health_url: str
    root_url: str
    inventory_path: Path
    ssh_key: Path
    known_hosts: Path
    pg_password_file: Path
    pg_socket_dir: Path
    logs_dir: Path
    pids_dir: Path
    # the alerting stack's ports, chosen at the first up like the others (lab.json keeps them)
    blackbox_port: int
    prometheus_port: int
    alertmanager_port: int
    gateway_port: int  # the alert gateway (started by someone else) listens here
    gateway_url: str
    prometheus_url: str
    alertmanager_url: str
    blackbox_url: str
    alertmanager_token_file: Path
    postgres_exporter_port: int
    redis_exporter_port: int
    node_exporter_port: int
    # the application tier (lab/app.py): the upstream "prices" API and the queue consumer
    upstream_port: int
    worker_port: int
    upstream_url: str
    worker_url: str
    metrics_url: str  # the web service's own /metrics
    admin_url: str  # base of the web service's admin endpoints
    app_dir: Path  # secrets/ (admin and chaos tokens), status/ (textfile collector), logs/ (app.log)
    admin_token_file: Path
    chaos_token_file: Path
    app_log_file: Path
    app_status_dir: Path


class LabContext:
    """Paths under ``lab_dir``, the lazily created LabInfo, and the :class:`Procs` helper."""

    def __init__(self, lab_dir: Path, container_name: str = "lab-web") -> None:
        self.lab_dir = d = Path(lab_dir).resolve()
        self.container_name = container_name
        self.logs_dir = d / "logs"
        self.pids_dir = d / "pids"
        self.docker_dir = d / "docker"
        self.docker_socket = self.docker_dir / "docker.sock"
        self.set_pg_paths(d / "pg")
        self.redis_dir = d / "redis"
        self.ssh_dir = d / "ssh"
        self.secrets_dir = d / "secrets"
        self.build_dir = d / "build"
        self.alerting_dir = d / "alerting"
        self.app_dir = d / "app"
        self.app_secrets_dir = self.app_dir / "secrets"
        self.app_status_dir = self.app_dir / "status"
        self.app_logs_dir = self.app_dir / "logs"
        self.info_path = d / "lab.json"
        self.inventory_path = d / "inventory.yaml"
        self.procs = Procs(self.logs_dir, self.pids_dir, d)
        self._info: LabInfo | None = None

    def set_pg_paths(self, pg_dir: Path) -> None:
        # resolved: user postgres must not have to pass through the lab dir to reach a link
        self.pg_dir = pg_dir.resolve() if pg_dir.is_symlink() else pg_dir
        self.pg_data = self.pg_dir / "data"
        self.pg_sock = self.pg_dir / "sock"

    # shortcuts to the process helper
    def log(self, name: str) -> Path:
        return self.procs.log(name)

    def pidfile(self, name: str) -> Path:
        return self.procs.pidfile(name)

    def read_pid(self, name: str) -> int | None:
        return self.procs.read_pid(name)

    def fail(self, name: str, what: str, log: Path | None = None) -> LabError:
        return self.procs.fail(name, what, log)

    # ----------------------------------------------------------------- lab.json

    @property
    def info(self) -> LabInfo:
        if self._info is None:
            self._info = self._load_or_create_info()
        return self._info

    def _load_or_create_info(self) -> LabInfo:
        ports: dict[str, int] = {}
        if self.info_path.exists():
            try:
                old = json.loads(self.info_path.read_text())
                ports = {k: int(old[k]) for k in BASE_PORTS}
                ports.update({k: int(old[k]) for k in (*ALERTING_PORTS, *APP_PORTS) if old.get(k)})
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise LabError(f"lab: {self.info_path} is unreadable ({exc}); remove it to start afresh") from None
        taken: set[int] = set(ports.values())
        for k in (*BASE_PORTS, *ALERTING_PORTS, *APP_PORTS):
            if k not in ports:
                ports[k] = free_port(taken)
                taken.add(ports[k])
        web = ports["web_port"]
        return LabInfo.model_validate(dict(
            lab_dir=self.lab_dir,
            docker_socket=self.docker_socket,
            docker_base_url=f"unix://{self.docker_socket}",
            container_name=self.container_name,
            health_url=f"http://127.0.0.1:{web}/health",
            root_url=f"http://127.0.0.1:{web}/",
            inventory_path=self.inventory_path,
            ssh_key=self.ssh_dir / "id_ed25519",
            known_hosts=self.ssh_dir / "known_hosts",
            pg_password_file=self.secrets_dir / "pg_password",
            pg_socket_dir=self.pg_sock,
            logs_dir=self.logs_dir,
            pids_dir=self.pids_dir,
            gateway_url=f"http://127.0.0.1:{ports['gateway_port']}",
            prometheus_url=f"http://127.0.0.1:{ports['prometheus_port']}",
            alertmanager_url=f"http://127.0.0.1:{ports['alertmanager_port']}",
            blackbox_url=f"http://127.0.0.1:{ports['blackbox_port']}",
            alertmanager_token_file=self.secrets_dir / "alertmanager_token",
            upstream_url=f"http://127.0.0.1:{ports['upstream_port']}",
            worker_url=f"http://127.0.0.1:{ports['worker_port']}",
            metrics_url=f"http://127.0.0.1:{web}/metrics",
            admin_url=f"http://127.0.0.1:{web}/admin",
            app_dir=self.app_dir,
            admin_token_file=self.app_secrets_dir / "admin_token",
            chaos_token_file=self.app_secrets_dir / "chaos_token",
            app_log_file=self.app_logs_dir / "app.log",
            app_status_dir=self.app_status_dir,
            **ports,
        ))

    def save_info(self) -> None:
        self.info_path.write_text(self.info.model_dump_json(indent=2) + "\n")

    def prepare_dirs(self) -> None:
        for p in (self.lab_dir, self.logs_dir, self.pids_dir, self.docker_dir, self.redis_dir,
                  self.ssh_dir, self.build_dir):
            p.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        os.chmod(self.lab_dir, 0o755)
        for p in (self.app_dir, self.app_status_dir, self.app_logs_dir):
            p.mkdir(parents=True, exist_ok=True)
        self.app_secrets_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.app_secrets_dir, 0o700)
        for token in (self.info.admin_token_file, self.info.chaos_token_file):
            write_secret_file(token)
        for sock in (self.docker_socket, self.docker_dir / "exec" / "containerd" / "containerd.sock",
                     self.pg_sock / ".s.PGSQL.65535"):
            if len(str(sock)) > SOCK_MAX:
                raise LabError(
                    f"lab: socket path {sock} is too long ({len(str(sock))} > {SOCK_MAX} chars); "
                    "use a shorter lab_dir (RUNBOOKS_STATE_DIR)"
                )
