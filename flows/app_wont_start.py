"""Runbook: the application will not start (its container exits at start; ServiceWontStart).

Automates these hand-written steps from ../shared/runbooks/:
- 004 "Common Issues and Solutions" 1. "Application Won't Start" (symptoms: the container
  fails to start, the health check endpoint is unreachable), by cause:
  - "Port already in use": `lsof -i :8000` (who holds the port: pid, user, command line),
    then `kill <PID>` - SIGTERM after a person approved that very process, never `kill -9`;
  - "Missing environment variables": `grep -E "DATABASE_URL|REDIS_URL|..." .env` (the
    inventory's ``app.required_settings`` against the container's environment, names only):
    reported and escalated, a value is never invented;
  - "Redis connection failure": `redis-cli ping`, `docker-compose ps redis`, then Redis is
    started by its own runbook (redis-down, 000 step 4) run as a step of this one (a subflow);
  - "Database connection failure": the database is checked and, when down, escalated.
- 004 "Incident Response Procedures" step 4 "Resolution": restart affected services (the
  container is started once the cause is gone), "Verify resolution: check health endpoints".
- 004 "Quick Reference Commands": `docker-compose ps`, `docker-compose logs` (the container's
  state, exit code, when it stopped, its last log lines).

Phases: diagnose (container state and last log lines -> the cause: port_in_use /
missing_setting / dependency_down / unknown; the required settings; each start dependency;
for a port in use, who holds it, over SSH) -> contain (the service's ``severity_down``) ->
fix by cause (stop the port holder - a person approves, destructive; start the dependency
through its runbook; a missing setting or an unknown cause escalates) -> start the container
(approval gate) -> verify (it runs, N consecutive healthy probes; otherwise escalate with what
its log says now).
"""

from __future__ import annotations

import re
import shlex
from typing import Literal
from urllib.parse import urlparse
from uuid import UUID

from prefect.futures import PrefectFuture
from prefect.states import State
from pydantic import BaseModel

from flows.redis_down import redis_down
from incident.approval import ActionPlan
from incident.errors import ActionFailedError, ConfigurationError, VerificationFailedError
from incident.inventory import AppSpec, Target
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, IncidentRecord, Trigger, load_record
from tasks.common import DependencyCheck
from tasks.containers import ContainerState, inspect_container, read_container_logs
from tasks.containers import restart_container, wait_until_started
from tasks.http_checks import HealthProbe, probe_health, wait_until_healthy
from tasks.postgres import check_postgres
from tasks.processes import PortHolder, SettingsCheck, find_missing_settings, find_port_holder, stop_port_holder
from tasks.redis import check_redis
from tasks.ssh_hosts import require_ssh

SCENARIO = "app-wont-start"

Cause = Literal["port_in_use", "missing_setting", "dependency_down", "unknown"]
#: The start dependencies this runbook can check (``app.start_dependencies``), and their checks.
DEPENDENCY_CHECKS = {"redis": check_redis, "database": check_postgres}
#: What the service says when it cannot start, newest line first wins (runbook 004's causes).
_CAUSES: list[tuple[Cause, re.Pattern[str]]] = [
    ("missing_setting", re.compile(r"required setting (?P<setting>[A-Za-z_][A-Za-z0-9_]*) is missing")),
    ("dependency_down", re.compile(r"dependency (?P<dependency>[\w.-]+) at (?P<address>\S+) is not reachable")),
    ("port_in_use", re.compile(r"port (?P<address>(?:\S+:)?(?P<port>\d+)) is in use|address already in use",
                               re.IGNORECASE)),
]


class StartFailure(BaseModel):
    """Why the service did not start, as its log (or the alert) says."""

    cause: Cause
    line: str | None = None  # the log line that says so
    source: str = "its log"
    setting: str | None = None
    dependency: str | None = None
    address: str | None = None
    port: int | None = None

    def describe(self) -> str:
        said = f'{self.source}: "{self.line}"' if self.line else self.source
        if self.cause == "unknown" and self.source == "its log":
            said = "its log names no cause this runbook knows"
        return f"{self.cause} ({said})"


class StartDiagnosis(Diagnosis):
    container: ContainerState
    health: HealthProbe
    failure: StartFailure
    settings: SettingsCheck
    dependencies: list[DependencyCheck]
    holder: PortHolder | None = None
    port: int | None = None
    last_lines: list[str] = []


@runbook_flow(SCENARIO)
def app_wont_start(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    stop_wait_s: float = 10.0,
    start_deadline_s: int = 30,
    healthy_probes: int = 3,
    verify_deadline_s: int = 60,
    probe_interval_s: float = 1.0,
    log_lines: int = 20,
) -> State:
    """Find why the service will not start, remove that cause, start it and prove it healthy.

    Args:
        target: service name in the inventory (needs ``container``/``docker_host`` and ``app``;
            ``ssh_host`` for a port in use).
        dry_run: diagnose and show the plan; change nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        stop_wait_s: how long the port may take to free after the holder got SIGTERM.
        start_deadline_s: how long the started container has to answer its health check
            (one that exits again meanwhile is not waited for).
        healthy_probes: consecutive good health probes that count as recovered (also asked of
            a dependency's runbook: consecutive answers of the dependency).
        verify_deadline_s: how long each verification may take before the run escalates.
        probe_interval_s: seconds between probes while waiting and verifying.
        log_lines: how many of the container's last log lines are read.
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)
    app = require_app(service)

    # 1. Diagnose: the container, its log, its settings, its dependencies; who holds its port
    seen = diagnose(incident, service, app, log_lines)
    if seen.healthy:
        return already_fine(incident, seen)

    # 2. Contain
    incident.enter("contain", seen.summary)
    incident.set_severity(service.service.severity_down, f"{service.name} does not run: {seen.summary}")
    if seen.container.running:
        return escalate_and_fail(
            incident, f"{seen.container.describe()} but {seen.health.describe()}: it started, so this "
            "is not a start failure; see the service-down runbook and the findings")

    # 3. Fix the cause (runbook 004 "Application Won't Start")
    cause = seen.failure.cause
    if cause == "missing_setting":
        return report_missing_setting(incident, service, seen)
    if cause == "unknown":
        return escalate_and_fail(
            incident, f"{service.name} does not start, and not for a cause this runbook fixes (port in use, "
            f"missing setting, dependency down): {seen.failure.describe()}; {seen.container.describe()}; last "
            f"lines: {' | '.join(seen.last_lines[-5:]) or '(empty)'}. Read the whole log (`docker logs "
            f"{seen.container.name}`); a release that crashes at start is rolled back by service-down")
    if cause == "port_in_use":
        incident.enter("fix", "free the service's port (runbook 004 \"Port already in use\")")
        closed = free_port(incident, service, seen, stop_wait_s)
    else:
        incident.enter("fix", "start the service's dependencies (runbook 004 \"Redis connection failure\")")
        closed = start_dependencies(incident, service, seen, healthy_probes, verify_deadline_s,
                                    probe_interval_s)
    if closed is not None:
        return closed

    # 4. Start it (runbook 004 step 4 "Restart affected services")
    incident.enter("fix", f"start {seen.container.name} now that the cause ({cause}) is gone")
    step = change(incident, service, plan_start(service, seen), restart_container, service)
    if not step.taken:
        return step.closed

    # 5. Verify: it runs and answers N healthy probes in a row
    incident.enter("verify", f"{seen.container.name} runs and {healthy_probes} consecutive healthy "
                             f"probes within {verify_deadline_s} s")
    started = wait_until_started(service, deadline_s=start_deadline_s, interval_s=probe_interval_s)
    incident.note("verify", f"after the start: {started.describe()}")
    if not started.healthy:
        return still_not_started(incident, service, log_lines, started.describe())
    streak = wait_until_healthy(service, consecutive=healthy_probes, deadline_s=verify_deadline_s,
                                interval_s=probe_interval_s, streak_so_far=started.consecutive)
    state = inspect_container(service)
    incident.verified(f"{state.describe()}; {streak.describe()}")
    if not (streak.healthy and state.running):
        return escalate_and_fail(incident, f"{service.name} started but is not healthy: {state.describe()}; "
                                 f"{streak.describe()}", error=VerificationFailedError)
    return incident.close("resolved", f"{service.name} runs and is healthy again ({streak.describe()}); "
                                      f"the cause was {seen.failure.describe()}")


def require_app(service: Target) -> AppSpec:
    """The inventory's ``app`` section (required settings, start dependencies), checked."""
    app = service.service.app
    if app is None:
        raise ConfigurationError(service.name, "no app section in the inventory",
                                 "app.required_settings and app.start_dependencies",
                                 f"add app (with required_settings and start_dependencies) to "
                                 f"services.{service.name} in the inventory")
    unknown = [d for d in app.start_dependencies if d not in DEPENDENCY_CHECKS]
    if unknown:
        raise ConfigurationError(service.name, f"app.start_dependencies lists {', '.join(unknown)}",
                                 f"dependencies among {', '.join(DEPENDENCY_CHECKS)}",
                                 f"fix services.{service.name}.app.start_dependencies in the inventory")
    return app


def diagnose(incident: Incident, service: Target, app: AppSpec, log_lines: int) -> StartDiagnosis:
    """Runbook 004 `docker-compose ps` / `docker-compose logs`, the settings, `redis-cli ping`;
    read-only and concurrent. A port in use is then traced to its holder over SSH."""
    incident.enter("diagnose", f"why {service.name} ({service.service.container}) does not start")
    container = inspect_container.submit(service)
    logs = read_container_logs.submit(service, lines=log_lines)
    health = probe_health.submit(service)
    settings = find_missing_settings.submit(service, app.required_settings)
    checks: list[tuple[str, PrefectFuture[DependencyCheck | None]]] = [
        (name, DEPENDENCY_CHECKS[name].submit(service)) for name in app.start_dependencies]

    probe = health.result()
    incident.finding("health", probe.healthy, probe.describe())
    state = container.result()
    stopped = (f"; stopped at {state.finished_at:%Y-%m-%d %H:%M:%S} UTC"
               if state.finished_at and not state.running else "")
    incident.finding("container", state.running, state.describe() + stopped)
    lines = logs.result()
    failure = classify_start_failure(lines)
    incident.finding("logs", failure.line is None and state.running,
                     " | ".join(([failure.line] if failure.line else lines)[-5:]) or "(no log lines)")
    found = settings.result()
    incident.finding("settings", found.complete, found.describe())
    deps = []
    for name, check in checks:
        dep = check.result()
        if dep is None:
            raise ConfigurationError(service.name, f"app.start_dependencies lists {name}, but the service "
                                     f"has no {name} in the inventory", f"services.{service.name}.{name}",
                                     f"add {name} to services.{service.name}, or remove it from app.start_dependencies")
        incident.finding(dep.name, dep.ok, f"{dep.address}: {dep.detail}")
        deps.append(dep)

    healthy = probe.healthy and state.running
    if not healthy:
        failure = judge_cause(failure, found, deps, incident.record.trigger.labels)
        incident.finding("cause", False, failure.describe())
    port, holder = None, None
    if failure.cause == "port_in_use":
        port = failure.port or urlparse(service.service.health_url).port
        if port is None:
            raise ConfigurationError(service.name, "no port in the log line nor in health_url",
                                     "the service's port", "give health_url an explicit port in the inventory")
        holder = find_port_holder(service, port)
        incident.finding("port holder", holder is None,
                         holder.describe() if holder else f"nothing listens on port {port} any more")
    summary = (probe.describe() if healthy else
               f"{state.describe()}{stopped}; cause: {failure.describe()}")
    return StartDiagnosis(healthy=healthy, summary=summary, container=state, health=probe, failure=failure,
                          settings=found, dependencies=deps, holder=holder, port=port, last_lines=lines)


def classify_start_failure(lines: list[str]) -> StartFailure:
    """The cause the newest "cannot start" line of the log names (unknown when none does)."""
    for line in reversed(lines):
        for cause, pattern in _CAUSES:
            match = pattern.search(line)
            if match is None:
                continue
            groups = {k: v for k, v in match.groupdict().items() if v}
            return StartFailure(cause=cause, line=line.strip()[:300], setting=groups.get("setting"),
                                dependency=groups.get("dependency"), address=groups.get("address"),
                                port=int(groups["port"]) if "port" in groups else None)
    return StartFailure(cause="unknown")


def judge_cause(said: StartFailure, settings: SettingsCheck, deps: list[DependencyCheck],
                alert_labels: dict[str, str]) -> StartFailure:
    """The cause to act on: a required setting the container lacks first (it could not start
    whatever else is fixed); then a start failure reason in the alert (the service's own start
    status) that is none of this runbook's causes (say, broken_release: not to be fixed here);
    else what the log says, else a dependency that does not answer, else the alert's reason."""
    if not settings.complete and said.cause != "missing_setting":
        name = (settings.missing + settings.empty)[0]
        return StartFailure(cause="missing_setting", setting=name, source="the container's environment",
                            line=settings.describe())
    reason = alert_labels.get("reason", "")
    ours: list[Cause] = ["port_in_use", "missing_setting", "dependency_down"]
    if reason and reason != "none" and reason not in ours:
        return StartFailure(cause="unknown", line=said.line,
                            source=f"the service reports start failure reason {reason} (the alert's label)")
    if said.cause != "unknown":
        return said
    down = [d for d in deps if not d.ok]
    if down:
        return StartFailure(cause="dependency_down", dependency=down[0].name, address=down[0].address,
                            source=f"the dependency check ({down[0].name} at {down[0].address}: {down[0].detail})")
    for cause in ours:
        if reason == cause:
            return StartFailure(cause=cause, source=f"the alert's reason label ({reason}); the log says nothing")
    return said


# --------------------------------------------------------------------------- by cause


def report_missing_setting(incident: Incident, service: Target, seen: StartDiagnosis) -> State:
    """Runbook 004 "Missing environment variables": name it and where to set it; never invent it."""
    setting = seen.failure.setting or "(unnamed)"
    also = [s for s in seen.settings.missing + seen.settings.empty if s != setting]
    name = seen.container.name
    said = f'{seen.failure.source}: "{seen.failure.line}"' if seen.failure.line else seen.failure.source
    unlisted = setting not in seen.settings.required
    why = (f"{service.name} cannot start: the required setting {setting} is missing ({said}; "
           f"{seen.settings.describe()})" + (f"; also missing: {', '.join(also)}" if also else "")
           + (f"; {setting} is not among app.required_settings: list it there if the service needs it, or, if "
              "the release itself is broken, roll it back (service-down runbook)" if unlisted else "")
           + f". This runbook never invents a value: set {setting} in the environment container {name} is "
           f"created with (where {service.name} is deployed: its compose/env file or `docker run -e "
           f"{setting}=...`; a secret from its secret store), recreate the container, then run this "
           "runbook again (it starts and verifies the service)")
    if incident.record.dry_run:
        return incident.close("dry run", f"{why}; this run changed nothing")
    return escalate_and_fail(incident, why, expected=f"{setting} set in {name}'s environment")


def free_port(incident: Incident, service: Target, seen: StartDiagnosis, stop_wait_s: float) -> State | None:
    """Runbook 004 "Port already in use": stop the holder (a person approves that process).
    None when the port is free and the service may start; else the closed state."""
    holder = seen.holder
    if holder is None:
        incident.note("fix", f"port {seen.port} is free now (its holder went away): nothing to stop")
        return None
    if holder.pid is None or holder.other_pids:
        return escalate_and_fail(
            incident, f"{holder.describe()}: this runbook stops one known process only; find the owner "
                      f"as root (`ss -ltnp 'sport = :{holder.port}'`) and free the port by hand, then rerun",
            expected=f"port {holder.port} free")
    try:
        step = change(incident, service, plan_stop_holder(service, holder, stop_wait_s), stop_port_holder,
                      service, holder, stop_wait_s=stop_wait_s)
    except ActionFailedError as exc:
        return escalate_and_fail(incident, f"stopping the port's holder failed: {exc.observed}; {exc.next_step}",
                                 expected=f"port {holder.port} free")
    if not step.taken:
        return step.closed
    return None


def start_dependencies(incident: Incident, service: Target, seen: StartDiagnosis, checks: int,
                       verify_deadline_s: int, interval_s: float) -> State | None:
    """Runbook 004 "Redis connection failure": each start dependency that does not answer is
    started by its own runbook, run as a step (subflow) of this one with its own record. None
    when every dependency answers; else the closed state."""
    down = [d for d in seen.dependencies if not d.ok]
    if not down:
        incident.note("fix", "every start dependency answers now: nothing to start before the service")
        return None
    for dep in down:
        if dep.name != "redis":
            return escalate_and_fail(
                incident, f"{service.name} cannot start while its {dep.name} at {dep.address} does not answer "
                f"({dep.detail}); no runbook here starts a {dep.name}: bring it back (runbook 004 \"Database "
                "connection failure\"), then run this runbook again", expected=f"{dep.name} answering")
        child = run_redis_down(incident, service, checks, verify_deadline_s, interval_s)
        outcome = child.outcome if child else "unknown (no record)"
        said = (f"redis-down ran as a step of this run: incident {child.incident_id} ended {outcome}: "
                f"{child.summary}" if child else "redis-down ran as a step of this run and left no record")
        incident.finding("redis-down subflow", outcome in ("resolved", "already fine"), said)
        if outcome == "dry run":
            return incident.close("dry run", f"{said}; then would start {seen.container.name}; "
                                             "this run changed nothing")
        if outcome not in ("resolved", "already fine"):
            return escalate_and_fail(incident, f"{said}; {service.name} cannot start without Redis: see that "
                                     "incident's record", expected="Redis answering")
    return None


def run_redis_down(incident: Incident, service: Target, checks: int, verify_deadline_s: int,
                   interval_s: float) -> IncidentRecord | None:
    """The redis-down runbook as a subflow on the same target (it runs under this run's lock),
    with its own incident record, named after this one. Its record, or None if it kept none."""
    rec = incident.record
    child_id = f"{rec.incident_id}-redis"
    incident.note("fix", f"running redis-down as a step of this run (incident {child_id})")
    state = redis_down(
        target=service.name, dry_run=rec.dry_run, incident_id=child_id,
        trigger=Trigger(kind=rec.trigger.kind, source=f"{SCENARIO} {rec.incident_id}",
                        summary=f"{service.name} cannot start without Redis (incident {rec.incident_id})",
                        labels=rec.trigger.labels),
        redis_checks=checks, verify_deadline_s=verify_deadline_s, check_interval_s=interval_s,
        verify_service=False, return_state=True)
    run_id = state.state_details.flow_run_id
    return load_record(UUID(str(run_id))) if run_id else None


def still_not_started(incident: Incident, service: Target, log_lines: int, seen: str) -> State:
    """After the start the container exited again (or never answered): what it says now."""
    state = inspect_container(service)
    failure = classify_start_failure(read_container_logs(service, lines=log_lines))
    incident.finding("after start", False, f"{state.describe()}; cause now: {failure.describe()}")
    return escalate_and_fail(incident, f"{service.name} did not start: {seen}; {state.describe()}; its log "
                             f"now says {failure.describe()}", error=VerificationFailedError)


# --------------------------------------------------------------------------- plans


def plan_stop_holder(service: Target, holder: PortHolder, stop_wait_s: float) -> ActionPlan:
    host = require_ssh(service)
    return ActionPlan(
        action="stop_port_holder",
        target=holder.label,
        runs=(f"ssh {host.username}@{host.hostname} -p {host.port} {shlex.join(['kill', '-TERM', str(holder.pid)])}"
              f"  # pid {holder.pid}, user {holder.user or '?'}: {holder.command} (re-checked first: the same "
              f"pid with the same command line must still hold {holder.address})"),
        expected_effect=f"{holder.label} exits and {holder.address} is free within {stop_wait_s:.0f} s; then "
                        f"{service.service.container} is started and {service.service.health_url} answers 200",
        undo=f"the process cannot be brought back by this runbook: if it was needed, start it again as "
             f"{holder.user or 'its user'} ({holder.command}) on another port or host",
        destructive=True,
    )


def plan_start(service: Target, seen: StartDiagnosis) -> ActionPlan:
    name = seen.container.name
    return ActionPlan(
        action="restart_container",
        target=name,
        runs=f"docker restart {name}",
        expected_effect=f"{name} ({seen.container.image}) starts now that the cause ({seen.failure.cause}) "
                        f"is gone, and {service.service.health_url} answers 200",
        undo=f"docker stop {name} (it was not running)",
        destructive=False,
    )
