"""Every deployment in prefect.yaml resolves, and one really runs on a worker."""

from __future__ import annotations

import time

import pytest
import yaml
from prefect.deployments import run_deployment
from prefect.flows import load_flow_from_entrypoint

from deployments.stack import WORK_POOL, deploy_all, prefect_env, start_worker, stop_pid
from incident.settings import REPO_ROOT
from tasks.http_checks import check_health

PREFECT_YAML = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = PREFECT_YAML["deployments"]


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
def test_deployment_heals_killed_container_through_a_worker(prefect_api, healthy_web, state_dir):
    env = prefect_env(state_dir / "prefect", prefect_api)
    deploy_all(env)
    worker = start_worker(env, state_dir)
    try:
        healthy_web.kill_web()
        assert check_health(healthy_web.info.health_url, timeout_s=2).status_code is None
        run = run_deployment("service-down/service-down", parameters={"target": "web"}, timeout=300)
        assert run.state.is_completed(), run.state
        assert check_health(healthy_web.info.health_url, timeout_s=2).status_code == 200
        assert "severity:P0" in run.tags
    finally:
        stop_pid(worker)
