from __future__ import annotations

import pytest

from incident.approval import ActionPlan, ApprovalForm, load_policies, matching_policy
from incident.errors import ConfigurationError
from incident.inventory import Service, Target
from incident.settings import REPO_ROOT


def _target(environment: str, stateless: bool = True) -> Target:
    return Target(name="web", service=Service(environment=environment, owner="sre", stateless=stateless,
                                              health_url="http://127.0.0.1:1/health"))


def _plan(action: str) -> ActionPlan:
    return ActionPlan(action=action, target="web", runs="x", expected_effect="y", undo="z",
                      destructive=action == "rollback_container")


def test_repo_policy_file_loads():
    names = [p.name for p in load_policies(REPO_ROOT / "policies" / "approval.yaml")]
    assert "restart-stateless-container-in-lab" in names


@pytest.mark.parametrize(
    ("environment", "stateless", "action", "expected"),
    [
        ("lab", True, "restart_container", "restart-stateless-container-in-lab"),
        ("drill", True, "restart_container", "restart-stateless-container-in-lab"),
        ("production", True, "restart_container", None),
        ("lab", False, "restart_container", None),
        ("lab", True, "rollback_container", None),
    ],
)
def test_policy_covers_only_what_it_says(environment, stateless, action, expected):
    policy = matching_policy(_plan(action), _target(environment, stateless), "service-down")
    assert (policy.name if policy else None) == expected


def test_broken_policy_file_is_a_clear_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policies: [{name: x}]")
    with pytest.raises(ConfigurationError, match="every step needs a human"):
        load_policies(path)


def test_approval_form_requires_an_explicit_decision():
    schema = ApprovalForm.model_json_schema()
    assert "decision" in schema["required"] and "reason" in schema["required"]
    assert schema["properties"]["decision"]["enum"] == ["approve", "reject", "stand-down"]
    assert "default" not in schema["properties"]["decision"]
