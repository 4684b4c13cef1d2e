"""The application tier around the web service: the upstream "prices" API (container
``lab-upstream``), the queue consumer (container ``lab-worker``) and steady client traffic
(lab process ``traffic``: ``python -m lab.traffic URL RPS``).

Both containers run the current release's image (``lab-web:1.1``) in another role
(``LABWEB_ROLE=upstream|worker``, lab/labweb.c), on the host network, labelled
``runbooks.service``. The traffic (10 requests/s on the web service's ``/api/price``) is what
makes the web service call its upstream and fill the queue, so the application faults show
in the metrics as they would under real load.

Chaos calls (the lab's faults; flows never make them) carry the chaos token; admin calls (the
lab's resets) the admin token. Both tokens live in ``<lab>/app/secrets`` (mode 0600).

The lab's values of the inventory's ``services.web.app`` (:func:`app_inventory`) are here too,
scaled so that a drill fires in seconds: the alert rules (lab/exporters.py) use the same ones.
"""

from __future__ import annotations

import sys

from lab.context import LabContext, LabInfo
from lab.docker import Docker
from lab.exporters import QUEUE_KEY
from lab.faults import fault
from lab.proc import LabError, expect_cmdline, http_get, http_request, tcp_exchange, wait_until

expect_cmdline("traffic", "lab.traffic")

MiB = 1 << 20
UPSTREAM_CONTAINER = "lab-upstream"
WORKER_CONTAINER = "lab-worker"
#: the web container's limits (docker run --memory 64m --memory-swap 64m --cpus 0.5)
MEMORY_LIMIT_BYTES = 64 * MiB
NANO_CPUS = 500_000_000
#: the web-memory-leak fault's rate (labweb's default: 8 MiB/s): past the alert threshold in ~3 s
LEAK_BYTES_PER_S = 16 * MiB
# --- the lab's values of services.web.app (scaled: a drill fires in seconds) ---
UPSTREAM_NAME = "prices"
UPSTREAM_TIMEOUT_MS = 300  # the web service's own timeout on each upstream call
MAX_BACKLOG = 50
MIN_DRAIN_PER_S = 1.0
LOG_MAX_BYTES = 4 * MiB
LOG_KEEP = 3
MEMORY_ALERT_FRACTION = 0.8
MEMORY_BASELINE_FRACTION = 0.5
CPU_ALERT_CORES = 0.3  # the web container has half a CPU: a spin shows as ~0.5
ERROR_RATE_THRESHOLD = 0.05
ERROR_RATE_WINDOW_S = 5
UPSTREAM_DEADLINE_S = 30
REQUIRED_SETTINGS = ["LABWEB_UPSTREAM", "LABWEB_PG", "LABWEB_REDIS"]
START_DEPENDENCIES = ["redis"]
TRAFFIC_RPS = 10
# --- inside the containers ---
SECRETS_MOUNT = "/run/labweb"
STATUS_MOUNT = "/status"
LOGS_MOUNT = "/var/log/labweb"
STATUS_FILE = f"{STATUS_MOUNT}/web.prom"
APP_LOG = f"{LOGS_MOUNT}/app.log"


def app_inventory(i: LabInfo) -> dict:
    """Service ``web``'s ``app`` entry of the lab's inventory (incident/inventory.py AppSpec)."""
    return {
        "metrics_url": i.metrics_url,
        "admin_url": i.admin_url,
        "admin_token": f"file:{i.admin_token_file}",
        "prometheus_url": i.prometheus_url,
        "upstream": {"name": UPSTREAM_NAME, "health_url": f"{i.upstream_url}/health",
                     "probe_url": f"{i.upstream_url}/price", "timeout_s": 2.0},
        "memory_alert_fraction": MEMORY_ALERT_FRACTION,
        "memory_baseline_fraction": MEMORY_BASELINE_FRACTION,
        "cpu_alert_cores": CPU_ALERT_CORES,
        "error_rate_threshold": ERROR_RATE_THRESHOLD,
        "error_rate_window_s": ERROR_RATE_WINDOW_S,
        "upstream_deadline_s": UPSTREAM_DEADLINE_S,
        "required_settings": list(REQUIRED_SETTINGS),
        "start_dependencies": list(START_DEPENDENCIES),
        "log": {"path": str(i.app_log_file), "max_bytes": LOG_MAX_BYTES, "keep": LOG_KEEP},
        "queue": {"redis": "lab", "key": QUEUE_KEY, "consumer_container": WORKER_CONTAINER,
                  "max_backlog": MAX_BACKLOG, "min_drain_per_s": MIN_DRAIN_PER_S},
    }


# --------------------------------------------------------------------------- HTTP helpers


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels as written}': value} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            continue
    return out


def metrics(url: str, timeout: float = 2.0) -> dict[str, float] | None:
    code, body = http_get(url, timeout)
    return parse_metrics(body) if code == 200 else None


def llen(port: int, key: str = QUEUE_KEY) -> int | None:
    """LLEN of ``key`` on the Redis at 127.0.0.1:port; None if Redis does not answer."""
    k = key.encode()
    try:
        reply = tcp_exchange(port, b"*2\r\n$4\r\nLLEN\r\n$%d\r\n%s\r\n" % (len(k), k), 64)
    except OSError:
        return None
    return int(reply[1:].split(b"\r\n")[0]) if reply.startswith(b":") else None


# --------------------------------------------------------------------------- the containers


class App:
    """The upstream and worker containers, and the traffic process."""

    def __init__(self, ctx: LabContext, docker: Docker) -> None:
        self.ctx = ctx
        self.docker = docker

    # ----------------------------------------------------------------- containers

    def _spec(self, role: str) -> tuple[str, int, dict[str, str]]:
        """(container name, port, environment) of the upstream or the worker."""
        i = self.ctx.info
        port = i.upstream_port if role == "upstream" else i.worker_port
        env = {
            "LABWEB_ROLE": role,
            "LABWEB_PORT": str(port),
            "LABWEB_PG": f"127.0.0.1:{i.pg_port}",
            "LABWEB_REDIS": f"127.0.0.1:{i.redis_port}",
            "LABWEB_QUEUE_KEY": QUEUE_KEY,
            "LABWEB_CHAOS_TOKEN_FILE": f"{SECRETS_MOUNT}/chaos_token",
        }
        return (UPSTREAM_CONTAINER if role == "upstream" else WORKER_CONTAINER), port, env

    def _get(self, client, name: str):
        import docker.errors

        try:
            return client.containers.get(name)
        except docker.errors.NotFound:
            return None

    def _health_ok(self, role: str) -> bool:
        port = self._spec(role)[1]
        return http_get(f"http://127.0.0.1:{port}/health", 2)[0] == 200

    def recreate(self, role: str, timeout: float = 20.0) -> None:
        """A fresh ``lab-upstream`` / ``lab-worker`` container of the current release; waits until
        its /health answers 200."""
        name, port, env = self._spec(role)
        i = self.ctx.info
        client = self.docker.client()
        try:
            old = self._get(client, name)
            if old is not None:
                old.remove(force=True)
            c = client.containers.run(
                i.web_image, name=name, detach=True, network_mode="host", environment=env,
                labels={"runbooks.service": role}, restart_policy={"Name": "no"},
                # only the chaos token: these roles have no admin endpoints
                volumes={str(i.chaos_token_file): {"bind": f"{SECRETS_MOUNT}/chaos_token", "mode": "ro"}},
            )
            if not wait_until(lambda: self._health_ok(role), timeout, 0.1):
                log = self.ctx.log(role)
                try:
                    log.write_bytes(c.logs(stdout=True, stderr=True))
                except Exception:  # noqa: BLE001
                    pass
                raise self.ctx.fail(role, f"container {name} did not answer 200 on "
                                          f"http://127.0.0.1:{port}/health within {timeout:.0f}s", log)
        finally:
            client.close()

    def _current(self, role: str) -> bool:
        """The container runs the current image of the release tag (labweb.c may have changed)."""
        client = self.docker.client()
        try:
            c = self._get(client, self._spec(role)[0])
            if c is None or c.attrs["State"].get("Status") != "running":
                return False
            return bool(c.attrs["Image"] == client.images.get(self.ctx.info.web_image).id)
        finally:
            client.close()

    def up(self) -> None:
        """Create the upstream and worker containers unless they run the current image. A running
        one is kept as it is (a stalled consumer or an upstream in error mode stays so: up never
        hides a fault)."""
        for role in ("upstream", "worker"):
            if not self._current(role):
                self.recreate(role)

    def container_status(self, role: str) -> str:
        try:
            client = self.docker.client(timeout=5)
        except Exception as exc:  # noqa: BLE001
            return f"unknown ({type(exc).__name__})"
        try:
            c = self._get(client, self._spec(role)[0])
            if c is None:
                return "down (no container)"
            state = c.attrs["State"]
            if state.get("Status") != "running":
                return f"{state.get('Status')} (exit code {state.get('ExitCode')})"
        except Exception as exc:  # noqa: BLE001
            return f"unknown ({type(exc).__name__})"
        finally:
            client.close()
        code, body = http_get(f"http://127.0.0.1:{self._spec(role)[1]}/health", 3)
        return "up" if code == 200 else f"unhealthy ({code or body})"

    # ----------------------------------------------------------------- the upstream

    def upstream_mode(self) -> str | None:
        """The upstream's mode (ok, slow, rate_limited, error) from its /metrics; None if it
        does not answer."""
        m = metrics(f"{self.ctx.info.upstream_url}/metrics")
        if m is None:
            return None
        return next((k.split('mode="')[1].split('"')[0] for k, v in m.items()
                     if k.startswith("labupstream_mode{") and v == 1), None)

    def set_upstream_mode(self, mode: str, for_s: int = 0, retry_after: int = 2) -> None:
        url = f"{self.ctx.info.upstream_url}/admin/mode?set={mode}&for={for_s}&retry_after={retry_after}"
        code, body = http_request("POST", url, self.ctx.info.chaos_token_file)
        if code != 200:
            raise LabError(f"upstream: POST /admin/mode?set={mode} answered {code or ''} {body}".strip())

    def upstream_ok(self) -> bool:
        return self.upstream_mode() == "ok"

    def reset_upstream(self) -> None:
        """Mode ok; a container that does not answer is recreated."""
        try:
            self.set_upstream_mode("ok")
        except LabError:
            self.recreate("upstream")

    # ----------------------------------------------------------------- the worker

    def backlog(self) -> int | None:
        return llen(self.ctx.info.redis_port)

    def worker_consuming(self) -> bool:
        m = metrics(f"{self.ctx.info.worker_url}/metrics")
        return m is not None and m.get("labworker_consuming") == 1

    def worker_chaos(self, query: str) -> None:
        code, body = http_request("POST", f"{self.ctx.info.worker_url}/admin/chaos?{query}",
                                  self.ctx.info.chaos_token_file)
        if code != 200:
            raise LabError(f"worker: POST /admin/chaos?{query} answered {code or ''} {body}".strip())

    def reset_worker(self, timeout: float = 30.0) -> None:
        """Restart the consumer (a fresh container) and wait until the backlog is under the
        inventory's max_backlog."""
        self.recreate("worker")
        if not wait_until(lambda: (self.backlog() or 0) < MAX_BACKLOG, timeout, 0.2):
            raise self.ctx.fail("worker", f"backlog of {QUEUE_KEY!r} still {self.backlog()} "
                                          f"(>= {MAX_BACKLOG}) {timeout:.0f}s after a restart")

    # ----------------------------------------------------------------- traffic

    def traffic_argv(self) -> list[str]:
        return [sys.executable, "-m", "lab.traffic", f"http://127.0.0.1:{self.ctx.info.web_port}/api/price",
                str(TRAFFIC_RPS)]

    def start_traffic(self) -> None:
        ctx = self.ctx
        if ctx.procs.alive("traffic"):
            return
        ctx.pidfile("traffic").unlink(missing_ok=True)
        proc = ctx.procs.start("traffic", self.traffic_argv())
        # it prints one line when it starts; fail now (with its log) if it exits at once
        ctx.procs.wait_started("traffic", proc, lambda: proc.poll() is None and "traffic: " in ctx.log(
            "traffic").read_text(errors="replace").rsplit("=== ", 1)[-1], 10, "did not start sending")

    def stop_traffic(self) -> None:
        self.ctx.procs.stop("traffic")

    def traffic_status(self) -> str:
        return "up" if self.ctx.procs.alive("traffic") else "down"


# --------------------------------------------------------------------------- faults


def _upstream_healthy(lab) -> bool:
    """What the upstream-outage runbook's verify sees: the upstream answers in mode ok, and the
    web service calls it again (breaker closed, not in degraded mode)."""
    if not lab.app.upstream_ok():
        return False
    status = lab.web.admin_status()
    return status is not None and status.get("breaker") == "closed" and status.get("degraded") is False


def _upstream_at_baseline(lab) -> bool:
    """The upstream in mode ok and, if the web service answers, its breaker closed and degraded
    mode off (a web service that does not answer is the web faults' part: a fresh one starts so)."""
    if not lab.app.upstream_ok():
        return False
    status = lab.web.admin_status()
    return status is None or (status.get("breaker") == "closed" and status.get("degraded") is False)


def _reset_upstream(lab) -> None:
    lab.app.reset_upstream()
    lab.web.reset_app_state()


def _inject_upstream(lab, mode: str, for_s: int, retry_after: int = 2) -> None:
    lab.app.set_upstream_mode(mode, for_s, retry_after)
    # the traffic trips the web service's breaker after 5 failed calls (about half a second)
    if not wait_until(lambda: (lab.web.admin_status() or {}).get("breaker") in ("open", "half_open"), 10, 0.1):
        raise LabError(f"upstream-{mode}: the web service's circuit breaker did not open within 10s "
                       f"(traffic: {lab.ctx.log('traffic')})")


@fault("upstream-down", scenario="upstream-outage", alert="UpstreamFailing",
       description="the prices API answers 503 for 15 s: the web service's breaker opens; the API "
                   "comes back by itself, degraded mode bridges the gap",
       reset=_reset_upstream, healthy=_upstream_healthy, at_baseline=_upstream_at_baseline)
def _inject_upstream_down(lab) -> None:
    _inject_upstream(lab, "error", 15)


@fault("upstream-rate-limited", scenario="upstream-outage", alert="UpstreamFailing",
       description="the prices API answers 429 (Retry-After: 3) for 12 s: the breaker opens; "
                   "back by itself",
       reset=_reset_upstream, healthy=_upstream_healthy, at_baseline=_upstream_at_baseline)
def _inject_upstream_rate_limited(lab) -> None:
    _inject_upstream(lab, "rate_limited", 12, retry_after=3)


@fault("upstream-down-for-good", scenario="upstream-outage", alert="UpstreamFailing",
       description="the prices API answers 503 until told otherwise: degraded mode keeps the service "
                   "up, the runbook escalates after its deadline",
       reset=_reset_upstream, healthy=_upstream_healthy, heals=False, at_baseline=_upstream_at_baseline)
def _inject_upstream_down_for_good(lab) -> None:
    _inject_upstream(lab, "error", 0)


def _consumer_healthy(lab) -> bool:
    """What the logs-backlog runbook's verify sees: the consumer consumes, the backlog is small."""
    backlog = lab.app.backlog()
    return backlog is not None and backlog < MAX_BACKLOG and lab.app.worker_consuming()


def _reset_consumer(lab) -> None:
    lab.app.reset_worker()


def _consumer_at_baseline(lab) -> bool:
    """As healthy, but a Redis that does not answer is the Redis faults' part."""
    backlog = lab.app.backlog()
    return backlog is None or (backlog < MAX_BACKLOG and lab.app.worker_consuming())


@fault("queue-consumer-stuck", scenario="logs-backlog", alert="QueueBacklogHigh",
       description=f"the consumer ({WORKER_CONTAINER}) stops consuming but still answers /health: the "
                   f"'{QUEUE_KEY}' list grows with the traffic past {MAX_BACKLOG}; a restart heals it",
       reset=_reset_consumer, healthy=_consumer_healthy, at_baseline=_consumer_at_baseline)
def _inject_queue_consumer_stuck(lab) -> None:
    lab.app.worker_chaos("stall=1")
    if not wait_until(lambda: not lab.app.worker_consuming(), 5, 0.1):
        raise LabError(f"queue-consumer-stuck: {WORKER_CONTAINER} still consuming 5s after stall=1")
