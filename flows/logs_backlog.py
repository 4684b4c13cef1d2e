"""Runbook: logs and backlog (a log file too large; a queue consumer lagging behind its queue).

Alerts: ``LogFileTooLarge`` (the service's log grew past ``app.log.max_bytes``) and
``QueueBacklogHigh`` (more than ``app.queue.max_backlog`` jobs wait in the service's queue).
Whichever fired, the run looks at both and fixes whichever is wrong (both if both).

Automates these hand-written steps from ../shared/runbooks/:
- 004 "Logging Issues" - symptom "Log file too large": "Check log file size"
  (``ls -lh /var/log/...``), "Rotate logs if too large" (``logrotate``), "Fix log level if too
  verbose" (what the escalation advises when the log keeps flooding after the rotation).
- 002 "Scenario: Blockchain Indexer Lagging" (a consumer falling behind): "Diagnosis"
  (its lag, its status, its logs: ``docker-compose logs indexer``), "Fix: Restart indexer"
  (``docker-compose restart indexer``), "If still lagging, may need to catch up"; the P0/P1
  timeline's "Step 6: Verify" ("monitoring stable").
- 004 "Step 4: Resolution" - "Restart affected services", "Verify resolution", "Monitor for
  stability" (the backlog must stay down, not only get down).

Phases: diagnose (concurrently: ``stat`` of the log file and its rotated copies over SSH,
twice, for its growth; ``LLEN`` of the queue sampled a few seconds for its trend - a stuck
consumer lets it grow at the producers' rate; the consumer container's state and last log
lines) -> already fine if the log is within its limit and the backlog is low or shrinking ->
contain (the service's ``severity_degraded``) -> fix, each through the approval gate: rotate
the log (copytruncate under the application's own ``flock``, compress, shift the older
copies; only the copy beyond ``keep`` is removed), then restart the consumer container
(re-reading the backlog just before: one that caught up by itself is left alone; last, so the
drain is timed from the restart) -> verify, both
at once: the log under ``max_bytes``, ``gzip -t`` on the copy, no line lost (last ``seq`` of
the copy + 1 == first ``seq`` of the live file); the backlog under ``max_backlog`` within a
deadline, shrinking at ``min_drain_per_s`` or faster, then staying there without growing -
the record keeps the samples and the measured rate; otherwise escalate with what was seen.
"""

from __future__ import annotations

import shlex
from datetime import datetime

from prefect.futures import PrefectFuture
from prefect.states import State

from incident.approval import ActionPlan
from incident.errors import (ActionFailedError, ConfigurationError, ContainerNotFoundError, RunbookError,
                             TargetUnreachableError, VerificationFailedError)
from incident.inventory import AppSpec, Target
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, Trigger
from tasks.containers import ContainerState, inspect_container, read_container_logs, restart_container
from tasks.disk import human
from tasks.logs import (LogFile, RotationCheck, RotationResult, check_rotation, copytruncate_command,
                        read_log_file, rotate_log_file, rotated_path)
from tasks.queues import (DrainCheck, QueueBacklog, describe_rate, read_queue_backlog, sample_backlog,
                          wait_until_backlog_drains)
from tasks.ssh_hosts import require_ssh

SCENARIO = "logs-backlog"
#: the alert of each half of the scenario, and the inventory section it needs
ALERT_SECTIONS = {"LogFileTooLarge": "log", "QueueBacklogHigh": "queue"}


class LogsBacklogDiagnosis(Diagnosis):
    log: LogFile | None = None
    log_growth_per_s: float | None = None
    backlog: QueueBacklog | None = None
    consumer: ContainerState | None = None
    unread: list[str] = []  # what could not be looked at, and why

    @property
    def rotate(self) -> bool:
        return self.log is not None and self.log.exists and self.log.too_large

    def restart(self, app: AppSpec) -> bool:
        return (self.backlog is not None and app.queue is not None and self.backlog.too_high
                and not self.backlog.catching_up(app.queue.min_drain_per_s))


@runbook_flow(SCENARIO)
def logs_backlog(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    backlog_samples: int = 4,
    sample_interval_s: float = 1.0,
    drain_deadline_s: float = 60.0,
    hold_s: float = 5.0,
    max_growth_per_s: float = 1.0,
    lock_timeout_s: int = 10,
    first_line_wait_s: float = 10.0,
) -> State:
    """Rotate a log file that grew too large, restart a consumer that stopped draining its queue,
    and prove both: nothing lost, the backlog drained at a measured rate.

    Args:
        target: service name in the inventory (its ``app.log`` and ``app.queue``).
        dry_run: diagnose and show the plan; change nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        backlog_samples: ``LLEN`` readings of the diagnosis (their trend tells a stuck consumer).
        sample_interval_s: seconds between ``LLEN`` readings (diagnosis and verification).
        drain_deadline_s: how long the backlog may take to get under ``max_backlog`` after the restart.
        hold_s: how long it must then stay under it without growing (runbook: monitor for stability).
        max_growth_per_s: the growth (jobs/s) still counted as flat while holding; a consumer
            stuck again lets the backlog grow at the producers' rate.
        lock_timeout_s: how long the rotation waits for the application's lock on its log.
        first_line_wait_s: how long the verification waits for the first line written after the
            rotation (to prove no line was lost).
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)
    app = require_app(service, trigger)

    # 1. Diagnose: the log's size (and growth), the backlog's trend, the consumer
    seen = diagnose(incident, service, app, trigger, backlog_samples, sample_interval_s)
    if seen.healthy:
        return already_fine(incident, seen)

    # 2. Contain
    if not seen.rotate and not seen.restart(app):  # nothing this runbook fixes, something unread
        incident.enter("contain", "part of the diagnosis could not be read")
        return escalate_and_fail(incident, f"{seen.summary}; {'; '.join(seen.unread)}",
                                 expected="the log and the queue readable")
    todo = [what for what, needed in (("rotate the log", seen.rotate), ("restart the consumer", seen.restart(app)))
            if needed]
    incident.enter("contain", f"to do: {' and '.join(todo)}")
    incident.set_severity(service.service.severity_degraded, seen.summary)

    # 3. Fix: rotate the log (runbook 004), restart the consumer (runbook 002) - the second, so
    #    that the drain is timed from the restart on, nothing else in between
    rotation: RotationResult | None = None
    if dry_run and seen.rotate and seen.restart(app) and app.queue is not None:  # the dry run ends at the first plan
        incident.note("fix", f"dry run: after the rotation this run would restart the consumer "
                             f"(docker restart {app.queue.consumer_container})")
    if seen.rotate:
        done = rotate_log(incident, service, app, seen, lock_timeout_s)
        if isinstance(done, State):
            return done
        rotation = done
    drain_from: tuple[QueueBacklog, datetime] | None = None
    if seen.restart(app):
        fixed = restart_consumer(incident, service, app, seen, drain_deadline_s)
        if isinstance(fixed, State):
            return fixed
        drain_from = fixed

    # 4. Verify, both at once
    return verify(incident, service, app, seen, rotation, drain_from, drain_deadline_s, hold_s,
                  sample_interval_s, max_growth_per_s, first_line_wait_s)


def require_app(service: Target, trigger: Trigger | None) -> AppSpec:
    """The inventory sections this runbook needs: ``app`` with ``log`` and/or ``queue`` - the one
    the alert is about, when it is about one."""
    app = service.service.app
    if app is None or (app.log is None and app.queue is None):
        raise ConfigurationError(
            service.name, "no app.log and no app.queue in the inventory", "the service's log file or queue",
            "add app.log {path, max_bytes, keep} and/or app.queue {redis, key, consumer_container, "
            "max_backlog, min_drain_per_s} to the service in the inventory",
        )
    alert = (trigger.labels.get("alertname") if trigger else None) or ""
    section = ALERT_SECTIONS.get(alert)
    if section is not None and getattr(app, section) is None:
        fields = "{path, max_bytes, keep}" if section == "log" else \
            "{redis, key, consumer_container, max_backlog, min_drain_per_s}"
        raise ConfigurationError(service.name, f"alert {alert} fired but the inventory has no app.{section}",
                                 f"app.{section} for the service", f"add app.{section} {fields} to the "
                                 "service in the inventory")
    return app


# --------------------------------------------------------------------------- diagnose


def _result(future: PrefectFuture | None, what: str, unread: list[str]):
    """A read-only task's result, or None with the reason kept in ``unread`` (the other half of
    the runbook goes on)."""
    if future is None:
        return None
    try:
        return future.result()
    except RunbookError as exc:
        unread.append(f"{what} could not be read: {exc.observed} (next: {exc.next_step})")
        return None


def diagnose(incident: Incident, service: Target, app: AppSpec, trigger: Trigger | None, samples: int,
             interval_s: float) -> LogsBacklogDiagnosis:
    """Runbook 004 "check log file size", 002 "indexer lag" diagnosis: read-only, concurrently."""
    alert = (trigger.labels.get("alertname") if trigger else None) or "no alert name"
    parts = ([f"the log file {app.log.path}"] if app.log else []) + \
            ([f"the queue {app.queue.key} and its consumer {app.queue.consumer_container}"] if app.queue else [])
    incident.enter("diagnose", f"checking {' and '.join(parts)} of {service.name} ({alert})")
    unread: list[str] = []
    log_f = read_log_file.submit(service) if app.log else None
    backlog_f = sample_backlog.submit(service, samples=samples, interval_s=interval_s) if app.queue else None
    consumer = app.queue.consumer_container if app.queue else None
    state_f = inspect_container.submit(service, container=consumer) if consumer else None

    log: LogFile | None = _result(log_f, "the log file", unread)
    backlog: QueueBacklog | None = _result(backlog_f, "the queue", unread)
    growth = None
    if log is not None and log.too_large:  # a second look, after the backlog's seconds: still flooding?
        later: LogFile | None = _result(read_log_file.submit(service), "the log file", unread)
        if later is not None:
            growth, log = later.growth_per_s(log), later
    if log is not None:
        flood = f"; growing {human(int(growth))}/s" if growth else ""
        incident.finding("log file", log.exists and not log.too_large, log.describe() + flood)
    seen = LogsBacklogDiagnosis(healthy=False, summary="", log=log, log_growth_per_s=growth, backlog=backlog)
    if backlog is not None:
        catching_up = backlog.too_high and not seen.restart(app)
        incident.finding("queue backlog", not seen.restart(app), backlog.describe()
                         + (": the consumer is catching up by itself" if catching_up else ""))
    state: ContainerState | None = _result(state_f, f"the consumer container {consumer}", unread)
    if state is not None:
        seen.consumer = state
        stuck = seen.restart(app) and state.running
        incident.finding("consumer", state.running and not stuck, state.describe() + (
            " - but the backlog grows: it does not consume (stuck)" if stuck else ""))
        if seen.restart(app):
            lines: list[str] | None = _result(read_container_logs.submit(service, lines=20, container=consumer),
                                              f"the logs of {consumer}", unread)
            if lines is not None:
                incident.finding("consumer logs", True, " | ".join(lines[-5:]) or "(no log lines)")
    for reason in unread:
        incident.finding("not read", False, reason)
    seen.unread = unread
    problems = []
    if seen.rotate and log is not None:
        problems.append(f"{log.path} is {human(log.size_bytes)}, over its {human(log.max_bytes)} limit")
    if seen.restart(app) and backlog is not None:
        problems.append(f"{backlog.length} jobs wait in {backlog.queue} (max {backlog.max_backlog}), "
                        f"{describe_rate(backlog.growth_per_s)}")
    fine = []
    if log is not None and not seen.rotate:
        fine.append(f"{log.path} {human(log.size_bytes)} (limit {human(log.max_bytes)})")
    if backlog is not None and not seen.restart(app):
        fine.append(f"{backlog.queue} {backlog.length} jobs, {describe_rate(backlog.growth_per_s)}")
    seen.summary = "; ".join(problems) or ("fine: " + "; ".join(fine) if fine else "nothing could be read")
    seen.healthy = not problems and not unread
    return seen


# --------------------------------------------------------------------------- fix


def restart_consumer(incident: Incident, service: Target, app: AppSpec, seen: LogsBacklogDiagnosis,
                     deadline_s: float) -> tuple[QueueBacklog, datetime] | State | None:
    """Runbook 002 "restart indexer", for the consumer container: the backlog re-read just before
    (a consumer that caught up meanwhile is left alone: None). Returns the reading before the
    restart and when the restart started (the drain is timed from there), or the closed state."""
    queue = app.queue
    assert queue is not None and seen.backlog is not None
    incident.enter("fix", f"restart the consumer {queue.consumer_container} (runbook 002 'restart indexer')")
    fresh = read_queue_backlog(service)
    if not fresh.too_high:
        incident.finding("queue backlog", True, f"{fresh.describe()}: the consumer caught up meanwhile; "
                                                "not restarted")
        return None
    try:
        step = change(incident, service, plan_restart_consumer(service, seen, fresh, deadline_s),
                      restart_container, service, container=queue.consumer_container)
    except (ActionFailedError, TargetUnreachableError, ContainerNotFoundError) as exc:
        return escalate_and_fail(incident, f"restarting the consumer {queue.consumer_container} failed: "
                                           f"{exc.observed} ({exc.next_step})",
                                 expected=f"{queue.consumer_container} consuming {queue.key}")
    if not step.taken:
        return step.closed
    approved = [a.at for a in incident.record.approvals if a.action == "restart_container"]
    return fresh, max([fresh.samples[-1].at, *approved[-1:]])


def rotate_log(incident: Incident, service: Target, app: AppSpec, seen: LogsBacklogDiagnosis,
               lock_timeout_s: int) -> RotationResult | State:
    """Runbook 004 "rotate logs if too large": copytruncate under the application's lock."""
    assert app.log is not None and seen.log is not None
    incident.enter("fix", f"rotate {app.log.path} (runbook 004 'rotate logs if too large')")
    try:
        step = change(incident, service, plan_rotation(service, app, seen.log, lock_timeout_s),
                      rotate_log_file, service, lock_timeout_s=lock_timeout_s)
    except (ActionFailedError, TargetUnreachableError) as exc:
        return escalate_and_fail(incident, f"rotating {app.log.path} failed: {exc.observed} ({exc.next_step})",
                                 expected=f"{app.log.path} rotated, every line kept")
    if not step.taken:
        return step.closed
    return step.result


# --------------------------------------------------------------------------- verify


def verify(incident: Incident, service: Target, app: AppSpec, seen: LogsBacklogDiagnosis,
           rotation: RotationResult | None, drain_from: tuple[QueueBacklog, datetime] | None,
           deadline_s: float, hold_s: float, interval_s: float, max_growth_per_s: float,
           first_line_wait_s: float) -> State:
    checks = []
    if rotation is not None:
        checks.append("the log under its limit, its copy valid, no line lost")
    if drain_from is not None:
        checks.append(f"the backlog under {app.queue.max_backlog if app.queue else '?'} within {deadline_s:g} s "
                      f"and flat for {hold_s:g} s")
    incident.enter("verify", "; ".join(checks) or "nothing was changed: nothing to verify")
    rotated_f = check_rotation.submit(service, wait_s=first_line_wait_s) \
        if rotation is not None and rotation.changed else None
    unrotated_f = read_log_file.submit(service) if rotation is not None and not rotation.changed else None
    drain_f = None
    if drain_from is not None:
        before, since = drain_from
        drain_f = wait_until_backlog_drains.submit(service, baseline=before.samples[-1], since=since,
                                                   deadline_s=deadline_s, hold_s=hold_s, interval_s=interval_s,
                                                   max_growth_per_s=max_growth_per_s)
    failures: list[str] = []
    verified: list[str] = []
    outcome: list[str] = []  # the closing summary, short
    if rotated_f is not None:
        check: RotationCheck = rotated_f.result()
        incident.finding("log rotation", check.ok, check.describe())
        verified.append(check.describe())
        outcome.append(check.summary())
        if not check.ok:
            failures.append(log_failure(check, seen))
    if unrotated_f is not None:
        now: LogFile = unrotated_f.result()
        incident.finding("log file", not now.too_large, now.describe())
        verified.append(now.describe())
        outcome.append(now.describe())
        if now.too_large:
            failures.append(f"{now.path} is still over its limit: {now.describe()}")
    if drain_f is not None:
        drain: DrainCheck = drain_f.result()
        incident.finding("backlog drain", drain.ok, drain.describe())
        verified.append(drain.describe())
        outcome.append(drain.summary())
        if not drain.ok:
            failures.append(queue_failure(app, drain))
    incident.verified("; ".join(verified))
    if failures:
        return escalate_and_fail(incident, "; ".join(failures), expected="the log under its limit and "
                                 "the backlog drained", error=VerificationFailedError)
    if seen.unread:
        return escalate_and_fail(incident, f"fixed and verified what could be read, but "
                                 f"{'; '.join(seen.unread)}", expected="the log and the queue readable")
    if not any(a.changed for a in incident.record.actions):
        last = incident.record.findings[-1].detail if incident.record.findings else seen.summary
        return incident.close("resolved without action", "; ".join(outcome) or last)
    return incident.close("resolved", "; ".join(outcome))


def log_failure(check: RotationCheck, seen: LogsBacklogDiagnosis) -> str:
    why = []
    if not check.under_max:
        flood = f" (before the rotation it grew {human(int(seen.log_growth_per_s))}/s)" \
            if seen.log_growth_per_s else ""
        why.append(f"{check.path} is over its limit again right after the rotation{flood}: the application "
                   "floods its log - lower its log level (runbook 004 'fix log level if too verbose') and "
                   "look for the cause of the flood")
    if not check.gzip_ok:
        why.append(f"{check.compressed} fails `gzip -t` ({check.gzip_detail}): keep it, it may still be "
                   "partly readable (`zcat`), and check the disk")
    if check.contiguous is False:
        why.append(f"the seq numbers do not join ({check.last_rotated_seq} in {check.compressed}, "
                   f"{check.first_live_seq} in {check.path}): lines may be missing or the application "
                   "restarted meanwhile; compare both files by hand")
    return f"the log rotation did not verify: {check.describe()}; " + "; ".join(why)


def queue_failure(app: AppSpec, drain: DrainCheck) -> str:
    queue = app.queue
    consumer = queue.consumer_container if queue else "the consumer"
    return (f"the consumer {consumer} was restarted but the backlog did not drain as required: "
            f"{drain.describe()}. Next: read its logs (`docker logs {consumer}`), check its connection "
            f"to the queue's Redis, and add consumers if the producers simply outpace it "
            "(runbook 002 'may need to catch up')")


# --------------------------------------------------------------------------- plans


def plan_restart_consumer(service: Target, seen: LogsBacklogDiagnosis, fresh: QueueBacklog,
                          deadline_s: float) -> ActionPlan:
    queue = service.service.app.queue if service.service.app else None
    assert queue is not None
    state = seen.consumer.describe() if seen.consumer else f"container {queue.consumer_container}"
    trend = describe_rate(seen.backlog.growth_per_s if seen.backlog else None)
    return ActionPlan(
        action="restart_container",
        target=queue.consumer_container,
        runs=f"docker restart {queue.consumer_container}",
        expected_effect=(f"{queue.consumer_container} consumes {fresh.queue} again: the backlog "
                         f"({fresh.length} jobs, {trend} while {state}) shrinks by at least {queue.min_drain_per_s:g} "
                         f"jobs/s to under {queue.max_backlog} within {deadline_s:g} s and stays there"),
        undo=(f"nothing to undo: the jobs wait in the Redis list while {queue.consumer_container} restarts "
              f"(none is lost); `docker stop {queue.consumer_container}` would stop it again"),
        destructive=False,
    )


def plan_rotation(service: Target, app: AppSpec, log: LogFile, lock_timeout_s: int) -> ActionPlan:
    spec = app.log
    assert spec is not None
    host = require_ssh(service)
    oldest = next((c for c in log.copies if c.path == rotated_path(spec, spec.keep)), None)
    deletes = (f"the only file removed is {oldest.path} ({human(oldest.size_bytes)}), the oldest copy beyond "
               f"keep={spec.keep}" if oldest else
               f"nothing is deleted ({rotated_path(spec, spec.keep)}, the copy beyond keep={spec.keep}, "
               "does not exist)")
    return ActionPlan(
        action="rotate_log_file",
        target=f"{spec.path} on {host.username}@{host.hostname}:{host.port}",
        runs=(f"ssh {host.username}@{host.hostname} -p {host.port} "
              f"{shlex.join(copytruncate_command(spec, lock_timeout_s))}; then shift {spec.path}.N.gz to "
              f".N+1.gz (up to keep={spec.keep}) and `gzip -- {rotated_path(spec, 1, compressed=False)}`"),
        expected_effect=(f"{spec.path} ({human(log.size_bytes)}) emptied under the application's own lock and "
                         f"written on from there; its lines kept in {rotated_path(spec, 1)} (`gzip -t` ok); the "
                         f"last seq there + 1 = the first seq in {spec.path}: no line lost"),
        undo=(f"every line is kept: `zcat {rotated_path(spec, 1)}` gives them back; {deletes}"),
        destructive=False,
    )
