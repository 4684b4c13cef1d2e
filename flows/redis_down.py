"""Runbook: Redis down (the service's Redis does not answer; the service reports unhealthy).

Automates these hand-written steps from ../shared/runbooks/:
- 000 "Redis Connection Failures": 1. check Redis health, 2. verify the Redis URL
  configuration, 3. check Redis logs, 4. restart Redis if needed (5. the application
  falls back to its in-memory cache meanwhile).
- 004 "App will not start" - "Cause: Redis connection failure. Solution: check Redis
  availability": `redis-cli ping`, `docker-compose ps redis`; 004 "Restart services"
  (`docker-compose restart postgresql redis`).
- 003 "verify recovery with the health endpoints".

Phases: diagnose (PING; INFO - version, uptime, role, clients, memory - when it answers;
the process and its last log lines on Redis' host over SSH; the service's health) ->
contain (the service's ``severity_down``) -> fix (start Redis with the inventory's
``start_command`` over SSH - approval gate; only a Redis that is *down*: one that runs but
is unhealthy escalates saying whether a restart would fix it, and a Redis the inventory
gives no ``ssh_host``/``start_command`` for escalates with what a human should run) ->
verify (N consecutive PINGs and the service healthy again; otherwise escalate with the
start command's exit code and stderr and the last lines of the Redis log, and fail).
"""

from __future__ import annotations

import shlex

from prefect.states import State

from incident.approval import ActionPlan
from incident.errors import ActionFailedError, TargetUnreachableError, VerificationFailedError
from incident.inventory import SshHost, Target
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, Trigger
from tasks.http_checks import HealthProbe, probe_health, wait_until_healthy
from tasks.redis import (
    RedisProcess, RedisState, address_of, inspect_redis, read_redis_process, redis_label,
    require_redis, start_command_of, start_redis, status_command, wait_until_redis_answers,
)

SCENARIO = "redis-down"


class RedisDiagnosis(Diagnosis):
    redis: RedisState
    process: RedisProcess | None = None
    health: HealthProbe


@runbook_flow(SCENARIO)
def redis_down(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    redis_checks: int = 3,
    healthy_probes: int = 3,
    verify_deadline_s: int = 60,
    check_interval_s: float = 1.0,
    verify_service: bool = True,
) -> State:
    """Bring a stopped Redis back with its start command, and prove Redis and the service healthy.

    Args:
        target: service name in the inventory (its ``redis`` is the Redis this run heals).
        dry_run: diagnose and show the plan; change nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        redis_checks: consecutive PINGs answered that count as Redis recovered.
        healthy_probes: consecutive good health probes of the service that count as recovered.
        verify_deadline_s: how long each verification may take before the run escalates.
        check_interval_s: seconds between PINGs and between health probes while verifying.
        verify_service: also prove the service healthy. False when the run that called this one
            as a step starts the service itself once Redis answers, and verifies it (app-wont-start:
            a service that cannot start without Redis is not healthy before that).
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)
    require_redis(service)
    label = redis_label(service)

    # 1. Diagnose: PING / INFO, the process and its log on the host, the service's health
    seen = diagnose(incident, service)
    if seen.healthy:
        return already_fine(incident, seen)

    # 2. Contain
    incident.enter("contain", f"{label} is not healthy")
    incident.set_severity(service.service.severity_down,
                          f"{label} {seen.redis.status}; {service.name} depends on it")
    if seen.redis.status != "down":
        return escalate_and_fail(
            incident, f"{label} is not down but {seen.redis.status} ({seen.redis.detail}): "
            f"{seen.redis.restart_advice()}; this runbook only starts a stopped Redis",
            expected=f"{label} answering PING")
    how = start_command_of(service)
    if how is None:
        return cannot_automate(incident, service, seen)

    # 3. Fix: start it (runbook 000 step 4)
    host, argv = how
    incident.enter("fix", "start Redis with its start command (runbook 000 step 4)")
    try:
        step = change(incident, service, plan_start(service, host, argv), start_redis, service)
    except (ActionFailedError, TargetUnreachableError) as exc:
        process = read_redis_process(service)
        record_process(incident, "redis process after start", process)
        return escalate_and_fail(
            incident, f"starting {label} failed: {exc.observed}"
            + (f"; then {process.describe()}" if process else ""),
            expected=f"{label} answering PING")
    if not step.taken:
        return step.closed

    # 4. Verify: Redis answers N PINGs in a row, then the service is healthy again
    incident.enter("verify", f"{redis_checks} consecutive PINGs"
                   + (f" and {healthy_probes} healthy probes of {service.name}" if verify_service else "")
                   + f", each within {verify_deadline_s} s")
    streak = wait_until_redis_answers(service, consecutive=redis_checks, deadline_s=verify_deadline_s,
                                      interval_s=check_interval_s)
    if not streak.answers:
        incident.verified(streak.describe())
        process = read_redis_process(service)
        record_process(incident, "redis process after start", process)
        return escalate_and_fail(
            incident, f"{label} still does not answer after the start: {streak.describe()}"
            + (f"; {process.describe()}" if process else ""),
            expected=f"{label} answering PING", error=VerificationFailedError)
    if not verify_service:
        incident.verified(f"{streak.describe()}; {service.name} is started and verified by the run "
                          "that called this one")
        return incident.close("resolved", f"{label} answers again ({streak.consecutive} PINGs); "
                                          f"{service.name} is started and verified by the run that called this one")
    health = wait_until_healthy(service, consecutive=healthy_probes, deadline_s=verify_deadline_s,
                                interval_s=check_interval_s)
    incident.verified(f"{streak.describe()}; {service.name}: {health.describe()}")
    if not health.healthy:
        return escalate_and_fail(
            incident, f"{label} answers again but {service.name} is not healthy: {health.describe()}",
            error=VerificationFailedError)
    return incident.close("resolved", f"{label} answers again and {service.name} is healthy "
                                      f"({streak.consecutive} PINGs, {health.consecutive} probes)")


def diagnose(incident: Incident, service: Target) -> RedisDiagnosis:
    """Runbook 000 steps 1-3, 004 `redis-cli ping` / `ps redis`: read-only, run concurrently."""
    label = redis_label(service)
    incident.enter("diagnose", f"checking {label} ({address_of(require_redis(service))}) "
                               f"behind {service.name}")
    redis_state = inspect_redis.submit(service)
    process = read_redis_process.submit(service) if service.redis_host is not None else None
    health = probe_health.submit(service)

    state = redis_state.result()
    incident.finding("redis", state.answers, state.describe())
    proc = process.result() if process is not None else None
    if proc is not None:
        record_process(incident, "redis process", proc)
    else:
        incident.note("diagnose", f"{label}: no ssh_host in the inventory; its process and log "
                                  "were not checked")
    probe = health.result()
    incident.finding("health", probe.healthy, probe.describe())
    summary = state.describe()
    if state.answers and not probe.healthy:
        summary += f" (but {service.name} is unhealthy: not a Redis outage - see service-down)"
    return RedisDiagnosis(healthy=state.answers, summary=summary, redis=state, process=proc, health=probe)


def record_process(incident: Incident, check: str, process: RedisProcess | None) -> None:
    if process is not None:
        incident.finding(check, process.running, process.describe())


def cannot_automate(incident: Incident, service: Target, seen: RedisDiagnosis) -> State:
    """No way to start this Redis in the inventory: escalate with what a human should do."""
    r = require_redis(service)
    label = redis_label(service)
    why = (f"{label} is down ({seen.redis.detail}) and the inventory gives no ssh_host/start_command "
           "for it, so this runbook cannot start it safely. A human should, on the Redis host: check "
           "the process and its log (`systemctl status redis-server`, `journalctl -u redis-server -n 50`), "
           "start it (`systemctl start redis-server`), confirm "
           f"`{shlex.join(['redis-cli', '-h', r.host, '-p', str(r.port), 'ping'])}` answers PONG and "
           f"{service.service.health_url} answers 200. To let this runbook do it next time, add ssh_host "
           f"and start_command to redis.{service.service.redis} in the inventory")
    if incident.record.dry_run:
        return incident.close("dry run", why)
    return escalate_and_fail(incident, why, expected=f"{label} answering PING")


def plan_start(service: Target, host: SshHost, argv: list[str]) -> ActionPlan:
    r = require_redis(service)
    status = status_command(argv)
    return ActionPlan(
        action="start_redis",
        target=redis_label(service),
        runs=f"ssh {host.username}@{host.hostname} -p {host.port} {shlex.join(argv)}",
        expected_effect=f"Redis runs and {address_of(r)} answers PING; {service.service.health_url} "
                        "answers 200",
        undo="stop Redis again" + (f" (see `{shlex.join(status)}` for its pid)" if status else "")
             + ": it was down before, so starting it lost nothing",
        destructive=False,
    )
