"""Process handling shared by every part of the lab (and by deployments/stack.py).

- pidfiles: one ``pids/<name>.pid`` per process the lab started, one ``logs/<name>.log``;
- liveness: :func:`pid_alive` (zombies count as dead) and a cmdline check before any
  signal, so a stale pidfile whose PID now belongs to another program is never signalled;
- stopping is by the recorded PID, never by name;
- :func:`wait_until`: the one polling loop of the lab;
- loopback helpers: free/used ports, :func:`http_get`, a raw TCP exchange.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


class LabError(Exception):
    """A lab component failed; the message names it and where its log is."""


# Substring expected in /proc/<pid>/cmdline before we signal a pidfile's PID (guards
# against a stale pidfile whose PID now belongs to something else). Each system module
# adds its own entries with expect_cmdline() next to the code that starts the process.
EXPECTED_CMD: dict[str, str] = {}


def expect_cmdline(name: str, substring: str) -> None:
    """Declare what the cmdline of lab process ``name`` contains (``""``: anything)."""
    EXPECTED_CMD[name] = substring


# --------------------------------------------------------------------------- processes


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


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str | None = None,
               fail: Callable[[str], BaseException] | None = None,
               propagate: tuple[type[BaseException], ...] = (LabError,)) -> bool:
    """Poll ``predicate`` every ``interval`` s until it is true or ``timeout`` s have passed.

    The predicate may raise one of ``propagate`` (default :class:`LabError`) to stop at
    once (e.g. "the process exited while starting"); any other exception counts as "not
    yet" (probes fail while things start). On timeout: ``False`` if ``what`` is None, else
    raises ``fail(f"{what} within {timeout}s")`` (default: a LabError with that text).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except propagate:
            raise
        except Exception:  # noqa: BLE001 - probes may fail while things start
            pass
        if time.monotonic() >= deadline:
            if what is None:
                return False
            msg = f"{what} within {timeout:.0f}s"
            raise fail(msg) if fail is not None else LabError(msg)
        time.sleep(interval)


# --------------------------------------------------------------------------- loopback


def free_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise LabError("could not find a free port on 127.0.0.1")


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def tcp_exchange(port: int, data: bytes, n: int, timeout: float = 1.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(data)
        return s.recv(n)


def http_request(method: str, url: str, token_file: Path | None = None,
                 timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a request, with ``Authorization: Bearer <token of token_file>`` if one is
    given; status 0 with the error text if it failed. The token never appears in what is returned."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token_file is not None:
        req.add_header("Authorization", f"Bearer {token_file.read_text().strip()}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(getattr(e, "reason", e))


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 with the error text if it failed."""
    return http_request("GET", url, timeout=timeout)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- the helper


class Procs:
    """Pidfiles and logs of one lab dir; starts processes with their log, stops them by PID."""

    def __init__(self, logs_dir: Path, pids_dir: Path, cwd: Path) -> None:
        self.logs_dir = logs_dir
        self.pids_dir = pids_dir
        self.cwd = cwd

    def log(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def pidfile(self, name: str) -> Path:
        return self.pids_dir / f"{name}.pid"

    def read_pid(self, name: str) -> int | None:
        try:
            return int(self.pidfile(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def write_pid(self, name: str, pid: int) -> None:
        self.pidfile(name).write_text(f"{pid}\n")

    def fail(self, name: str, what: str, log: Path | None = None) -> LabError:
        """A LabError naming the component, its log and the log's last lines."""
        log = log or self.log(name)
        last = tail(log)
        msg = f"{name}: {what}; log: {log}"
        if last:
            msg += "\n--- last lines of the log ---\n" + last
        return LabError(msg)

    def start(self, name: str, argv: list[str], write_pid: bool = True,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` in its own session, output appended to ``logs/<name>.log``;
        the pidfile is written at once, so a later stop finds it even if startup fails."""
        logf = open(self.log(name), "ab")
        try:
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, cwd=str(self.cwd),
                env={**os.environ, **env} if env else None,
            )
        except OSError as exc:
            raise LabError(f"{name}: could not start ({exc}); log: {self.log(name)}") from None
        finally:
            logf.close()
        if write_pid:
            self.write_pid(name, proc.pid)
        return proc

    def wait_started(self, name: str, proc: subprocess.Popen | None, ready: Callable[[], bool],
                     timeout: float, what: str) -> None:
        """Wait until ``ready()``; fail at once (with the log) if ``proc`` exits meanwhile,
        and with ``what`` if it is not ready within ``timeout``."""

        def check() -> bool:
            if proc is not None and proc.poll() is not None:
                raise self.fail(name, f"exited with code {proc.returncode} while starting")
            return ready()

        wait_until(check, timeout, what=what, fail=lambda msg: self.fail(name, msg))

    def alive(self, name: str) -> int | None:
        """The PID from name's pidfile if that process runs and is the expected program."""
        pid = self.read_pid(name)
        if pid and pid_alive(pid) and EXPECTED_CMD[name] in cmdline(pid):
            return pid
        return None

    def stop_pid(self, name: str, pid: int, sig: int = signal.SIGTERM, timeout: float = 10.0,
                 expect: str | None = None) -> None:
        """Signal ``pid`` (if it still runs the expected program), then SIGKILL after ``timeout``."""
        if not pid_alive(pid):
            return
        if (EXPECTED_CMD.get(name, "") if expect is None else expect) not in cmdline(pid):
            return  # stale pidfile: the PID belongs to some other program now
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if not wait_until(lambda: not pid_alive(pid), timeout, 0.05):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            wait_until(lambda: not pid_alive(pid), 5.0, 0.05)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0, expect: str | None = None) -> None:
        """Stop the process of ``pids/<name>.pid`` by its PID and remove the pidfile."""
        pid = self.read_pid(name)
        if pid:
            self.stop_pid(name, pid, sig, timeout, expect)
        self.pidfile(name).unlink(missing_ok=True)
