"""The deployment triggers of prefect.yaml can start remediations only in automation mode.

Each trigger is an automation on the server that starts a remediation for anyone who can
emit a ``runbooks.incident.dispatch`` event. ``deploy_all`` creates them enabled only when
``RUNBOOKS_GATEWAY_DISPATCH=automation``; in the default runner mode (and shadow) they
exist, disabled. Read back from the real server's automations.
"""

from __future__ import annotations

import pytest
import yaml
from prefect.client.orchestration import get_client

from deployments.stack import StackError, deploy_all, prefect_env
from incident.settings import REPO_ROOT

SCENARIOS = [d["name"] for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
             if d.get("triggers")]


def _trigger_automations() -> dict[str, list[bool]]:
    """For each deployment with a trigger: the enabled flag of each automation related to it
    (``prefect deploy`` replaces them on every deploy, so there is one per trigger)."""
    found: dict[str, list[bool]] = {}
    with get_client(sync_client=True) as client:
        for name in SCENARIOS:
            deployment = client.read_deployment_by_name(f"{name}/{name}")
            automations = client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")
            found[name] = [a.enabled for a in automations]
    return found


def _env(state_dir, api_url, dispatch: str | None) -> dict[str, str]:
    env = prefect_env(state_dir / "prefect", api_url)
    env.pop("RUNBOOKS_GATEWAY_DISPATCH", None)
    if dispatch is not None:
        env["RUNBOOKS_GATEWAY_DISPATCH"] = dispatch
    return env


def test_triggers_are_live_only_in_automation_mode(deployed, state_dir):
    assert SCENARIOS, "prefect.yaml declares no deployment trigger"
    try:
        deploy_all(_env(state_dir, deployed, "automation"))
        live = _trigger_automations()
        assert all(flags == [True] for flags in live.values()), f"automation mode: {live}"
    finally:
        deploy_all(_env(state_dir, deployed, None))  # back to the session's default mode
    default = _trigger_automations()
    assert all(flags == [False] for flags in default.values()), f"default (runner) mode: {default}"


def test_shadow_mode_deploys_the_triggers_disabled(deployed, state_dir):
    deploy_all(_env(state_dir, deployed, "shadow"))
    shadow = _trigger_automations()
    assert all(flags == [False] for flags in shadow.values()), f"shadow mode: {shadow}"


def test_unknown_dispatch_mode_is_refused_before_deploying(deployed, state_dir):
    with pytest.raises(StackError, match="runner, automation or shadow"):
        deploy_all(_env(state_dir, deployed, "automatic"))
