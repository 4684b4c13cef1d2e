"""Drills from their deployments, against the real pipeline: a real fault -> the exporter sees
it -> Prometheus fires -> Alertmanager -> the alert gateway -> the scenario's run -> healed ->
the resolve on the record; the drill grades it and publishes its report.

Each scenario's drill (policies/drills.yaml) runs once (policy mode); one fault is drilled
in game-day mode (a person approves in the UI); a drill whose remediation is broken on purpose
(the kill switch on) reports fail, and the lab is reset either way.
"""

from __future__ import annotations

import threading
import time
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.exceptions import ObjectAlreadyExists
from prefect.flow_engine import run_flow
from prefect.flow_runs import resume_flow_run
from prefect.states import State

from flows.drill import drill
from incident.drills import drill_on, load_drills
from incident.guardrails import KILL_SWITCH
from incident.record import load_record
from lab.faults import FAULTS
from tests.helpers import run_tags, wait_paused

pytestmark = pytest.mark.lab

GAME_DAY = "web-broken-release"  # its rollback needs a person: drilled in game-day mode
#: The drills run here: the data tier's and service-down's, as their monthly deployments run them.
#: The application tier's scenarios heal these same faults from their real alerts in their own
#: tests (tests/flows/test_memory_cpu.py ...), which the 20-minute budget does not allow twice;
#: their drill data is checked below, and `drill-all` runs every drill (README, Drills).
DRILLED_HERE = ("service-down", "db-connections", "db-locks", "redis-down", "disk-full")
POLICY_MODE = [FAULTS[load_drills().drills[scenario].fault] for scenario in DRILLED_HERE]


@pytest.fixture
def quiet(quiet_pipeline):
    return quiet_pipeline


def run_drill(deployment: str, **params) -> tuple[State, UUID]:
    """Create a run of the drill deployment and execute it here, as a runner does."""
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(f"drill/{deployment}")
        run = client.create_flow_run_from_deployment(dep.id, parameters={**dep.parameters, **params})
    state: State = run_flow(drill, flow_run=run, parameters=run.parameters,  # type: ignore[assignment]
                            return_type="state")
    return state, run.id


def drill_report(scenario: str) -> str:
    with get_client(sync_client=True) as client:
        got = client.request("GET", "/artifacts/{key}/latest", path_params={"key": f"drill-{scenario}"})
    return str(got.json()["data"])


def set_kill_switch(value: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.create_variable(VariableCreate(name=KILL_SWITCH, value=value))
        except ObjectAlreadyExists:
            client.update_variable(VariableUpdate(name=KILL_SWITCH, value=value))


def test_every_scenario_has_a_drill_of_a_fault_that_really_alerts():
    drills = load_drills().drills
    for scenario, spec in drills.items():
        assert FAULTS[spec.fault].scenario == scenario and FAULTS[spec.fault].alert, spec
    assert {"service-down", "db-connections", "db-locks", "redis-down", "disk-full"} <= set(drills)


@pytest.mark.parametrize("fault", POLICY_MODE, ids=[f.name for f in POLICY_MODE])
def test_a_drill_detects_heals_and_reports_pass(quiet, fault):
    lab, store = quiet
    seen = {r["id"] for r in store.recent_alerts(1000)}
    state, drill_run = run_drill(f"drill-{fault.scenario}", fault=fault.name)
    text = drill_report(fault.scenario)

    assert state.is_completed() and state.name == "Drill Passed", state.message
    assert f"# Drill of {fault.scenario}: PASS" in text
    assert "| yes | alert |" in text, "detected through the real alert pipeline"
    for check in ("detected", "the runbook healed the fault", "one outage, one incident",
                  "the alert's resolve reached the record", "the lab is back at its baseline"):
        assert f"| {check} | ok |" in text, f"{check} not ok:\n{text}"
    assert lab.fault_healthy(fault.name) and FAULTS[fault.name].is_at_baseline(lab)
    assert "drill-result:pass" in run_tags(drill_run)
    assert drill_on("web") is None, "the drill took its mark off the target"

    opened = [r for r in store.recent_alerts(200) if r["id"] not in seen and r["disposition"] == "opened"]
    assert [(r["source"], r["scenario"]) for r in opened] == [
        ("alertmanager", f"{fault.scenario}/{fault.scenario}")], f"one outage, one remediation: {opened}"
    run_id = UUID(opened[0]["flow_run_id"])
    assert "drill" in run_tags(run_id), "the drill's remediation run is tagged drill"
    record = load_record(run_id)
    assert record is not None and record.drill is not None and record.drill.mode == "policy"
    assert record.outcome == "resolved"
    assert all(a.by.startswith("policy:") for a in record.approvals if a.decision == "approved")


def test_game_day_drill_waits_for_a_person_and_reports_who_answered(quiet):
    lab, store = quiet
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.update(result=run_drill("drill-service-down", fault=GAME_DAY,
                                                                         mode="game-day")), daemon=True)
    thread.start()
    by = time.monotonic() + 120
    while not (opened := [i for i in store.open_incidents() if i.flow_run_id]):
        assert time.monotonic() < by, "the drill's fault never opened an incident"
        time.sleep(0.5)
    run_id = UUID(opened[0].flow_run_id)
    wait_paused(run_id)  # game day: nobody but a person approves the rollback
    resume_flow_run(run_id, run_input={"decision": "approve", "reason": "game day: roll back",
                                       "approver": "game-day on-call"})
    thread.join(timeout=180)
    state, _ = box["result"]  # type: ignore[misc]
    text = drill_report("service-down")
    assert state.is_completed(), state.message
    assert "rollback_container: approved by game-day on-call after" in text
    assert "**Mode:** game-day" in text
    assert lab.fault_healthy(GAME_DAY) and FAULTS[GAME_DAY].is_at_baseline(lab), "reset after the drill"


def test_a_drill_whose_remediation_is_broken_reports_fail_and_resets_the_lab(quiet):
    lab, _ = quiet
    set_kill_switch("on")  # every step becomes a plan: the runbook cannot heal
    try:
        state, drill_run = run_drill("drill-service-down", deadline_s=120)
    finally:
        set_kill_switch("off")
    text = drill_report("service-down")

    assert state.is_failed(), state.message
    assert "# Drill of service-down: FAIL" in text
    assert "| the runbook healed the fault | **FAIL** | the run ended plan only" in text
    assert "| the lab is back at its baseline | ok | reset by the drill |" in text
    assert lab.fault_healthy("web-killed"), "the drill reset the fault it injected"
    assert "drill-result:fail" in run_tags(drill_run)
    trend = text.split("## Trend", 1)[1]
    assert "| pass |" in trend and "| fail |" in trend, "the trend shows the earlier drills of the scenario"
    assert "time to recover (s)" in trend and "✗ not recovered" in trend
