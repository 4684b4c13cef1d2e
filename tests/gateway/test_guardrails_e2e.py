"""Guardrails at the door, end to end: the real gateway, the real Prefect server, the real lab.

- Two sources alerting on one outage give one incident and one change.
- Twenty runs waiting for approval leave the runner free to heal a new fault.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState,
                                            FlowRunFilterStateName, FlowRunFilterStateType,
                                            FlowRunFilterTags)
from prefect.client.schemas.objects import StateType

from deployments.stack import free_port
from gateway.__main__ import service_down_alert, serving, signed_headers
from gateway.models import SOURCES
from gateway.settings import GatewaySettings
from tasks.http_checks import check_health
from tests.gateway.conftest import payload
from tests.helpers import report, wait_for

pytestmark = pytest.mark.lab


def _post(url: str, source: str, body: dict, settings: GatewaySettings) -> httpx.Response:
    raw = json.dumps(body).encode()
    return httpx.post(f"{url}/alerts/{source}", content=raw,
                      headers=signed_headers(source, raw, settings), timeout=30)


def _grafana_service_down(service: str) -> dict:
    """The real Grafana body of the shared payloads, alerting on ``service`` being down."""
    body = json.loads(payload("grafana/bougou_grafana-alert.json"))
    labels = {"alertname": "ServiceDown", "service": service, "grafana_folder": "web-tier"}
    body["status"] = "firing"
    body["alerts"] = body["alerts"][:1]
    body["alerts"][0].update(status="firing", labels=labels, fingerprint="0fe1b5d6a1c2e3f4",
                             startsAt=datetime.now(timezone.utc).isoformat())
    body["commonLabels"] = body["groupLabels"] = labels
    return body


def _resolved(body: dict) -> dict:
    """The same alerts (same episodes: same startsAt), now resolved, as their sender posts them."""
    ended = datetime.now(timezone.utc).isoformat()
    return {**body, "status": "resolved",
            "alerts": [{**a, "status": "resolved", "endsAt": ended} for a in body["alerts"]]}


def _actions(report: str) -> str:
    return report.split("## Actions taken")[1].split("##")[0]


def test_two_sources_alerting_on_one_outage_give_one_incident_and_one_change(gateway, healthy_web):
    settings, url = gateway
    healthy_web.kill_web()
    alertmanager, grafana = service_down_alert("web"), _grafana_service_down("web")
    first = _post(url, "alertmanager", alertmanager, settings)
    second = _post(url, "grafana", grafana, settings)  # the same outage, from a second sender
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    opened = first.json()["intake"]["alerts"][0]
    joined = second.json()["intake"]["alerts"][0]
    assert opened["disposition"] == "opened"
    assert joined["disposition"] == "attached" and joined["incident_id"] == opened["incident_id"]
    incident_id = opened["incident_id"]

    wait_for(lambda: "**Status:** resolved" in report(incident_id, missing_ok=True), "the one run to heal web",
             timeout_s=120)
    text = report(incident_id)
    assert _actions(text).count("| restart_container |") == 1, "one change"
    assert "grafana alert joined" in text, "the record lists the alert that joined"
    assert check_health(healthy_web.info.health_url, timeout_s=2).status_code == 200
    for source, body in (("alertmanager", alertmanager), ("grafana", grafana)):
        resolved = _post(url, source, _resolved(body), settings)
        assert resolved.json()["intake"]["alerts"][0]["disposition"] in ("resolved-partial", "resolved")


# -- approvals do not hold the runner ---------------------------------------------------------------
WAITERS = [f"waiter-{i:02d}" for i in range(20)]


@pytest.fixture
def parked_services(lab, tmp_path: Path, monkeypatch):
    """Twenty services whose container (one, created and never started) is down: each run
    for them pauses for a person (their environment, staging, has no auto-approval policy)."""
    docker = lab.docker_client()
    image = docker.containers.get(lab.info.container_name).image
    parked = docker.containers.create(image.id, name="lab-parked")
    inventory = yaml.safe_load(Path(os.environ["RUNBOOKS_INVENTORY"]).read_text())
    for name in WAITERS:
        inventory["services"][name] = {
            "environment": "staging", "owner": "sre-lab", "stateless": True,
            "health_url": "http://127.0.0.1:9/health", "container": "lab-parked",
            "docker_host": inventory["services"]["web"]["docker_host"]}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory))
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(path))
    yield WAITERS
    parked.remove(force=True)


def _count_runs(state: FlowRunFilterState) -> int:
    """Runs of the waiter services (environment staging) in ``state``."""
    with get_client(sync_client=True) as client:
        return client.count_flow_runs(flow_run_filter=FlowRunFilter(
            state=state, tags=FlowRunFilterTags(all_=["env:staging"])))


def _many_down(services: list[str]) -> dict:
    body = service_down_alert(services[0])
    template = body["alerts"][0]
    body["alerts"] = [{**template, "labels": {**template["labels"], "service": s}} for s in services]
    return body


def test_twenty_runs_waiting_for_approval_leave_the_runner_free_to_heal_a_new_fault(
        deployed, healthy_lab, parked_services, state_dir: Path):
    settings = GatewaySettings(port=free_port(), store=state_dir / "gateway-busy" / "alerts.db",
                               insecure_sources=list(SOURCES), max_parallel_runs=2,
                               max_waiting_runs=24, max_queued_runs=8, sweep_interval_s=0,
                               runner_lease_s=3)  # the runner reports its load every second
    with serving(settings) as url:
        def load() -> dict:
            """The (one, embedded) runner's load, as it last reported it to the gateway."""
            return httpx.get(f"{url}/healthz", timeout=10).json()["runner"]["runners"].get(
                "embedded-1", {"waiting": -1, "working": -1})

        waiters = _many_down(parked_services)
        resp = _post(url, "alertmanager", waiters, settings)
        assert resp.status_code == 202, resp.text
        assert {a["disposition"] for a in resp.json()["intake"]["alerts"]} == {"opened"}
        paused = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
        wait_for(lambda: _count_runs(paused) == 20 and load()["waiting"] == 20,
                  "20 runs paused for approval", timeout_s=240)
        assert load()["working"] == 0, "a run waiting for a person holds no working slot"

        healthy_lab.inject("redis-stopped")  # a new fault, while 20 runs wait
        redis = {**service_down_alert("web"), "alerts": [{
            **service_down_alert("web")["alerts"][0],
            "labels": {"alertname": "RedisDown", "service": "web", "severity": "critical"}}]}
        resp = _post(url, "alertmanager", redis, settings)
        assert resp.status_code == 202, resp.text
        healed = resp.json()["intake"]["alerts"][0]["incident_id"]
        wait_for(lambda: "**Status:** resolved" in report(healed, missing_ok=True), "the new fault to heal",
                  timeout_s=180)
        assert "| start_redis |" in _actions(report(healed))
        assert _count_runs(paused) == 20, "the waiting runs are still waiting"

        # the alerts resolve: every waiting run stands down, and the runner empties
        resp = _post(url, "alertmanager", _resolved(waiters), settings)
        assert {a["disposition"] for a in resp.json()["intake"]["alerts"]} == {"resolved"}
        stood_down = FlowRunFilterState(name=FlowRunFilterStateName(any_=["Resolved Without Action"]))
        wait_for(lambda: _count_runs(stood_down) == 20, "the waiting runs to stand down",
                  timeout_s=240)
        wait_for(lambda: load()["waiting"] == load()["working"] == 0, "the runner to empty", timeout_s=120)
