"""Runbook: memory leak / high memory, and high CPU (a service's container near its memory
limit or leaking, or spinning the CPU).

Automates these hand-written steps from ../shared/runbooks/:
- 004 "5. Memory Leaks": symptoms (gradually increasing memory usage, out of memory errors,
  container restarts); "Identify memory usage" (`docker stats tradingbot`); "Temporary fix:
  Restart service" (`docker-compose restart tradingbot`). Profiling the leak and the common
  fixes (caches, connections, data structures) are the developers' follow-up: the record keeps
  every sample for them.
- 004 "6. High CPU Usage": symptoms (CPU usage consistently high); "Check CPU usage"
  (`docker stats tradingbot`); profiling the hot path is the developers' follow-up.
- 003 "P2 Performance Issues" (high memory usage, high CPU usage: "Memory analysis"), 003
  "System Completely Down" step 3 "Check system resources" (`free -h`, `top`), 003 "Deep System
  Analysis" "Memory Usage by Process" (`ps aux --sort=-%mem | head -5`) and "Recovery
  Verification" (all services healthy, performance within thresholds).

Phases: diagnose (N `docker stats` samples of the container ``sample_interval_s`` apart: memory
against the limit and its growth, CPU in cores; `docker top`; `ps` by CPU and by memory and the
load average on the host over SSH; the container's state; the service's health; memory near the
limit (``app.memory_alert_fraction``) and/or growing, or CPU above ``app.cpu_alert_cores`` in
every interval, is the problem; neither: already fine) -> contain (severity: the service's
``severity_degraded``, ``severity_down`` when memory is within a few % of the limit) -> fix
(restart the container - approval gate: a written policy pre-approves it for stateless services
in the lab, any other service waits for a person) -> verify (N healthy probes, then samples:
memory under ``app.memory_baseline_fraction`` of the limit and not growing, CPU under the
threshold; otherwise escalate with the samples and fail).
"""

from __future__ import annotations

from prefect.futures import PrefectFuture
from prefect.states import State

from incident.approval import ActionPlan
from incident.errors import (ActionFailedError, ContainerNotFoundError, RunbookError, TargetUnreachableError,
                             VerificationFailedError)
from incident.inventory import Target
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, Phase, Trigger
from tasks.containers import ContainerState, inspect_container, restart_container
from tasks.http_checks import HealthProbe, probe_health, wait_until_healthy
from tasks.resources import (
    ResourceSeries, ResourceThresholds, ResourceVerdict, list_container_processes, list_host_top_processes,
    mib, require_app, sample_container_resources,
)

SCENARIO = "memory-cpu"


class ResourceDiagnosis(Diagnosis):
    series: ResourceSeries
    verdict: ResourceVerdict | None  # None: no samples (the container does not run)
    container: ContainerState
    health: HealthProbe


@runbook_flow(SCENARIO)
def memory_cpu(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    samples: int = 4,
    sample_interval_s: float = 1.0,
    verify_samples: int = 3,
    growth_fraction: float = 0.02,
    critical_fraction: float = 0.95,
    healthy_probes: int = 3,
    verify_deadline_s: int = 60,
    probe_interval_s: float = 1.0,
    top_lines: int = 5,
    stop_timeout_s: int = 10,
) -> State:
    """Restart a container that leaks memory or spins the CPU, and prove it back to its baseline.

    Args:
        target: service name in the inventory (its ``app`` section has the thresholds).
        dry_run: diagnose and show the plan; change nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        samples: `docker stats` readings taken to diagnose (growth and CPU need at least 2).
        sample_interval_s: seconds between two readings (diagnosis and verification).
        verify_samples: readings taken after the restart to judge memory and CPU again.
        growth_fraction: memory that rose by this share of the limit across the readings counts
            as growing (0.02: 1.3 MiB of a 64 MiB limit).
        critical_fraction: memory at this share of the limit or more is about to be OOM-killed:
            the incident gets the service's ``severity_down``.
        healthy_probes: consecutive good health probes after the restart that count as healthy.
        verify_deadline_s: how long the health probes may take before the run escalates.
        probe_interval_s: seconds between health probes.
        top_lines: processes kept from `docker top` and from `ps` on the host.
        stop_timeout_s: seconds `docker restart` waits for the service to stop before killing it.
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)
    thresholds = ResourceThresholds.of(require_app(service), critical_fraction, growth_fraction)

    # 1. Diagnose: docker stats samples, docker top, ps on the host, the container, /health
    seen = diagnose(incident, service, thresholds, samples, sample_interval_s, top_lines)
    if seen.healthy:
        return already_fine(incident, seen)
    if seen.verdict is None:
        why = (f"{seen.container.describe()}: not a leak or a spin this runbook restarts but an "
               + ("out-of-memory kill (memory reached its limit): " if seen.container.oom_killed else "outage: ")
               + "the service-down runbook starts it again")
        if incident.record.dry_run:
            return incident.close("dry run", why)
        return escalate_and_fail(incident, why, expected=f"{seen.container.name} running")

    # 2. Contain
    verdict = seen.verdict
    incident.enter("contain", seen.summary)
    if verdict.critical:
        incident.set_severity(service.service.severity_down,
                              f"memory at {verdict.memory_fraction:.0%} of the limit: within "
                              f"{1 - critical_fraction:.0%} of it, the kernel's OOM killer is next")
    else:
        incident.set_severity(service.service.severity_degraded,
                              f"{service.name} degraded: {problems(verdict, thresholds)}")

    # 3. Fix: runbook 004's temporary fix, restart the service
    incident.enter("fix", "restart the container (runbook 004: \"Temporary fix: Restart service\")")
    try:
        plan = plan_restart(service, seen, thresholds, stop_timeout_s)
        step = change(incident, service, plan, restart_container, service, stop_timeout_s=stop_timeout_s,
                      expected_started_at=seen.container.started_at)
    except (ActionFailedError, ContainerNotFoundError, TargetUnreachableError) as exc:
        return escalate_and_fail(incident, f"restarting {seen.container.name} failed: {exc.observed}; "
                                 f"before it: {seen.summary}", expected=f"{seen.container.name} restarted")
    if not step.taken:
        return step.closed

    # 4. Verify: healthy, then memory under the baseline and steady, CPU under the threshold
    name = seen.container.name
    incident.enter("verify", f"{healthy_probes} consecutive healthy probes within {verify_deadline_s} s, then "
                   f"{verify_samples} samples: memory under {thresholds.memory_baseline_fraction:.0%} of the limit "
                   f"and not growing, CPU under {thresholds.cpu_alert_cores:g} cores")
    health = wait_until_healthy(service, consecutive=healthy_probes, deadline_s=verify_deadline_s,
                                interval_s=probe_interval_s)
    if not health.healthy:
        incident.verified(health.describe())
        return escalate_and_fail(incident, f"{name} was restarted but is not healthy: {health.describe()}",
                                 error=VerificationFailedError)
    after = sample_container_resources(service, samples=verify_samples, interval_s=sample_interval_s)
    now = record_samples(incident, "verify", "after restart", after, thresholds)
    if now is None or not now.recovered:
        incident.verified(f"{health.describe()}; " + (describe(after, thresholds) if now else
                                                      f"{name} is {after.status}: no samples"))
        processes = list_container_processes(service, lines=top_lines)
        incident.finding("processes after restart", False, processes.describe())
        return escalate_and_fail(
            incident, f"the restart did not hold: {name} is healthy but "
            + (not_recovered(now, thresholds) if now else f"{after.status}")
            + f" right after it (before: {problems(verdict, thresholds)}). Restarting again only buys time: "
            "if a release went out lately roll it back (bad-deploy runbook), otherwise hand the samples in the "
            "findings to the developers (runbook 004: profile the memory / the hot path)",
            expected=f"memory under {thresholds.memory_baseline_fraction:.0%} of the limit and steady, CPU under "
            f"{thresholds.cpu_alert_cores:g} cores", error=VerificationFailedError)
    incident.verified(f"{health.describe()}; {describe(after, thresholds)}")
    return incident.close(
        "resolved", f"{name} restarted ({problems(verdict, thresholds)}); now memory "
        f"{mib(after.samples[-1].memory_bytes)} = {now.memory_fraction:.0%} of the limit and steady, CPU "
        f"{now.cpu_cores_avg or 0:.2f} cores, healthy. A restart is runbook 004's temporary fix: the samples "
        "in the findings are for the developers' follow-up (profile the leak / the hot path)")


def diagnose(incident: Incident, service: Target, thresholds: ResourceThresholds, samples: int,
             interval_s: float, top_lines: int) -> ResourceDiagnosis:
    """Runbook 004 `docker stats`, 003 `top` / `ps --sort=-%mem`: read-only, run concurrently."""
    incident.enter("diagnose", f"sampling {service.service.container} {samples} times, {interval_s:g} s apart; "
                               f"its processes, the host's busiest processes, its health")
    series = sample_container_resources.submit(service, samples=samples, interval_s=interval_s)
    container = inspect_container.submit(service)
    processes = list_container_processes.submit(service, lines=top_lines)
    host_top = list_host_top_processes.submit(service, lines=top_lines) if service.ssh is not None else None
    health = probe_health.submit(service)

    state = container.result()
    incident.finding("container", state.running, f"{state.describe()}, started {state.started_at}")
    probe = health.result()
    incident.finding("health", probe.healthy, probe.describe())
    seen = series.result()
    verdict = record_samples(incident, "diagnose", "sample", seen, thresholds)
    record_optional(incident, "processes in container", processes)
    record_optional(incident, "host processes", host_top)
    if verdict is None:
        summary = f"{seen.container} is {seen.status}: no samples"
    elif verdict.problem:
        summary = f"{seen.container}: {problems(verdict, thresholds)}"
    else:
        summary = describe(seen, thresholds)
        if not probe.healthy:
            summary += f" (but {service.name} is unhealthy: not a memory or CPU problem - see service-down)"
    return ResourceDiagnosis(healthy=verdict is not None and not verdict.problem, summary=summary,
                             series=seen, verdict=verdict, container=state, health=probe)


def record_samples(incident: Incident, phase: Phase, label: str, series: ResourceSeries,
                   thresholds: ResourceThresholds) -> ResourceVerdict | None:
    """The verdict on memory and CPU, then every sample (time, RSS and usage bytes, limit, CPU)
    as findings, and the series on one line: the developers' follow-up starts from these."""
    if not series.samples:
        return None
    verdict = series.judge(thresholds)
    after = phase == "verify"
    incident.finding(f"memory {label}" if after else "memory",
                     not (verdict.growing or (not verdict.under_baseline if after else verdict.near_limit)),
                     series.describe_memory(thresholds))
    incident.finding(f"cpu {label}" if after else "cpu", verdict.cpu_low if after else not verdict.cpu_high,
                     series.describe_cpu(thresholds))
    n = len(series.samples)
    for i, s in enumerate(series.samples, 1):
        limit = thresholds.memory_baseline_fraction if after else thresholds.memory_alert_fraction
        ok = s.memory_fraction < limit and (s.cpu_cores is None or s.cpu_cores <= thresholds.cpu_alert_cores)
        incident.finding(f"{label} {i}/{n}", ok, s.describe())
    incident.note(phase, f"samples{' ' + label if after else ''} of {series.container} (time, "
                         f"{series.memory_source}, share of the limit, CPU): {series.compact()}")
    return verdict


def record_optional(incident: Incident, check: str, future: PrefectFuture | None) -> None:
    """A process list: it explains, it does not decide; one that cannot be read is noted."""
    if future is None:
        incident.note("diagnose", f"{check}: no ssh_host in the inventory, not read")
        return
    try:
        incident.finding(check, True, future.result().describe())
    except RunbookError as exc:
        incident.finding(check, False, f"not read ({exc.observed}); optional, the run goes on")


def problems(verdict: ResourceVerdict, thresholds: ResourceThresholds) -> str:
    """What is wrong, in a few words: near the limit, growing, spinning."""
    found = []
    if verdict.near_limit:
        found.append(f"memory near the limit ({verdict.memory_fraction:.0%}, alert at "
                     f"{thresholds.memory_alert_fraction:.0%})")
    if verdict.growing:
        found.append(f"memory growing ({mib(verdict.growth_bytes)} in {verdict.window_s:.1f} s)")
    if verdict.cpu_high:
        found.append(f"CPU {verdict.cpu_cores_avg or 0:.2f} cores, above {thresholds.cpu_alert_cores:g} "
                     "in every interval")
    return " and ".join(found) or "memory and CPU within their thresholds"


def not_recovered(verdict: ResourceVerdict, thresholds: ResourceThresholds) -> str:
    found = []
    if not verdict.under_baseline:
        found.append(f"memory at {verdict.memory_fraction:.0%} of the limit (baseline "
                     f"{thresholds.memory_baseline_fraction:.0%})")
    if verdict.growing:
        found.append(f"memory growing again ({mib(verdict.growth_bytes)} in {verdict.window_s:.1f} s)")
    if not verdict.cpu_low:
        found.append(f"CPU at {verdict.cpu_cores_avg or 0:.2f} cores (threshold {thresholds.cpu_alert_cores:g})")
    return " and ".join(found)


def describe(series: ResourceSeries, thresholds: ResourceThresholds) -> str:
    return f"{series.describe_memory(thresholds)}; {series.describe_cpu(thresholds)}"


def plan_restart(service: Target, seen: ResourceDiagnosis, thresholds: ResourceThresholds,
                 stop_timeout_s: int) -> ActionPlan:
    name = seen.container.name
    verdict = seen.verdict
    stateless = service.service.stateless
    return ActionPlan(
        action="restart_container",
        target=name,
        runs=f"docker restart --time {stop_timeout_s} {name}",
        expected_effect=f"{name} ({seen.container.image}) starts afresh: memory under "
                        f"{thresholds.memory_baseline_fraction:.0%} of its limit and steady, CPU under "
                        f"{thresholds.cpu_alert_cores:g} cores, {service.service.health_url} answers 200"
                        + (f" (now: {problems(verdict, thresholds)})" if verdict else ""),
        undo="nothing to undo: the service is stateless, a restart loses only the leaked memory or the "
             "spinning thread" if stateless else
             "none: what the service holds in memory is lost (the inventory does not mark it stateless)",
        destructive=not stateless,
    )
