"""The approval form against the real Prefect server: who decides is asked, checked by the
server, and kept in the incident record with the decision, the reason and the time.

A small probe flow goes through the real gate (``incident.kit.change``): its one changing
step writes a marker file, so whether the step ran is a fact on disk. No lab needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run
from prefect.states import State

from incident.approval import ActionPlan
from incident.inventory import Service, Target
from incident.kit import change
from incident.record import open_incident
from tasks.common import ActionResult, changing_task
from tests.helpers import report, run_id_of, start_flow, wait_paused

PROBE = Target(name="probe", service=Service(environment="production", owner="sre",
                                             health_url="http://127.0.0.1:1/health"))


@changing_task
def write_marker(path: str) -> ActionResult:
    marker = Path(path)
    if marker.exists():
        return ActionResult(action="write_marker", target=path, changed=False, detail="already there")
    marker.write_text("written by the approved step\n")
    return ActionResult(action="write_marker", target=path, changed=True, detail="written")


@flow(name="approval-probe")
def approval_probe(incident_id: str, marker: str) -> State:
    """One changing step that no policy covers (production): a human must decide."""
    incident = open_incident("approval-probe", PROBE, None, incident_id, dry_run=False)
    plan = ActionPlan(action="write_marker", target=PROBE.name, runs=f"write {marker}",
                      expected_effect="the marker file exists", undo=f"rm {marker}", destructive=False)
    step = change(incident, PROBE, plan, write_marker, marker)
    if not step.taken:
        return step.closed
    return incident.close("resolved", f"marker written: {step.result.detail}")


def _paused_probe(tmp_path: Path):
    marker = tmp_path / "marker"
    thread, incident_id = start_flow(approval_probe, marker=str(marker))
    run_id = run_id_of(incident_id)
    wait_paused(run_id)
    return thread, incident_id, run_id, marker


def test_approval_needs_a_name_and_the_record_keeps_it(prefect_api, tmp_path):
    thread, incident_id, run_id, marker = _paused_probe(tmp_path)

    # the server checks the answer against the form's schema: no name, or a blank one, is refused
    with pytest.raises(RuntimeError, match="'approver' is a required property"):
        resume_flow_run(run_id, run_input={"decision": "approve", "reason": "looks right"})
    with pytest.raises(RuntimeError, match="approver"):
        resume_flow_run(run_id, run_input={"approver": "   ", "decision": "approve", "reason": "looks right"})
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_paused(), "a refused answer must leave the run waiting"
    assert not marker.exists()

    resume_flow_run(run_id, run_input={"approver": "Ada Lovelace", "decision": "approve",
                                       "reason": "looks right"})
    thread.join(timeout=120)
    assert thread.state is not None and thread.state.is_completed(), thread.state
    assert marker.exists(), "the approved step did not run"
    text = report(incident_id)
    assert "| write_marker | approved | Ada Lovelace | looks right |" in text
    assert "**Status:** resolved" in text


def test_gateway_stand_down_is_signed_by_the_gateway(prefect_api, tmp_path):
    thread, incident_id, run_id, marker = _paused_probe(tmp_path)
    resume_flow_run(run_id, run_input={
        "approver": "alert-gateway (alertmanager resolved)", "decision": "stand-down",
        "reason": "alert resolved (alertmanager) while waiting for approval: resolved without action"})
    thread.join(timeout=120)
    assert thread.state is not None and thread.state.name == "Resolved Without Action", thread.state
    assert not marker.exists(), "standing down ran the step"
    assert "| write_marker | stood down | alert-gateway (alertmanager resolved) |" in report(incident_id)


def test_a_run_cancelled_while_waiting_stops_waiting_and_closes_its_record(prefect_api, tmp_path):
    """Cancelling a waiting run (UI or API) is a decision not to go on: the run stops waiting
    at once instead of polling until the approval timeout, and its record says so."""
    from prefect.states import Cancelling

    thread, incident_id, run_id, marker = _paused_probe(tmp_path)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(message="cancelled from the UI"), force=True)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the run kept waiting after it was cancelled"
    assert not marker.exists(), "the step ran after the run was cancelled"
    text = report(incident_id)
    assert "| write_marker | rejected | run cancelling | cancelled from the UI |" in text
    assert "**Status:** not approved" in text and "write_marker was rejected; nothing changed" in text
