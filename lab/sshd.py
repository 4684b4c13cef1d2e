"""sshd of the lab: key-only root login on 127.0.0.1, with a pinned host key
(``ssh/known_hosts``) so clients can use RejectPolicy."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lab.context import LabContext
from lab.proc import LabError, expect_cmdline, port_in_use, wait_until

expect_cmdline("sshd", "sshd")


class Sshd:
    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    def _keys(self) -> None:
        ctx = self.ctx
        host_key = ctx.ssh_dir / "ssh_host_ed25519_key"
        client_key = ctx.info.ssh_key
        for key, comment in ((host_key, "lab-host"), (client_key, "lab-client")):
            if not key.exists() or not Path(f"{key}.pub").exists():
                key.unlink(missing_ok=True)
                Path(f"{key}.pub").unlink(missing_ok=True)
                r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                                   capture_output=True, text=True, timeout=30)
                if r.returncode != 0:
                    raise LabError(f"sshd: ssh-keygen failed: {r.stderr.strip()}; log: {ctx.log('sshd')}")
            os.chmod(key, 0o600)
        (ctx.ssh_dir / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
        host_pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        ctx.info.known_hosts.write_text(f"[127.0.0.1]:{ctx.info.ssh_port} {host_pub}\n")

    def check(self, command: str | None = None) -> str:
        """Log in with the lab key (host key pinned); run ``command`` if given, its stdout."""
        import paramiko

        info = self.ctx.info
        c = paramiko.SSHClient()
        c.load_host_keys(str(info.known_hosts))
        c.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            c.connect("127.0.0.1", port=info.ssh_port, username="root", key_filename=str(info.ssh_key),
                      look_for_keys=False, allow_agent=False, timeout=3, banner_timeout=3, auth_timeout=3)
            if command is None:
                return ""
            _, out, _ = c.exec_command(command, timeout=5)
            return out.read().decode()
        finally:
            c.close()

    def up(self) -> None:
        ctx = self.ctx
        self._keys()
        port = ctx.info.ssh_port
        if ctx.procs.alive("sshd"):
            if wait_until(lambda: self.check() == "", 5, 0.2):
                return
            raise ctx.fail("sshd", f"runs (pid {ctx.read_pid('sshd')}) but key login on 127.0.0.1:{port} fails")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir sshd requires
        cfg = ctx.ssh_dir / "sshd_config"
        cfg.write_text(
            "# lab sshd (written by lab/sshd.py)\n"
            "ListenAddress 127.0.0.1\n"
            f"Port {port}\n"
            f"HostKey {ctx.ssh_dir / 'ssh_host_ed25519_key'}\n"
            f"PidFile {ctx.pidfile('sshd')}\n"
            f"AuthorizedKeysFile {ctx.ssh_dir / 'authorized_keys'}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "Subsystem sftp internal-sftp\n"
        )
        if port_in_use(port):
            raise LabError(f"sshd: port {port} on 127.0.0.1 is taken by another program; log: {ctx.log('sshd')}")
        proc = ctx.procs.start("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)])
        ctx.procs.wait_started("sshd", proc, lambda: self.check() == "", 20,
                               f"key login (RejectPolicy) on 127.0.0.1:{port} did not succeed")
        ctx.procs.write_pid("sshd", proc.pid)

    def stop(self) -> None:
        self.ctx.procs.stop("sshd")

    def status(self) -> str:
        if not self.ctx.procs.alive("sshd"):
            return "down"
        try:
            self.check()
            return "up"
        except Exception as exc:  # noqa: BLE001
            return f"not answering ({type(exc).__name__})"
