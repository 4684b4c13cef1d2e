"""The web service: one container (``lab-web:1.1``, host network) of the lab's dockerd,
whose ``/health`` checks PostgreSQL and Redis and whose ``/api/price`` calls the upstream
prices API and queues a job on Redis (lab/app.py runs those); and the faults that break it.

The container has the limits a real deployment sets (64 MiB of memory, no swap beyond it, half
a CPU) and three bind mounts under ``<lab>/app``::

    secrets/  -> /run/labweb (ro)   admin_token, chaos_token (0600)
    status/   -> /status            web.prom: labweb_start_failed (node exporter textfile collector)
    logs/     -> /var/log/labweb    app.log: one line per request
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lab.app import (
    APP_LOG, CPU_ALERT_CORES, LEAK_BYTES_PER_S, LOG_MAX_BYTES, LOGS_MOUNT, MEMORY_ALERT_FRACTION,
    MEMORY_BASELINE_FRACTION, MEMORY_LIMIT_BYTES, NANO_CPUS, QUEUE_KEY, SECRETS_MOUNT, STATUS_FILE,
    STATUS_MOUNT, UPSTREAM_TIMEOUT_MS, metrics,
)
from lab.context import LabContext
from lab.docker import Docker
from lab.faults import fault, start_holder
from lab.proc import LabError, expect_cmdline, http_get, http_request, pid_alive, port_in_use, wait_until

expect_cmdline("fault-web-port-held", "lab.port_holder")
#: the bytes of log lines the app-log-flood fault makes the service write (over LOG_MAX_BYTES)
LOG_BURST_BYTES = 6 * (1 << 20)


class Web:
    def __init__(self, ctx: LabContext, docker: Docker) -> None:
        self.ctx = ctx
        self.docker = docker

    @property
    def name(self) -> str:
        return self.ctx.container_name

    def env(self, without: tuple[str, ...] = (), extra: dict[str, str] | None = None) -> dict[str, str]:
        """The container's environment (``without``: settings left out, ``extra``: settings added,
        for a fault)."""
        i = self.ctx.info
        env = {
            "LABWEB_ROLE": "web",
            "LABWEB_PORT": str(i.web_port),
            "LABWEB_PG": f"127.0.0.1:{i.pg_port}",
            "LABWEB_REDIS": f"127.0.0.1:{i.redis_port}",
            "LABWEB_UPSTREAM": f"127.0.0.1:{i.upstream_port}",
            "LABWEB_UPSTREAM_TIMEOUT_MS": str(UPSTREAM_TIMEOUT_MS),
            "LABWEB_ADMIN_TOKEN_FILE": f"{SECRETS_MOUNT}/admin_token",
            "LABWEB_CHAOS_TOKEN_FILE": f"{SECRETS_MOUNT}/chaos_token",
            "LABWEB_LOG_FILE": APP_LOG,
            "LABWEB_STATUS_FILE": STATUS_FILE,
            "LABWEB_MEMORY_LIMIT_BYTES": str(MEMORY_LIMIT_BYTES),
            "LABWEB_LEAK_BYTES_PER_S": str(LEAK_BYTES_PER_S),
            "LABWEB_QUEUE_KEY": QUEUE_KEY,
        }
        return {**{k: v for k, v in env.items() if k not in without}, **(extra or {})}

    def volumes(self) -> dict[str, dict[str, str]]:
        c = self.ctx
        return {
            str(c.app_secrets_dir): {"bind": SECRETS_MOUNT, "mode": "ro"},
            str(c.app_status_dir): {"bind": STATUS_MOUNT, "mode": "rw"},
            str(c.app_logs_dir): {"bind": LOGS_MOUNT, "mode": "rw"},
        }

    def _get(self, client):
        import docker.errors

        try:
            return client.containers.get(self.name)
        except docker.errors.NotFound:
            return None

    def _remove(self, client) -> None:
        old = self._get(client)
        if old is not None:
            old.remove(force=True)

    def _run(self, client, image: str, previous: str, without: tuple[str, ...] = (), check_port: bool = True,
             extra: dict[str, str] | None = None):
        info = self.ctx.info
        self._remove(client)
        if check_port and port_in_use(info.web_port) and image != info.broken_image:
            raise LabError(f"web: port {info.web_port} on 127.0.0.1 is taken by another program")
        return client.containers.run(
            image,
            name=self.name,
            detach=True,
            network_mode="host",
            environment=self.env(without, extra),
            labels={"runbooks.previous-image": previous, "runbooks.service": "web"},
            restart_policy={"Name": "no"},
            mem_limit=MEMORY_LIMIT_BYTES,
            memswap_limit=MEMORY_LIMIT_BYTES,  # no swap beyond the limit
            nano_cpus=NANO_CPUS,
            volumes=self.volumes(),
        )

    def _save_logs(self, container) -> Path:
        log = self.ctx.log("web")
        try:
            log.write_bytes(container.logs(stdout=True, stderr=True))
        except Exception:  # noqa: BLE001
            pass
        return log

    def _health_ok(self) -> bool:
        return http_get(self.ctx.info.health_url, 2)[0] == 200

    def up(self, restart_stopped: bool = False) -> str | None:
        """Create the container when there is none (or, ``restart_stopped``, when ``down``
        stopped it). One that exists but is down or unhealthy is left as it is - repairing it
        here would hide what a runbook did or did not do - and the returned line says so
        (None when it is healthy)."""
        client = self.docker.client()
        try:
            c = self._get(client)
            if c is None or (restart_stopped and c.attrs["State"].get("Status") != "running"):
                self.reset()
                return None
            status = c.attrs["State"].get("Status")
            if status == "running" and wait_until(self._health_ok, 10, 0.2):
                return None
            code, body = http_get(self.ctx.info.health_url, 2)
            self._save_logs(c)
            seen = (f"runs but {self.ctx.info.health_url} answers {code or 'nothing'} {body}".strip()
                    if status == "running" else f"is {status}")
            return (f"web: container {self.name} {seen}; left for the service-down runbook "
                    f"(log: {self.ctx.log('web')}); `python -m lab reset web-killed` repairs it by hand")
        finally:
            client.close()

    def kill(self) -> None:
        client = self.docker.client()
        try:
            c = self._get(client)
            if c is None:
                raise LabError(f"web: no container {self.name}")
            c.kill()
            if not wait_until(lambda: client.containers.get(self.name).status != "running", 10):
                raise self.ctx.fail("web", "container still running 10s after docker kill")
        finally:
            client.close()

    def deploy_broken(self) -> None:
        """Replace the container by the broken release (it exits at start), labelled so
        that a rollback goes back to the image that ran before."""
        self.recreate_failing(self.ctx.info.broken_image, "broken release")

    def recreate_failing(self, image: str, what: str, without: tuple[str, ...] = (),
                         previous: str | None = None, extra: dict[str, str] | None = None) -> None:
        """Recreate the container so that it exits at start (``what`` says why), labelled with
        ``previous`` (default: the image that ran before, so a rollback goes back to it)."""
        client = self.docker.client()
        try:
            c = self._get(client)
            if previous is None:
                previous = c.attrs["Config"]["Image"] if c is not None else self.ctx.info.web_image
            new = self._run(client, image, previous, without=without, check_port=False, extra=extra)

            def exited() -> bool:
                new.reload()
                return new.status == "exited"

            if not wait_until(exited, 15):
                raise self.ctx.fail("web", f"{what}: the container did not exit within 15s", self._save_logs(new))
            self._save_logs(new)
        finally:
            client.close()

    def deploy(self, image: str, previous: str, timeout: float = 30.0) -> None:
        """Replace the container by ``image`` (labelled with ``previous``); waits for 200."""
        client = self.docker.client()
        try:
            c = self._run(client, image, previous)
            self._wait_healthy(c, timeout)
        finally:
            client.close()

    def _wait_healthy(self, c, timeout: float) -> None:
        """Wait for /health 200; fail at once (with the container's log) if it exits."""
        info = self.ctx.info

        def ready() -> bool:
            if http_get(info.health_url, 2)[0] == 200:
                return True
            c.reload()
            if c.status == "exited":
                raise self.ctx.fail("web", f"container {self.name} ({c.attrs['Config']['Image']}) exited "
                                           f"with code {c.attrs['State'].get('ExitCode')} while starting",
                                    self._save_logs(c))
            return False

        if not wait_until(ready, timeout, 0.1):
            code, body = http_get(info.health_url, 2)
            raise self.ctx.fail(
                "web", f"{info.health_url} not 200 within {timeout:.0f}s (last: {code or ''} {body})",
                self._save_logs(c))

    def reset(self, timeout: float = 30.0) -> None:
        """A fresh container of the current release (previous: the one before); waits for 200."""
        info = self.ctx.info
        self.deploy(info.web_image, info.previous_image, timeout)

    def _running(self) -> tuple[str, dict[str, str]] | None:
        """(image, labels) of the web container if it runs; None with no engine, no container,
        or a container that is not running."""
        try:
            client = self.docker.client(timeout=5)
        except Exception:  # noqa: BLE001 - no engine: not running
            return None
        try:
            c = self._get(client)
            if c is None or c.attrs["State"].get("Status") != "running":
                return None
            return c.attrs["Config"]["Image"], dict(c.labels or {})
        except Exception:  # noqa: BLE001
            return None
        finally:
            client.close()

    def healthy(self) -> bool:
        """The service is back: its container runs and ``/health`` answers 200 (whatever the
        image: a rollback to the previous release heals a broken one)."""
        return self._running() is not None and http_get(self.ctx.info.health_url, 3)[0] == 200

    def at_baseline(self) -> bool:
        """The web service is as ``reset`` leaves it: the container runs the current release
        (labelled with the right previous image) and ``/health`` answers 200. A rollback
        to the previous image heals the outage but is not this baseline."""
        info = self.ctx.info
        running = self._running()
        if running is None:
            return False
        image, labels = running
        return (image == info.web_image and labels.get("runbooks.previous-image") == info.previous_image
                and http_get(info.health_url, 3)[0] == 200)

    # ----------------------------------------------------------------- the application

    def admin(self, path: str) -> dict | None:
        """POST an admin endpoint (admin token), e.g. ``degraded?on=0``: its status JSON, or
        None if the service did not answer 200."""
        code, body = http_request("POST", f"{self.ctx.info.admin_url}/{path}", self.ctx.info.admin_token_file)
        return json.loads(body) if code == 200 else None

    def admin_status(self) -> dict | None:
        """``GET /admin/status`` (admin token); None if the service did not answer 200."""
        code, body = http_request("GET", f"{self.ctx.info.admin_url}/status", self.ctx.info.admin_token_file, timeout=2)
        try:
            return json.loads(body) if code == 200 else None
        except ValueError:
            return None

    def chaos(self, query: str) -> None:
        """``POST /admin/chaos?<query>`` with the chaos token (the lab's faults only)."""
        code, body = http_request("POST", f"{self.ctx.info.admin_url}/chaos?{query}", self.ctx.info.chaos_token_file)
        if code != 200:
            raise LabError(f"web: POST /admin/chaos?{query} answered {code or ''} {body}".strip())

    def reset_app_state(self) -> None:
        """Degraded mode off and the circuit breaker closed (admin endpoints); a container that
        does not answer is replaced by a fresh one."""
        if self.admin("degraded?on=0") is None or self.admin("breaker?state=closed") is None:
            self.reset()

    def metrics(self) -> dict[str, float] | None:
        return metrics(self.ctx.info.metrics_url)

    def memory_fraction(self) -> float | None:
        """RSS / the container's memory limit, from the service's own metrics."""
        m = self.metrics()
        if not m or not m.get("labweb_memory_limit_bytes"):
            return None
        return m["process_resident_memory_bytes"] / m["labweb_memory_limit_bytes"]

    def cpu_cores(self, sample_s: float = 0.25) -> float | None:
        """CPU used over ``sample_s`` seconds (cores), from two reads of the service's metrics."""
        first = self.metrics()
        t0 = time.monotonic()
        time.sleep(sample_s)
        second = self.metrics()
        if not first or not second or "process_cpu_seconds_total" not in first:
            return None
        if second.get("process_start_time_seconds") != first.get("process_start_time_seconds"):
            return None  # restarted in between
        return (second["process_cpu_seconds_total"] - first["process_cpu_seconds_total"]) / (time.monotonic() - t0)

    def log_size(self) -> int:
        try:
            return self.ctx.info.app_log_file.stat().st_size
        except OSError:
            return 0

    def truncate_log(self) -> None:
        """Empty the app log in place (the service appends with O_APPEND: no reopen needed)."""
        log = self.ctx.info.app_log_file
        if log.exists():
            with open(log, "r+b") as f:
                f.truncate(0)

    def running_env(self) -> dict[str, str] | None:
        """The environment of the running container (the image's included); None if not running."""
        try:
            client = self.docker.client(timeout=5)
        except Exception:  # noqa: BLE001
            return None
        try:
            c = self._get(client)
            if c is None or c.attrs["State"].get("Status") != "running":
                return None
            return dict(e.split("=", 1) for e in c.attrs["Config"].get("Env") or [] if "=" in e)
        except Exception:  # noqa: BLE001
            return None
        finally:
            client.close()

    def start_failure(self) -> str | None:
        """The reason of ``labweb_start_failed`` in the status file if the last start failed."""
        try:
            text = (self.ctx.app_status_dir / Path(STATUS_FILE).name).read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("labweb_start_failed{") and line.rsplit(" ", 1)[-1].strip() not in ("0", "0.0"):
                return line.split('reason="', 1)[1].split('"', 1)[0]
        return None

    def status(self) -> str:
        import docker.errors

        try:
            client = self.docker.client(timeout=5)
            c = client.containers.get(self.name)
        except docker.errors.NotFound:
            return "down (no container)"
        except Exception as exc:  # noqa: BLE001
            return f"unknown ({type(exc).__name__})"
        state = c.attrs["State"]
        if state.get("Status") != "running":
            return f"{state.get('Status')} (exit code {state.get('ExitCode')}, image {c.attrs['Config']['Image']})"
        code, body = http_get(self.ctx.info.health_url, timeout=3)
        if code == 200:
            return "up"
        return f"unhealthy ({code or body})"


# --------------------------------------------------------------------------- faults


def _reset_web(lab) -> None:
    lab.reset_web()


def _web_healthy(lab) -> bool:
    return lab.web.healthy()


def _web_at_baseline(lab) -> bool:
    return lab.web.at_baseline()


@fault("web-killed", scenario="service-down", alert="ServiceDown",
       description="docker kill the web container: nothing listens, /health stops answering; "
                   "a restart heals it",
       reset=_reset_web, healthy=_web_healthy, at_baseline=_web_at_baseline)
def _inject_web_killed(lab) -> None:
    lab.kill_web()


@fault("web-broken-release", scenario="service-down", alert="ServiceDown",
       description="deploy the broken release (lab-web:broken exits at start): a restart does not "
                   "help, a rollback to the previous image does",
       reset=_reset_web, healthy=_web_healthy, at_baseline=_web_at_baseline)
def _inject_web_broken_release(lab) -> None:
    lab.deploy_broken_web()


# ----- memory-cpu


def _memory_healthy(lab) -> bool:
    """What the memory-cpu runbook's verify sees: the service answers and its RSS is back under
    the baseline share of its limit."""
    fraction = lab.web.memory_fraction()
    return fraction is not None and fraction < MEMORY_BASELINE_FRACTION and lab.web.healthy()


def _memory_at_baseline(lab) -> bool:
    return _memory_healthy(lab) and lab.web.at_baseline()


@fault("web-memory-leak", scenario="memory-cpu", alert="AppMemoryHigh",
       description="the web service leaks memory (16 MiB/s up to 85 % of its 64 MiB limit): RSS over 80 % "
                   "of the limit; only a restart gives the memory back",
       reset=_reset_web, healthy=_memory_healthy,
       at_baseline=_memory_at_baseline)
def _inject_web_memory_leak(lab) -> None:
    lab.web.chaos("leak=1")
    if not wait_until(lambda: (lab.web.memory_fraction() or 0) > MEMORY_ALERT_FRACTION, 20, 0.2):
        raise LabError(f"web-memory-leak: RSS still at {lab.web.memory_fraction()} of the limit 20s after leak=1")


def _cpu_healthy(lab) -> bool:
    cores = lab.web.cpu_cores()
    return cores is not None and cores < CPU_ALERT_CORES and lab.web.healthy()


def _cpu_at_baseline(lab) -> bool:
    return _cpu_healthy(lab) and lab.web.at_baseline()


@fault("web-cpu-spin", scenario="memory-cpu", alert="AppCpuHigh",
       description="a thread of the web service spins: it uses its whole half CPU (over 0.3 cores); "
                   "a restart stops it",
       reset=_reset_web, healthy=_cpu_healthy, at_baseline=_cpu_at_baseline)
def _inject_web_cpu_spin(lab) -> None:
    lab.web.chaos("spin=1")
    if not wait_until(lambda: (lab.web.cpu_cores() or 0) > CPU_ALERT_CORES, 10, 0):
        raise LabError("web-cpu-spin: CPU use still under the threshold 10s after spin=1")


# ----- bad-deploy


def _no_error_release(lab) -> bool:
    """The running release answers without injected errors (the rollback's verify)."""
    env = lab.web.running_env()
    return (env is not None and env.get("LABWEB_ERROR_PERCENT", "0") == "0"
            and http_get(lab.info.health_url, 3)[0] == 200)


@fault("web-error-release", scenario="bad-deploy", alert="HighErrorRate",
       description="deploy lab-web:1.2-errors (labelled previous lab-web:1.1): /health stays 200 but "
                   "30 % of /api/price answer 500; a rollback heals it",
       reset=_reset_web, healthy=_no_error_release, at_baseline=_web_at_baseline)
def _inject_web_error_release(lab) -> None:
    lab.web.deploy(lab.info.errors_image, lab.info.web_image)


# ----- app-wont-start


#: The start check of a dependency: the lab's baseline web starts without it (an outage of Redis
#: must not keep a restarted web down in the other scenarios); web-dependency-down sets it.
REQUIRE_SETTING = "LABWEB_REQUIRE"


def _inject_wont_start(lab, what: str, reason: str, without: tuple[str, ...] = (),
                       extra: dict[str, str] | None = None) -> None:
    lab.web.recreate_failing(lab.info.web_image, what, without=without, previous=lab.info.previous_image,
                             extra=extra)
    if lab.web.start_failure() != reason:
        raise lab.ctx.fail("web", f"{what}: the status file says {lab.web.start_failure()!r}, not {reason!r}")


@fault("web-port-held", scenario="app-wont-start", alert="ServiceWontStart",
       description="another program (python -m lab.port_holder) listens on the web port; the web "
                   "container, recreated, exits: port_in_use. Stopping that program heals it",
       reset=_reset_web, healthy=_web_healthy, at_baseline=_web_at_baseline)
def _inject_web_port_held(lab) -> None:
    port = lab.info.web_port
    client = lab.web.docker.client()
    try:
        lab.web._remove(client)  # frees the port for the holder
    finally:
        client.close()
    argv = [sys.executable, "-m", "lab.port_holder", str(port)]
    start_holder(lab, "web-port-held", argv,
                 ready=lambda: pid_alive(lab.ctx.read_pid("fault-web-port-held")) and port_in_use(port))
    _inject_wont_start(lab, "web-port-held", "port_in_use")


@fault("web-missing-setting", scenario="app-wont-start", alert="ServiceWontStart",
       description="the web container is recreated without LABWEB_UPSTREAM: it exits (missing_setting); "
                   "the runbook cannot invent a setting and escalates",
       reset=_reset_web, healthy=_web_healthy, heals=False, at_baseline=_web_at_baseline)
def _inject_web_missing_setting(lab) -> None:
    _inject_wont_start(lab, "web-missing-setting", "missing_setting", without=("LABWEB_UPSTREAM",))


def _reset_dependency(lab) -> None:
    lab.redis.reset()
    lab.reset_web()


def _dependency_healthy(lab) -> bool:
    return lab.redis.answers() and lab.web.healthy()


def _dependency_at_baseline(lab) -> bool:
    env = lab.web.running_env()
    return (lab.redis.answers() and lab.web.at_baseline() and env is not None
            and REQUIRE_SETTING not in env)


@fault("web-dependency-down", scenario="app-wont-start", alert=None,
       description="Redis is stopped (by its PID) and the web container recreated with a start check "
                   "of Redis (LABWEB_REQUIRE=redis, as an application that refuses to start without "
                   "its cache): it exits (dependency_down); starting Redis, then the service, heals it",
       reset=_reset_dependency, healthy=_dependency_healthy, at_baseline=_dependency_at_baseline)
def _inject_web_dependency_down(lab) -> None:
    lab.stop_component("redis")
    _inject_wont_start(lab, "web-dependency-down", "dependency_down", extra={REQUIRE_SETTING: "redis"})


# ----- logs-backlog


def _log_small(lab) -> bool:
    return lab.web.log_size() <= LOG_MAX_BYTES


def _reset_log_flood(lab) -> None:
    try:
        lab.web.chaos("off=1")
    except LabError:
        pass  # not running: nothing writes
    lab.web.truncate_log()


@fault("app-log-flood", scenario="logs-backlog", alert="LogFileTooLarge",
       description=f"the web service writes {LOG_BURST_BYTES >> 20} MiB of log lines at ~3 MB/s: app.log "
                   f"grows past {LOG_MAX_BYTES >> 20} MiB; rotating it (copytruncate + gzip) heals it",
       reset=_reset_log_flood, healthy=_log_small)
def _inject_app_log_flood(lab) -> None:
    lab.web.chaos(f"logburst={LOG_BURST_BYTES}")
    if not wait_until(lambda: not _log_small(lab), 15, 0.1):
        raise LabError(f"app-log-flood: {lab.info.app_log_file} still {lab.web.log_size()} bytes 15s after "
                       "the burst started")
