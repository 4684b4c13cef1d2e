"""The memory-cpu runbook against the real lab: the web service leaks memory or spins a thread
(chaos endpoints of lab/labweb.c), the runbook samples `docker stats`, restarts the container and
proves memory and CPU back to their baseline."""

from __future__ import annotations

import threading
from uuid import UUID

import pytest

from flows.memory_cpu import memory_cpu
from tests.helpers import (
    alert_ids, escalations, new_incident_id, report, wait_for_alert_incident, wait_run_final,
)

pytestmark = pytest.mark.lab

#: short samples for the direct runs (the alert's run uses the deployment's defaults)
QUICK = {"samples": 3, "sample_interval_s": 1.0, "verify_samples": 3, "probe_interval_s": 0.5,
         "verify_deadline_s": 30}


def _section(text: str, heading: str) -> str:
    return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def _started_at(lab) -> str:
    return lab.docker_client().containers.get(lab.info.container_name).attrs["State"]["StartedAt"]


def test_memory_leak_alert_restarts_by_policy_and_keeps_the_samples(quiet_pipeline):
    lab, store = quiet_pipeline
    since = alert_ids(store)
    before = _started_at(lab)
    lab.inject("web-memory-leak")

    row = wait_for_alert_incident(store, "memory-cpu", since)
    run = wait_run_final(UUID(row["flow_run_id"]))

    assert run.state.is_completed() and run.state.name == "Completed", run.state.message
    assert lab.fault_healthy("web-memory-leak")
    assert _started_at(lab) != before, "the container was not restarted"
    text = report(row["incident_id"])
    assert "**Status:** resolved" in text
    assert "AppMemoryHigh" in _section(text, "Trigger")
    assert "| restart_container | approved | policy:restart-stateless-container-in-lab |" in text
    assert "| restart_container | lab-web | yes | restarted;" in text
    findings = _section(text, "Findings")
    assert "| memory | **problem** | lab-web: rss " in findings and "near the limit" in findings
    assert "| sample 1/4 | **problem** |" in findings, "each diagnosis sample is a finding"
    assert "limit 67108864 B (64.0 MiB)" in findings, "a sample names its bytes and the limit"
    assert "| after restart 1/3 | ok |" in findings and "| memory after restart | ok |" in findings
    assert "| processes in container | ok | container lab-web" in findings
    assert "| host processes | ok | host 127.0.0.1:" in findings
    assert "samples of lab-web (time, rss, share of the limit, CPU):" in _section(text, "Timeline")
    assert "under the baseline" in _section(text, "Verification")


def test_cpu_spin_is_restarted_and_verified(prefect_api, healthy_lab):
    lab = healthy_lab
    before = _started_at(lab)
    lab.inject("web-cpu-spin")
    incident_id = new_incident_id()

    state = memory_cpu(target="web", incident_id=incident_id, **QUICK, return_state=True)

    assert state.is_completed() and state.name == "Completed", state.message
    assert lab.fault_healthy("web-cpu-spin")
    assert _started_at(lab) != before, "the container was not restarted"
    text = report(incident_id)
    assert "**Status:** resolved" in text and "**Severity:** P2" in text
    findings = _section(text, "Findings")
    assert "| cpu | **problem** |" in findings and "SUSTAINED" in findings
    assert "| memory | ok |" in findings, "a spin is not a leak"
    assert "| cpu after restart | ok |" in findings and "under the threshold" in findings
    assert "| restart_container | approved | policy:restart-stateless-container-in-lab |" in text
    assert "| restart_container | lab-web | yes |" in text


def test_a_leak_that_comes_back_after_the_restart_escalates(prefect_api, healthy_lab):
    """The restart runs (policy) but the service leaks again at once (here: the leak injected
    again as soon as the new process answers): verify sees memory above the baseline (growing,
    or already at the leak's cap), escalates, fails."""
    lab = healthy_lab
    before = _started_at(lab)
    lab.web.chaos("leak=1")  # growing from now on: the diagnosis sees it grow
    stop = threading.Event()

    def leak_again() -> None:  # as soon as the restarted service answers: it leaks again
        while not stop.wait(0.05):
            if _started_at(lab) != before and lab.web.healthy():
                lab.web.chaos("leak=1")
                return

    watcher = threading.Thread(target=leak_again, daemon=True)
    watcher.start()
    try:
        incident_id = new_incident_id()
        state = memory_cpu(target="web", incident_id=incident_id, **QUICK, return_state=True)

        assert state.is_failed(), state
        assert "the restart did not hold" in state.message
        # growing again, or already back at the leak's cap when the samples start: both above the baseline
        assert "memory growing again" in state.message or "(baseline 50%)" in state.message
        assert "roll it back" in state.message, "the message says what to do next"
        text = report(incident_id)
        assert "**Status:** failed" in text
        assert "| restart_container | lab-web | yes |" in text
        escalated = _section(text, "Escalations")
        assert "this run changed: restart_container on lab-web" in escalated
        findings = _section(text, "Findings")
        assert "| memory after restart | **problem** |" in findings
        assert "| processes after restart | **problem** |" in findings
        found = escalations(prefect_api, incident_id)
        assert found and found[0]["payload"]["scenario"] == "memory-cpu"
    finally:
        stop.set()
        watcher.join(timeout=5)
        lab.reset_fault("web-memory-leak")


def test_a_healthy_service_is_left_alone(prefect_api, healthy_lab):
    before = _started_at(healthy_lab)
    incident_id = new_incident_id()
    state = memory_cpu(target="web", incident_id=incident_id, samples=2, sample_interval_s=1.0,
                       return_state=True)
    assert state.is_completed() and state.name == "Already Fine", state.message
    assert _started_at(healthy_lab) == before, "a healthy container was restarted"
    text = report(incident_id)
    assert "| memory | ok |" in text and "| cpu | ok |" in text
    assert "| - | none | - | - | - |" in text
