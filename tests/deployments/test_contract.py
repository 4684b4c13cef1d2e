"""The contract between deployments, flows, routes, policies and the scenario kit.

The gateway, the deployment triggers and the drills start any scenario the same way
(``target``, ``dry_run``, ``trigger``, ``incident_id``); routes name deployments that
exist; policies name scenarios and changing tasks that exist; and every changing step of
every flow goes through the kit's one choke point (``incident.kit.change``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from prefect import Task
from prefect.flows import load_flow_from_entrypoint

from gateway.routing import Router
from incident.approval import load_policies
from incident.kit import CONTRACT_PARAMETERS, close_stopped_run
from incident.record import Trigger
from incident.settings import REPO_ROOT
from tasks.common import CHANGING_TAG, READ_ONLY_TAG

#: the runbook scenarios' deployments (drills and reports are deployments of other flows)
DEPLOYMENTS = [d for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
               if "runbook" in d.get("tags", [])]
FLOW_MODULES = sorted(p for p in (REPO_ROOT / "flows").glob("*.py") if not p.name.startswith("_"))
TASK_MODULES = sorted(p.stem for p in (REPO_ROOT / "tasks").glob("*.py") if not p.name.startswith("_"))


def _flow(deployment: dict):
    return load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"]))


def _all_tasks() -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for module in TASK_MODULES:
        mod = importlib.import_module(f"tasks.{module}")
        tasks.update({t.name: t for _, t in inspect.getmembers(mod) if isinstance(t, Task)})
    return tasks


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_scenario_takes_the_contract_parameters(deployment):
    flow = _flow(deployment)
    params = inspect.signature(flow.fn).parameters
    missing = [p for p in CONTRACT_PARAMETERS if p not in params]
    assert not missing, f"{flow.name} lacks contract parameters {missing}"
    extra_without_default = [n for n, p in params.items()
                             if n not in CONTRACT_PARAMETERS and p.default is inspect.Parameter.empty]
    assert not extra_without_default, f"{flow.name}: parameters without defaults {extra_without_default}"
    # what the gateway sends validates against every flow
    validated = flow.validate_parameters({
        "target": "web", "dry_run": True, "incident_id": "INC-20260101-abcdef12",
        "trigger": Trigger(kind="alert", source="alertmanager", summary="x").model_dump(mode="json"),
    })
    assert validated["dry_run"] is True and validated["trigger"].source == "alertmanager"


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_scenario_closes_its_record_whatever_stops_it(deployment):
    flow = _flow(deployment)
    assert close_stopped_run in flow.on_failure_hooks and close_stopped_run in flow.on_crashed_hooks, \
        f"{flow.name}: declare it with @runbook_flow (incident/kit.py)"


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_deployment_trigger_names_its_own_scenario(deployment):
    for trigger in deployment.get("triggers", []):
        assert trigger["match_related"]["prefect.resource.id"] == f"runbooks.scenario.{deployment['name']}"
        assert set(trigger["parameters"]) >= {"target", "incident_id", "trigger"}


def test_every_route_names_a_deployment_that_exists():
    names = {f"{_flow(d).name}/{d['name']}" for d in DEPLOYMENTS}
    router = Router.from_file(REPO_ROOT / "routes.yaml")
    assert router.routes, "routes.yaml has no routes"
    for route in router.routes:
        assert route.scenario in names, f"route {route.name} -> unknown deployment {route.scenario}"


def test_every_deployment_is_routed_from_an_alert():
    routed = {r.scenario for r in Router.from_file(REPO_ROOT / "routes.yaml").routes}
    for d in DEPLOYMENTS:
        assert f"{d['name']}/{d['name']}" in routed, f"no route in routes.yaml starts {d['name']}"


def test_every_policy_names_scenarios_and_changing_tasks_that_exist():
    scenarios = {_flow(d).name for d in DEPLOYMENTS}
    tasks = _all_tasks()
    policies = load_policies(REPO_ROOT / "policies" / "approval.yaml")
    assert policies
    for policy in policies:
        for scenario in policy.scenarios or []:
            assert scenario in scenarios, f"policy {policy.name}: unknown scenario {scenario}"
        for action in policy.actions:
            assert action in tasks, f"policy {policy.name}: no task named {action}"
            assert CHANGING_TAG in tasks[action].tags, f"policy {policy.name}: {action} is not a changing task"


def test_every_task_is_declared_read_only_or_changing():
    for name, task in _all_tasks().items():
        kinds = {CHANGING_TAG, READ_ONLY_TAG} & set(task.tags)
        assert len(kinds) == 1, f"task {name} must use exactly one preset (read_only_task/changing_task)"
        assert task.cache_policy is not None and type(task.cache_policy).__name__ == "_None", \
            f"task {name} must not use the result cache"
        if CHANGING_TAG in task.tags:
            assert task.retries == 0, f"changing task {name} must not be retried blindly"


def _changing_calls(path: Path, changing: set[str]) -> list[str]:
    """Calls of a changing task in a flow module that do not go through ``change(...)``."""
    tree = ast.parse(path.read_text())
    allowed: set[int] = set()
    for node in ast.walk(tree):  # change(incident, target, plan, <task>, ...): the task is passed, not called
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "change":
            allowed.update(id(a) for a in node.args)
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else (
            func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None)
        if name in changing and id(node) not in allowed:
            bad.append(f"{path.name}:{node.lineno} calls {name}")
    return bad


@pytest.mark.parametrize("path", FLOW_MODULES, ids=[p.name for p in FLOW_MODULES])
def test_flows_change_things_only_through_the_kit(path):
    changing = {n for n, t in _all_tasks().items() if CHANGING_TAG in t.tags}
    assert changing, "no changing tasks found"
    assert not _changing_calls(path, changing)


def test_the_choke_point_check_catches_a_direct_call(tmp_path):
    """The AST check above must be able to fail."""
    bad = tmp_path / "bad_flow.py"
    bad.write_text("def f(service):\n    restart_container(service)\n    restart_container.submit(service)\n"
                   "    change(incident, service, plan, restart_container, service)\n")
    assert _changing_calls(bad, {"restart_container"}) == [
        "bad_flow.py:2 calls restart_container", "bad_flow.py:3 calls restart_container"]
