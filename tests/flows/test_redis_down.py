"""The redis-down runbook against the real lab: Redis stopped by PID (or its config broken),
started again over real SSH by the inventory's start command, verified by PING and /health."""

from __future__ import annotations

import pytest
import yaml
from prefect.client.orchestration import get_client

from flows.redis_down import redis_down
from incident.inventory import load_target
from tasks.http_checks import check_health
from tasks.redis import ping_redis
from tests.helpers import escalations, new_incident_id, report

pytestmark = pytest.mark.lab


def _health(lab) -> int | None:
    return check_health(lab.info.health_url, timeout_s=2).status_code


def _run(**params):
    incident_id = new_incident_id()
    state = redis_down(target="web", incident_id=incident_id, verify_deadline_s=30,
                       check_interval_s=0.5, return_state=True, **params)
    return state, incident_id


def test_stopped_redis_is_started_and_verified(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("redis-stopped")
    assert not lab.fault_healthy("redis-stopped")
    assert _health(lab) == 503, "with Redis down the service must report unhealthy"

    state, incident_id = _run()

    assert state.is_completed() and state.name == "Completed", state.message
    assert lab.fault_healthy("redis-stopped")
    assert _health(lab) == 200
    assert lab.status()["redis"] == "up", "the lab must still find Redis by its pidfile"

    text = report(incident_id)
    assert "**Status:** resolved" in text
    assert "| start_redis | approved | policy:start-stopped-redis-in-lab |" in text
    assert "| start_redis | redis lab | yes |" in text
    assert "redisctl start" in text, "the plan and the action name the command that ran"
    assert "3/3 consecutive PINGs answered" in text and "3/3 consecutive good probes" in text
    assert "down: Error 111" in text or "Connection refused" in text, "diagnosis records the refusal"
    assert "redis not running" in text, "diagnosis records the process state read over SSH"
    for phase in ("| diagnose |", "| contain |", "| fix |", "| verify |", "| close |"):
        assert phase in text, f"timeline lacks {phase}"

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name.startswith(incident_id) and "redis-down" in run.name
    assert {"severity:P0", "scenario:redis-down", "service:web", "env:lab",
            "outcome:resolved"} <= set(run.tags)


def test_healthy_redis_is_left_alone(prefect_api, healthy_lab):
    redis = load_target("web", healthy_lab.inventory_path).redis
    before = ping_redis(redis)
    assert before.answers

    state, incident_id = _run()

    assert state.is_completed() and state.name == "Already Fine", state.message
    after = ping_redis(redis)
    assert after.run_id == before.run_id and after.process_id == before.process_id, "Redis was restarted"
    assert after.uptime_s >= before.uptime_s
    text = report(incident_id)
    assert "| - | none | - | - | - |" in text, "an action was recorded on a healthy Redis"
    assert "answers PING (Redis " in text, "the INFO findings belong in the record"


def test_dry_run_changes_nothing(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("redis-stopped")

    state, incident_id = _run(dry_run=True)

    assert state.name == "Dry Run", state.message
    assert not lab.redis.answers(), "dry run started Redis: it changed something"
    text = report(incident_id)
    assert "| start_redis | dry run | dry run |" in text
    assert "| - | none | - | - | - |" in text, "dry run recorded an action"
    lab.reset_fault("redis-stopped")


def test_bad_config_start_fails_and_escalates(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("redis-bad-config")
    try:
        state, incident_id = _run()

        assert state.is_failed(), state
        assert "starting redis lab failed" in state.message
        assert not lab.redis.answers()
        text = report(incident_id)
        assert "**Status:** failed" in text
        assert "## Escalations" in text
        escalation = text.split("## Escalations", 1)[1]
        assert "exited 1" in escalation, "the start command's exit code belongs in the escalation"
        assert "FATAL CONFIG FILE ERROR" in escalation and "Bad directive" in escalation, "its stderr too"
        assert "last lines of" in escalation, "and the Redis log read over SSH"
        assert "| start_redis | approved | policy:start-stopped-redis-in-lab |" in text

        found = escalations(prefect_api, incident_id)
        assert found, "no escalation event reached Prefect"
        assert found[0]["payload"]["target"] == "web"
    finally:
        lab.reset_fault("redis-bad-config")
    assert lab.fault_healthy("redis-bad-config")


def test_redis_without_start_command_escalates_with_what_to_run(prefect_api, healthy_lab, tmp_path,
                                                               monkeypatch):
    lab = healthy_lab
    inv = yaml.safe_load(lab.inventory_path.read_text())
    inv["redis"]["lab"].pop("ssh_host")
    inv["redis"]["lab"].pop("start_command")
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(path))
    lab.inject("redis-stopped")
    try:
        state, incident_id = _run()

        assert state.is_failed(), state
        assert "cannot start it safely" in state.message
        assert not lab.redis.answers(), "the runbook must not have started Redis"
        text = report(incident_id)
        escalation = text.split("## Escalations", 1)[1]
        assert "systemctl start redis-server" in escalation
        assert f"redis-cli -h 127.0.0.1 -p {lab.info.redis_port} ping" in escalation
        assert "add ssh_host and start_command" in escalation
        assert "| - | none | - | - | - |" in text
        assert escalations(prefect_api, incident_id), "no escalation event reached Prefect"
    finally:
        lab.reset_fault("redis-stopped")


def test_start_that_does_not_bring_redis_back_escalates(prefect_api, healthy_lab, tmp_path, monkeypatch):
    """The start command succeeds but nothing answers: verification fails and escalates."""
    lab = healthy_lab
    inv = yaml.safe_load(lab.inventory_path.read_text())
    inv["redis"]["lab"]["start_command"] = ["true"]  # exits 0, starts nothing
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(path))
    lab.inject("redis-stopped")
    try:
        incident_id = new_incident_id()
        state = redis_down(target="web", incident_id=incident_id, verify_deadline_s=2,
                           check_interval_s=0.5, return_state=True)

        assert state.is_failed(), state
        assert "still does not answer after the start" in state.message
        text = report(incident_id)
        assert "| start_redis | redis lab | yes |" in text, "the start that ran is on the record"
        assert "does NOT answer: 0/3 consecutive PINGs" in text.split("## Verification", 1)[1]
        assert "Connection refused" in text.split("## Escalations", 1)[1]
        assert escalations(prefect_api, incident_id), "no escalation event reached Prefect"
    finally:
        lab.reset_fault("redis-stopped")
