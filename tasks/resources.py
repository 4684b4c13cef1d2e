"""Resources of a service's container: memory against its limit, CPU, the top processes.

What runbook 004 ("Memory Leaks", "High CPU Usage": `docker stats tradingbot`) and 003
("Performance Issues": `top`, `free -h`, `ps aux --sort=-%mem | head -5`) have a person type,
as typed samples a flow can judge and a record can keep for the developers' follow-up:

* ``sample_container_resources``: N samples of the Docker engine's stats of the container,
  ``interval_s`` apart (memory usage, RSS, limit, cumulative CPU time, pids); CPU in cores is
  the CPU time used between two samples over the time between them.
* ``list_container_processes``: `docker top` - the container's processes, busiest first.
* ``list_host_top_processes``: `ps --sort=-pcpu` / `--sort=-rss` and the load average on the
  service's host, over SSH.

Memory is judged by the RSS (anonymous memory: what a leak grows, what the service's own
``process_resident_memory_bytes`` shows; cgroup v1 ``total_rss``, v2 ``anon``) when the engine
reports it, else by the working set (usage minus inactive page cache, what `docker stats` shows).
Process lists name processes by their command name only, never their arguments (which may hold
secrets).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Literal

import docker.errors
from docker.models.containers import Container
from pydantic import BaseModel

from incident.errors import ConfigurationError, ContainerNotFoundError, DockerEngineUnreachableError, SshError
from incident.inventory import AppSpec, DockerHost, Target
from tasks.common import read_only_task
from tasks.containers import ENGINE_ERRORS, docker_client
from tasks.ssh_hosts import require_ssh, run_commands

MIB = 1024 * 1024
#: `ps` columns, the same in the container and on the host: no arguments (they may hold secrets)
PS_COLUMNS = "pid,user,pcpu,pmem,rss,etime,comm"


def mib(n: int | float) -> str:
    return f"{n / MIB:.1f} MiB"


class ResourceThresholds(BaseModel):
    """When memory and CPU count as a problem, and when as recovered (from the inventory's app)."""

    memory_alert_fraction: float  # memory / limit at which memory is near the limit
    memory_baseline_fraction: float  # verify: memory back under this share of the limit
    memory_critical_fraction: float  # within a few % of the limit: the service is about to fail
    growth_fraction: float  # memory that rose by this share of the limit across the samples grows
    cpu_alert_cores: float  # CPU above this in every interval is a spin

    @classmethod
    def of(cls, app: AppSpec, critical_fraction: float, growth_fraction: float) -> ResourceThresholds:
        return cls(memory_alert_fraction=app.memory_alert_fraction,
                   memory_baseline_fraction=app.memory_baseline_fraction,
                   memory_critical_fraction=critical_fraction, growth_fraction=growth_fraction,
                   cpu_alert_cores=app.cpu_alert_cores)


class ResourceSample(BaseModel):
    """One `docker stats` reading of the container."""

    at: datetime  # when the engine read it
    usage_bytes: int  # the cgroup's memory usage (page cache included)
    working_set_bytes: int  # usage minus inactive page cache (what `docker stats` shows)
    rss_bytes: int | None  # anonymous memory of its processes (None: the engine did not say)
    limit_bytes: int  # the container's memory limit (the host's memory when it has none)
    cpu_total_ns: int  # CPU time used by the container since it started
    cpu_cores: float | None = None  # CPU used since the previous sample, in cores (None: first)
    pids: int | None = None

    @property
    def memory_bytes(self) -> int:
        """What memory is judged by: the RSS, or the working set when the engine gives no RSS."""
        return self.rss_bytes if self.rss_bytes is not None else self.working_set_bytes

    @property
    def memory_fraction(self) -> float:
        return self.memory_bytes / self.limit_bytes if self.limit_bytes else 0.0

    def describe(self) -> str:
        rss = f"rss {self.rss_bytes} B ({mib(self.rss_bytes)})" if self.rss_bytes is not None else "rss n/a"
        cpu = f"cpu {self.cpu_cores:.2f} cores" if self.cpu_cores is not None else "cpu (first sample)"
        return (f"{self.at:%H:%M:%S.%f}"[:-3] + f" UTC: {rss}, usage {self.usage_bytes} B ({mib(self.usage_bytes)}), "
                f"working set {mib(self.working_set_bytes)}, limit {self.limit_bytes} B ({mib(self.limit_bytes)}), "
                f"{self.memory_fraction:.1%} of the limit, {cpu}, cpu time {self.cpu_total_ns / 1e9:.2f} s"
                + (f", {self.pids} pids" if self.pids is not None else ""))


class ResourceVerdict(BaseModel):
    """What a series of samples says about memory and CPU, against the thresholds."""

    memory_fraction: float  # at the last sample
    growth_bytes: int  # last minus first sample
    window_s: float
    near_limit: bool
    critical: bool
    growing: bool
    under_baseline: bool
    cpu_cores_avg: float | None  # over the whole window (None: a single sample)
    cpu_cores_min: float | None  # the quietest interval
    cpu_high: bool  # above the threshold in every interval: sustained
    cpu_low: bool  # the average under the threshold

    @property
    def memory_problem(self) -> bool:
        return self.near_limit or self.growing

    @property
    def problem(self) -> bool:
        return self.memory_problem or self.cpu_high

    @property
    def recovered(self) -> bool:
        """Verify: memory under the baseline and steady, CPU under the threshold."""
        return self.under_baseline and not self.growing and self.cpu_low


class ResourceSeries(BaseModel):
    """Samples of one container, oldest first, with its limits."""

    container: str
    running: bool
    status: str
    memory_limited: bool  # False: no memory limit, fractions are of the host's memory
    cpu_limit_cores: float | None  # the container's CPU limit (NanoCpus), None: none
    memory_source: Literal["rss", "working set"]
    samples: list[ResourceSample] = []

    @property
    def limit_bytes(self) -> int:
        return self.samples[-1].limit_bytes if self.samples else 0

    def judge(self, th: ResourceThresholds) -> ResourceVerdict:
        if not self.samples:
            raise ValueError("no samples to judge")
        first, last = self.samples[0], self.samples[-1]
        window = (last.at - first.at).total_seconds()
        growth = last.memory_bytes - first.memory_bytes
        cores = [s.cpu_cores for s in self.samples if s.cpu_cores is not None]
        avg = (last.cpu_total_ns - first.cpu_total_ns) / 1e9 / window if window > 0 else None
        return ResourceVerdict(
            memory_fraction=last.memory_fraction, growth_bytes=growth, window_s=window,
            near_limit=last.memory_fraction >= th.memory_alert_fraction,
            critical=last.memory_fraction >= th.memory_critical_fraction,
            growing=len(self.samples) > 1 and growth >= th.growth_fraction * last.limit_bytes,
            under_baseline=last.memory_fraction < th.memory_baseline_fraction,
            cpu_cores_avg=avg, cpu_cores_min=min(cores) if cores else None,
            cpu_high=bool(cores) and min(cores) > th.cpu_alert_cores,
            cpu_low=avg is None or avg < th.cpu_alert_cores,
        )

    def describe_memory(self, th: ResourceThresholds) -> str:
        v = self.judge(th)
        last = self.samples[-1]
        limit = f"{mib(last.limit_bytes)} limit" if self.memory_limited else \
            f"{mib(last.limit_bytes)} of host memory (the container has no memory limit)"
        state = ("within a few % of the limit" if v.critical else "near the limit" if v.near_limit
                 else "under the baseline" if v.under_baseline else "above the baseline, under the alert")
        trend = (f"grew {mib(v.growth_bytes)} in {v.window_s:.1f} s ({mib(v.growth_bytes / v.window_s)}/s): GROWING"
                 if v.growing else f"changed {v.growth_bytes / MIB:+.1f} MiB in {v.window_s:.1f} s: steady")
        return (f"{self.container}: {self.memory_source} {mib(last.memory_bytes)} = {v.memory_fraction:.1%} of the "
                f"{limit} ({state}; alert at {th.memory_alert_fraction:.0%}, baseline "
                f"{th.memory_baseline_fraction:.0%}); {trend} over {len(self.samples)} samples")

    def describe_cpu(self, th: ResourceThresholds) -> str:
        v = self.judge(th)
        if v.cpu_cores_avg is None or v.cpu_cores_min is None:
            return f"{self.container}: CPU not measured (one sample)"
        limit = f" (limit {self.cpu_limit_cores:g} cores)" if self.cpu_limit_cores else ""
        verdict = ("above the threshold in every interval: SUSTAINED" if v.cpu_high
                   else "under the threshold" if v.cpu_low else "above the threshold on average, not in every interval")
        return (f"{self.container}: {v.cpu_cores_avg:.2f} cores on average over {v.window_s:.1f} s, "
                f"quietest interval {v.cpu_cores_min:.2f}{limit}; threshold {th.cpu_alert_cores:g} cores: {verdict}")

    def compact(self) -> str:
        """The series on one line: time, memory MiB, % of the limit, CPU cores."""
        return "; ".join(
            f"{s.at:%H:%M:%S}.{s.at.microsecond // 100_000} {s.memory_bytes / MIB:.1f} MiB {s.memory_fraction:.0%}"
            + (f" {s.cpu_cores:.2f} cores" if s.cpu_cores is not None else "") for s in self.samples)


class ProcessTable(BaseModel):
    """The busiest processes of one place (a container, a host): `ps` columns and rows."""

    where: str
    titles: list[str]
    rows: list[list[str]]
    total: int  # processes seen (rows keeps only the top few)
    note: str = ""

    def describe(self) -> str:
        if not self.rows:
            return f"{self.where}: no processes" + (f" ({self.note})" if self.note else "")
        lines = [" ".join(f"{t.lower()}={v}" for t, v in zip(self.titles, row)) for row in self.rows]
        return (f"{self.where} ({len(self.rows)} of {self.total}{'; ' + self.note if self.note else ''}): "
                + " / ".join(lines))


class HostTop(BaseModel):
    """`ps` on the service's host, busiest first by CPU and by memory, and the load average."""

    host: str
    load_average: str
    by_cpu: ProcessTable
    by_memory: ProcessTable

    def describe(self) -> str:
        return f"{self.host}: load average {self.load_average}; {self.by_cpu.describe()}; {self.by_memory.describe()}"


# --------------------------------------------------------------------------- docker


def require_app(target: Target) -> AppSpec:
    """The inventory's ``app`` section and a container to measure, or a ConfigurationError
    saying what to add."""
    if target.service.app is None:
        raise ConfigurationError(
            target.name, "no app section in the inventory", "services.<name>.app with metrics_url, "
            "admin_url, admin_token and the thresholds (memory_alert_fraction, memory_baseline_fraction, "
            "cpu_alert_cores)", f"add app to services.{target.name} in the inventory",
        )
    _require_container(target)
    return target.service.app


def _require_container(target: Target) -> tuple[DockerHost, str]:
    if target.docker is None or not target.service.container:
        raise ConfigurationError(
            target.name, "no container/docker_host in the inventory", "a containerised service",
            f"add container and docker_host to services.{target.name} in the inventory",
        )
    return target.docker, target.service.container


def _container(target: Target) -> tuple[Container, DockerHost]:
    host, name = _require_container(target)
    try:
        return docker_client(host).containers.get(name), host
    except docker.errors.NotFound:
        raise ContainerNotFoundError(
            f"{name}@{host.base_url}", "no such container", "the service's container to exist",
            "check the container name in the inventory; redeploy the service if it was removed",
        ) from None
    except ENGINE_ERRORS as exc:
        raise _engine_error(host, f"docker inspect {name}", exc) from None


def _engine_error(host: DockerHost, what: str, exc: BaseException) -> DockerEngineUnreachableError:
    why = exc.explanation if isinstance(exc, docker.errors.APIError) and exc.explanation else type(exc).__name__
    return DockerEngineUnreachableError(
        host.base_url, f"{what} failed ({why})", "the Docker engine to answer",
        f"check dockerd on that host (lab: `make status`) and run `{what}` by hand",
    )


def _parse_read(value: object) -> datetime:
    """The engine's read time (RFC 3339, nanoseconds); now when it has none."""
    if isinstance(value, str) and not value.startswith("0001-01-01"):
        head, _, frac = value.rstrip("Z").partition(".")
        digits = "".join(c for c in frac if c.isdigit())[:6].ljust(6, "0")
        rest = frac.lstrip("0123456789")
        try:
            return datetime.fromisoformat(f"{head}.{digits}{rest or '+00:00'}")
        except ValueError:
            pass
    return datetime.now(timezone.utc)


def parse_stats(raw: dict[str, Any], previous: ResourceSample | None = None) -> ResourceSample:
    """One `docker stats` reading (cgroup v1 or v2) as a sample; CPU in cores since ``previous``."""
    mem = raw.get("memory_stats") or {}
    stats = mem.get("stats") or {}
    usage = int(mem.get("usage") or 0)
    inactive = stats.get("total_inactive_file", stats.get("inactive_file", 0))  # v1, v2
    rss = stats.get("total_rss", stats.get("rss", stats.get("anon")))  # v1, v1, v2
    cpu_total = int(((raw.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage") or 0)
    at = _parse_read(raw.get("read"))
    cores = None
    if previous is not None:
        elapsed = (at - previous.at).total_seconds()
        if elapsed > 0:
            cores = max(cpu_total - previous.cpu_total_ns, 0) / 1e9 / elapsed
    return ResourceSample(
        at=at, usage_bytes=usage, working_set_bytes=max(usage - int(inactive or 0), 0),
        rss_bytes=int(rss) if rss is not None else None, limit_bytes=int(mem.get("limit") or 0),
        cpu_total_ns=cpu_total, cpu_cores=cores, pids=(raw.get("pids_stats") or {}).get("current"),
    )


@read_only_task
def sample_container_resources(target: Target, samples: int = 5, interval_s: float = 1.0) -> ResourceSeries:
    """Runbook 004: `docker stats <container>` - ``samples`` readings, ``interval_s`` apart.

    A container that is not running (or stops while sampled) gives the samples taken so far
    and ``running=False``: an observation, not an error. The engine collects stats about once
    a second: a shorter interval gives no finer samples."""
    container, host = _container(target)
    attrs = container.attrs
    config = attrs.get("HostConfig") or {}
    nano = int(config.get("NanoCpus") or 0)
    series = ResourceSeries(
        container=container.name, running=bool(attrs["State"]["Running"]), status=attrs["State"]["Status"],
        memory_limited=bool(config.get("Memory")), cpu_limit_cores=nano / 1e9 if nano else None,
        memory_source="rss",
    )
    if not series.running:
        return series
    next_at = time.monotonic()
    previous: ResourceSample | None = None
    for _ in range(max(samples, 1)):
        try:
            raw = container.stats(stream=False, one_shot=True)
        except docker.errors.NotFound:
            return series.model_copy(update={"running": False, "status": "removed"})
        except ENGINE_ERRORS as exc:
            raise _engine_error(host, f"docker stats --no-stream {container.name}", exc) from None
        if not (raw.get("memory_stats") or {}).get("usage") and not raw.get("pids_stats"):
            return series.model_copy(update={"running": False, "status": "stopped while sampled"})
        previous = parse_stats(raw, previous)
        series.samples.append(previous)
        next_at += interval_s
        if len(series.samples) < samples:
            time.sleep(max(next_at - time.monotonic(), 0.0))
    if all(s.rss_bytes is None for s in series.samples):
        series.memory_source = "working set"
    return series


def _top_rows(titles: list[str], rows: list[list[str]], sort_by: str, lines: int) -> list[list[str]]:
    try:
        col = titles.index(sort_by)
    except ValueError:
        return rows[:lines]

    def key(row: list[str]) -> float:
        try:
            return float(row[col])
        except (ValueError, IndexError):
            return 0.0

    return sorted(rows, key=key, reverse=True)[:lines]


@read_only_task
def list_container_processes(target: Target, lines: int = 5) -> ProcessTable:
    """Runbook 004: `docker top <container>` - its processes, busiest (CPU) first."""
    container, host = _container(target)
    where = f"container {container.name}"
    if container.status != "running":
        return ProcessTable(where=where, titles=[], rows=[], total=0, note=f"container is {container.status}")
    try:
        top = container.top(ps_args=f"-o {PS_COLUMNS}")
    except docker.errors.NotFound:
        return ProcessTable(where=where, titles=[], rows=[], total=0, note="container is gone")
    except docker.errors.APIError as exc:
        if exc.status_code == 409:  # stopped meanwhile
            return ProcessTable(where=where, titles=[], rows=[], total=0, note="container is not running")
        raise _engine_error(host, f"docker top {container.name}", exc) from None
    except ENGINE_ERRORS as exc:
        raise _engine_error(host, f"docker top {container.name}", exc) from None
    titles = [str(t) for t in top.get("Titles") or []]
    rows = [[str(v) for v in row] for row in top.get("Processes") or []]
    return ProcessTable(where=where, titles=titles, rows=_top_rows(titles, rows, "%CPU", lines), total=len(rows),
                        note="%CPU over each process's lifetime")


def _ps_table(where: str, out: str, sort_title: str, lines: int) -> ProcessTable:
    text = out.splitlines()
    titles = text[0].split() if text else []
    rows = [line.split(None, len(titles) - 1) for line in text[1:] if line.strip()] if titles else []
    return ProcessTable(where=where, titles=titles, rows=rows[:lines], total=len(rows),
                        note=f"sorted by {sort_title}, %CPU over each process's lifetime")


@read_only_task
def list_host_top_processes(target: Target, lines: int = 5) -> HostTop:
    """Runbook 003: `top`, `ps aux --sort=-%mem | head -5` - on the service's host, over SSH."""
    host = require_ssh(target)
    where = f"host {host.hostname}:{host.port}"
    by_cpu, by_mem, load = run_commands(host, [
        ["ps", "-eo", PS_COLUMNS, "--sort=-pcpu"],
        ["ps", "-eo", PS_COLUMNS, "--sort=-rss"],
        ["cat", "/proc/loadavg"],
    ], timeout_s=15)
    for result in (by_cpu, by_mem, load):
        if not result.ok:
            raise SshError(where, f"`{result.command}` exited {result.exit_code}: {result.stderr.strip()[:200]}",
                           "ps and /proc/loadavg to work", f"run `{result.command}` on the host by hand")
    return HostTop(host=where, load_average=" ".join(load.stdout.split()[:3]),
                   by_cpu=_ps_table(f"{where} by CPU", by_cpu.stdout, "%CPU", lines),
                   by_memory=_ps_table(f"{where} by memory", by_mem.stdout, "RSS", lines))
