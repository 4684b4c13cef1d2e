"""The service-down runbook against the real lab: real faults, real healing, real pauses."""

from __future__ import annotations

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run

from flows.service_down import service_down
from tasks.http_checks import check_health
from tests.helpers import FlowThread, escalations, new_incident_id, report, run_id_of, start_flow, wait_paused

pytestmark = pytest.mark.lab


def _health(lab) -> int | None:
    return check_health(lab.info.health_url, timeout_s=2).status_code


def _start(**params) -> tuple[FlowThread, str]:
    return start_flow(service_down, target="web", restart_deadline_s=8, verify_deadline_s=40, **params)


def test_killed_container_is_restarted_and_verified(prefect_api, healthy_web):
    lab = healthy_web
    lab.kill_web()
    assert _health(lab) is None, "the fault did not take the service down"

    incident_id = new_incident_id()
    state = service_down(target="web", incident_id=incident_id, return_state=True)

    assert state.is_completed(), state.message
    assert state.name == "Completed"
    assert _health(lab) == 200
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.status == "running"
    assert container.image.tags[0] == "lab-web:1.1", "a restart must not change the image"

    text = report(incident_id)
    assert "**Status:** resolved" in text
    assert "| restart_container | lab-web | yes |" in text
    assert "policy:restart-stateless-container-in-lab" in text
    for phase in ("| detect |", "| diagnose |", "| contain |", "| fix |", "| verify |", "| close |"):
        assert phase in text, f"timeline lacks {phase}"
    assert "exit code 137" in text, "diagnosis should record the kill's exit code"
    assert "# Post-Incident Report" in text and "## Action Items" in text

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name.startswith(incident_id) and "service-down" in run.name
    assert {"severity:P0", "scenario:service-down", "service:web", "env:lab"} <= set(run.tags)


def test_healthy_service_is_left_alone(prefect_api, healthy_web):
    container = healthy_web.docker_client().containers.get(healthy_web.info.container_name)
    started = container.attrs["State"]["StartedAt"]
    state = service_down(target="web", return_state=True)
    assert state.is_completed() and state.name == "Already Fine"
    container.reload()
    assert container.attrs["State"]["StartedAt"] == started, "a healthy container was restarted"


def test_dry_run_changes_nothing(prefect_api, healthy_web):
    lab = healthy_web
    lab.kill_web()
    incident_id = new_incident_id()
    state = service_down(target="web", dry_run=True, incident_id=incident_id, return_state=True)
    assert state.name == "Dry Run", state.message
    assert _health(lab) is None, "dry run healed the service: it changed something"
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.status == "exited"
    text = report(incident_id)
    assert "| restart_container | dry run | dry run |" in text
    assert "| - | none | - | - | - |" in text, "dry run recorded an action"


def test_broken_release_is_rolled_back_after_human_approval(prefect_api, healthy_web):
    lab = healthy_web
    lab.deploy_broken_web()
    assert _health(lab) is None

    thread, incident_id = _start()
    run_id = run_id_of(incident_id)
    paused = wait_paused(run_id)
    assert "approve-rollback-container" in str(paused.state.state_details.pause_key)

    # a bare resume (no decision) must not approve: the server refuses it
    with pytest.raises(RuntimeError, match="'decision' is a required property"):
        resume_flow_run(run_id, run_input={})
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_paused()

    resume_flow_run(run_id, run_input={"decision": "approve", "reason": "bad release 1.2", "approver": "Ada Lovelace"})
    thread.join(timeout=180)
    assert thread.state is not None and thread.state.is_completed(), thread.state
    assert _health(lab) == 200
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.image.tags[0] == "lab-web:1.1"
    assert container.labels["runbooks.previous-image"] == "lab-web:broken"

    text = report(incident_id)
    assert "| rollback_container | approved | Ada Lovelace | bad release 1.2 |" in text
    assert "| rollback_container | lab-web | yes |" in text
    assert "FATAL" in text, "the crash log line belongs in the findings"


def test_rejected_rollback_changes_nothing(prefect_api, healthy_web):
    lab = healthy_web
    lab.deploy_broken_web()
    thread, incident_id = _start()
    run_id = run_id_of(incident_id)
    wait_paused(run_id)
    resume_flow_run(run_id, run_input={"decision": "reject", "reason": "investigating first",
                                       "approver": "Ada Lovelace"})
    thread.join(timeout=120)

    assert thread.state.is_completed() and thread.state.name == "Not Approved"
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.image.tags[0] == "lab-web:broken", "a rejected rollback changed the image"
    text = report(incident_id)
    assert "| rollback_container | rejected | Ada Lovelace | investigating first |" in text
    assert "| rollback_container | lab-web |" not in text
    with get_client(sync_client=True) as client:
        assert "outcome:not-approved" in client.read_flow_run(run_id).tags


def test_approval_timeout_fails_clearly_and_escalates(prefect_api, healthy_web, monkeypatch):
    lab = healthy_web
    monkeypatch.setenv("RUNBOOKS_APPROVAL_TIMEOUT_S", "4")
    lab.deploy_broken_web()
    thread, incident_id = _start()
    thread.join(timeout=180)

    assert thread.state.is_failed()
    message = thread.state.message or ""
    assert "timed out" in message or "within 4 s" in message
    # the restart (lab policy) ran before the rollback's approval timed out: the message says so
    assert "this run changed: restart_container on lab-web" in message, message
    assert "not run: rollback_container on lab-web" in message, message
    assert "nothing was changed" not in message and "changed nothing" not in message, message
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.image.tags[0] == "lab-web:broken", "the rollback ran without approval"
    text = report(incident_id)
    assert "| rollback_container | timed out | nobody |" in text
    assert "| restart_container | lab-web | yes |" in text
    escalated = text.split("## Escalations", 1)[1].split("##", 1)[0]
    assert "this run changed: restart_container on lab-web" in escalated
    assert "nothing changed" not in escalated

    found = escalations(prefect_api, incident_id)
    assert found, "no escalation event reached Prefect"
    assert found[0]["payload"]["target"] == "web"


def test_unknown_target_says_what_exists(prefect_api, lab):
    incident_id = new_incident_id()
    state = service_down(target="no-such-service", incident_id=incident_id, return_state=True)
    assert state.is_failed()
    assert "no-such-service" in state.message and "web" in state.message
    # no record could be opened, but somebody is still told, with what the run knew
    found = escalations(prefect_api, incident_id)
    assert found, "a run that stopped before opening its record was not escalated"
    payload = found[-1]["payload"]
    assert payload["scenario"] == "service-down" and payload["target"] == "no-such-service"
    assert "changed nothing" in payload["reason"]


def test_unreachable_docker_engine_is_a_clear_error(prefect_api, healthy_web, tmp_path, monkeypatch):
    inv = yaml.safe_load(healthy_web.inventory_path.read_text())
    inv["docker_hosts"]["lab"]["base_url"] = f"unix://{tmp_path}/nothing-here.sock"
    inv["docker_hosts"]["lab"]["timeout_s"] = 2
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(path))
    healthy_web.kill_web()
    incident_id = new_incident_id()
    state = service_down(target="web", incident_id=incident_id, return_state=True)
    assert state.is_failed()
    assert "Docker engine did not answer" in state.message
    assert "dockerd" in state.message  # says what to do next
    # an unexpected stop still ends in a closed, true record and an escalation
    text = report(incident_id)
    assert "**Status:** failed" in text
    assert "the run stopped unexpectedly" in text and "this run changed nothing" in text
    assert "## Escalations" in text
    found = escalations(prefect_api, incident_id)
    assert found and "stopped unexpectedly" in found[0]["payload"]["reason"]


def test_an_ssh_host_that_refuses_does_not_fail_the_run(prefect_api, healthy_web):
    """Host resources over SSH are an optional finding: with sshd down a healthy target is
    still Already Fine, and a dead one is still restarted and verified."""
    lab = healthy_web
    lab.stop_component("sshd")
    try:
        state = service_down(target="web", return_state=True)
        assert state.name == "Already Fine", state.message
        lab.kill_web()
        incident_id = new_incident_id()
        state = service_down(target="web", incident_id=incident_id, restart_deadline_s=8,
                             verify_deadline_s=40, return_state=True)
        assert state.is_completed() and state.name == "Completed", state.message
        assert _health(lab) == 200
        text = report(incident_id)
        assert "| host resources | **problem** | not read (" in text
        assert "| restart_container | lab-web | yes |" in text
    finally:
        lab.sshd.up()
