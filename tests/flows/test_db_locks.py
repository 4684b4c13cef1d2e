"""The db-locks runbook against the real lab: a blocker running a query (cancelled), a
blocker idle in transaction (ended after a human approves), one that keeps coming back
(escalated)."""

from __future__ import annotations

import pytest
from prefect.flow_runs import resume_flow_run

from flows.db_locks import db_locks
from tests.helpers import escalations, new_incident_id, report, run_id_of, start_flow, wait_paused

pytestmark = pytest.mark.lab

KNOBS = {"cancel_settle_s": 2, "verify_checks": 2, "verify_deadline_s": 10, "check_interval_s": 0.5}


def _sessions(lab, app: str) -> int:
    return int(lab.postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"))


def test_busy_blocker_is_cancelled_and_verified(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("pg-lock-blocker-busy")
    assert not lab.fault_healthy("pg-lock-blocker-busy")

    incident_id = new_incident_id()
    state = db_locks(target="web", incident_id=incident_id, return_state=True, **KNOBS)

    assert state.is_completed() and state.name == "Completed", state.message
    assert lab.fault_healthy("pg-lock-blocker-busy")
    assert _sessions(lab, "lab-lock-blocker") == 1, "a cancel must keep the blocker's session"
    text = report(incident_id)
    assert "| cancel_blocking_queries | approved | policy:cancel-blocking-query-in-lab |" in text
    assert "| yes | pg_cancel_backend sent to pid" in text and "lab-lock-blocker" in text
    assert "terminate_blocking_sessions" not in text, "the cancel was enough"
    assert "waiting on Lock/" in text, "the blocked sessions belong in the findings"
    assert "**Status:** resolved" in text


def test_idle_in_transaction_blocker_is_ended_after_human_approval(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("pg-lock-blocker-idle")
    thread, incident_id = start_flow(db_locks, target="web", **KNOBS)
    run_id = run_id_of(incident_id)
    paused = wait_paused(run_id)
    assert "approve-terminate-blocking-sessions" in str(paused.state.state_details.pause_key)
    assert not lab.fault_healthy("pg-lock-blocker-idle"), "the cancel alone must not have fixed it"

    resume_flow_run(run_id, run_input={"decision": "approve", "reason": "idle transaction holds accounts",
                                       "approver": "Ada Lovelace"})
    thread.join(timeout=120)
    assert thread.state is not None and thread.state.name == "Completed", thread.state
    assert lab.fault_healthy("pg-lock-blocker-idle")
    assert _sessions(lab, "lab-idle-blocker") == 0
    text = report(incident_id)
    assert "| cancel_blocking_queries | approved | policy:cancel-blocking-query-in-lab |" in text
    assert "| terminate_blocking_sessions | approved | Ada Lovelace | idle transaction holds accounts |" in text
    assert "| yes | pg_terminate_backend sent to pid" in text
    assert "idle in transaction" in text


def test_respawning_blocker_escalates_with_what_it_saw(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("pg-lock-blocker-respawning")
    try:
        # it never unblocks: a short verification deadline is enough to see that
        thread, incident_id = start_flow(db_locks, target="web", **{**KNOBS, "verify_deadline_s": 5})
        run_id = run_id_of(incident_id)
        wait_paused(run_id)
        resume_flow_run(run_id, run_input={"decision": "approve", "reason": "end it", "approver": "Ada Lovelace"})
        thread.join(timeout=120)

        assert thread.state is not None and thread.state.is_failed(), thread.state
        assert "still blocked after the fix" in thread.state.message
        text = report(incident_id)
        assert "## Escalations" in text and "lab-lock-respawner" in text
        assert "| terminate_blocking_sessions | 127.0.0.1:" in text
        found = escalations(prefect_api, incident_id)
        assert found and "still blocked" in found[0]["payload"]["reason"]
    finally:
        lab.reset_fault("pg-lock-blocker-respawning")
    assert lab.fault_healthy("pg-lock-blocker-respawning")


def test_nothing_blocked_is_already_fine(prefect_api, healthy_lab):
    state = db_locks(target="web", return_state=True, **KNOBS)
    assert state.is_completed() and state.name == "Already Fine", state.message


def test_dry_run_signals_nothing(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("pg-lock-blocker-busy")
    incident_id = new_incident_id()
    state = db_locks(target="web", dry_run=True, incident_id=incident_id, return_state=True, **KNOBS)
    assert state.name == "Dry Run", state.message
    assert not lab.fault_healthy("pg-lock-blocker-busy"), "dry run unblocked the sessions"
    text = report(incident_id)
    assert "| cancel_blocking_queries | dry run | dry run |" in text
    assert "| - | none | - | - | - |" in text
    lab.reset_fault("pg-lock-blocker-busy")
