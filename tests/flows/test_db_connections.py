"""The db-connections runbook against the real lab: a leaky client holds the connections
(healed by ending its idle sessions), a busy one (nothing safe to end: escalated)."""

from __future__ import annotations

import pytest

from flows.db_connections import db_connections
from tests.helpers import escalations, new_incident_id, report, run_tags

pytestmark = pytest.mark.lab

KNOBS = {"verify_checks": 2, "verify_deadline_s": 20, "check_interval_s": 0.5}


def _sessions(lab, app: str) -> int:
    return int(lab.postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"))


def test_idle_connections_are_ended_and_usage_verified(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("pg-connections-idle")
    assert not lab.fault_healthy("pg-connections-idle"), "the fault did not exhaust the connections"

    incident_id = new_incident_id()
    state = db_connections(target="web", incident_id=incident_id, return_state=True, **KNOBS)

    assert state.is_completed() and state.name == "Completed", state.message
    assert lab.fault_healthy("pg-connections-idle")
    assert _sessions(lab, "lab-leaky-app") == 0
    text = report(incident_id)
    assert "**Status:** resolved" in text
    assert "| terminate_idle_connections | approved | policy:terminate-idle-connections-in-lab |" in text
    assert "| terminate_idle_connections | 127.0.0.1:" in text and "| yes | ended 33 idle sessions" in text
    assert "33 x lab-leaky-app (app) idle" in text, "the diagnosis should group the sessions"
    assert "consecutive checks under the threshold" in text and "healthy" in text
    assert {"scenario:db-connections", "outcome:resolved"} <= set(run_tags(state.state_details.flow_run_id))


def test_busy_connections_escalate_with_a_max_connections_proposal(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("pg-connections-busy")
    try:
        incident_id = new_incident_id()
        state = db_connections(target="web", incident_id=incident_id, return_state=True, **KNOBS)

        assert state.is_failed(), state
        assert "no idle session" in state.message
        assert _sessions(lab, "lab-busy-app") == 33, "an active session was ended"
        text = report(incident_id)
        assert "## Escalations" in text
        assert "33 x lab-busy-app (app) active" in text
        assert "raise max_connections from 40 to" in text and "restart" in text
        assert "| - | none | - | - | - |" in text, "nothing may have been changed"
        found = escalations(prefect_api, incident_id)
        assert found and "max_connections" in found[0]["payload"]["reason"]
    finally:
        lab.reset_fault("pg-connections-busy")
    assert lab.fault_healthy("pg-connections-busy")


def test_healthy_database_is_already_fine(prefect_api, healthy_lab):
    incident_id = new_incident_id()
    state = db_connections(target="web", incident_id=incident_id, return_state=True, **KNOBS)
    assert state.is_completed() and state.name == "Already Fine", state.message
    assert "| - | none | - | - | - |" in report(incident_id)


def test_dry_run_ends_no_session(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("pg-connections-idle")
    incident_id = new_incident_id()
    state = db_connections(target="web", dry_run=True, incident_id=incident_id, return_state=True, **KNOBS)
    assert state.name == "Dry Run", state.message
    assert _sessions(lab, "lab-leaky-app") == 33, "dry run ended sessions"
    assert not lab.fault_healthy("pg-connections-idle")
    text = report(incident_id)
    assert "| terminate_idle_connections | dry run | dry run |" in text
    assert "| - | none | - | - | - |" in text
    lab.reset_fault("pg-connections-idle")
