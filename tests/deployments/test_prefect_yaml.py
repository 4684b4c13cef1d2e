"""Every deployment in prefect.yaml resolves, and one really runs on a worker."""

from __future__ import annotations

import time

import pytest
import yaml
import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.events import emit_event
from prefect.flows import load_flow_from_entrypoint

from deployments.stack import WORK_POOL, deploy_all, prefect_env, start_worker, stop_pid
from gateway.intake import DISPATCH_EVENT
from incident.settings import REPO_ROOT
from tasks.http_checks import check_health

PREFECT_YAML = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
ALL = PREFECT_YAML["deployments"]
DEPLOYMENTS = [d for d in ALL if "runbook" in d.get("tags", [])]  # the scenarios' own
OTHERS = [d for d in ALL if d not in DEPLOYMENTS]


@pytest.mark.parametrize("deployment", OTHERS, ids=[d["name"] for d in OTHERS])
def test_drill_and_report_deployments_resolve(deployment):
    flow = load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"]))
    flow.validate_parameters(deployment.get("parameters", {}))
    assert deployment["work_pool"]["name"] == WORK_POOL
    for schedule in deployment.get("schedules", []):  # monthly on a weekday needs day_or false
        assert schedule.get("day_or") is False and schedule.get("timezone"), schedule
    scenario = deployment.get("parameters", {}).get("scenario")
    if scenario:
        from incident.drills import load_drills

        assert scenario in load_drills().drills, f"{deployment['name']}: no drill of {scenario}"
        assert scenario in [d["name"] for d in DEPLOYMENTS], f"{deployment['name']}: no such scenario"


def test_every_scenario_has_a_drill():
    from incident.drills import load_drills

    drilled = {d["parameters"]["scenario"] for d in OTHERS if "scenario" in d.get("parameters", {})}
    assert drilled == {d["name"] for d in DEPLOYMENTS} == set(load_drills().drills)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_entrypoint_and_parameters_resolve(deployment):
    flow = load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"]))
    assert flow.name == deployment["name"], "deployment and flow should share the scenario name"
    validated = flow.validate_parameters(deployment.get("parameters", {}))
    assert "target" in validated
    assert deployment["work_pool"]["name"] == WORK_POOL
    module_doc = __import__(flow.fn.__module__, fromlist=["_"]).__doc__
    assert module_doc and "Runbook" in module_doc, "flow module must list the runbook steps it automates"


@pytest.mark.lab
def test_automation_path_heals_killed_container_through_a_worker(deployed, healthy_web, state_dir):
    """Prefect's default path: dispatch event -> prefect.yaml trigger -> worker -> flow."""
    env = prefect_env(state_dir / "prefect", deployed)
    # the triggers are live only when deployed for automation dispatch (off by default)
    deploy_all({**env, "RUNBOOKS_GATEWAY_DISPATCH": "automation"})
    worker = start_worker(env, state_dir)
    incident_id = f"INC-AUTO-{uuid.uuid4().hex[:8]}"
    try:
        healthy_web.kill_web()
        assert check_health(healthy_web.info.health_url, timeout_s=2).status_code is None
        emit_event(DISPATCH_EVENT,
                   resource={"prefect.resource.id": f"runbooks.incident.{incident_id}"},
                   related=[{"prefect.resource.id": "runbooks.scenario.service-down",
                             "prefect.resource.role": "scenario"}],
                   payload={"target": "web", "incident_id": incident_id,
                            "trigger": {"kind": "alert", "source": "alertmanager",
                                        "summary": "ServiceDown web", "fingerprint": "abc",
                                        "fired_at": None}})
        deadline = time.monotonic() + 240
        with get_client(sync_client=True) as client:
            while True:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[f"incident:{incident_id}"])), limit=1)
                if runs and runs[0].state and runs[0].state.is_final():
                    break
                assert time.monotonic() < deadline, "the automation never ran the deployment"
                time.sleep(1)
        assert runs[0].state.is_completed(), runs[0].state
        assert runs[0].parameters["trigger"]["source"] == "alertmanager"
        assert check_health(healthy_web.info.health_url, timeout_s=2).status_code == 200
    finally:
        stop_pid(worker)
        deploy_all({**env, "RUNBOOKS_GATEWAY_DISPATCH": "runner"})  # the session's default again
