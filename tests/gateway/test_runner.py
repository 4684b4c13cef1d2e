"""Runners apart from the intake: the claim protocol, lapsed claims, and a runner killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prefect.client.orchestration import get_client
from prefect.states import Completed, Pending

from deployments.stack import free_port
from gateway.__main__ import service_down_alert, serving
from gateway.app import create_app
from gateway.intake import AlertIntake, Dispatcher
from gateway.models import SOURCES, Delivery
from gateway.routing import Router
from gateway.settings import GatewaySettings
from gateway.sources import PARSERS
from gateway.store import AlertStore
from incident.settings import REPO_ROOT
from lab.proc import wait_until

TOKEN = "runner-token-for-tests-0123456789"


def _open(store: AlertStore, service: str, instance: str = "i-1"):
    body = service_down_alert(service)
    body["alerts"][0]["labels"]["instance"] = instance
    alerts = PARSERS["alertmanager"](json.dumps(body).encode(), {})
    [outcome] = store.record_delivery(Delivery(source="alertmanager", received_at=datetime.now(UTC)),
                                      alerts, Router.from_file(REPO_ROOT / "routes.yaml").route_all(alerts))
    assert outcome.disposition == "opened", outcome.reason
    return outcome.incident


def test_runner_endpoints_take_only_the_runner_token(tmp_path, test_inventory):
    store = AlertStore(tmp_path / "a.db")
    dispatcher = Dispatcher(store, mode="runner")
    dispatcher.recover()  # nothing to recover: runners may claim
    app = create_app(GatewaySettings(insecure_sources=list(SOURCES), runner_token=TOKEN),
                     AlertIntake(store, Router.from_file(REPO_ROOT / "routes.yaml"), dispatcher),
                     runners=dispatcher)
    client = TestClient(app)
    claim = {"runner": "r1", "limit": 1, "wait_s": 0}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert client.post("/runner/claim", json=claim, headers=headers).status_code == 401
    ok = client.post("/runner/claim", json=claim, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json() == {"runs": [], "lease_s": 30.0}
    assert "/runner/claim" not in client.get("/openapi.json").json()["paths"]
    with pytest.raises(Exception, match="RUNBOOKS_GATEWAY_RUNNER_TOKEN"):
        create_app(GatewaySettings(insecure_sources=list(SOURCES)), AlertIntake(
            store, Router.from_file(REPO_ROOT / "routes.yaml"), dispatcher), runners=dispatcher)
    dispatcher.shutdown()
    store.close()


def test_lapsed_claims_are_settled_by_what_their_runs_did(deployed, tmp_path, test_inventory):
    """A runner that claimed runs and went silent: the run it never started goes back to the
    queue, the one that ended closes its incident."""
    store = AlertStore(tmp_path / "a.db")
    dispatcher = Dispatcher(store, mode="runner", lease_s=0.05)
    assert dispatcher.recover() == {"started": 0, "queued": 0, "claimed": 0, "closed": 0, "crashed": 0}
    never_started, ended = _open(store, "web"), _open(store, "api")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("service-down/service-down")
        for inc in (never_started, ended):
            run = client.create_flow_run_from_deployment(deployment.id, state=Pending(),
                                                         parameters={"target": inc.target})
            store.set_flow_run(inc.incident_id, str(run.id))
        client.set_flow_run_state(store.incident(ended.incident_id).flow_run_id,
                                  Completed(name="Already Fine"), force=True)
    assert len(dispatcher.claim("silent", 5, 0).runs) == 2
    time.sleep(0.1)
    assert dispatcher.settle_expired_claims() == {"requeued": 1, "closed": 1, "crashed": 0}
    assert store.incident(ended.incident_id).outcome == "Already Fine"
    requeued = store.incident(never_started.incident_id)
    assert requeued.status == "open" and requeued.runner is None and store.queued_runs() == 1
    assert [r.incident_id for r in dispatcher.claim("alive", 5, 0).runs] == [never_started.incident_id]
    dispatcher.shutdown()
    store.close()


def _alias_inventory(state_dir: Path, names: list[str]) -> Path:
    """The lab's inventory plus aliases of its (healthy) web service."""
    inventory = yaml.safe_load((state_dir / "lab" / "inventory.yaml").read_text())
    inventory["services"].update({n: dict(inventory["services"]["web"]) for n in names})
    path = state_dir / "runner-test-inventory.yaml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def _spawn_runner(url: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway", "runner", "--gateway", url], env=env,
                                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop_runners(runners: list[subprocess.Popen]) -> None:
    """SIGTERM each runner still running (it lets its runs finish), SIGKILL after 60 s."""
    for r in runners:
        if r.poll() is None:
            r.send_signal(signal.SIGTERM)
            try:
                r.wait(60)
            except subprocess.TimeoutExpired:
                r.kill()


def test_a_runner_killed_mid_run_loses_nothing_the_intake_accepted(deployed, healthy_web, state_dir,
                                                                  tmp_path, monkeypatch):
    """Two runner processes; the one running web's remediation (held at web's lock) is killed.
    Its run is closed as Crashed with a true record and escalated once its claim lapses; the
    other runner goes on with new alerts meanwhile, and the intake answers throughout."""
    from incident.guardrails import load_rules
    from incident.locks import TargetLock
    from incident.record import load_record

    inventory = _alias_inventory(state_dir, ["runner-b"])
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(inventory))
    settings = GatewaySettings(port=free_port(), store=tmp_path / "alerts.db", insecure_sources=list(SOURCES),
                               runner_token=TOKEN, runner_lease_s=3)
    env = {**os.environ, "RUNBOOKS_GATEWAY_RUNNER_TOKEN": TOKEN, "RUNBOOKS_INVENTORY": str(inventory)}
    held = TargetLock("web", None, load_rules().lock)
    assert held.acquire(lambda holder: None) == 0.0
    runners: list[subprocess.Popen] = []
    store = AlertStore(settings.store_path)
    try:
        with serving(settings, runners=0) as url:
            runners = [_spawn_runner(url, env, tmp_path / f"runner-{i}.log") for i in (1, 2)]
            wait_until(lambda: len(httpx.get(f"{url}/healthz").json()["runner"]["runners"]) == 2, 60, 0.5,
                       what="two runners never reported to the gateway (logs: runner-*.log)")

            def post(service: str) -> str:
                resp = httpx.post(f"{url}/alerts/alertmanager", json=service_down_alert(service), timeout=10)
                assert resp.status_code == 202, resp.text
                return resp.json()["intake"]["alerts"][0]["incident_id"]

            web = post("web")
            wait_until(lambda: (i := store.incident(web)) is not None and i.runner is not None, 30, 0.2,
                       what="no runner claimed web's run")
            run_id = UUID(str(store.incident(web).flow_run_id))

            def waits_for_the_lock() -> bool:
                record = load_record(run_id)
                return record is not None and any("waiting for the lock" in g for g in record.guardrails)
            wait_until(waits_for_the_lock, 60, 0.5, what="web's run never waited for the held lock")
            claimed_by = store.incident(web).runner or ""
            [victim] = [r for r in runners if claimed_by.endswith(f"-{r.pid}")]
            victim.send_signal(signal.SIGKILL)  # mid-run: between diagnose and anything it could change
            victim.wait(10)

            other = post("runner-b")  # the surviving runner takes it while the dead claim lapses
            wait_until(lambda: store.incident(other).status == "closed", 90, 0.5,
                       what="the surviving runner did not finish runner-b's run")
            wait_until(lambda: store.incident(web).status == "closed", 60, 0.5,
                       what="the killed runner's run was never settled")
            assert store.incident(other).outcome == "Already Fine"
            assert store.incident(other).runner != claimed_by
            closed = store.incident(web)
            assert closed.outcome.startswith("Crashed (its runner") and claimed_by in closed.outcome
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(run_id).state
            assert state.is_crashed() and "stopped renewing its claim" in state.message
            record = load_record(run_id)
            assert record is not None and record.outcome == "failed" and record.escalations
            assert "changed nothing" in record.summary, record.summary
    finally:
        held.release()
        _stop_runners(runners)
        store.close()


def test_two_runners_heal_one_target_while_the_other_waits_for_a_person(deployed, healthy_web, lab, state_dir,
                                                                       tmp_path, monkeypatch):
    """The full alert -> heal path through two runner processes (one working slot and no
    waiting thread each), on the session's Prefect server (PostgreSQL by default): a run on
    one target pauses for approval and holds its runner; the web is killed meanwhile and its
    run heals it on the other runner, at the same time."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    parked = lab.docker_client().containers.create(
        lab.docker_client().containers.get(lab.info.container_name).image.id, name="lab-parked-runner")
    inventory = yaml.safe_load((state_dir / "lab" / "inventory.yaml").read_text())
    web = inventory["services"]["web"]
    inventory["services"]["parked-1"] = {  # staging: a restart waits for a person
        "environment": "staging", "owner": "sre-lab", "stateless": True, "health_url": "http://127.0.0.1:9/health",
        "container": "lab-parked-runner", "docker_host": web["docker_host"]}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory))
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(path))
    settings = GatewaySettings(port=free_port(), store=tmp_path / "alerts.db", insecure_sources=list(SOURCES),
                               runner_token=TOKEN, runner_lease_s=6)
    env = {**os.environ, "RUNBOOKS_GATEWAY_RUNNER_TOKEN": TOKEN, "RUNBOOKS_GATEWAY_MAX_PARALLEL_RUNS": "1",
           "RUNBOOKS_GATEWAY_MAX_WAITING_RUNS": "0"}
    runners: list[subprocess.Popen] = []
    store = AlertStore(settings.store_path)

    def post(url: str, body: dict) -> str:
        resp = httpx.post(f"{url}/alerts/alertmanager", json=body, timeout=10)
        assert resp.status_code == 202, resp.text
        return resp.json()["intake"]["alerts"][0]["incident_id"]

    def run_of(incident_id: str):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
                any_=[UUID(str(store.incident(incident_id).flow_run_id))])))[0]
    try:
        with serving(settings, runners=0) as url:
            runners = [_spawn_runner(url, env, tmp_path / f"runner-{i}.log") for i in (1, 2)]
            wait_until(lambda: len(httpx.get(f"{url}/healthz").json()["runner"]["runners"]) == 2, 60, 0.5,
                       what="two runners never reported to the gateway (logs: runner-*.log)")
            parked_alert = service_down_alert("parked-1")
            waiter = post(url, parked_alert)
            wait_until(lambda: store.incident(waiter).flow_run_id and run_of(waiter).state.is_paused(), 90, 0.5,
                       what="parked-1's run never paused for approval")

            lab.inject("web-killed")
            healer = post(url, service_down_alert("web"))
            wait_until(lambda: store.incident(healer).status == "closed", 120, 0.5,
                       what="web's run did not end")
            assert store.incident(healer).outcome == "Completed", store.incident(healer)
            assert lab.web.healthy(), "the web is healthy again"
            assert run_of(waiter).state.is_paused(), "the other target's run still waits for its person"
            assert store.incident(healer).runner != store.incident(waiter).runner, "one run per runner"
            healed, paused = run_of(healer), run_of(waiter)
            assert paused.start_time < healed.start_time < healed.end_time, "they ran at the same time"

            resolved = {**parked_alert, "status": "resolved", "alerts": [
                {**parked_alert["alerts"][0], "status": "resolved", "endsAt": datetime.now(UTC).isoformat()}]}
            post(url, resolved)
            wait_until(lambda: store.incident(waiter).status == "closed", 60, 0.5,
                       what="parked-1's run did not stand down on the resolve")
            assert store.incident(waiter).outcome == "Resolved Without Action"
    finally:
        _stop_runners(runners)
        store.close()
        parked.remove(force=True)
