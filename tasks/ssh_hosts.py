"""SSH hosts: the one SSH client, quoted commands, host resources.

Host keys are verified against the inventory's pinned known_hosts file; an unknown
or changed key is refused (never auto-added). Commands are argv lists, quoted with
``shlex.join`` before they reach the remote shell.
"""

from __future__ import annotations

import shlex
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import paramiko
from pydantic import BaseModel

from incident.errors import ConfigurationError, HostKeyMismatchError, SshError
from incident.inventory import SshHost, Target
from tasks.common import read_only_task


class CommandResult(BaseModel):
    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class DiskUsage(BaseModel):
    path: str
    size_kb: int
    available_kb: int
    used_percent: int


class HostResources(BaseModel):
    disks: list[DiskUsage]
    mem_total_kb: int
    mem_available_kb: int

    def describe(self) -> str:
        disks = ", ".join(
            f"{d.path} {d.used_percent}% used ({d.available_kb // 1024} MiB free)" for d in self.disks
        )
        return f"disk: {disks}; memory: {self.mem_available_kb // 1024} MiB free of {self.mem_total_kb // 1024} MiB"


def ssh_connect(host: SshHost) -> paramiko.SSHClient:
    """The one SSH client of the project: pinned host keys, key auth, timeouts."""
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(str(host.known_hosts))
    except OSError:
        raise ConfigurationError(
            f"{host.hostname}:{host.port}", f"known_hosts file {host.known_hosts} unreadable",
            "a pinned known_hosts file", "fix known_hosts in the inventory's ssh_hosts entry",
        ) from None
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    where = f"{host.username}@{host.hostname}:{host.port}"
    try:
        client.connect(
            host.hostname, port=host.port, username=host.username, key_filename=str(host.key_file),
            timeout=host.timeout_s, banner_timeout=host.timeout_s, auth_timeout=host.timeout_s,
            allow_agent=False, look_for_keys=False,
        )
    except (paramiko.BadHostKeyException, paramiko.SSHException) as exc:
        if isinstance(exc, paramiko.BadHostKeyException) or "not found in known_hosts" in str(exc):
            raise HostKeyMismatchError(
                where, "host key unknown or changed", f"a key pinned in {host.known_hosts}",
                "verify the host's key out of band, then update known_hosts; do not disable checks",
            ) from None
        raise SshError(where, f"SSH failed ({type(exc).__name__}: {exc})", "an SSH session",
                       "check sshd on the host and the key in the inventory") from None
    except (OSError, socket.timeout) as exc:
        raise SshError(where, f"no SSH connection ({exc})", "sshd answering",
                       "check the host is up and sshd listens on that port") from None
    return client


def run_command(host: SshHost, argv: list[str], timeout_s: float = 30.0) -> CommandResult:
    """Run ``argv`` on the host (quoted for the remote shell); plain function used by tasks."""
    return run_commands(host, [argv], timeout_s)[0]


def run_commands(host: SshHost, commands: list[list[str]], timeout_s: float = 30.0) -> list[CommandResult]:
    """Run several commands over one SSH connection (one key exchange), each quoted."""
    client = ssh_connect(host)
    try:
        return [_exec(client, host, argv, timeout_s) for argv in commands]
    finally:
        client.close()


@contextmanager
def ssh_session(host: SshHost) -> Iterator[Callable[..., CommandResult]]:
    """One SSH connection for commands that depend on each other's output: yields
    ``run(argv, timeout_s=30.0) -> CommandResult`` (each argv quoted, as above)."""
    client = ssh_connect(host)
    try:
        yield lambda argv, timeout_s=30.0: _exec(client, host, argv, timeout_s)
    finally:
        client.close()


def _exec(client: paramiko.SSHClient, host: SshHost, argv: list[str], timeout_s: float) -> CommandResult:
    command = shlex.join(argv)
    try:
        _, stdout, stderr = client.exec_command(command, timeout=timeout_s)
        out = stdout.read().decode("utf-8", errors="replace")
        err = stderr.read().decode("utf-8", errors="replace")
        code = stdout.channel.recv_exit_status()
    except (paramiko.SSHException, socket.timeout) as exc:
        raise SshError(f"{host.hostname}:{host.port}", f"command {command!r} did not finish ({exc})",
                       f"it to finish within {timeout_s}s", "run it by hand on the host") from None
    return CommandResult(command=command, exit_code=code, stdout=out, stderr=err)


def require_ssh(target: Target) -> SshHost:
    if target.ssh is None:
        raise ConfigurationError(target.name, "no ssh_host in the inventory", "an SSH host",
                                 "add ssh_host to the service in the inventory")
    return target.ssh


@read_only_task
def read_host_resources(target: Target, paths: list[str] | None = None) -> HostResources:
    """Runbook: `df -h` and `free -h` on the service's host."""
    host = require_ssh(target)
    paths = paths or ["/"]
    df, mem = run_commands(host, [["df", "-Pk", "--", *paths], ["cat", "/proc/meminfo"]])
    if not df.ok or not mem.ok:
        raise SshError(f"{host.hostname}:{host.port}", f"df/meminfo failed: {df.stderr or mem.stderr}",
                       "df and /proc/meminfo to work", "check the host by hand")
    disks = []
    for line, path in zip(df.stdout.splitlines()[1:], paths):
        fields = line.split()
        disks.append(DiskUsage(path=path, size_kb=int(fields[1]), available_kb=int(fields[3]),
                               used_percent=int(fields[4].rstrip("%"))))
    meminfo = {k.strip(): int(v.split()[0]) for k, v in
               (line.split(":", 1) for line in mem.stdout.splitlines() if ":" in line)}
    return HostResources(disks=disks, mem_total_kb=meminfo["MemTotal"],
                         mem_available_kb=meminfo["MemAvailable"])
