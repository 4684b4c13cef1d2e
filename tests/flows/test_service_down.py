"""The service-down runbook against the real lab: real faults, real healing, real pauses."""

from __future__ import annotations

import os
import threading
import time
import uuid

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.client.schemas.filters import FlowRunFilterTags
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.flow_runs import resume_flow_run

from flows.service_down import service_down
from incident.escalation import ESCALATED_EVENT
from tasks.http_checks import check_health

pytestmark = pytest.mark.lab


def _health(lab) -> int | None:
    return check_health(lab.info.health_url, timeout_s=2).status_code


def _run_id_of(incident_id: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"incident:{incident_id}"]))
            )
            if runs:
                return runs[0].id
            time.sleep(0.5)
    raise AssertionError(f"no flow run tagged incident:{incident_id}")


def _wait_paused(run_id, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_paused():
                keyset = run.state.state_details.run_input_keyset or {}
                try:  # the form's schema is saved just after the pause; the UI needs it too
                    client.read_flow_run_input(run_id, keyset["schema"])
                    return run
                except (KeyError, ObjectNotFound, PrefectHTTPStatusError):
                    pass
            assert not (run.state and run.state.is_final()), f"run ended before pausing: {run.state}"
            time.sleep(0.5)
    raise AssertionError("the run never paused for approval")


def _report(incident_id: str) -> str:
    """The latest version of the incident's report artifact, as the UI shows it."""
    key = "incident-" + incident_id.lower()
    resp = httpx.get(f"{os.environ['PREFECT_API_URL']}/artifacts/{key}/latest", timeout=10)
    assert resp.status_code == 200, f"no artifact with key {key}: {resp.status_code}"
    return resp.json()["data"]


class FlowThread(threading.Thread):
    """Run the flow in the background, as a worker would, keeping its final state."""

    def __init__(self, **params):
        super().__init__(daemon=True)
        self.params = params
        self.state = None

    def run(self):
        self.state = service_down(**self.params, return_state=True)


def _start(**params) -> tuple[FlowThread, str]:
    incident_id = f"INC-TEST-{uuid.uuid4().hex[:8]}"
    thread = FlowThread(target="web", incident_id=incident_id, restart_deadline_s=8,
                        verify_deadline_s=40, **params)
    thread.start()
    return thread, incident_id


def test_killed_container_is_restarted_and_verified(prefect_api, healthy_web):
    lab = healthy_web
    lab.kill_web()
    assert _health(lab) is None, "the fault did not take the service down"

    incident_id = f"INC-TEST-{uuid.uuid4().hex[:8]}"
    state = service_down(target="web", incident_id=incident_id, return_state=True)

    assert state.is_completed(), state.message
    assert state.name == "Completed"
    assert _health(lab) == 200
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.status == "running"
    assert container.image.tags[0] == "lab-web:1.1", "a restart must not change the image"

    report = _report(incident_id)
    assert "**Status:** resolved" in report
    assert "| restart_container | lab-web | yes |" in report
    assert "policy:restart-stateless-container-in-lab" in report
    for phase in ("| detect |", "| diagnose |", "| contain |", "| fix |", "| verify |", "| close |"):
        assert phase in report, f"timeline lacks {phase}"
    assert "exit code 137" in report, "diagnosis should record the kill's exit code"
    assert "# Post-Incident Report" in report and "## Action Items" in report

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
    incident_id = f"INC-TEST-{uuid.uuid4().hex[:8]}"
    state = service_down(target="web", dry_run=True, incident_id=incident_id, return_state=True)
    assert state.name == "Dry Run", state.message
    assert _health(lab) is None, "dry run healed the service: it changed something"
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.status == "exited"
    report = _report(incident_id)
    assert "| restart_container | dry run | dry run |" in report
    assert "| - | none | - | - | - |" in report, "dry run recorded an action"


def test_broken_release_is_rolled_back_after_human_approval(prefect_api, healthy_web):
    lab = healthy_web
    lab.deploy_broken_web()
    assert _health(lab) is None

    thread, incident_id = _start()
    run_id = _run_id_of(incident_id)
    paused = _wait_paused(run_id)
    assert "approve-rollback-container" in str(paused.state.state_details.pause_key)

    # a bare resume (no decision) must not approve: the server refuses it
    with pytest.raises(RuntimeError, match="'decision' is a required property"):
        resume_flow_run(run_id, run_input={})
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_paused()

    resume_flow_run(run_id, run_input={"decision": "approve", "reason": "bad release 1.2"})
    thread.join(timeout=180)
    assert thread.state is not None and thread.state.is_completed(), thread.state
    assert _health(lab) == 200
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.image.tags[0] == "lab-web:1.1"
    assert container.labels["runbooks.previous-image"] == "lab-web:broken"

    report = _report(incident_id)
    assert "| rollback_container | approved | human | bad release 1.2 |" in report
    assert "| rollback_container | lab-web | yes |" in report
    assert "FATAL" in report, "the crash log line belongs in the findings"


def test_rejected_rollback_changes_nothing(prefect_api, healthy_web):
    lab = healthy_web
    lab.deploy_broken_web()
    thread, incident_id = _start()
    run_id = _run_id_of(incident_id)
    _wait_paused(run_id)
    resume_flow_run(run_id, run_input={"decision": "reject", "reason": "investigating first"})
    thread.join(timeout=120)

    assert thread.state.is_completed() and thread.state.name == "Not Approved"
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.image.tags[0] == "lab-web:broken", "a rejected rollback changed the image"
    report = _report(incident_id)
    assert "| rollback_container | rejected | human | investigating first |" in report
    assert "| rollback_container | lab-web |" not in report
    with get_client(sync_client=True) as client:
        assert "outcome:not-approved" in client.read_flow_run(run_id).tags


def test_approval_timeout_fails_clearly_and_escalates(prefect_api, healthy_web, monkeypatch):
    lab = healthy_web
    monkeypatch.setenv("RUNBOOKS_APPROVAL_TIMEOUT_S", "4")
    lab.deploy_broken_web()
    thread, incident_id = _start()
    thread.join(timeout=180)

    assert thread.state.is_failed()
    assert "timed out" in thread.state.message or "within 4 s" in thread.state.message
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.image.tags[0] == "lab-web:broken"
    report = _report(incident_id)
    assert "| rollback_container | timed out | nobody |" in report
    assert "## Escalations" in report

    deadline = time.monotonic() + 30
    found = []
    while time.monotonic() < deadline and not found:
        resp = httpx.post(f"{prefect_api}/events/filter", timeout=10, json={
            "filter": {"event": {"name": [ESCALATED_EVENT]},
                       "resource": {"id": [f"runbooks.incident.{incident_id}"]}},
            "limit": 10,
        })
        resp.raise_for_status()
        found = resp.json()["events"]
        time.sleep(0.5)
    assert found, "no escalation event reached Prefect"
    assert found[0]["payload"]["target"] == "web"


def test_unknown_target_says_what_exists(prefect_api, lab):
    state = service_down(target="no-such-service", return_state=True)
    assert state.is_failed()
    assert "no-such-service" in state.message and "web" in state.message


def test_unreachable_docker_engine_is_a_clear_error(prefect_api, healthy_web, tmp_path, monkeypatch):
    inv = yaml.safe_load(healthy_web.inventory_path.read_text())
    inv["docker_hosts"]["lab"]["base_url"] = f"unix://{tmp_path}/nothing-here.sock"
    inv["docker_hosts"]["lab"]["timeout_s"] = 2
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(path))
    healthy_web.kill_web()
    state = service_down(target="web", return_state=True)
    assert state.is_failed()
    assert "Docker engine did not answer" in state.message
    assert "dockerd" in state.message  # says what to do next
