"""Runbook: service down (a service's health check fails; its container is not running).

Automates these hand-written steps from ../shared/runbooks/:
- 001 "Service Outage": 1. check if the service is running, 2. check recent logs,
  3. restart, 4. if restart fails check env / database / disk / memory,
  5. if the issue persists, roll back to the last known good version.
- 002 "Scenario: API Unavailable": `docker-compose ps`, `docker-compose logs`,
  causes (crashed, DB connection, OOM), `docker-compose restart`; P0 timeline
  (alert, assess, contain, diagnose, fix, verify).
- 003 "System Completely Down": processes, ports, resources (`df -h`, `free -h`),
  emergency restart, verify recovery with the health endpoints.

Phases: diagnose (health, container state/exit code/OOM/restarts, last log lines,
dependencies, host disk and memory) -> contain (record, P0 when down) -> fix
(restart - approval gate; if not healthy by the deadline, roll back to the previous
image - approval gate, destructive) -> verify (N consecutive healthy probes within
a deadline, else escalate and fail saying what was seen).
"""

from __future__ import annotations

from prefect.futures import PrefectFuture
from prefect.states import State
from pydantic import ConfigDict

from incident.approval import ActionPlan
from incident.errors import RunbookError, VerificationFailedError
from incident.inventory import Target
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, Trigger
from tasks.containers import ContainerState, inspect_container, read_container_logs
from tasks.containers import restart_container, rollback_container, wait_until_started
from tasks.http_checks import HealthProbe, probe_health, wait_until_healthy
from tasks.postgres import check_postgres
from tasks.redis import check_redis
from tasks.ssh_hosts import read_host_resources

SCENARIO = "service-down"


class ServiceDiagnosis(Diagnosis):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    health: HealthProbe
    container: ContainerState
    host_resources: PrefectFuture | None = None  # an SSH round trip, recorded when needed


@runbook_flow(SCENARIO)
def service_down(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    restart_deadline_s: int = 30,
    healthy_probes: int = 3,
    verify_deadline_s: int = 60,
    probe_interval_s: float = 1.0,
) -> State:
    """Bring a down service back: restart, then roll back if needed, and prove it healthy.

    Args:
        target: service name in the inventory.
        dry_run: diagnose and show the plan; change nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        restart_deadline_s: how long a restarted service has to become healthy before rollback
            (a container that exits again meanwhile is not waited for).
        healthy_probes: consecutive good health probes that count as recovered.
        verify_deadline_s: how long verification may take before the run escalates.
        probe_interval_s: seconds between health probes while waiting and verifying.
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)

    # 1. Diagnose (host disk/memory is read over SSH meanwhile: recorded at step 4)
    seen = diagnose(incident, service)
    if seen.healthy:
        record_host_resources(incident, seen.host_resources)
        return already_fine(incident, seen)

    # 2. Contain
    incident.enter("contain", "service is down")
    incident.set_severity(service.service.severity_down, f"{service.name} health check fails")
    if seen.container.running:
        record_host_resources(incident, seen.host_resources)
        return escalate_and_fail(incident, "the container runs but the service is unhealthy; "
                                 "a restart is not this runbook's fix - see the findings")

    # 3. Fix: restart, then roll back if the restart does not heal it
    incident.enter("fix", "restart the container (runbook step 3)")
    step = change(incident, service, plan_restart(service, seen.container), restart_container, service)
    if not step.taken:
        record_host_resources(incident, seen.host_resources)
        return step.closed
    recovered = wait_until_started(service, deadline_s=restart_deadline_s, interval_s=probe_interval_s)
    incident.note("fix", f"after restart: {recovered.describe()}")
    record_host_resources(incident, seen.host_resources)  # runbook 001 step 4: disk, memory

    if not recovered.healthy:
        state = inspect_container(service)
        logs = read_container_logs(service, lines=10)
        incident.finding("after restart", False, f"{state.describe()}; last log: "
                         + (" | ".join(logs[-3:]) or "(empty)"))
        step = change(incident, service, plan_rollback(service, state), rollback_container,
                      service, expected_from=state.image)
        if not step.taken:
            return step.closed

    # 4. Verify: the streak of healthy probes may start with the one that ended the fix
    incident.enter("verify", f"{healthy_probes} consecutive healthy probes within {verify_deadline_s} s")
    streak = wait_until_healthy(service, consecutive=healthy_probes, deadline_s=verify_deadline_s,
                                interval_s=probe_interval_s,
                                streak_so_far=recovered.consecutive if recovered.healthy else 0)
    incident.verified(streak.describe())
    if not streak.healthy:
        return escalate_and_fail(incident, f"not healthy after remediation: {streak.describe()}",
                                 error=VerificationFailedError)
    return incident.close("resolved", f"{service.name} healthy again ({streak.describe()})")


def diagnose(incident: Incident, service: Target) -> ServiceDiagnosis:
    """Runbook steps 1, 2 and 4: is it up, what does the container say, deps, resources.

    The checks only read, so they run concurrently; findings are recorded in a fixed
    order. Host resources (an SSH round trip) do not decide the next step, so their
    future is kept and recorded by ``record_host_resources`` when the flow needs it.
    """
    incident.enter("diagnose", f"checking {service.name}")
    resources = read_host_resources.submit(service) if service.ssh is not None else None
    health = probe_health.submit(service)
    container = inspect_container.submit(service)
    logs = read_container_logs.submit(service, lines=20)
    deps = [check_postgres.submit(service), check_redis.submit(service)]

    probe = health.result()
    incident.finding("health", probe.healthy, probe.describe())
    state = container.result()
    incident.finding("container", state.running, state.describe())
    if not state.running or state.restart_count:
        lines = logs.result()
        errors = [line for line in lines if any(w in line.lower() for w in ("fatal", "error", "panic"))]
        incident.finding("logs", not errors, " | ".join((errors or lines)[-5:]) or "(no log lines)")
    for dep in (d.result() for d in deps):
        if dep is not None:
            incident.finding(dep.name, dep.ok, f"{dep.address}: {dep.detail}")
    return ServiceDiagnosis(healthy=probe.healthy, summary=probe.describe(), health=probe,
                            container=state, host_resources=resources)


def record_host_resources(incident: Incident, resources: PrefectFuture | None) -> None:
    """Runbook 001 step 4 / 003: disk and memory of the host, flagged at 90 % disk use.

    An optional finding: a host that cannot be read over SSH is recorded as such and the run
    goes on (the service's outage, not the SSH host, decides what this runbook does)."""
    if resources is None:
        return
    try:
        res = resources.result()
    except RunbookError as exc:
        incident.finding("host resources", False, f"not read ({exc.observed}); optional, the run goes on")
        return
    tight = [d for d in res.disks if d.used_percent >= 90]
    incident.finding("host resources", not tight, res.describe())


def plan_restart(service: Target, container: ContainerState) -> ActionPlan:
    return ActionPlan(
        action="restart_container",
        target=container.name,
        runs=f"docker restart {container.name}",
        expected_effect=f"{container.name} ({container.image}) starts again and "
                        f"{service.service.health_url} answers 200",
        undo=f"docker stop {container.name} (it was already down)",
        destructive=False,
    )


def plan_rollback(service: Target, container: ContainerState) -> ActionPlan:
    previous = container.previous_image or "(none recorded)"
    return ActionPlan(
        action="rollback_container",
        target=container.name,
        runs=f"recreate {container.name} from {previous} (replacing {container.image})",
        expected_effect=f"{container.name} runs {previous} and {service.service.health_url} answers 200",
        undo=f"roll forward: recreate {container.name} from {container.image}",
        destructive=True,
    )
