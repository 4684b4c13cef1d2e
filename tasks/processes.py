"""The service's process on its host: who holds its port, which settings it starts without.

Runbook 004 "Application Won't Start":

- "Cause: Port already in use ... `lsof -i :8000`": :func:`find_port_holder` asks the
  service's host over SSH who listens on the port (``ss -Hltnp`` filtered on it), then reads
  the process' user and full command line from ``/proc/<pid>``.
- "... `kill -9 <PID>`": :func:`stop_port_holder` (changing) sends **SIGTERM**, never SIGKILL,
  and only to the process a person approved: the same pid with the same command line must
  still hold the port. It waits for the port to free and says clearly when it did not (a
  process that ignores SIGTERM is a human's decision).
- "Cause: Missing environment variables ... `grep -E "DATABASE_URL|..." .env`":
  :func:`find_missing_settings` compares the names in the container's configured environment
  with the inventory's ``app.required_settings``. Only names are read out: the values may be
  secrets and never leave the Docker engine's answer.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable

from pydantic import BaseModel

from incident.errors import ActionFailedError, SshError
from incident.inventory import SshHost, Target
from tasks.common import ActionResult, changing_task, read_only_task
from tasks.containers import _get_container, _require_docker, docker_client
from tasks.ssh_hosts import CommandResult, require_ssh, ssh_session

#: a listening socket's owners in ``ss -p`` output: users:(("name",pid=123,fd=3),...)
_OWNER = re.compile(r'\("((?:[^"\\]|\\.)*)",pid=(\d+),fd=\d+\)')
COMMAND_TIMEOUT_S = 15.0

Run = Callable[..., CommandResult]


class PortHolder(BaseModel):
    """The process listening on a port of the service's host."""

    host: str  # the SSH host asked: user@hostname:port
    address: str  # the listening socket, e.g. 127.0.0.1:18080
    port: int
    pid: int | None  # None: ss shows no process (the SSH user may not see it)
    name: str | None = None  # the process name ss shows
    user: str | None = None
    cmdline: list[str] = []
    other_pids: list[int] = []  # more processes on the same socket (forked workers)

    @property
    def label(self) -> str:
        """How plans and actions name the process: ``pid 123 (python3)``."""
        return f"pid {self.pid} ({self.name or '?'})" if self.pid else f"the process on {self.address}"

    @property
    def command(self) -> str:
        return shlex.join(self.cmdline) if self.cmdline else "(command line not readable)"

    def describe(self) -> str:
        if self.pid is None:
            return (f"{self.address} on {self.host} is held by a process `ss -p` does not show "
                    "(the SSH user may not see other users' processes)")
        text = f"{self.address} on {self.host} is held by {self.label}, user {self.user or '?'}: {self.command}"
        if self.other_pids:
            text += f"; also pids {', '.join(map(str, self.other_pids))} on the same socket"
        return text


def _where(host: SshHost) -> str:
    return f"{host.username}@{host.hostname}:{host.port}"


def _ss(run: Run, host: SshHost, port: int) -> CommandResult:
    result = run(["ss", "-Hltnp", "sport", "=", f":{port}"], timeout_s=COMMAND_TIMEOUT_S)
    if not result.ok:
        raise SshError(_where(host), f"`{result.command}` exited {result.exit_code}: "
                       f"{result.stderr.strip()[:300] or '(no stderr)'}", "ss (iproute2) to list listening sockets",
                       "install iproute2 on the host, or find the process by hand: `ss -ltnp` / `lsof -i :PORT`")
    return result


def _read_holder(run: Run, host: SshHost, port: int) -> PortHolder | None:
    """Who listens on ``port`` (any address) now; None when nothing does."""
    lines = [line for line in _ss(run, host, port).stdout.splitlines() if line.strip()]
    if not lines:
        return None
    fields = lines[0].split()
    address = fields[3] if len(fields) > 3 else f"*:{port}"
    owners: list[tuple[str, int]] = []
    for line in lines:
        for name, pid in _OWNER.findall(line):
            if int(pid) not in [p for _, p in owners]:
                owners.append((name, int(pid)))
    if not owners:
        return PortHolder(host=_where(host), address=address, port=port, pid=None)
    name, pid = owners[0]
    user = run(["stat", "-c", "%U", f"/proc/{pid}"], timeout_s=COMMAND_TIMEOUT_S)
    cmdline = run(["cat", f"/proc/{pid}/cmdline"], timeout_s=COMMAND_TIMEOUT_S)
    return PortHolder(
        host=_where(host), address=address, port=port, pid=pid, name=name,
        user=(user.stdout.strip() or None) if user.ok else None,
        cmdline=[arg for arg in cmdline.stdout.split("\0") if arg] if cmdline.ok else [],
        other_pids=[p for _, p in owners[1:]],
    )


@read_only_task
def find_port_holder(target: Target, port: int) -> PortHolder | None:
    """Runbook 004 `lsof -i :PORT`: the process listening on ``port`` on the service's host
    (pid, name, user, full command line), or None when nothing listens there."""
    host = require_ssh(target)
    with ssh_session(host) as run:
        return _read_holder(run, host, port)


@changing_task
def stop_port_holder(target: Target, holder: PortHolder, stop_wait_s: float = 10.0,
                     interval_s: float = 0.5) -> ActionResult:
    """Runbook 004 `kill <PID>`: send SIGTERM to the approved holder of the port and wait up to
    ``stop_wait_s`` for the port to free.

    Re-checks first, over the same SSH connection: a port nobody holds any more is "already
    free" (nothing signalled); a port now held by another process (another pid, or the same pid
    running another command line: a reused pid) is refused without signalling anything. Never
    sends SIGKILL: a holder that outlives SIGTERM is an :class:`ActionFailedError` for a human."""
    host = require_ssh(target)
    if holder.pid is None:
        raise ActionFailedError(holder.address, "the holder's pid is unknown; nothing was signalled",
                                "an approved pid to stop", "find the process by hand as root (`ss -ltnp`)")
    with ssh_session(host) as run:
        now = _read_holder(run, host, holder.port)
        if now is None:
            return ActionResult(action="stop_port_holder", target=holder.label, changed=False,
                                detail=f"already free: nothing listens on port {holder.port} any more; "
                                       f"pid {holder.pid} was not signalled")
        if now.pid != holder.pid or now.cmdline != holder.cmdline:
            raise ActionFailedError(
                holder.label, f"port {holder.port} is now held by {now.label} ({now.command}), not by the "
                f"approved {holder.label} ({holder.command}); nothing was signalled",
                "the approved process to still hold the port",
                "run the runbook again: it finds the new holder and asks for approval again")
        sent = run(["kill", "-TERM", str(holder.pid)], timeout_s=COMMAND_TIMEOUT_S)
        if not sent.ok and "no such process" not in sent.stderr.lower():
            raise ActionFailedError(
                holder.label, f"`{sent.command}` on {_where(host)} exited {sent.exit_code}: "
                f"{sent.stderr.strip()[:300] or '(no stderr)'}", "SIGTERM delivered",
                f"stop it by hand as a user allowed to (the process runs as {holder.user or '?'})")
        started = time.monotonic()
        while (still := _read_holder(run, host, holder.port)) is not None:
            if time.monotonic() - started >= stop_wait_s:
                raise ActionFailedError(
                    holder.label, f"sent SIGTERM to {holder.label} ({holder.command}); {still.describe()} "
                    f"still, {stop_wait_s:.0f} s later", f"port {holder.port} free after SIGTERM",
                    f"the process ignores SIGTERM or stops slowly: a human decides whether to wait or "
                    f"to `kill -KILL {holder.pid}` (it loses whatever it had not saved)")
            time.sleep(interval_s)
    return ActionResult(action="stop_port_holder", target=holder.label, changed=True,
                        detail=f"sent SIGTERM to {holder.label}, user {holder.user or '?'}: {holder.command}; "
                               f"port {holder.port} free after {time.monotonic() - started:.1f} s")


class SettingsCheck(BaseModel):
    """Which required settings a container is configured without (names only, never values)."""

    container: str
    required: list[str]
    missing: list[str]  # not in its environment at all
    empty: list[str]  # present, but set to an empty value

    @property
    def complete(self) -> bool:
        return not self.missing and not self.empty

    def describe(self) -> str:
        if self.complete:
            listed = ", ".join(self.required) or "none listed"
            return f"{self.container}'s environment sets every required setting ({listed})"
        parts = []
        if self.missing:
            parts.append(f"lacks {', '.join(self.missing)}")
        if self.empty:
            parts.append(f"sets {', '.join(self.empty)} to an empty value")
        return f"{self.container}'s environment {' and '.join(parts)} (required: {', '.join(self.required)})"


@read_only_task
def find_missing_settings(target: Target, required: list[str]) -> SettingsCheck:
    """Runbook 004 "Missing environment variables": the ``required`` settings the service's
    container is configured without (its ``Config.Env``; only the names are kept)."""
    host, name = _require_docker(target)
    container = _get_container(docker_client(host), name, host)
    env = container.attrs.get("Config", {}).get("Env") or []
    set_names = {entry.partition("=")[0]: bool(entry.partition("=")[2]) for entry in env}
    return SettingsCheck(container=name, required=list(required),
                         missing=[s for s in required if s not in set_names],
                         empty=[s for s in required if s in set_names and not set_names[s]])
