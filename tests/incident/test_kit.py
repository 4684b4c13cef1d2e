"""The scenario kit's promise against the real Prefect server: whatever ends a run, its record
is closed, true about what changed, and escalated; a run that gives up on purpose is not
logged as a crash. Probe flows go through the real kit; no lab needed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.runtime import flow_run as current_run
from prefect.states import State

from incident.approval import ActionPlan
from incident.guardrails import GuardrailRules, LockRules
from incident.inventory import Service, Severity, Target
from incident.kit import change, escalate_and_fail, runbook_flow, take_target_lock
from incident.locks import TargetLock
from incident.record import (RECORD_INPUT_PREFIX, add_run_tags, artifact_key_for, load_record,
                             open_incident)
from tasks.common import ActionResult, changing_task
from tests.helpers import escalations, new_incident_id, report, run_id_of, run_tags

PROBE = Target(name="probe", service=Service(environment="staging", owner="sre",
                                             health_url="http://127.0.0.1:1/health"))


@changing_task
def touch_then_break(path: str) -> ActionResult:
    """Changes something, then fails in a way no runbook expects."""
    Path(path).write_text("half done\n")
    raise OSError("the disk went away mid-step")


@changing_task
def touch_probe(path: str) -> ActionResult:
    """A harmless changing step."""
    Path(path).write_text("done\n")
    return ActionResult(action="touch_probe", target="probe", changed=True, detail=f"wrote {path}")


ONE_STEP = Target(name="kit-one-step-probe", service=PROBE.service)


@runbook_flow("kit-one-step")
def kit_one_step(incident_id: str, marker: str) -> State:
    incident = open_incident("kit-one-step", ONE_STEP, None, incident_id, dry_run=False)
    add_run_tags("lock:kit-one-step-probe")  # a mark of this module: kept by every later retag
    incident.enter("diagnose", "looking")
    incident.finding("probe", False, "it is broken")
    incident.enter("contain", "containing")
    incident.set_severity(Severity.P1, "the probe is down")
    plan = ActionPlan(action="touch_probe", target="probe", runs=f"touch {marker}",
                      expected_effect="a file", undo=f"rm {marker}", destructive=False)
    change(incident, ONE_STEP, plan, touch_probe, marker)
    incident.verified("the file is there")  # goes out with the next publish
    incident.publish()
    versions = _versions(incident.record.artifact_key)
    incident.publish()  # nothing new: not published again
    assert _versions(incident.record.artifact_key) == versions, "an unchanged record was republished"
    return incident.close("resolved", "touched")


@runbook_flow("kit-probe")
def kit_probe(incident_id: str, how: str, marker: str = "") -> State:
    incident = open_incident("kit-probe", PROBE, None, incident_id, dry_run=False)
    if how == "gives-up":
        escalate_and_fail(incident, "the probe gives up on purpose")
    if how == "breaks-mid-step":
        plan = ActionPlan(action="touch_then_break", target="probe", runs=f"touch {marker}",
                          expected_effect="a file", undo=f"rm {marker}", destructive=False)
        change(incident, PROBE, plan, touch_then_break, marker)
    raise RuntimeError("an unexpected bug")


def _versions(key: str) -> int:
    with get_client(sync_client=True) as client:
        return len(client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))


@pytest.fixture
def every_step_approved(tmp_path, monkeypatch):
    path = tmp_path / "policies.yaml"
    path.write_text("policies:\n  - name: probe-policy\n    description: probes may\n"
                    "    actions: [touch_then_break, touch_probe]\n    environments: [staging]\n"
                    "    require_stateless: false\n")
    monkeypatch.setenv("RUNBOOKS_POLICIES", str(path))


def _errors_with_traceback(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "prefect.flow_runs" and r.levelno >= logging.ERROR
            and r.exc_info]


def test_giving_up_on_purpose_is_one_info_line_not_a_crash(prefect_api, caplog):
    caplog.set_level(logging.INFO)
    incident_id = new_incident_id()
    state = kit_probe(incident_id=incident_id, how="gives-up", return_state=True)
    assert state.is_failed()
    assert _errors_with_traceback(caplog) == [], "an intended failure was logged as a crash"
    assert any("ends Failed on purpose" in r.getMessage() for r in caplog.records)
    text = report(incident_id)
    assert "**Status:** failed" in text and "this run changed nothing" in text


def test_an_unexpected_error_keeps_its_traceback_and_closes_the_record(prefect_api, caplog):
    caplog.set_level(logging.INFO)
    incident_id = new_incident_id()
    state = kit_probe(incident_id=incident_id, how="breaks", return_state=True)
    assert state.is_failed()
    assert _errors_with_traceback(caplog), "a real error must keep its traceback"
    text = report(incident_id)
    assert "**Status:** failed" in text and "the run stopped unexpectedly" in text
    found = escalations(prefect_api, incident_id)
    assert found, "nobody was told"
    payload = found[-1]["payload"]
    assert payload["scenario"] == "kit-probe" and payload["environment"] == "staging"
    assert payload["outcome"] == "failed" and payload["target"] == "probe"


def test_a_step_that_dies_half_way_is_named_as_unknown(prefect_api, tmp_path, every_step_approved):
    incident_id = new_incident_id()
    marker = tmp_path / "marker"
    state = kit_probe(incident_id=incident_id, how="breaks-mid-step", marker=str(marker),
                      return_state=True)
    assert state.is_failed() and marker.exists(), "the probe step should have half-run"
    text = report(incident_id)
    assert "starting touch_then_break on probe" in text, "the step was not recorded before it ran"
    assert "touch_then_break on probe was started and did not report back" in text
    assert "its effect is unknown" in text


def test_one_steps_events_publish_once_and_the_saved_record_is_the_newest(
        prefect_api, tmp_path, every_step_approved):
    incident_id = new_incident_id()
    marker = tmp_path / "marker"
    state = kit_one_step(incident_id=incident_id, marker=str(marker), return_state=True)
    assert state.is_completed(), state.message
    text = report(incident_id)
    for line in ("severity P1: the probe is down", "approval for touch_probe: approved by policy:probe-policy",
                 "starting touch_probe on probe", "touch_probe on probe: wrote", "the file is there",
                 "resolved: touched"):
        assert line in text, f"{line!r} is not in the report"
    # opened, diagnose, contain, the step (declared, plan, approval, starting), the action, the
    # explicit publish (the verification), the close
    assert _versions(artifact_key_for(incident_id)) == 7
    run_id = run_id_of(incident_id)
    saved = load_record(run_id)
    assert saved is not None and saved.outcome == "resolved" and saved.verification == "the file is there"
    with get_client(sync_client=True) as client:
        copies = client.filter_flow_run_input(run_id, RECORD_INPUT_PREFIX, 100, set())
    assert len(copies) == 1, "the previous copies of the record are deleted"
    tags = run_tags(run_id)
    assert {"lock:kit-one-step-probe", "severity:P1", "outcome:resolved", "auto-fix"} <= set(tags), tags
    assert "severity:P2" not in tags


# -- a subflow on its parent's target runs under the parent's lock ---------------------------------
LOCKED = Target(name="kit-subflow-probe", service=PROBE.service)
NO_WAIT = GuardrailRules(lock=LockRules(wait_s=0, lease_s=60, poll_s=0.5))
#: what the probe parent saw while it ran (a flow's return value is its state)
SEEN: dict[str, object] = {}


def _lock_is_free() -> bool:
    """Take and give back the probe target's lock at once, as an unrelated run would."""
    other = TargetLock(LOCKED.name, None, NO_WAIT.lock)
    if other.acquire(lambda holder: None) is None:
        return False
    other.release()
    return True


@runbook_flow("kit-probe-child")
def kit_child(incident_id: str) -> State:
    incident = open_incident("kit-probe-child", LOCKED, None, incident_id, dry_run=False)
    take_target_lock(incident, LOCKED, NO_WAIT, current_run.get_id())  # wait_s 0: fails if it waits
    return incident.close("resolved", "ran under its parent's lock")


@runbook_flow("kit-probe-parent")
def kit_parent(incident_id: str, child_id: str) -> State:
    incident = open_incident("kit-probe-parent", LOCKED, None, incident_id, dry_run=False)
    take_target_lock(incident, LOCKED, NO_WAIT, current_run.get_id())
    SEEN["child"] = kit_child(incident_id=child_id, return_state=True)
    SEEN["free after the child"] = _lock_is_free()
    return incident.close("resolved", "the child ran")


def test_a_subflow_on_the_same_target_runs_under_its_parents_lock(prefect_api):
    parent_id, child_id = new_incident_id(), new_incident_id()
    state = kit_parent(incident_id=parent_id, child_id=child_id, return_state=True)

    assert state.is_completed(), state.message
    child = SEEN["child"]
    assert isinstance(child, State) and child.is_completed(), child
    assert "runs under the lock on kit-subflow-probe held by the run that called it" in report(child_id)
    assert "took the lock on kit-subflow-probe" in report(parent_id)
    assert SEEN["free after the child"] is False, "the child gave back its parent's lock"
    assert _lock_is_free(), "the lock must be free once the parent ended"


def test_a_run_that_is_no_subflow_of_the_holder_still_waits(prefect_api):
    holder = TargetLock(LOCKED.name, None, NO_WAIT.lock)
    assert holder.acquire(lambda who: None) is not None
    try:
        incident_id = new_incident_id()
        state = kit_child(incident_id=incident_id, return_state=True)
        assert state.is_failed(), "a run beside the holder must not run under its lock"
        assert "the lock on kit-subflow-probe stayed busy" in report(incident_id)
    finally:
        holder.release()
