"""The lab's own Docker engine (dockerd + its containerd, under ``lab_dir/docker``) and the
``lab-web`` images, built from ``labweb.c`` and busybox without any registry."""

from __future__ import annotations

import hashlib
import io
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from lab.context import LabContext
from lab.proc import LabError, cmdline, expect_cmdline, pid_alive

HERE = Path(__file__).resolve().parent
LABWEB_SOURCE = HERE / "labweb.c"
BUSYBOX = Path("/bin/busybox")

expect_cmdline("dockerd", "dockerd")
expect_cmdline("containerd", "containerd")
expect_cmdline("shim", "containerd-shim")
expect_cmdline("container", "")


class Docker:
    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    def client(self, timeout: int = 30):
        import docker

        return docker.DockerClient(base_url=f"unix://{self.ctx.docker_socket}", timeout=timeout)

    def answers(self) -> bool:
        c = self.client(timeout=2)
        try:
            return bool(c.ping())
        finally:
            c.close()

    def containerd_pid(self) -> int | None:
        for p in (self.ctx.docker_dir / "exec" / "containerd" / "containerd.pid", self.ctx.pidfile("containerd")):
            try:
                return int(p.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return None

    # ----------------------------------------------------------------- start / stop

    def start(self) -> subprocess.Popen | None:
        """Start dockerd unless it runs (the slowest part: start it first, :meth:`wait` later)."""
        ctx = self.ctx
        if ctx.procs.alive("dockerd"):
            return None  # running; wait() checks it answers
        if shutil.which("dockerd") is None:
            raise LabError("dockerd: not installed (apt-get install docker.io)")
        # a stale containerd from a SIGKILLed dockerd would hold the exec root
        stale = self.containerd_pid()
        if stale:
            ctx.procs.stop_pid("containerd", stale)
            if not pid_alive(stale):
                # dockerd trusts kill(pid, 0), which succeeds on an unreaped zombie
                (ctx.docker_dir / "exec" / "containerd" / "containerd.pid").unlink(missing_ok=True)
        self.stop_orphan_containers()  # left by a dockerd that died; they would hold the web port
        self.unmount_leftovers()
        d = ctx.docker_dir
        for sub in ("data", "exec"):
            (d / sub).mkdir(exist_ok=True)
        (d / "daemon.json").write_text("{}\n")
        ctx.docker_socket.unlink(missing_ok=True)
        ctx.pidfile("dockerd").unlink(missing_ok=True)
        return ctx.procs.start("dockerd", [
            "dockerd",
            "--host", f"unix://{ctx.docker_socket}",
            "--data-root", str(d / "data"),
            "--exec-root", str(d / "exec"),
            "--pidfile", str(ctx.pidfile("dockerd")),
            "--storage-driver=vfs",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--config-file", str(d / "daemon.json"),
        ], write_pid=False)  # dockerd writes its own pidfile and refuses to start if one exists

    def wait(self, proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
        self.ctx.procs.wait_started("dockerd", proc, self.answers, timeout,
                                    f"socket {self.ctx.docker_socket} did not answer ping")
        if proc is not None and self.ctx.read_pid("dockerd") != proc.pid:
            self.ctx.procs.write_pid("dockerd", proc.pid)

    def stop(self) -> None:
        ctx = self.ctx
        pid = ctx.read_pid("dockerd")
        containerd = self.containerd_pid()
        if pid:
            ctx.procs.stop_pid("dockerd", pid, signal.SIGTERM, timeout=20.0)
        if containerd:  # dockerd stops its containerd, unless dockerd was SIGKILLed
            ctx.procs.stop_pid("containerd", containerd)
        self.stop_orphan_containers()
        ctx.pidfile("dockerd").unlink(missing_ok=True)
        self.unmount_leftovers()

    def stop_labelled_containers(self) -> None:
        """Stop the service containers cleanly before dockerd goes (best effort)."""
        if not self.ctx.procs.alive("dockerd"):
            return
        try:
            client = self.client(timeout=15)
            for c in client.containers.list(filters={"label": "runbooks.service"}):
                c.stop(timeout=2)
            client.close()
        except Exception:  # noqa: BLE001 - dockerd stopping will kill them anyway
            pass

    def _task_dirs(self) -> list[Path]:
        root = self.ctx.docker_dir / "exec" / "containerd" / "daemon" / "io.containerd.runtime.v2.task"
        return sorted(p.parent for p in root.glob("*/*/init.pid"))

    def stop_orphan_containers(self) -> None:
        """With dockerd and containerd gone, kill container processes and shims they left.

        Only PIDs named in the lab's own runtime state (init.pid, and its parent
        if that is a containerd shim serving this lab's exec root) are signalled.
        """
        for task in self._task_dirs():
            try:
                init = int((task / "init.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            shim = None
            if pid_alive(init):
                try:
                    status = Path(f"/proc/{init}/status").read_text()
                    ppid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))
                    if "containerd-shim" in cmdline(ppid) and str(self.ctx.docker_dir) in cmdline(ppid):
                        shim = ppid
                except (OSError, StopIteration, ValueError):
                    pass
                self.ctx.procs.stop_pid("container", init, signal.SIGKILL, timeout=5)
            if shim:
                self.ctx.procs.stop_pid("shim", shim, signal.SIGTERM, timeout=5)

    def unmount_leftovers(self) -> None:
        """dockerd leaves e.g. an nsfs mount in its exec root; detach mounts under the lab."""
        try:
            lines = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return
        prefix = str(self.ctx.lab_dir) + "/"
        points = [ln.split()[4] for ln in lines if len(ln.split()) > 4]
        for mp in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True, timeout=10)

    def status(self) -> str:
        if not self.ctx.procs.alive("dockerd"):
            return "down"
        try:
            c = self.client(timeout=5)
            c.ping()
            c.close()
            return "up"
        except Exception as exc:  # noqa: BLE001
            return f"not answering ({type(exc).__name__})"

    # ----------------------------------------------------------------- images

    def _source_sha(self) -> str:
        return hashlib.sha256(LABWEB_SOURCE.read_bytes()).hexdigest()[:16]

    def _build_labweb(self) -> Path:
        out = self.ctx.build_dir / "labweb"
        stamp = self.ctx.build_dir / "labweb.sha"
        sha = self._source_sha()
        if out.exists() and stamp.exists() and stamp.read_text().strip() == sha:
            return out
        log = self.ctx.log("build")
        with open(log, "ab") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} gcc -static -pthread labweb.c\n".encode())
            f.flush()
            r = subprocess.run(
                ["gcc", "-static", "-O2", "-Wall", "-pthread", "-o", str(out), str(LABWEB_SOURCE)],
                stdout=f, stderr=subprocess.STDOUT, timeout=120,
            )
        if r.returncode != 0:
            raise self.ctx.fail("build", f"gcc -static failed compiling {LABWEB_SOURCE}", log)
        stamp.write_text(sha + "\n")
        return out

    def _rootfs_tar(self, labweb: Path) -> bytes:
        """A tar of: /bin/busybox + applet symlinks, /labweb, /tmp, /etc/passwd."""
        if not BUSYBOX.exists():
            raise LabError(f"build: {BUSYBOX} missing (apt-get install busybox-static)")
        applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, timeout=10).stdout.split()
        buf = io.BytesIO()
        now = int(time.time())

        def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, now
            tar.addfile(ti)

        def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, now
            tar.addfile(ti, io.BytesIO(data))

        with tarfile.open(fileobj=buf, mode="w") as tar:
            for d in ("bin", "etc", "proc", "sys", "dev", "root"):
                add_dir(tar, d)
            add_dir(tar, "tmp", 0o1777)
            add_file(tar, "bin/busybox", BUSYBOX.read_bytes(), 0o755)
            for a in sorted(set(applets) - {"busybox"}):
                ti = tarfile.TarInfo(f"bin/{a}")
                ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, "busybox", 0o777, now
                tar.addfile(ti)
            add_file(tar, "labweb", labweb.read_bytes(), 0o755)
            add_file(tar, "etc/passwd",
                     b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644)
            add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)
        return buf.getvalue()

    def ensure_images(self) -> None:
        """lab-web:1.0, :1.1, :broken and :1.2-errors, re-imported when labweb.c changed."""
        import docker.errors

        sha = self._source_sha()
        wanted = {
            "1.0": ["ENV LABWEB_VERSION=1.0"],
            "1.1": ["ENV LABWEB_VERSION=1.1"],
            "broken": ["ENV LABWEB_VERSION=1.2", "ENV LABWEB_BROKEN=1"],
            # a release that answers 30 % of /api/price with 500 (/health stays 200)
            "1.2-errors": ["ENV LABWEB_VERSION=1.2", "ENV LABWEB_ERROR_PERCENT=30"],
        }
        client = self.client(timeout=120)
        try:
            missing = []
            for tag in wanted:
                try:
                    img = client.images.get(f"lab-web:{tag}")
                    if f"LABWEB_SOURCE_SHA={sha}" in (img.attrs["Config"].get("Env") or []):
                        continue
                except docker.errors.ImageNotFound:
                    pass
                missing.append(tag)
            if not missing:
                return
            data = self._rootfs_tar(self._build_labweb())
            for tag in missing:
                changes = ['CMD ["/labweb"]', "ENV PATH=/bin", f"ENV LABWEB_SOURCE_SHA={sha}", *wanted[tag]]
                try:
                    client.api.import_image_from_data(data, repository="lab-web", tag=tag, changes=changes)
                    client.images.get(f"lab-web:{tag}")
                except docker.errors.DockerException as exc:
                    raise self.ctx.fail("dockerd", f"docker import of lab-web:{tag} failed ({exc})") from None
                with open(self.ctx.log("build"), "a") as f:
                    f.write(f"imported lab-web:{tag}\n")
        finally:
            client.close()
