"""The lab: real targets on loopback (dockerd + web container, PostgreSQL,
Redis, sshd), started and stopped by one command.

Everything lives under ``lab_dir``::

    lab.json        LabInfo (ports are chosen once and reused)
    inventory.yaml  a valid inventory pointing at the lab
    logs/<name>.log one log per component
    pids/<name>.pid one pidfile per process the lab started
    docker/ pg/ redis/ ssh/ secrets/ build/
    alerting/       configs and data of the optional alerting stack

Processes are stopped by the PID in their pidfile, never by name.

The alerting stack (blackbox exporter, Prometheus, Alertmanager; see lab/alerting.py)
is started only when asked: ``Lab(lab_dir, alerting=True).up()`` or
``lab.up(alerting=True)``; ``down()`` always stops it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from lab import alerting as _al

HERE = Path(__file__).resolve().parent
LABWEB_SOURCE = HERE / "labweb.c"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
BUSYBOX = Path("/bin/busybox")
COMPONENTS = ("dockerd", "postgres", "redis", "sshd", "web")
# Substring expected in /proc/<pid>/cmdline before we signal a pidfile's PID
# (guards against a stale pidfile whose PID now belongs to something else).
_EXPECTED_CMD = {
    "dockerd": "dockerd",
    "shim": "containerd-shim",
    "container": "",
    "containerd": "containerd",
    "postgres": "postgres",
    "redis": "redis-server",
    "sshd": "sshd",
    "blackbox": _al.BLACKBOX_BIN,
    "prometheus": _al.PROMETHEUS_BIN,
    "alertmanager": _al.ALERTMANAGER_BIN,
}
_BASE_PORTS = ("web_port", "pg_port", "redis_port", "ssh_port")
# Optional in lab.json (older files lack them): chosen on first load and then persisted.
_ALERTING_PORTS = ("blackbox_port", "prometheus_port", "alertmanager_port", "gateway_port")
_SOCK_MAX = 100  # unix socket paths are limited to ~108 bytes


class LabError(Exception):
    """A lab component failed; the message names it and where its log is."""


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
    health_url: str
    root_url: str
    inventory_path: Path
    ssh_key: Path
    known_hosts: Path
    pg_password_file: Path
    pg_socket_dir: Path
    logs_dir: Path
    pids_dir: Path
    # alerting stack (optional; defaults keep older lab.json files loadable)
    blackbox_port: int | None = None
    prometheus_port: int | None = None
    alertmanager_port: int | None = None
    gateway_port: int | None = None  # the alert gateway (started by someone else) listens here
    gateway_url: str | None = None
    prometheus_url: str | None = None
    alertmanager_url: str | None = None
    blackbox_url: str | None = None
    alertmanager_token_file: Path | None = None


# --------------------------------------------------------------------------- helpers


def _free_port(taken: set[int]) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise LabError("could not find a free port on 127.0.0.1")


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` runs (zombies count as dead; our own zombies are reaped)."""
    if not pid or pid <= 0:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait(what: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if what():
                return True
        except Exception:  # noqa: BLE001 - probes may fail while things start
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _tcp_exchange(port: int, data: bytes, n: int, timeout: float = 1.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(data)
        return s.recv(n)


def _pg_answers(port: int) -> bool:
    return _tcp_exchange(port, bytes([0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F]), 1) in (b"N", b"S")


def _redis_answers(port: int) -> bool:
    return _tcp_exchange(port, b"PING\r\n", 64).startswith(b"+PONG")


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 with the error text if it failed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return 0, str(reason)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- the lab


class Lab:
    def __init__(self, lab_dir: Path, container_name: str = "lab-web", alerting: bool = False) -> None:
        self.lab_dir = Path(lab_dir).resolve()
        self.container_name = container_name
        self.alerting = alerting  # start the alerting stack at up() (also: up(alerting=True))
        d = self.lab_dir
        self.logs_dir = d / "logs"
        self.pids_dir = d / "pids"
        self.docker_dir = d / "docker"
        self.docker_socket = self.docker_dir / "docker.sock"
        self._set_pg_paths(d / "pg")
        self.redis_dir = d / "redis"
        self.ssh_dir = d / "ssh"
        self.secrets_dir = d / "secrets"
        self.build_dir = d / "build"
        self.alerting_dir = d / "alerting"
        self.info_path = d / "lab.json"
        self.inventory_path = d / "inventory.yaml"
        self._info: LabInfo | None = None

    # ----------------------------------------------------------------- info / paths

    def log(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def pidfile(self, name: str) -> Path:
        return self.pids_dir / f"{name}.pid"

    def read_pid(self, name: str) -> int | None:
        try:
            return int(self.pidfile(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> dict[str, int]:
        """PIDs of the lab's processes according to the pidfiles (alive or not)."""
        out = {}
        for name in ("dockerd", "containerd", "postgres", "redis", "sshd"):
            pid = self.read_pid(name) if name != "containerd" else self._containerd_pid()
            if pid:
                out[name] = pid
        return out

    def _containerd_pid(self) -> int | None:
        for p in (self.docker_dir / "exec" / "containerd" / "containerd.pid", self.pidfile("containerd")):
            try:
                return int(p.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return None

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
                ports = {k: int(old[k]) for k in _BASE_PORTS}
                ports.update({k: int(old[k]) for k in _ALERTING_PORTS if old.get(k)})
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise LabError(f"lab: {self.info_path} is unreadable ({exc}); remove it to start afresh") from None
        taken: set[int] = set(ports.values())
        for k in (*_BASE_PORTS, *_ALERTING_PORTS):
            if k not in ports:
                ports[k] = _free_port(taken)
                taken.add(ports[k])
        web = ports["web_port"]
        return LabInfo(
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
            **ports,
        )

    def _save_info(self) -> None:
        self.info_path.write_text(self.info.model_dump_json(indent=2) + "\n")

    # ----------------------------------------------------------------- process plumbing

    def _popen(self, name: str, argv: list[str], write_pid: bool = True) -> subprocess.Popen:
        logf = open(self.log(name), "ab")
        try:
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, cwd=str(self.lab_dir),
            )
        except OSError as exc:
            raise LabError(f"{name}: could not start ({exc}); log: {self.log(name)}") from None
        finally:
            logf.close()
        if write_pid:
            self.pidfile(name).write_text(f"{proc.pid}\n")
        return proc

    def _fail(self, name: str, what: str, log: Path | None = None) -> LabError:
        log = log or self.log(name)
        tail = _tail(log)
        msg = f"{name}: {what}; log: {log}"
        if tail:
            msg += "\n--- last lines of the log ---\n" + tail
        return LabError(msg)

    def _alive(self, name: str) -> int | None:
        """The PID from name's pidfile if that process runs and is the expected program."""
        pid = self.read_pid(name)
        if pid and pid_alive(pid) and _EXPECTED_CMD[name] in _cmdline(pid):
            return pid
        return None

    def _stop_pid(self, name: str, pid: int, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if not pid_alive(pid):
            return
        if _EXPECTED_CMD.get(name, "") not in _cmdline(pid):
            return  # stale pidfile: the PID belongs to some other program now
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if not _wait(lambda: not pid_alive(pid), timeout, 0.05):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            _wait(lambda: not pid_alive(pid), 5.0, 0.05)

    def stop_component(self, name: str) -> None:
        """Stop one lab process by the PID in its pidfile (for drills and tests)."""
        if name not in ("dockerd", "postgres", "redis", "sshd"):
            raise LabError(f"{name}: not a lab process (one of dockerd, postgres, redis, sshd)")
        if name == "dockerd":
            self._stop_docker()
            return
        pid = self.read_pid(name)
        if pid:
            # postgres: SIGINT is "fast shutdown"; SIGTERM would wait for clients.
            self._stop_pid(name, pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        self.pidfile(name).unlink(missing_ok=True)

    # ----------------------------------------------------------------- up / down / status

    def up(self, alerting: bool | None = None) -> LabInfo:
        """Start what is not running (idempotent). ``alerting=True`` (or ``Lab(..., alerting=True)``)
        also starts the alerting stack; without it the alerting stack is neither started nor stopped."""
        t0 = time.monotonic()
        if alerting:
            self.alerting = True
        self._prepare_dirs()
        info = self.info
        self._save_info()
        docker_proc = self._start_dockerd()  # slowest: start first, wait later
        self._up_postgres()
        self._up_redis()
        self._up_sshd()
        self._wait_dockerd(docker_proc)
        self._ensure_images()
        self._up_web()
        self._write_inventory()
        if self.alerting if alerting is None else alerting:
            self.up_alerting()
        self._save_info()
        self.last_up_seconds = time.monotonic() - t0
        return info

    def down(self) -> None:
        # the alerting stack first (it would alert on everything below), then
        # the web container (cleanly), then the daemons
        self._stop_alerting()  # self.alerting stays: a Lab(alerting=True) starts it again at up()
        if self._alive("dockerd"):
            try:
                client = self.docker_client(timeout=15)
                for c in client.containers.list(filters={"label": "runbooks.service"}):
                    c.stop(timeout=2)
                client.close()
            except Exception:  # noqa: BLE001 - dockerd stopping will kill them anyway
                pass
        for name in ("sshd", "redis", "postgres"):
            self.stop_component(name)
        self._stop_docker()

    def _stop_docker(self) -> None:
        pid = self.read_pid("dockerd")
        containerd = self._containerd_pid()
        if pid:
            self._stop_pid("dockerd", pid, signal.SIGTERM, timeout=20.0)
        if containerd:  # dockerd stops its containerd, unless dockerd was SIGKILLed
            self._stop_pid("containerd", containerd)
        self._stop_orphan_containers()
        self.pidfile("dockerd").unlink(missing_ok=True)
        self._unmount_leftovers()

    def _task_dirs(self) -> list[Path]:
        root = self.docker_dir / "exec" / "containerd" / "daemon" / "io.containerd.runtime.v2.task"
        return sorted(p.parent for p in root.glob("*/*/init.pid"))

    def _stop_orphan_containers(self) -> None:
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
                    if "containerd-shim" in _cmdline(ppid) and str(self.docker_dir) in _cmdline(ppid):
                        shim = ppid
                except (OSError, StopIteration, ValueError):
                    pass
                self._stop_pid("container", init, signal.SIGKILL, timeout=5)
            if shim:
                self._stop_pid("shim", shim, signal.SIGTERM, timeout=5)

    def _unmount_leftovers(self) -> None:
        """dockerd leaves e.g. an nsfs mount in its exec root; detach mounts under the lab."""
        try:
            lines = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return
        prefix = str(self.lab_dir) + "/"
        points = [ln.split()[4] for ln in lines if len(ln.split()) > 4]
        for mp in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True, timeout=10)

    def status(self) -> dict[str, str]:
        info = self.info
        out: dict[str, str] = {}
        if not self._alive("dockerd"):
            out["dockerd"] = "down"
        else:
            try:
                c = self.docker_client(timeout=5)
                c.ping()
                c.close()
                out["dockerd"] = "up"
            except Exception as exc:  # noqa: BLE001
                out["dockerd"] = f"not answering ({type(exc).__name__})"
        for name, probe, port in (
            ("postgres", _pg_answers, info.pg_port),
            ("redis", _redis_answers, info.redis_port),
        ):
            if not self._alive(name):
                out[name] = "down"
            else:
                try:
                    out[name] = "up" if probe(port) else "not answering"
                except OSError as exc:
                    out[name] = f"not answering ({exc.strerror or type(exc).__name__})"
        if not self._alive("sshd"):
            out["sshd"] = "down"
        else:
            try:
                self._ssh_check()
                out["sshd"] = "up"
            except Exception as exc:  # noqa: BLE001
                out["sshd"] = f"not answering ({type(exc).__name__})"
        out["web"] = self._web_status() if out["dockerd"] == "up" else "down (dockerd down)"
        if self.alerting_enabled():
            out.update(self.alerting_status())
        return out

    def _web_status(self) -> str:
        import docker.errors

        try:
            client = self.docker_client(timeout=5)
            c = client.containers.get(self.container_name)
        except docker.errors.NotFound:
            return "down (no container)"
        except Exception as exc:  # noqa: BLE001
            return f"unknown ({type(exc).__name__})"
        state = c.attrs["State"]
        if state.get("Status") != "running":
            return f"{state.get('Status')} (exit code {state.get('ExitCode')}, image {c.attrs['Config']['Image']})"
        code, body = http_get(self.info.health_url, timeout=3)
        if code == 200:
            return "up"
        return f"unhealthy ({code or body})"

    # ----------------------------------------------------------------- dirs

    def _prepare_dirs(self) -> None:
        for p in (self.lab_dir, self.logs_dir, self.pids_dir, self.docker_dir, self.redis_dir,
                  self.ssh_dir, self.build_dir):
            p.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        os.chmod(self.lab_dir, 0o755)
        for sock in (self.docker_socket, self.docker_dir / "exec" / "containerd" / "containerd.sock",
                     self.pg_sock / ".s.PGSQL.65535"):
            if len(str(sock)) > _SOCK_MAX:
                raise LabError(
                    f"lab: socket path {sock} is too long ({len(str(sock))} > {_SOCK_MAX} chars); "
                    "use a shorter lab_dir (RUNBOOKS_STATE_DIR)"
                )

    # ----------------------------------------------------------------- dockerd

    def docker_client(self, timeout: int = 30):
        import docker

        return docker.DockerClient(base_url=f"unix://{self.docker_socket}", timeout=timeout)

    def _docker_answers(self) -> bool:
        import docker

        c = docker.DockerClient(base_url=f"unix://{self.docker_socket}", timeout=2)
        try:
            return bool(c.ping())
        finally:
            c.close()

    def _start_dockerd(self) -> subprocess.Popen | None:
        if self._alive("dockerd"):
            return None  # running; _wait_dockerd checks it answers
        if shutil.which("dockerd") is None:
            raise LabError("dockerd: not installed (apt-get install docker.io)")
        # a stale containerd from a SIGKILLed dockerd would hold the exec root
        stale = self._containerd_pid()
        if stale:
            self._stop_pid("containerd", stale)
            if not pid_alive(stale):
                # dockerd trusts kill(pid, 0), which succeeds on an unreaped zombie
                (self.docker_dir / "exec" / "containerd" / "containerd.pid").unlink(missing_ok=True)
        self._stop_orphan_containers()  # left by a dockerd that died; they would hold the web port
        self._unmount_leftovers()
        for sub in ("data", "exec"):
            (self.docker_dir / sub).mkdir(exist_ok=True)
        (self.docker_dir / "daemon.json").write_text("{}\n")
        self.docker_socket.unlink(missing_ok=True)
        self.pidfile("dockerd").unlink(missing_ok=True)
        d = self.docker_dir
        return self._popen("dockerd", [
            "dockerd",
            "--host", f"unix://{self.docker_socket}",
            "--data-root", str(d / "data"),
            "--exec-root", str(d / "exec"),
            "--pidfile", str(self.pidfile("dockerd")),
            "--storage-driver=vfs",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--config-file", str(d / "daemon.json"),
        ], write_pid=False)  # dockerd writes its own pidfile and refuses to start if one exists

    def _wait_dockerd(self, proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if proc is not None and proc.poll() is not None:
                raise self._fail("dockerd", f"exited with code {proc.returncode} while starting")
            return self._docker_answers()

        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    break
            except LabError:
                raise
            except Exception:  # noqa: BLE001
                pass
            if time.monotonic() > deadline:
                raise self._fail("dockerd", f"socket {self.docker_socket} did not answer ping within {timeout:.0f}s")
            time.sleep(0.1)
        if proc is not None and self.read_pid("dockerd") != proc.pid:
            self.pidfile("dockerd").write_text(f"{proc.pid}\n")

    # ----------------------------------------------------------------- images

    def _source_sha(self) -> str:
        return hashlib.sha256(LABWEB_SOURCE.read_bytes()).hexdigest()[:16]

    def _build_labweb(self) -> Path:
        out = self.build_dir / "labweb"
        stamp = self.build_dir / "labweb.sha"
        sha = self._source_sha()
        if out.exists() and stamp.exists() and stamp.read_text().strip() == sha:
            return out
        log = self.log("build")
        with open(log, "ab") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} gcc -static labweb.c\n".encode())
            f.flush()
            r = subprocess.run(
                ["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(LABWEB_SOURCE)],
                stdout=f, stderr=subprocess.STDOUT, timeout=120,
            )
        if r.returncode != 0:
            raise self._fail("build", f"gcc -static failed compiling {LABWEB_SOURCE}", log)
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
            add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644)
            add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)
        return buf.getvalue()

    def _ensure_images(self) -> None:
        import docker.errors

        sha = self._source_sha()
        wanted = {
            "1.0": ["ENV LABWEB_VERSION=1.0"],
            "1.1": ["ENV LABWEB_VERSION=1.1"],
            "broken": ["ENV LABWEB_VERSION=1.2", "ENV LABWEB_BROKEN=1"],
        }
        client = self.docker_client(timeout=120)
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
                    raise self._fail("dockerd", f"docker import of lab-web:{tag} failed ({exc})") from None
                with open(self.log("build"), "a") as f:
                    f.write(f"imported lab-web:{tag}\n")
        finally:
            client.close()

    # ----------------------------------------------------------------- web container

    def _web_env(self) -> dict[str, str]:
        i = self.info
        return {
            "LABWEB_PORT": str(i.web_port),
            "LABWEB_PG": f"127.0.0.1:{i.pg_port}",
            "LABWEB_REDIS": f"127.0.0.1:{i.redis_port}",
        }

    def _get_web(self, client):
        import docker.errors

        try:
            return client.containers.get(self.container_name)
        except docker.errors.NotFound:
            return None

    def _run_web(self, client, image: str, previous: str):
        old = self._get_web(client)
        if old is not None:
            old.remove(force=True)
        if _port_in_use(self.info.web_port) and image != self.info.broken_image:
            raise LabError(f"web: port {self.info.web_port} on 127.0.0.1 is taken by another program")
        return client.containers.run(
            image,
            name=self.container_name,
            detach=True,
            network_mode="host",
            environment=self._web_env(),
            labels={"runbooks.previous-image": previous, "runbooks.service": "web"},
            restart_policy={"Name": "no"},
        )

    def _save_web_logs(self, container) -> Path:
        log = self.log("web")
        try:
            log.write_bytes(container.logs(stdout=True, stderr=True))
        except Exception:  # noqa: BLE001
            pass
        return log

    def _up_web(self) -> None:
        client = self.docker_client()
        try:
            c = self._get_web(client)
            if c is not None and c.attrs["State"].get("Status") == "running":
                if _wait(lambda: http_get(self.info.health_url, 2)[0] == 200, 10, 0.2):
                    return
                code, body = http_get(self.info.health_url, 2)
                log = self._save_web_logs(c)
                raise self._fail("web", f"container runs but {self.info.health_url} answers {code or ''} {body}", log)
        finally:
            client.close()
        self.reset_web()

    def kill_web(self) -> None:
        client = self.docker_client()
        try:
            c = self._get_web(client)
            if c is None:
                raise LabError(f"web: no container {self.container_name}")
            c.kill()
            if not _wait(lambda: client.containers.get(self.container_name).status != "running", 10):
                raise self._fail("web", "container still running 10s after docker kill")
        finally:
            client.close()

    def deploy_broken_web(self) -> None:
        client = self.docker_client()
        try:
            c = self._get_web(client)
            previous = c.attrs["Config"]["Image"] if c is not None else self.info.web_image
            new = self._run_web(client, self.info.broken_image, previous)

            def exited() -> bool:
                new.reload()
                return new.status == "exited"

            if not _wait(exited, 15):
                raise self._fail("web", "broken release did not exit within 15s", self._save_web_logs(new))
            self._save_web_logs(new)
        finally:
            client.close()

    def reset_web(self, timeout: float = 30.0) -> None:
        client = self.docker_client()
        try:
            c = self._run_web(client, self.info.web_image, self.info.previous_image)
            if not _wait(lambda: http_get(self.info.health_url, 2)[0] == 200, timeout, 0.2):
                code, body = http_get(self.info.health_url, 2)
                log = self._save_web_logs(c)
                raise self._fail(
                    "web", f"{self.info.health_url} not 200 within {timeout:.0f}s (last: {code or ''} {body})", log
                )
        finally:
            client.close()

    # ----------------------------------------------------------------- postgres

    def _pg(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                           timeout=timeout, cwd="/")
        if check and r.returncode != 0:
            with open(self.log("postgres"), "a") as f:
                f.write(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}\n")
            raise self._fail("postgres", f"{Path(argv[0]).name} failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
        return r

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.pg_data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _set_pg_paths(self, pg_dir: Path) -> None:
        # resolved: user postgres must not have to pass through the lab dir to reach a link
        self.pg_dir = pg_dir.resolve() if pg_dir.is_symlink() else pg_dir
        self.pg_data = self.pg_dir / "data"
        self.pg_sock = self.pg_dir / "sock"

    def _place_pg_dir(self) -> None:
        """PostgreSQL runs as user postgres, which must traverse every parent of its data dir.
        A lab dir below a 0700 dir (say a checkout in /root) cannot hold it: then the data
        lives in <tmp>/rb-pg-<hash of the lab dir> and lab_dir/pg is a link to it."""
        link = self.lab_dir / "pg"
        if link.exists() or link.is_symlink():
            return
        if self._pg("test", "-x", str(self.lab_dir), check=False).returncode == 0:
            return
        digest = hashlib.sha256(str(self.lab_dir.resolve()).encode()).hexdigest()[:10]
        target = Path(tempfile.gettempdir()) / f"rb-pg-{digest}"
        target.mkdir(exist_ok=True)
        os.chmod(target, 0o755)
        link = self.lab_dir / "pg"
        link.symlink_to(target, target_is_directory=True)
        self._set_pg_paths(link)

    def _up_postgres(self) -> None:
        port = self.info.pg_port
        pid = self._postmaster_pid()
        if pid and pid_alive(pid) and "postgres" in _cmdline(pid):
            self.pidfile("postgres").write_text(f"{pid}\n")
            if _wait(lambda: _pg_answers(port), 10):
                self._ensure_pg_app()
                return
            raise self._fail("postgres", f"runs (pid {pid}) but does not answer on 127.0.0.1:{port}")
        if pid and not pid_alive(pid):
            # postgres died uncleanly: its lock file names a dead (maybe zombie) PID,
            # which postgres itself would take for a running postmaster
            (self.pg_data / "postmaster.pid").unlink(missing_ok=True)
            for f in self.pg_sock.glob(".s.PGSQL.*"):
                f.unlink(missing_ok=True)
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise LabError("postgres: no 'postgres' user (apt-get install postgresql-15)") from None
        self._place_pg_dir()
        self.pg_dir.mkdir(exist_ok=True)
        self.pg_sock.mkdir(exist_ok=True)
        os.chown(self.pg_dir, pw.pw_uid, pw.pw_gid)
        os.chown(self.pg_sock, pw.pw_uid, pw.pw_gid)
        log = self.log("postgres")
        if (self.lab_dir / "pg").is_symlink():  # postgres cannot reach the lab's logs dir either
            log = self.pg_dir / "postgres.log"
        log.touch()
        os.chown(log, pw.pw_uid, pw.pw_gid)
        if self._pg("test", "-x", str(self.pg_dir), check=False).returncode != 0:
            raise LabError(f"postgres: user postgres cannot reach {self.pg_dir}; make its parent dirs traversable (chmod o+x)")
        if not (self.pg_data / "PG_VERSION").exists():
            if self.pg_data.exists():
                shutil.rmtree(self.pg_data)  # a half-done initdb
            self._pg(str(PG_BIN / "initdb"), "-D", str(self.pg_data), "-U", "postgres", "-E", "UTF8",
                     "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", timeout=120)
            (self.pg_data / "pg_hba.conf").write_text(
                "# lab: written by lab/core.py\n"
                "local   all   postgres                 trust\n"
                "host    all   all        127.0.0.1/32  scram-sha-256\n"
            )
            os.chown(self.pg_data / "pg_hba.conf", pw.pw_uid, pw.pw_gid)
        conf = self.pg_data / "postgresql.auto.conf"  # rewritten every up: port may be chosen anew
        conf.write_text(
            "# lab settings (written by lab/core.py)\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{self.pg_sock}'\n"
            "max_connections = 30\n"
            "password_encryption = 'scram-sha-256'\n"
            "shared_buffers = '32MB'\n"
            "fsync = off\n"
        )
        os.chown(conf, pw.pw_uid, pw.pw_gid)
        if _port_in_use(port):
            raise LabError(f"postgres: port {port} on 127.0.0.1 is taken by another program; log: {log}")
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.pg_data), "-w", "-t", "60", "-l", str(log), "start",
                 timeout=90)
        pid = self._postmaster_pid()
        if not pid:
            raise self._fail("postgres", "started but wrote no postmaster.pid")
        self.pidfile("postgres").write_text(f"{pid}\n")
        if not _wait(lambda: _pg_answers(port), 30):
            raise self._fail("postgres", f"does not answer on 127.0.0.1:{port} within 30s")
        self._ensure_pg_app()

    def _psql(self, sql: str) -> str:
        r = self._pg(str(PG_BIN / "psql"), "-h", str(self.pg_sock), "-p", str(self.info.pg_port), "-U", "postgres",
                     "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc", sql)
        return r.stdout.strip()

    def _ensure_pg_app(self) -> None:
        pwfile = self.info.pg_password_file
        if pwfile.exists() and pwfile.read_text().strip():
            password = pwfile.read_text().strip()
        else:
            password = secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: safe inside a SQL literal
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        os.chmod(pwfile, 0o600)
        if self._psql("SELECT 1 FROM pg_roles WHERE rolname = 'app'") == "1":
            self._psql(f"ALTER ROLE app WITH LOGIN PASSWORD '{password}'")
        else:
            self._psql(f"CREATE ROLE app WITH LOGIN PASSWORD '{password}'")
        if self._psql("SELECT 1 FROM pg_database WHERE datname = 'app'") != "1":
            self._psql("CREATE DATABASE app OWNER app")

    # ----------------------------------------------------------------- redis

    def _up_redis(self) -> None:
        port = self.info.redis_port
        if self._alive("redis"):
            if _wait(lambda: _redis_answers(port), 5):
                return
            raise self._fail("redis", f"runs (pid {self.read_pid('redis')}) but does not answer PING on 127.0.0.1:{port}")
        if _port_in_use(port):
            raise LabError(f"redis: port {port} on 127.0.0.1 is taken by another program; log: {self.log('redis')}")
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        proc = self._popen("redis", [
            exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.redis_dir),
            "--save", "", "--appendonly", "no", "--pidfile", str(self.pidfile("redis")),
            "--daemonize", "no", "--protected-mode", "yes",
        ])

        def ready() -> bool:
            if proc.poll() is not None:
                raise self._fail("redis", f"exited with code {proc.returncode} while starting")
            return _redis_answers(port)

        self._wait_or_fail("redis", ready, 20, f"does not answer PING on 127.0.0.1:{port}")
        self.pidfile("redis").write_text(f"{proc.pid}\n")

    def _wait_or_fail(self, name: str, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except LabError:
                raise
            except Exception:  # noqa: BLE001
                pass
            if time.monotonic() > deadline:
                raise self._fail(name, f"{what} within {timeout:.0f}s")
            time.sleep(0.1)

    # ----------------------------------------------------------------- sshd

    def _ssh_keys(self) -> None:
        host_key = self.ssh_dir / "ssh_host_ed25519_key"
        client_key = self.info.ssh_key
        for key, comment in ((host_key, "lab-host"), (client_key, "lab-client")):
            if not key.exists() or not Path(f"{key}.pub").exists():
                key.unlink(missing_ok=True)
                Path(f"{key}.pub").unlink(missing_ok=True)
                r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                                   capture_output=True, text=True, timeout=30)
                if r.returncode != 0:
                    raise LabError(f"sshd: ssh-keygen failed: {r.stderr.strip()}; log: {self.log('sshd')}")
            os.chmod(key, 0o600)
        (self.ssh_dir / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
        host_pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        self.info.known_hosts.write_text(f"[127.0.0.1]:{self.info.ssh_port} {host_pub}\n")

    def _ssh_check(self, command: str | None = None) -> str:
        import paramiko

        c = paramiko.SSHClient()
        c.load_host_keys(str(self.info.known_hosts))
        c.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            c.connect("127.0.0.1", port=self.info.ssh_port, username="root", key_filename=str(self.info.ssh_key),
                      look_for_keys=False, allow_agent=False, timeout=3, banner_timeout=3, auth_timeout=3)
            if command is None:
                return ""
            _, out, _ = c.exec_command(command, timeout=5)
            return out.read().decode()
        finally:
            c.close()

    def _up_sshd(self) -> None:
        self._ssh_keys()
        port = self.info.ssh_port
        if self._alive("sshd"):
            if _wait(lambda: self._ssh_check() == "", 5, 0.2):
                return
            raise self._fail("sshd", f"runs (pid {self.read_pid('sshd')}) but key login on 127.0.0.1:{port} fails")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir sshd requires
        cfg = self.ssh_dir / "sshd_config"
        cfg.write_text(
            "# lab sshd (written by lab/core.py)\n"
            "ListenAddress 127.0.0.1\n"
            f"Port {port}\n"
            f"HostKey {self.ssh_dir / 'ssh_host_ed25519_key'}\n"
            f"PidFile {self.pidfile('sshd')}\n"
            f"AuthorizedKeysFile {self.ssh_dir / 'authorized_keys'}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "Subsystem sftp internal-sftp\n"
        )
        if _port_in_use(port):
            raise LabError(f"sshd: port {port} on 127.0.0.1 is taken by another program; log: {self.log('sshd')}")
        proc = self._popen("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)])

        def ready() -> bool:
            if proc.poll() is not None:
                raise self._fail("sshd", f"exited with code {proc.returncode} while starting")
            return self._ssh_check() == ""

        self._wait_or_fail("sshd", ready, 20, f"key login (RejectPolicy) on 127.0.0.1:{port} did not succeed")
        self.pidfile("sshd").write_text(f"{proc.pid}\n")

    # ----------------------------------------------------------------- inventory

    def inventory_dict(self) -> dict:
        i = self.info
        return {
            "docker_hosts": {"lab": {"base_url": i.docker_base_url}},
            "ssh_hosts": {"lab": {
                "hostname": "127.0.0.1", "port": i.ssh_port, "username": "root",
                "key_file": str(i.ssh_key), "known_hosts": str(i.known_hosts),
            }},
            "databases": {"lab": {
                "host": "127.0.0.1", "port": i.pg_port, "dbname": "app", "user": "app",
                "password": f"file:{i.pg_password_file}",
            }},
            "redis": {"lab": {"host": "127.0.0.1", "port": i.redis_port}},
            "services": {"web": {
                "environment": "lab", "owner": "sre-lab", "health_url": i.health_url,
                "container": i.container_name, "docker_host": "lab", "ssh_host": "lab",
                "database": "lab", "redis": "lab", "stateless": True, "severity_down": "P0",
            }},
        }

    def _write_inventory(self) -> None:
        import yaml

        header = "# Written by `python -m lab up` (lab/core.py); rewritten at every up.\n"
        tmp = self.inventory_path.with_suffix(".yaml.tmp")
        tmp.write_text(header + yaml.safe_dump(self.inventory_dict(), sort_keys=False))
        tmp.replace(self.inventory_path)

    # ----------------------------------------------------------------- alerting stack (optional)

    def alerting_pids(self) -> dict[str, int]:
        """PIDs of the alerting processes according to their pidfiles (alive or not)."""
        return {n: pid for n in _al.ALERTING_COMPONENTS if (pid := self.read_pid(n))}

    def alerting_enabled(self) -> bool:
        """Asked for on this Lab, or left running by an earlier ``up --alerting``."""
        return self.alerting or any(self.pidfile(n).exists() for n in _al.ALERTING_COMPONENTS)

    def _alerting_config(self, name: str) -> Path:
        return self.alerting_dir / f"{name}.yml"

    def _alerting_alive(self, name: str) -> int | None:
        """The PID if it runs our binary with this lab's config file (no name-only matches)."""
        pid = self._alive(name)
        if pid and f"--config.file={self._alerting_config(name)}" in _cmdline(pid):
            return pid
        return None

    def _alertmanager_token(self) -> str:
        f = self.info.alertmanager_token_file
        token = f.read_text().strip() if f.exists() else ""
        if not token:
            token = secrets.token_urlsafe(32)
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token)  # no newline: it is sent verbatim as the Bearer credentials
        os.chmod(f, 0o600)
        return token

    def _write_yaml(self, path: Path, data: dict, what: str) -> bool:
        """Write ``data`` as YAML; True if the file changed."""
        import yaml

        text = f"# {what} (written by lab/core.py from lab/alerting.py; rewritten at every up)\n"
        text += yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)
        if path.exists() and path.read_text() == text:
            return False
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return True

    def _check_config(self, name: str, argv: list[str]) -> None:
        if shutil.which(argv[0]) is None:
            return  # the checker ships with the package; without it the daemon itself validates
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=str(self.lab_dir))
        if r.returncode != 0:
            out = (r.stdout + r.stderr).strip()
            raise LabError(f"{name}: `{' '.join(argv)}` failed:\n{out}\nlog: {self.log(name)}")

    def _write_alerting_configs(self) -> dict[str, bool]:
        i = self.info
        rules = self.alerting_dir / "rules.yml"
        changed = {
            "blackbox": self._write_yaml(self._alerting_config("blackbox"), _al.blackbox_config(),
                                         "blackbox exporter modules"),
            "alertmanager": self._write_yaml(
                self._alerting_config("alertmanager"),
                _al.alertmanager_config(gateway_url=i.gateway_url, token_file=i.alertmanager_token_file),
                "Alertmanager: route every alert to the runbooks gateway webhook"),
        }
        rules_changed = self._write_yaml(rules, _al.prometheus_rules(), "Prometheus alerting rules")
        changed["prometheus"] = self._write_yaml(
            self._alerting_config("prometheus"),
            _al.prometheus_config(health_url=i.health_url, blackbox_port=i.blackbox_port,
                                  alertmanager_port=i.alertmanager_port, rules_file=rules),
            "Prometheus: probe the web service through blackbox, alert to Alertmanager") or rules_changed
        self._check_config("prometheus", [_al.PROMTOOL_BIN, "check", "config", str(self._alerting_config("prometheus"))])
        self._check_config("alertmanager", [_al.AMTOOL_BIN, "check-config", str(self._alerting_config("alertmanager"))])
        return changed

    def _alerting_specs(self) -> list[tuple[str, str, int, str, list[str]]]:
        """(name, package, port, readiness URL, argv) per alerting component."""
        i = self.info
        d = self.alerting_dir
        return [
            ("blackbox", _al.BLACKBOX_BIN, i.blackbox_port, f"{i.blackbox_url}/metrics", [
                shutil.which(_al.BLACKBOX_BIN) or f"/usr/bin/{_al.BLACKBOX_BIN}",
                f"--config.file={self._alerting_config('blackbox')}",
                f"--web.listen-address=127.0.0.1:{i.blackbox_port}",
            ]),
            ("alertmanager", _al.ALERTMANAGER_BIN, i.alertmanager_port, f"{i.alertmanager_url}/-/ready", [
                shutil.which(_al.ALERTMANAGER_BIN) or f"/usr/bin/{_al.ALERTMANAGER_BIN}",
                f"--config.file={self._alerting_config('alertmanager')}",
                f"--storage.path={d / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{i.alertmanager_port}",
                f"--web.external-url={i.alertmanager_url}",
                "--cluster.listen-address=",  # empty: no clustering/gossip, nothing beyond loopback
            ]),
            ("prometheus", _al.PROMETHEUS_BIN, i.prometheus_port, f"{i.prometheus_url}/-/ready", [
                shutil.which(_al.PROMETHEUS_BIN) or f"/usr/bin/{_al.PROMETHEUS_BIN}",
                f"--config.file={self._alerting_config('prometheus')}",
                f"--storage.tsdb.path={d / 'prometheus-data'}",
                "--storage.tsdb.retention.time=2d",
                f"--web.listen-address=127.0.0.1:{i.prometheus_port}",
                f"--web.external-url={i.prometheus_url}",
                "--web.enable-lifecycle",  # POST /-/reload when the lab rewrites the config
            ]),
        ]

    def up_alerting(self) -> LabInfo:
        """Start (or keep) the blackbox exporter, Prometheus and Alertmanager; idempotent."""
        self.alerting = True
        self._prepare_dirs()
        info = self.info
        for name, pkg, *_ in self._alerting_specs():
            if shutil.which(pkg) is None and not Path(f"/usr/bin/{pkg}").exists():
                raise LabError(f"{name}: {pkg} not installed (apt-get install {pkg}); log: {self.log(name)}")
        self.alerting_dir.mkdir(exist_ok=True)
        for sub in ("alertmanager-data", "prometheus-data"):
            (self.alerting_dir / sub).mkdir(exist_ok=True)
        self._alertmanager_token()
        self._save_info()
        changed = self._write_alerting_configs()
        procs: dict[str, subprocess.Popen | None] = {}
        for name, _pkg, port, _url, argv in self._alerting_specs():
            pid = self._alerting_alive(name)
            if pid:
                procs[name] = None
                if changed[name]:
                    self._reload_alerting(name)
                continue
            if _port_in_use(port):
                raise LabError(f"{name}: port {port} on 127.0.0.1 is taken by another program; log: {self.log(name)}")
            self.pidfile(name).unlink(missing_ok=True)
            procs[name] = self._popen(name, argv)  # pidfile now, so down() stops it even if up fails
        deadline = time.monotonic() + 30
        for name, _pkg, port, url, _argv in self._alerting_specs():
            proc = procs[name]

            def ready(name=name, proc=proc, url=url) -> bool:
                if proc is not None and proc.poll() is not None:
                    raise self._fail(name, f"exited with code {proc.returncode} while starting")
                return http_get(url, timeout=2)[0] == 200

            self._wait_or_fail(name, ready, max(1.0, deadline - time.monotonic()),
                               f"{url} did not answer 200")
        # Prometheus applies discovered targets only every ~5s after start: wait for the
        # first probe so alerts work from the moment up() returns.
        self._wait_or_fail("prometheus", self._probe_scraped, 30,
                           f"no scrape of the blackbox probe of {info.health_url} (see {info.prometheus_url}/targets)")
        return info

    def _probe_scraped(self) -> bool:
        code, body = http_get(f"{self.info.prometheus_url}/api/v1/targets?state=active", timeout=2)
        if code != 200:
            return False
        targets = json.loads(body)["data"]["activeTargets"]
        return any(t["labels"].get("job") == "blackbox" and t.get("health") == "up" for t in targets)

    def _reload_alerting(self, name: str) -> None:
        i = self.info
        base = {"blackbox": i.blackbox_url, "prometheus": i.prometheus_url, "alertmanager": i.alertmanager_url}[name]
        req = urllib.request.Request(f"{base}/-/reload", method="POST", data=b"")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status == 200:
                    return
                what = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            what = f"HTTP {e.code}: {e.read().decode(errors='replace').strip()}"
        except (urllib.error.URLError, OSError) as e:
            what = str(getattr(e, "reason", e))
        raise self._fail(name, f"config reload (POST {base}/-/reload) failed: {what}")

    def _stop_alerting(self) -> None:
        for name in ("prometheus", "alertmanager", "blackbox"):
            pid = self.read_pid(name)
            if pid and self._alerting_alive(name):
                self._stop_pid(name, pid, signal.SIGTERM, timeout=15.0)
            self.pidfile(name).unlink(missing_ok=True)

    def down_alerting(self) -> None:
        """Stop only the alerting stack (by PID); later up() calls leave it off."""
        self._stop_alerting()
        self.alerting = False

    def alerting_status(self) -> dict[str, str]:
        i = self.info
        out: dict[str, str] = {}
        for name, url in (("blackbox", f"{i.blackbox_url}/metrics"), ("prometheus", f"{i.prometheus_url}/-/ready"),
                          ("alertmanager", f"{i.alertmanager_url}/-/ready")):
            if not self._alerting_alive(name):
                out[name] = "down"
                continue
            code, body = http_get(url, timeout=3)
            out[name] = "up" if code == 200 else f"not answering ({code or body})"
        return out
