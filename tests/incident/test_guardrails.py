"""The guardrails against the real lab: each one stops the harm it is for.

Faults are real (the web container is killed); the runs are the service-down runbook's.
The guards that count history (loop guard, restart budget) are tested on an alias of the web
service (same container, another inventory name), so that the session's other tests, which
heal ``web`` many times, are not in their history.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.flow_runs import resume_flow_run
from prefect.variables import Variable

from flows.service_down import service_down
from gateway.__main__ import service_down_alert, signed_headers
from incident.errors import ConfigurationError
from incident.guardrails import (KILL_SWITCH, BlastRadius, LockRules, judge_blast_radius,
                                 kill_switch_on, load_rules)
from incident.inventory import Severity
from incident.locks import TargetLock
from incident.record import ActionTaken, IncidentRecord, Trigger
from tasks.http_checks import check_health
from tests.helpers import (escalations, new_incident_id, report, run_id_of, run_tags, start_flow, wait_for,
                           wait_paused)

pytestmark = pytest.mark.lab

FAST = {"restart_deadline_s": 8, "verify_deadline_s": 40}
APPROVE = {"decision": "approve", "reason": "guardrail test", "approver": "sre@example.test"}


def _health(lab) -> int | None:
    return check_health(lab.info.health_url, timeout_s=2).status_code


@pytest.fixture
def rules(tmp_path: Path, monkeypatch):
    """Write the guardrail rules a test needs (RUNBOOKS_GUARDRAILS for this test only)."""
    def write(text: str) -> Path:
        path = tmp_path / "guardrails.yaml"
        path.write_text(text)
        monkeypatch.setenv("RUNBOOKS_GUARDRAILS", str(path))
        return path
    return write


@pytest.fixture
def alias(tmp_path: Path, monkeypatch):
    """An inventory with one more name for the web service (fresh history for the guards)."""
    def add(name: str) -> str:
        inventory = yaml.safe_load(Path(os.environ["RUNBOOKS_INVENTORY"]).read_text())
        inventory["services"][name] = dict(inventory["services"]["web"])
        path = tmp_path / "inventory.yaml"
        path.write_text(yaml.safe_dump(inventory))
        monkeypatch.setenv("RUNBOOKS_INVENTORY", str(path))
        return name
    return add


@pytest.fixture
def every_step_asks(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "no-policies.yaml"
    path.write_text("policies: []\n")
    monkeypatch.setenv("RUNBOOKS_POLICIES", str(path))


# -- the loop guard ----------------------------------------------------------------------------
def test_a_flapping_target_ends_in_an_escalation_after_n_fixes(prefect_api, healthy_web, rules, alias):
    target = alias("flapper")
    rules("defaults: {max_automatic_fixes: 10, max_failed_fixes: 2, window_s: 3600, cool_down_s: 300}\n"
          "blast_radius: {max_restarts_per_service: 100}\nlock: {poll_s: 0.5}\n")
    outcomes: list[str] = []
    for _ in range(4):  # it dies again after every recovery; a fourth run would mean no guard
        healthy_web.kill_web()
        incident_id = new_incident_id()
        state = service_down(target=target, incident_id=incident_id, return_state=True, **FAST)
        outcomes.append(state.name)
        if state.name != "Completed":
            break
    assert outcomes == ["Completed", "Completed", "Held Back"], outcomes
    assert _health(healthy_web) is None, "the held-back run must not have restarted the target"
    text = report(incident_id)
    assert "**Status:** held back" in text
    assert "the loop guard allows 2 failed automatic fixes of flapper" in text
    assert "needed this runbook again" in text, "the history must say why the fixes count as failed"
    assert "| restart_container |" not in text.split("## Actions taken")[1].split("##")[0]
    notices = escalations(prefect_api, incident_id)
    assert notices and "loop guard" in json.dumps(notices[0]["payload"])


def test_the_restart_budget_holds_back_one_restart_too_many(prefect_api, healthy_web, rules, alias):
    target = alias("budgeted")
    rules("blast_radius: {max_restarts_per_service: 1, window_s: 3600}\nlock: {poll_s: 0.5}\n")
    healthy_web.kill_web()
    first = service_down(target=target, return_state=True, **FAST)
    assert first.name == "Completed", first.message
    healthy_web.kill_web()
    incident_id = new_incident_id()
    second = service_down(target=target, incident_id=incident_id, return_state=True, **FAST)
    assert second.name == "Held Back", second.message
    assert "1 runs restarted budgeted" in report(incident_id)
    assert _health(healthy_web) is None


def test_one_run_changes_at_most_k_targets() -> None:
    at = datetime.now(timezone.utc)
    record = IncidentRecord(
        incident_id="INC-X", scenario="s", target="web", environment="lab", severity=Severity.P2,
        dry_run=False, trigger=Trigger(), opened_at=at,
        actions=[ActionTaken(at=at, action="a", target=t, changed=True, detail="") for t in ("t1", "t2")]
        + [ActionTaken(at=at, action="a", target="t3", changed=False, detail="already fine")])
    budget = BlastRadius(max_targets_per_run=2, restart_actions=[])
    assert judge_blast_radius(record, "a", "t1", budget, None) is None, "a target it changed already"
    held = judge_blast_radius(record, "a", "t3", budget, None)
    assert held is not None and "already changed 2 targets" in held


# -- the kill switch and shadow mode -------------------------------------------------------------
@pytest.fixture
def kill_switch(prefect_api):
    def turn(value: str) -> None:
        Variable.set(KILL_SWITCH, value, overwrite=True)
    yield turn
    turn("off")


def test_the_kill_switch_turns_a_real_faults_run_into_a_plan(prefect_api, healthy_web, kill_switch):
    kill_switch("on")
    healthy_web.kill_web()
    incident_id = new_incident_id()
    state = service_down(target="web", incident_id=incident_id, return_state=True, **FAST)
    assert state.name == "Plan Only", state.message
    assert _health(healthy_web) is None, "nothing may change while the switch is on"
    text = report(incident_id)
    assert "(KILL SWITCH ON)" in text and "would run restart_container" in text
    assert "| health | **problem** |" in text, "the run still diagnoses"
    assert "kill-switch-on" in run_tags(run_id_of(incident_id))
    assert escalations(prefect_api, incident_id), "a plan nobody runs must reach a human"


def test_a_kill_switch_value_it_does_not_know_counts_as_on(prefect_api, kill_switch):
    kill_switch("of")  # a typo of "off" must never be read as off... nor a typo of "on"
    assert kill_switch_on()
    kill_switch("off")
    assert not kill_switch_on()


def test_shadow_mode_records_what_it_would_have_done(prefect_api, healthy_web, rules):
    rules("scenarios: {service-down: {mode: shadow}}\n")
    healthy_web.kill_web()
    incident_id = new_incident_id()
    state = service_down(target="web", incident_id=incident_id, return_state=True, **FAST)
    assert state.name == "Shadow", state.message
    assert _health(healthy_web) is None
    text = report(incident_id)
    assert "(SHADOW MODE)" in text
    assert "would run restart_container" in text
    assert "policy restart-stateless-container-in-lab would have approved it" in text
    assert "shadow" in run_tags(run_id_of(incident_id))


def test_broken_rules_are_refused_with_what_to_do(tmp_path: Path) -> None:
    bad = tmp_path / "guardrails.yaml"
    bad.write_text("scenarios: {service-down: {max_fixes: 3}}\n")  # not a rule
    with pytest.raises(ConfigurationError, match="RUNBOOKS_GUARDRAILS"):
        load_rules(bad)
    assert load_rules(tmp_path / "missing.yaml").defaults.mode == "act"


def test_rules_are_read_again_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "guardrails.yaml"
    path.write_text("defaults: {max_automatic_fixes: 3}\n")
    first = load_rules(path)
    first.defaults.max_automatic_fixes = 99  # a caller's change never reaches the next caller
    assert load_rules(path).defaults.max_automatic_fixes == 3
    path.write_text("defaults: {max_automatic_fixes: 4}\n")
    assert load_rules(path).defaults.max_automatic_fixes == 4


# -- the per-target lock -------------------------------------------------------------------------
def _alert(gateway, body: dict) -> str:
    settings, url = gateway
    raw = json.dumps(body).encode()
    resp = httpx.post(f"{url}/alerts/alertmanager", content=raw,
                      headers=signed_headers("alertmanager", raw, settings), timeout=10)
    assert resp.status_code == 202, resp.text
    return resp.json()["intake"]["alerts"][0]["incident_id"]


def test_a_manual_run_beside_an_alert_started_run_waits_for_the_lock(
        prefect_api, gateway, healthy_web, every_step_asks):
    healthy_web.kill_web()
    alerted = _alert(gateway, service_down_alert("web"))
    first = run_id_of(alerted)
    wait_paused(first)  # the alert's run holds web's lock while it waits for a person

    manual, manual_id = start_flow(service_down, target="web", **FAST)
    wait_for(lambda: "waiting for the lock on web" in report(manual_id, missing_ok=True),
              "the manual run to wait")
    assert "held by run" in report(manual_id)

    resume_flow_run(first, run_input=APPROVE)
    manual.join(timeout=180)
    assert manual.state is not None and manual.state.name == "Already Fine", manual.state
    text = report(manual_id)
    assert "stood aside" in text
    assert "| restart_container |" not in text.split("## Actions taken")[1].split("##")[0]
    assert "| restart_container | lab-web | yes |" in report(alerted), "one change, by the first run"
    assert _health(healthy_web) == 200

    # both ended: the lock is free at once, not after its lease
    probe = TargetLock("web", None, LockRules(wait_s=0, lease_s=60, poll_s=0.5))
    assert probe.acquire(lambda holder: None) is not None
    probe.release()


def test_a_dead_holder_leaves_a_lease_that_runs_out(prefect_api, state_dir: Path) -> None:
    rules = LockRules(wait_s=0, lease_s=60, poll_s=0.5)
    dead = TargetLock("lease-probe", None, rules)
    assert dead.acquire(lambda holder: None) is not None
    dead._stop.set()  # the process "dies": nobody renews, nobody releases
    told: list[str] = []
    assert TargetLock("lease-probe", None, rules).acquire(told.append) is None, "the lock is held"
    assert told and "died" in told[0]  # no live run holds it: it says the lease runs out
    lease = json.loads((state_dir / "prefect" / "concurrency_leases" / f"{dead.lease_id}.json").read_text())
    expires = datetime.fromisoformat(lease["expiration"])
    assert (expires - datetime.now(timezone.utc)).total_seconds() <= rules.lease_s, \
        "the lease must run out within lease_s of the last renewal"
    dead.release()


def test_a_lock_deleted_by_hand_is_made_again_never_skipped(prefect_api) -> None:
    from prefect.client.orchestration import get_client

    from incident.locks import lock_name

    rules = LockRules(wait_s=0, lease_s=60, poll_s=0.5)
    first = TargetLock("recreated", None, rules)
    assert first.acquire(lambda holder: None) is not None
    first.release()
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(lock_name("recreated"))
    again = TargetLock("recreated", None, rules)
    assert again.acquire(lambda holder: None) is not None
    assert TargetLock("recreated", None, rules).acquire(lambda holder: None) is None, \
        "the lock taken after the limit was made again must really be held"
    again.release()
