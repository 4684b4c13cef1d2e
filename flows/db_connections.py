"""Runbook: database connections exhausted (PostgreSQL sessions near max_connections).

Automates these hand-written steps from ../shared/runbooks/:
- 002 "Scenario: Database Connection Exhausted": diagnose with
  `SELECT count(*) FROM pg_stat_activity`; fix by killing idle connections
  (`pg_terminate_backend` of sessions idle for more than 5 minutes); raise max_connections
  (`ALTER SYSTEM SET max_connections = ...` + restart of the database).
- 004 "Database Performance Issues": "Database connection pool exhausted" - find the
  connection leak (which application holds the sessions).
- 000 "Database Connection Failures": check database health, verify the pool settings.

Phases: diagnose (client sessions by state, application, role and age against
max_connections; the idle sessions the never-touch rules allow ending) -> contain (record,
the service's degraded severity) -> fix (terminate the idle and idle-in-transaction sessions
older than the inventory's max_idle_s - approval gate; the task selects them again when it
runs) -> verify (usage under the threshold for N consecutive checks, and the service healthy).

Not automated, on purpose: raising max_connections needs a database restart; the run
proposes it (current and suggested value) in its escalation and never does it. Sessions
that are *active* are never ended by this runbook: when there is no idle session to end,
it escalates with the groups it saw. Restarting the database (000 step 4) is a human's call.
"""

from __future__ import annotations

from prefect.states import State

from incident.approval import ActionPlan
from incident.errors import TargetUnreachableError, VerificationFailedError
from incident.inventory import Target
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, Trigger
from tasks.http_checks import wait_until_healthy
from tasks.postgres import ConnectionUsage, address_of, capped, read_connection_usage
from tasks.postgres import require_database, terminate_idle_connections, wait_until_connections_below

SCENARIO = "db-connections"


class ConnectionsDiagnosis(Diagnosis):
    usage: ConnectionUsage


@runbook_flow(SCENARIO)
def db_connections(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    verify_checks: int = 3,
    verify_deadline_s: int = 60,
    check_interval_s: float = 1.0,
) -> State:
    """Free PostgreSQL connections held by idle sessions, and prove usage is back under the threshold.

    Args:
        target: service name in the inventory (its ``database`` is checked).
        dry_run: diagnose and show the plan; change nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        verify_checks: consecutive checks under the threshold (and healthy probes) that count as fixed.
        verify_deadline_s: how long verification may take before the run escalates.
        check_interval_s: seconds between checks while verifying.
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)

    # 1. Diagnose
    seen = diagnose(incident, service)
    if seen.healthy:
        return already_fine(incident, seen)
    usage = seen.usage

    # 2. Contain
    incident.enter("contain", "connections near exhaustion")
    incident.set_severity(service.service.severity_degraded,
                          f"{usage.used}/{usage.max_connections} PostgreSQL connections in use")
    if not usage.idle_candidates:
        return escalate_and_fail(
            incident, f"{usage.describe()}: no idle session older than {usage.max_idle_s} s that a runbook "
            f"may end - the connections are in use ({groups_text(usage)}); {usage.proposal()}",
            expected=f"connections under {usage.threshold:.0%} of max_connections")

    # 3. Fix: end the idle sessions (runbook 002 "kill idle connections")
    incident.enter("fix", f"terminate {len(usage.idle_candidates)} idle sessions (runbook 002)")
    step = change(incident, service, plan_terminate_idle(service, usage), terminate_idle_connections,
                  service, [s.pid for s in usage.idle_candidates])
    if not step.taken:
        return step.closed

    # 4. Verify: usage under the threshold, then the service healthy
    incident.enter("verify", f"{verify_checks} consecutive checks under {usage.threshold:.0%} "
                             f"within {verify_deadline_s} s, and the service healthy")
    streak = wait_until_connections_below(service, consecutive=verify_checks, deadline_s=verify_deadline_s,
                                          interval_s=check_interval_s)
    health = wait_until_healthy(service, consecutive=verify_checks, deadline_s=verify_deadline_s,
                                interval_s=check_interval_s)
    incident.verified(f"{streak.describe()}; {health.describe()}")
    if not streak.ok:
        last = streak.last
        return escalate_and_fail(
            incident, f"still exhausted after ending idle sessions: {last.describe()} "
            f"({groups_text(last)}); {last.proposal()}", error=VerificationFailedError,
            expected=f"connections under {last.threshold:.0%} of max_connections")
    if not health.healthy:
        return escalate_and_fail(incident, f"connections are fine but the service is not healthy: "
                                 f"{health.describe()}", error=VerificationFailedError)
    return incident.close("resolved", f"{streak.last.describe()}; {service.name} healthy")


def diagnose(incident: Incident, service: Target) -> ConnectionsDiagnosis:
    """Runbook 002 diagnosis / 004 "pool exhausted": who holds the connections, for how long."""
    db = require_database(service)
    incident.enter("diagnose", f"pg_stat_activity of {address_of(db)} against max_connections")
    try:
        usage = read_connection_usage(service)
    except TargetUnreachableError as exc:
        # the runbooks' role should get in through the headroom the application role leaves
        escalate_and_fail(incident, f"cannot open a session as {db.admin_user or db.user} to look: "
                          f"{exc.observed}; a human with superuser access (reserved slots) must look "
                          "at pg_stat_activity", expected="a runbook session")
    incident.finding("connections", not usage.exhausted, usage.describe())
    incident.finding("sessions by state, application, role", True, groups_text(usage))
    if usage.idle_candidates:
        incident.finding("idle sessions that may be ended", True, candidates_text(usage))
    return ConnectionsDiagnosis(healthy=not usage.exhausted, summary=usage.describe(), usage=usage)


def groups_text(usage: ConnectionUsage) -> str:
    return capped([g.describe() for g in usage.groups])


def candidates_text(usage: ConnectionUsage) -> str:
    return f"{len(usage.idle_candidates)}: " + capped([s.describe() for s in usage.idle_candidates])


def plan_terminate_idle(service: Target, usage: ConnectionUsage) -> ActionPlan:
    db = require_database(service)
    return ActionPlan(
        action="terminate_idle_connections",
        target=address_of(db),
        runs=(f"SELECT pg_terminate_backend(pid) for the idle / idle-in-transaction client sessions older "
              f"than {usage.max_idle_s} s, selected again when it runs (never superusers, never "
              f"{', '.join(db.protected_applications)}, never the runbooks' own sessions) - "
              f"now {candidates_text(usage)}"),
        expected_effect=(f"{len(usage.idle_candidates)} connections freed: usage from {usage.used} to about "
                         f"{usage.used - len(usage.idle_candidates)} of {usage.max_connections}"),
        undo="nothing to undo: clients reconnect when they need a connection; an idle-in-transaction "
             "session's open transaction is rolled back",
        destructive=True,
    )
