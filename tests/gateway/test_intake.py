"""Alerts start remediations: the real gateway, the real Prefect server, the real lab."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.input import keyset_from_paused_state

from gateway.__main__ import service_down_alert, signed_headers
from gateway.intake import stand_down_input
from gateway.store import AlertStore
from tasks.http_checks import check_health

pytestmark = pytest.mark.lab


def _post(gateway, body: dict, source: str = "alertmanager") -> dict:
    settings, url = gateway
    raw = json.dumps(body).encode()
    resp = httpx.post(f"{url}/alerts/{source}", content=raw,
                      headers=signed_headers(source, raw, settings), timeout=10)
    assert resp.status_code == 202, resp.text
    return resp.json()


def _incident(gateway, incident_id: str, until, timeout_s: float = 120.0):
    settings, _ = gateway
    store = AlertStore(settings.store_path)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            inc = store.incident(incident_id)
            if inc and until(inc):
                return inc
            time.sleep(0.5)
    finally:
        store.close()
    raise AssertionError(f"{incident_id} never reached the expected state: {inc}")


def _report(incident_id: str) -> str:
    key = "incident-" + incident_id.lower()
    resp = httpx.get(f"{os.environ['PREFECT_API_URL']}/artifacts/{key}/latest", timeout=10)
    assert resp.status_code == 200, key
    return resp.json()["data"]


def test_unauthenticated_alert_is_rejected(gateway):
    _, url = gateway
    resp = httpx.post(f"{url}/alerts/alertmanager", json=service_down_alert(), timeout=10)
    assert resp.status_code == 401


def test_alert_heals_once_and_resolve_lands_on_the_record(gateway, healthy_web):
    lab = healthy_web
    lab.kill_web()
    body = service_down_alert("web")
    results = [_post(gateway, body) for _ in range(3)]  # Alertmanager redelivers
    dispositions = [r["intake"]["alerts"][0]["disposition"] for r in results]
    assert dispositions == ["opened", "duplicate", "duplicate"]
    incident_id = results[0]["intake"]["alerts"][0]["incident_id"]

    inc = _incident(gateway, incident_id, lambda i: i.status == "closed")
    assert inc.outcome == "Completed", inc
    assert check_health(lab.info.health_url, timeout_s=2).status_code == 200
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(inc.flow_run_id)
        deployment = client.read_deployment(run.deployment_id)
    assert deployment.name == "service-down", "the run belongs to the deployment"
    assert "alert:alertmanager" in run.tags and f"incident:{incident_id}" in run.tags

    body["status"] = body["alerts"][0]["status"] = "resolved"
    body["alerts"][0]["endsAt"] = "2026-11-23T03:10:00Z"
    assert _post(gateway, body)["intake"]["alerts"][0]["disposition"] == "resolved"
    deadline = time.monotonic() + 30
    while "reports the alert RESOLVED" not in _report(incident_id):
        assert time.monotonic() < deadline, "the resolved notification never reached the record"
        time.sleep(0.5)
    assert "alertmanager" in _report(incident_id).split("## Alert updates")[1]


def test_resolve_while_waiting_for_approval_stands_down(gateway, healthy_web):
    lab = healthy_web
    lab.deploy_broken_web()
    body = service_down_alert("web")
    incident_id = _post(gateway, body)["intake"]["alerts"][0]["incident_id"]
    inc = _incident(gateway, incident_id, lambda i: i.flow_run_id is not None)
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while not client.read_flow_run(inc.flow_run_id).state.is_paused():
            assert time.monotonic() < deadline, "never paused for the rollback approval"
            time.sleep(0.5)
        keyset = keyset_from_paused_state(client.read_flow_run(inc.flow_run_id).state)
    body["status"] = body["alerts"][0]["status"] = "resolved"
    # Grafana resolving an alert with the same labels is not the alert that opened the incident
    other = _post(gateway, body, source="grafana")["intake"]["alerts"][0]
    assert other["disposition"] == "resolved-unknown" and other["incident_id"] is None, other
    resolved = _post(gateway, body)["intake"]["alerts"][0]
    assert resolved["disposition"] == "resolved" and resolved["incident_id"] == incident_id
    inc = _incident(gateway, incident_id, lambda i: i.status == "closed")
    # stood down before the rollback; the restart before the pause had changed the target, so
    # the run ends "resolved" (Completed), not "resolved without action" (incident/kit.py)
    assert inc.outcome == "Completed", inc
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.image.tags[0] == "lab-web:broken", "standing down must not roll back"
    assert "stood down before rollback_container" in _report(incident_id)
    with get_client(sync_client=True) as client:
        answer = json.loads(client.read_flow_run_input(inc.flow_run_id, keyset["response"]))
    assert answer == stand_down_input("alertmanager"), "the gateway answered the form, as itself"
    assert "| rollback_container | stood down | alert-gateway (alertmanager resolved) |" in _report(incident_id)


def test_stand_down_input_names_the_gateway_not_a_human():
    assert stand_down_input("sentry") == {
        "decision": "stand-down", "approver": "alert-gateway (sentry resolved)",
        "reason": "alert resolved (sentry) while waiting for approval: resolved without action"}


def test_the_record_says_which_alert_joined_and_why_the_incident_stays_open(tmp_path, test_inventory):
    from gateway.intake import update_text
    from gateway.models import Delivery
    from gateway.routing import Router
    from gateway.settings import GatewaySettings
    from gateway.sources import PARSERS

    store, router = AlertStore(tmp_path / "a.db"), Router.from_file(GatewaySettings().routes_file)

    def deliver(source: str, status: str, **labels: str):
        body = service_down_alert("web", status)
        body["alerts"][0]["startsAt"] = "2026-11-23T03:00:00Z"
        body["alerts"][0]["labels"].update(labels)
        alerts = PARSERS[source](json.dumps(body).encode(), {})
        delivery = Delivery(source=source, received_at=datetime.now(timezone.utc))  # type: ignore[arg-type]
        return store.record_delivery(delivery, alerts, router.route_all(alerts))[0]

    deliver("alertmanager", "firing")
    joined = deliver("grafana", "firing", grafana_folder="ops")
    assert update_text(joined) == (f"grafana alert joined: web is down (test alert) (fingerprint "
                                   f"{joined.alert.fingerprint}): attached to this incident, no new run")
    partial = update_text(deliver("alertmanager", "resolved"))
    assert partial.startswith("alertmanager reports an alert resolved")
    assert partial.endswith("the incident stays open: 1 other alert still fires")
    assert "reports the alert RESOLVED" in update_text(deliver("grafana", "resolved", grafana_folder="ops"))
    store.close()


def _accept_without_dispatch(store: AlertStore, instance: str):
    """What a gateway that died right after answering 202 leaves behind: an open incident.

    Its alert has resolved since (the incident stays open until its run ends), so that the
    next alert on web opens an incident of its own instead of joining it."""
    from gateway.models import Delivery
    from gateway.routing import Router
    from gateway.settings import GatewaySettings
    from gateway.sources import PARSERS

    router = Router.from_file(GatewaySettings().routes_file)
    body = service_down_alert("web")
    body["alerts"][0]["labels"]["instance"] = instance
    opened = None
    for status in ("firing", "resolved"):
        body["status"] = body["alerts"][0]["status"] = status
        alerts = PARSERS["alertmanager"](json.dumps(body).encode(), {})
        delivery = Delivery(source="alertmanager", received_at=datetime.now(timezone.utc))
        (outcome,) = store.record_delivery(delivery, alerts, router.route_all(alerts))
        assert outcome.disposition == ("opened" if status == "firing" else "resolved"), outcome.reason
        opened = opened or outcome.incident
    return opened


def test_restarted_gateway_finishes_what_the_last_one_left_open(deployed, healthy_web, state_dir):
    from prefect.states import Pending, Running

    from deployments.stack import free_port
    from gateway.models import SOURCES
    from gateway.settings import GatewaySettings
    from gateway.__main__ import serving

    store_path = state_dir / "gateway" / "restart.db"
    store = AlertStore(store_path)
    never_started = _accept_without_dispatch(store, "restart-a")
    never_executed = _accept_without_dispatch(store, "restart-b")
    left_running = _accept_without_dispatch(store, "restart-c")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("service-down/service-down")
        for inc in (never_executed, left_running):
            run = client.create_flow_run_from_deployment(
                deployment.id, state=Pending(),
                parameters={"target": "web", "incident_id": inc.incident_id})
            store.set_flow_run(inc.incident_id, str(run.id))
        orphan_run = store.incident(left_running.incident_id).flow_run_id
        client.set_flow_run_state(orphan_run, Running(), force=True)
    store.close()

    settings = GatewaySettings(port=free_port(), store=store_path, insecure_sources=list(SOURCES))
    with serving(settings) as url:
        started = _incident((settings, url), never_started.incident_id, lambda i: i.status == "closed")
        executed = _incident((settings, url), never_executed.incident_id, lambda i: i.status == "closed")
        crashed = _incident((settings, url), left_running.incident_id, lambda i: i.status == "closed")
    assert started.outcome == "Already Fine" and started.flow_run_id, started
    assert executed.outcome == "Already Fine", executed
    assert crashed.outcome == "Crashed (the alert gateway restarted)", crashed
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(orphan_run).state
        trigger = client.read_flow_run(started.flow_run_id).parameters["trigger"]
    assert state.is_crashed() and "gateway restarted" in state.message
    assert trigger["fingerprint"] == never_started.fingerprint, "restarted from the stored alert"
