"""Runbook: slow queries and lock contention (PostgreSQL sessions waiting on each other).

Automates these hand-written steps from ../shared/runbooks/:
- 004 "Database Performance Issues": "Long-running queries" - list the active queries
  older than 5 seconds (`pg_stat_activity`, `now() - query_start`); slow query responses
  and timeouts.
- 002 "Database Connection Exhausted" / "Slow API responses": sessions piling up behind
  one that holds a lock (`pg_locks`).

Phases: diagnose (the blocking tree from `pg_blocking_pids()`: who waits for whom, the
root blockers - blocking others, waiting for nobody; the long-running queries with state,
age, wait event and query text cut short) -> contain (record, the service's degraded
severity; a root blocker a runbook must not touch - superuser, protected application,
another database - is escalated) -> fix (cancel the root blockers' queries with
`pg_cancel_backend` - approval gate; re-check; only if they still block, end their
sessions with `pg_terminate_backend` - destructive, approval gate; each step re-checks
that each pid still blocks before acting) -> verify (nothing blocked for N consecutive
checks, and the service healthy).

Not automated, on purpose: long-running queries that block nobody are recorded, not
cancelled (runbook 004 says "identify and optimise": a human's job); a blocker that comes
back after being ended (an application re-taking the lock) is escalated with what was seen.
"""

from __future__ import annotations

from prefect.states import State

from incident.approval import ActionPlan
from incident.errors import TargetUnreachableError, VerificationFailedError
from incident.inventory import Target
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, Trigger
from tasks.http_checks import wait_until_healthy
from tasks.postgres import Blocker, LockState, address_of, cancel_blocking_queries, capped
from tasks.postgres import read_lock_state, require_database, terminate_blocking_sessions
from tasks.postgres import wait_until_unblocked

SCENARIO = "db-locks"


class LocksDiagnosis(Diagnosis):
    locks: LockState


@runbook_flow(SCENARIO)
def db_locks(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    slow_query_s: float = 5.0,
    cancel_settle_s: float = 5.0,
    verify_checks: int = 3,
    verify_deadline_s: int = 60,
    check_interval_s: float = 1.0,
) -> State:
    """Unblock sessions waiting on a lock: cancel the root blocker, end it only if it still blocks.

    Args:
        target: service name in the inventory (its ``database`` is checked).
        dry_run: diagnose and show the plan; change nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        slow_query_s: active queries older than this are reported (runbook 004: 5 s).
        cancel_settle_s: how long the blockers have to let go after the cancel before the
            run proposes ending their sessions.
        verify_checks: consecutive checks with nothing blocked (and healthy probes) that count as fixed.
        verify_deadline_s: how long verification may take before the run escalates.
        check_interval_s: seconds between checks while waiting and verifying.
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)

    # 1. Diagnose
    seen = diagnose(incident, service, slow_query_s)
    if seen.healthy:
        return already_fine(incident, seen)
    locks = seen.locks

    # 2. Contain
    incident.enter("contain", "sessions wait for locks")
    incident.set_severity(service.service.severity_degraded,
                          f"{len(locks.blocked)} PostgreSQL sessions blocked")
    untouchable = [b for b in locks.roots if b.untouchable]
    if untouchable or not locks.roots:
        why = "; ".join(f"pid {b.session.pid} is {b.untouchable}" for b in untouchable) \
            or "no root blocker found (a lock cycle? PostgreSQL's deadlock detector ends those)"
        return escalate_and_fail(incident, f"{locks.describe()}: {why} - a runbook must not end it; "
                                 f"blockers: {blockers_text(locks.roots)}", expected="no session blocked")

    # 3. Fix: cancel the root blockers' queries; end their sessions only if they still block
    incident.enter("fix", f"cancel the queries of root blocker(s) {locks.root_pids()}")
    step = change(incident, service, plan_cancel(service, locks.roots), cancel_blocking_queries,
                  service, locks.root_pids())
    if not step.taken:
        return step.closed
    settled = wait_until_unblocked(service, consecutive=1, deadline_s=cancel_settle_s,
                                   interval_s=min(check_interval_s, 0.5), pids=locks.root_pids())
    incident.note("fix", f"after the cancel: {settled.last.describe()}")
    if not settled.ok:
        still = [b for b in settled.last.roots if b.session.pid in locks.root_pids()]
        incident.finding("after cancel", False, f"still blocking: {blockers_text(still)}")
        step = change(incident, service, plan_terminate(service, still), terminate_blocking_sessions,
                      service, [b.session.pid for b in still])
        if not step.taken:
            return step.closed

    # 4. Verify: nothing blocked, then the service healthy
    incident.enter("verify", f"{verify_checks} consecutive checks with nothing blocked within "
                             f"{verify_deadline_s} s, and the service healthy")
    streak = wait_until_unblocked(service, consecutive=verify_checks, deadline_s=verify_deadline_s,
                                  interval_s=check_interval_s)
    health = wait_until_healthy(service, consecutive=verify_checks, deadline_s=verify_deadline_s,
                                interval_s=check_interval_s)
    incident.verified(f"{streak.describe()}; {health.describe()}")
    if not streak.ok:
        last = streak.last
        return escalate_and_fail(
            incident, f"still blocked after the fix: {last.describe()}; blockers now: "
            f"{blockers_text(last.roots)} - if the same application holds the lock again it re-takes "
            "it: stop or fix that client", error=VerificationFailedError, expected="no session blocked")
    if not health.healthy:
        return escalate_and_fail(incident, f"nothing is blocked but the service is not healthy: "
                                 f"{health.describe()}", error=VerificationFailedError)
    return incident.close("resolved", f"no session blocked; {service.name} healthy")


def diagnose(incident: Incident, service: Target, slow_query_s: float) -> LocksDiagnosis:
    """Runbook 004: the blocking tree and the long-running queries."""
    db = require_database(service)
    incident.enter("diagnose", f"blocking tree and queries > {slow_query_s:g} s on {address_of(db)}")
    try:
        locks = read_lock_state(service, slow_query_s=slow_query_s)
    except TargetUnreachableError as exc:
        escalate_and_fail(incident, f"cannot open a session as {db.admin_user or db.user} to look: "
                          f"{exc.observed}", expected="a runbook session")
    incident.finding("lock waits", not locks.contended, locks.describe())
    if locks.roots:
        incident.finding("root blockers", False, blockers_text(locks.roots))
    if locks.blocked:
        incident.finding("blocked sessions", False, capped([b.describe() for b in locks.blocked]))
    incident.finding(f"queries > {slow_query_s:g} s", not locks.long_running,
                     capped([f"{s.describe()}, query {s.query_age_s or 0:.0f} s: {s.query[:120]!r}"
                             for s in locks.long_running]) or "none")
    return LocksDiagnosis(healthy=not locks.contended, summary=locks.describe(), locks=locks)


def blockers_text(roots: list[Blocker]) -> str:
    return capped([b.describe() for b in roots]) or "none"


def plan_cancel(service: Target, roots: list[Blocker]) -> ActionPlan:
    blocked = sum(len(b.blocks) for b in roots)
    return ActionPlan(
        action="cancel_blocking_queries",
        target=address_of(require_database(service)),
        runs=f"SELECT pg_cancel_backend(pid) for root blocker(s) {[b.session.pid for b in roots]} "
             f"(each re-checked first): {blockers_text(roots)}",
        expected_effect=f"the running query of each blocker is cancelled and its transaction rolled back, "
                        f"releasing its locks; {blocked} waiting session(s) go on",
        undo="the client may run its transaction again; a blocker idle in transaction is not affected "
             "(the run then proposes ending its session)",
        destructive=False,
    )


def plan_terminate(service: Target, still: list[Blocker]) -> ActionPlan:
    return ActionPlan(
        action="terminate_blocking_sessions",
        target=address_of(require_database(service)),
        runs=f"SELECT pg_terminate_backend(pid) for {[b.session.pid for b in still]} (each re-checked "
             f"first): {blockers_text(still)}",
        expected_effect="the blockers' sessions end, their open transactions are rolled back and "
                        "their locks released; the waiting sessions go on",
        undo="none: the rolled-back work is lost; the client must reconnect and redo it",
        destructive=True,
    )
