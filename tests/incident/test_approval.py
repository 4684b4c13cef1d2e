from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from incident.approval import (ActionPlan, ApprovalForm, load_policies, matching_policy,
                               what_the_run_changed)
from incident.errors import ConfigurationError
from incident.inventory import Service, Severity, Target
from incident.record import ActionTaken, IncidentRecord, Trigger
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


def test_approval_form_asks_who_approves():
    schema = ApprovalForm.model_json_schema()
    assert "approver" in schema["required"]
    approver = schema["properties"]["approver"]
    assert approver["type"] == "string" and "default" not in approver
    # the server validates answers against this schema: a blank name is refused there too
    assert approver["minLength"] == 1 and approver["pattern"] == r"\S"


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_approval_form_refuses_a_blank_approver(name):
    with pytest.raises(ValidationError, match="approver"):
        ApprovalForm(approver=name, decision="approve", reason="looks right")


def test_approval_form_takes_the_gateways_stand_down_signature():
    answer = ApprovalForm(approver=" alert-gateway (alertmanager resolved) ", decision="stand-down",
                          reason="alert resolved (alertmanager) while waiting for approval")
    assert answer.approver == "alert-gateway (alertmanager resolved)"


def _record(*actions: tuple[str, str, bool, str]) -> IncidentRecord:
    now = datetime.now(timezone.utc)
    return IncidentRecord(
        incident_id="INC-TEST", scenario="service-down", target="web", environment="lab",
        severity=Severity.P0, dry_run=False, trigger=Trigger(), opened_at=now,
        actions=[ActionTaken(at=now, action=a, target=t, changed=c, detail=d) for a, t, c, d in actions])


def test_timeout_message_names_what_the_run_changed_before_it_paused():
    rec = _record(("restart_container", "lab-web", True, "restarted; exit code 0"),
                  ("start_redis", "cache", False, "already running"))
    text = what_the_run_changed(rec, _plan("rollback_container"))
    assert "this run changed: restart_container on lab-web (restarted; exit code 0)" in text
    assert "not run: rollback_container on web" in text
    assert "left as they were: start_redis on cache" in text
    assert "changed nothing" not in text


def test_timeout_message_says_nothing_changed_only_when_true():
    text = what_the_run_changed(_record(), _plan("rollback_container"))
    assert text.startswith("this run changed nothing; not run: rollback_container on web")
