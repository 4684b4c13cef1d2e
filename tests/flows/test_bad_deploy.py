"""The bad-deploy runbook against the real lab: a release that answers 30 % of its requests
with 500 raises the real HighErrorRate alert; the run rolls it back once a person approves,
and proves the error rate stays under the threshold for a whole window."""

from __future__ import annotations

from uuid import UUID

import pytest
import yaml
from prefect.flow_runs import resume_flow_run

from flows.bad_deploy import bad_deploy
from incident.inventory import load_target
from tasks.prometheus import error_ratio
from tests.helpers import (alert_ids, escalations, new_incident_id, report, wait_for, wait_for_alert_incident,
                           wait_paused, wait_run_final)

pytestmark = pytest.mark.lab

FAULT = "web-error-release"


def _image(lab) -> str:
    return lab.docker_client().containers.get(lab.info.container_name).image.tags[0]


def test_error_release_alert_is_rolled_back_after_approval(quiet_pipeline, prefect_api):
    lab, store = quiet_pipeline
    since = alert_ids(store)
    lab.inject(FAULT)
    row = wait_for_alert_incident(store, "bad-deploy", since)
    assert row["source"] == "alertmanager"
    run_id = UUID(row["flow_run_id"])
    wait_paused(run_id)
    resume_flow_run(run_id, run_input={"decision": "approve", "reason": "1.2 fails a third of prices",
                                       "approver": "on-call test"})
    run = wait_run_final(run_id)

    assert run.state.is_completed() and run.state.name == "Completed", run.state.message
    assert lab.fault_healthy(FAULT)
    assert _image(lab) == "lab-web:1.1"
    text = report(row["incident_id"])
    assert "**Status:** resolved" in text
    assert "HighErrorRate" in text
    assert "| error rate | **problem** |" in text and "of requests answered 5xx over the last" in text
    assert "| recent deploy | **problem** |" in text and "runs lab-web:1.2-errors" in text
    assert "replacing lab-web:1.1" in text
    assert "| rollback_container | approved | on-call test | 1.2 fails a third of prices |" in text
    assert "| rollback_container | lab-web | yes |" in text
    assert "| error rate after rollback | ok | the error rate stayed under 5.0 % for a whole" in text
    for phase in ("| diagnose |", "| contain |", "| fix |", "| verify |", "| close |"):
        assert phase in text, f"timeline lacks {phase}"


def test_rejected_rollback_changes_nothing_and_escalates(quiet_pipeline, prefect_api):
    lab, store = quiet_pipeline
    since = alert_ids(store)
    lab.inject(FAULT)
    try:
        row = wait_for_alert_incident(store, "bad-deploy", since)
        run_id = UUID(row["flow_run_id"])
        wait_paused(run_id)
        resume_flow_run(run_id, run_input={"decision": "reject", "reason": "fixing forward",
                                           "approver": "on-call test"})
        run = wait_run_final(run_id)

        assert run.state.is_completed() and run.state.name == "Not Approved", run.state.message
        assert "nothing changed" in run.state.message
        assert _image(lab) == "lab-web:1.2-errors", "a rejected rollback changed the image"
        text = report(row["incident_id"])
        assert "**Status:** not approved" in text
        assert "| rollback_container | rejected | on-call test | fixing forward |" in text
        assert "| - | none | - | - | - |" in text, "a rejected rollback recorded an action"
        escalated = text.split("## Escalations", 1)[1].split("##", 1)[0]
        assert "was rejected by on-call test" in escalated and "nothing was changed" in escalated
        found = escalations(prefect_api, row["incident_id"])
        assert found and "rejected" in found[-1]["payload"]["reason"]
    finally:
        lab.reset_fault(FAULT)  # the alert resolves; the next test starts from a healthy lab


def test_healthy_release_is_left_alone(alert_pipeline, healthy_lab):
    web = healthy_lab.docker_client().containers.get(healthy_lab.info.container_name)
    target = load_target("web")
    threshold = target.service.app.error_rate_threshold if target.service.app else 0.05

    def calm() -> bool:  # traffic seen, and an earlier test's errors out of Prometheus's window
        rate = error_ratio(target)
        return rate.ratio is not None and rate.under(threshold)

    wait_for(calm, "the lab's traffic in Prometheus, under the error threshold", 30)
    state = bad_deploy(target="web", return_state=True)
    assert state.is_completed() and state.name == "Already Fine", state.message
    assert "(under 5.0 %)" in state.message
    assert healthy_lab.docker_client().containers.get(web.name).id == web.id, "a healthy release was replaced"


def test_unreachable_prometheus_is_a_clear_error(prefect_api, lab, tmp_path, monkeypatch):
    inv = yaml.safe_load(lab.inventory_path.read_text())
    inv["services"]["web"]["app"]["prometheus_url"] = "http://127.0.0.1:9"
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(path))
    incident_id = new_incident_id()
    state = bad_deploy(target="web", incident_id=incident_id, return_state=True)

    assert state.is_failed()
    assert "Prometheus did not answer" in state.message and "http://127.0.0.1:9" in state.message
    assert "app.prometheus_url" in state.message  # says what to check
    text = report(incident_id)
    assert "**Status:** failed" in text and "this run changed nothing" in text
    assert "## Escalations" in text
