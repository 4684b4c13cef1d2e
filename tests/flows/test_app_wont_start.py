"""The app-wont-start runbook against the real lab: the web container exits at start because
another program holds its port (stopped after a person approved it), a required setting is
missing (escalated, never invented), or Redis is down (started by redis-down, run as a subflow)."""

from __future__ import annotations

from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run

from flows.app_wont_start import app_wont_start
from lab.faults import holder_pid
from lab.proc import cmdline, pid_alive
from tests.helpers import (alert_ids, escalations, new_incident_id, report, run_id_of, wait_for_alert_incident,
                           wait_paused, wait_run_final)

pytestmark = pytest.mark.lab

FAST = {"start_deadline_s": 15, "verify_deadline_s": 30, "probe_interval_s": 0.5}


def _web_status(lab) -> str:
    return lab.docker_client().containers.get(lab.info.container_name).status


def test_port_holder_is_stopped_after_approval_from_a_real_alert(prefect_api, quiet_pipeline):
    lab, store = quiet_pipeline
    since = alert_ids(store)
    lab.inject("web-port-held")
    holder = holder_pid(lab, "web-port-held")
    assert holder and "lab.port_holder" in cmdline(holder)

    row = wait_for_alert_incident(store, "app-wont-start", since)
    run_id = UUID(row["flow_run_id"])
    paused = wait_paused(run_id)
    assert "stop-port-holder" in str(paused.state.state_details.pause_key)
    assert pid_alive(holder), "the holder was stopped before a person approved it"
    resume_flow_run(run_id, run_input={"decision": "approve", "reason": "a stray program on the web port",
                                       "approver": "on-call test"})
    run = wait_run_final(run_id)

    assert run.state.is_completed() and run.state.name == "Completed", run.state.message
    assert not pid_alive(holder), "the approved holder still runs"
    assert lab.fault_healthy("web-port-held")
    text = report(row["incident_id"])
    assert "**Status:** resolved" in text
    assert "port_in_use" in text and "is in use" in text, "the cause and the log line that says so"
    assert f"held by pid {holder} (" in text and "lab.port_holder" in text, "the holder: pid and command line"
    assert "| stop_port_holder | approved | on-call test | a stray program on the web port |" in text
    assert f"| stop_port_holder | pid {holder} (" in text and "sent SIGTERM" in text
    assert "| restart_container | approved | policy:restart-stateless-container-in-lab |" in text
    assert "| restart_container | lab-web | yes |" in text
    for phase in ("| diagnose |", "| contain |", "| fix |", "| verify |", "| close |"):
        assert phase in text, f"timeline lacks {phase}"


def test_missing_setting_is_named_and_escalated_never_invented(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("web-missing-setting")
    try:
        incident_id = new_incident_id()
        state = app_wont_start(target="web", incident_id=incident_id, return_state=True, **FAST)

        assert state.is_failed(), state
        assert "required setting LABWEB_UPSTREAM is missing" in state.message
        assert "never invents a value" in state.message and "this run changed nothing" in state.message
        assert _web_status(lab) == "exited", "the runbook must not have started the web container"
        text = report(incident_id)
        assert "**Status:** failed" in text
        escalated = text.split("## Escalations", 1)[1]
        assert "LABWEB_UPSTREAM" in escalated and "environment" in escalated, "which setting, and where to set it"
        assert "this run changed nothing" in escalated
        assert "lacks LABWEB_UPSTREAM" in text, "the container's settings were checked"
        assert "| - | none | - | - | - |" in text, "an action was recorded"
        assert "LABWEB_PG=" not in text and "LABWEB_REDIS=" not in text, "setting values must never be shown"
        assert escalations(prefect_api, incident_id), "no escalation event reached Prefect"
    finally:
        lab.reset_fault("web-missing-setting")


def test_dependency_down_is_started_by_redis_down_as_a_subflow(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("web-dependency-down")
    assert not lab.redis.answers() and _web_status(lab) == "exited"

    incident_id = new_incident_id()
    state = app_wont_start(target="web", incident_id=incident_id, return_state=True, **FAST)

    assert state.is_completed() and state.name == "Completed", state.message
    assert lab.fault_healthy("web-dependency-down")
    child_id = f"{incident_id}-redis"
    child = report(child_id)
    assert "**Status:** resolved" in child
    assert "| start_redis | approved | policy:start-stopped-redis-in-lab |" in child
    assert "| start_redis | redis lab | yes |" in child
    assert "runs under the lock on web held by the run that called it" in child
    text = report(incident_id)
    assert "**Status:** resolved" in text
    assert "dependency_down" in text and "dependency redis at" in text
    assert f"incident {child_id} ended resolved" in text, "the parent's record names its subflow"
    assert "| restart_container | lab-web | yes |" in text
    assert "3/3 consecutive good probes" in text

    parent_run = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        child_run = client.read_flow_run(run_id_of(child_id))
        assert child_run.parent_task_run_id is not None
        assert client.read_task_run(child_run.parent_task_run_id).flow_run_id == parent_run, \
            "redis-down must run as a subflow of app-wont-start"
