"""The lab: real targets on loopback (dockerd + the web, upstream and worker containers,
PostgreSQL, Redis, sshd, steady client traffic), started and stopped by one command.

Everything lives under ``lab_dir``::

    lab.json        LabInfo (ports are chosen once and reused)
    inventory.yaml  a valid inventory pointing at the lab
    logs/<name>.log one log per component
    pids/<name>.pid one pidfile per process the lab started
    docker/ pg/ redis/ ssh/ secrets/ build/
    app/            the web service's tokens (secrets/), status file (status/) and log (logs/)
    alerting/       configs and data of the optional alerting stack
    disk/           a 64 MiB tmpfs mounted at up, unmounted at down (lab/disk.py: the disk-full drills)

Processes are stopped by the PID in their pidfile, never by name.

The alerting stack (blackbox exporter, Prometheus, Alertmanager; see lab/alerting.py)
is started only when asked: ``Lab(lab_dir, alerting=True).up()`` or
``lab.up(alerting=True)``; ``down()`` always stops it.

This module is the façade: one component object per system (lab/docker.py, web.py, app.py,
postgres.py, redis.py, sshd.py, alerting.py) shares one :class:`LabContext` (paths,
LabInfo, the process helper of lab/proc.py); faults live in lab/faults.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from lab import faults as _faults
from lab.alerting import Alerting
from lab.app import App
from lab.context import LabContext, LabInfo
from lab.disk import Disk
from lab.docker import Docker
from lab.inventory import inventory_dict, write_inventory
from lab.postgres import Postgres
from lab.proc import LabError, http_get, pid_alive
from lab.redis import Redis
from lab.sshd import Sshd
from lab.web import Web

__all__ = ["Lab", "LabError", "LabInfo", "http_get", "pid_alive"]

COMPONENTS = ("dockerd", "postgres", "redis", "sshd", "web", "upstream", "worker", "traffic")


class Lab:
    def __init__(self, lab_dir: Path, container_name: str = "lab-web", alerting: bool = False) -> None:
        self.ctx = ctx = LabContext(lab_dir, container_name)
        self.lab_dir = ctx.lab_dir
        self.container_name = container_name
        self.alerting = alerting  # start the alerting stack at up() (also: up(alerting=True))
        self.inventory_path = ctx.inventory_path
        self.docker = Docker(ctx)
        self.web = Web(ctx, self.docker)
        self.app = App(ctx, self.docker)
        self.disk = Disk(ctx)
        self.postgres = Postgres(ctx)
        self.redis = Redis(ctx)
        self.sshd = Sshd(ctx)
        self.alerting_stack = Alerting(ctx)
        #: what the last up() found down and left for a runbook (it never repairs a target)
        self.left_down: list[str] = []
        #: the runbook targets the last up() found stopped and started again (said, not silent)
        self.repaired: list[str] = []
        self._stoppers = {"dockerd": self.docker.stop, "postgres": self.postgres.stop,
                          "redis": self.redis.stop, "sshd": self.sshd.stop}

    # ----------------------------------------------------------------- info / pids

    @property
    def _down_marker(self) -> Path:
        return self.lab_dir / "stopped-by-down"

    @property
    def info(self) -> LabInfo:
        return self.ctx.info

    def log(self, name: str) -> Path:
        return self.ctx.log(name)

    def pidfile(self, name: str) -> Path:
        return self.ctx.pidfile(name)

    def read_pid(self, name: str) -> int | None:
        return self.ctx.read_pid(name)

    def pids(self) -> dict[str, int]:
        """PIDs of the lab's processes according to the pidfiles (alive or not)."""
        out = {}
        for name in ("dockerd", "containerd", "postgres", "redis", "sshd", "traffic"):
            pid = self.read_pid(name) if name != "containerd" else self.docker.containerd_pid()
            if pid:
                out[name] = pid
        return out

    def docker_client(self, timeout: int = 30):
        return self.docker.client(timeout=timeout)

    def inventory_dict(self) -> dict:
        return inventory_dict(self.info)

    def stop_component(self, name: str) -> None:
        """Stop one lab process by the PID in its pidfile (for drills and tests)."""
        if name not in self._stoppers:
            raise LabError(f"{name}: not a lab process (one of dockerd, postgres, redis, sshd)")
        self._stoppers[name]()

    # ----------------------------------------------------------------- up / down / status

    def up(self, alerting: bool | None = None) -> LabInfo:
        """Start what is not running (idempotent). ``alerting=True`` (or ``Lab(..., alerting=True)``)
        also starts the alerting stack; without it the alerting stack is neither started nor stopped."""
        t0 = time.monotonic()
        if alerting:
            self.alerting = True
        self.ctx.prepare_dirs()
        info = self.info
        self.ctx.save_info()
        docker_proc = self.docker.start()  # slowest: start first, wait later
        # targets of runbooks found stopped (a pidfile, no process) are started again, and said
        # so: a repair by `up` is never silent
        # (ran before - it has a log - but not now, and not stopped by `down`)
        was_down = [n for n in ("postgres", "redis") if self.ctx.log(n).exists()
                    and not self.ctx.procs.alive(n) and not self._down_marker.exists()]
        self.postgres.up()
        self.redis.up()
        self.sshd.up()
        self.docker.wait(docker_proc)
        self.docker.ensure_images()
        self.app.up()  # the upstream and the queue consumer, before the web service that uses them
        # after `down` stopped the container on purpose it is started again; otherwise a dead
        # target is left for its runbook (up does not repair targets)
        stopped_by_down = self._down_marker.exists()
        self.left_down = [w for w in [self.web.up(restart_stopped=stopped_by_down)] if w]
        self.app.start_traffic()
        self._down_marker.unlink(missing_ok=True)
        self.repaired = [f"{n}: was down; started again by lab up, not by a runbook" for n in was_down]
        self.disk.up()
        write_inventory(self.inventory_path, info)
        if self.alerting if alerting is None else alerting:
            self.up_alerting()
        self.ctx.save_info()
        self.last_up_seconds = time.monotonic() - t0
        return info

    def down(self) -> None:
        # the alerting stack first (it would alert on everything below), then fault
        # holders and the traffic, then the containers (cleanly), then the daemons
        self.alerting_stack.stop()  # self.alerting stays: a Lab(alerting=True) starts it again at up()
        if self.lab_dir.is_dir():
            self._down_marker.touch()  # the next up() restarts what this stops (not a repair)
        _faults.stop_all_holders(self)
        self.app.stop_traffic()
        self.docker.stop_labelled_containers()
        self.disk.down()
        for name in ("sshd", "redis", "postgres"):
            self.stop_component(name)
        self.docker.stop()

    def status(self) -> dict[str, str]:
        out: dict[str, str] = {
            "dockerd": self.docker.status(),
            "postgres": self.postgres.status(),
            "redis": self.redis.status(),
            "sshd": self.sshd.status(),
        }
        for name, part in (("web", self.web.status), ("upstream", lambda: self.app.container_status("upstream")),
                           ("worker", lambda: self.app.container_status("worker"))):
            out[name] = part() if out["dockerd"] == "up" else "down (dockerd down)"
        out["traffic"] = self.app.traffic_status()
        out["disk"] = self.disk.status()
        if self.alerting_enabled():
            out.update(self.alerting_status())
        return out

    # ----------------------------------------------------------------- web

    def kill_web(self) -> None:
        self.web.kill()

    def deploy_broken_web(self) -> None:
        self.web.deploy_broken()

    def reset_web(self, timeout: float = 30.0) -> None:
        self.web.reset(timeout)

    # ----------------------------------------------------------------- faults

    def inject(self, name: str) -> None:
        """Break the lab the way fault ``name`` describes (``python -m lab faults`` lists them)."""
        _faults.get(name).inject(self)

    def reset_fault(self, name: str) -> None:
        """Put fault ``name``'s part right: stop its holder (if any), then its reset."""
        f = _faults.get(name)
        _faults.stop_holder(self, name)
        f.reset(self)

    def fault_healthy(self, name: str) -> bool:
        """Is the part fault ``name`` breaks healthy (again)?"""
        return bool(_faults.get(name).healthy(self))

    def reset_all_faults(self) -> list[str]:
        """Reset each registered fault whose part is not at its baseline or whose holder is
        left; the names reset. When all is at baseline this only costs the health checks."""
        held = set(_faults.held_faults(self))
        for name in held:  # first: a holder may keep another fault's reset from working (the web port)
            _faults.stop_holder(self, name)
        done = []
        # faults that share a part share its check (web-killed, web-broken-release, ... all ask
        # whether the web service is at its baseline): each check runs once until a reset
        # changes the lab
        seen: dict[object, bool] = {}
        for name, f in list(_faults.FAULTS.items()):
            check = f.at_baseline or f.healthy
            if check not in seen:
                seen[check] = name not in held and f.is_at_baseline(self)
            if name in held or not seen[check]:  # checked in turn: faults may share a part
                self.reset_fault(name)
                done.append(name)
                seen.clear()
        return done

    # ----------------------------------------------------------------- alerting stack (optional)

    def alerting_pids(self) -> dict[str, int]:
        """PIDs of the alerting processes according to their pidfiles (alive or not)."""
        return self.alerting_stack.pids()

    def alerting_enabled(self) -> bool:
        """Asked for on this Lab, or left running by an earlier ``up --alerting``."""
        return self.alerting or self.alerting_stack.any_pidfile()

    def up_alerting(self) -> LabInfo:
        """Start (or keep) the blackbox exporter, Prometheus and Alertmanager; idempotent."""
        self.alerting = True
        self.ctx.prepare_dirs()
        return self.alerting_stack.up()

    def down_alerting(self) -> None:
        """Stop only the alerting stack (by PID); later up() calls leave it off."""
        self.alerting_stack.stop()
        self.alerting = False

    def alerting_status(self) -> dict[str, str]:
        return self.alerting_stack.status()

