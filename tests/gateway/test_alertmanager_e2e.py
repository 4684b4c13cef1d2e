"""The real pipeline, for every scenario: a real fault -> the exporter sees it -> Prometheus
fires -> Alertmanager -> gateway -> the scenario's flow -> healed -> resolved on the record.

No manual step: each test only breaks the lab (a fault of the lab's registry that has an
alert rule) and watches. Alertmanager's resolved notification must land on the same
incident's record, and one episode opens exactly one remediation.
"""

from __future__ import annotations

import time
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run

from gateway.__main__ import serving
from gateway.models import SOURCES
from gateway.settings import GatewaySettings
from gateway.store import AlertStore
from lab.faults import FAULTS
from tests.helpers import report

pytestmark = pytest.mark.lab

HEALING = [f for f in FAULTS.values() if f.alert and f.heals]


@pytest.fixture(scope="module")
def pipeline(deployed, lab, state_dir):
    lab.up(alerting=True)
    token = lab.info.alertmanager_token_file.read_text().strip()
    settings = GatewaySettings(port=lab.info.gateway_port, store=state_dir / "gateway" / "am-e2e.db",
                               alertmanager_bearer_token=token,  # only Alertmanager posts here
                               insecure_sources=[s for s in SOURCES if s != "alertmanager"])
    store = AlertStore(settings.store_path)
    try:
        with serving(settings):
            yield lab, store
    finally:
        store.close()
        lab.down_alerting()


def _paused(flow_run_id: str) -> bool:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run_id)).state
    return bool(state and state.is_paused())


def test_every_scenario_is_covered_by_a_real_alert():
    scenarios = {f.scenario for f in HEALING}
    assert {"service-down", "db-connections", "db-locks", "redis-down", "disk-full"} <= scenarios


@pytest.mark.parametrize("fault", HEALING, ids=[f.name for f in HEALING])
def test_real_alert_heals_the_fault_and_resolves_the_incident(pipeline, healthy_lab, fault):
    lab, store = pipeline
    # an earlier case's late alerts are its own: start from a quiet gateway, or this case's
    # alert would join an incident still open from the last one (one per scenario and target)
    quiet_by = time.monotonic() + 60
    while open_ := store.open_incidents():
        assert time.monotonic() < quiet_by, f"incidents still open from an earlier case: {open_}"
        time.sleep(0.5)
    seen = {r["id"] for r in store.recent_alerts(1000)}
    lab.inject(fault.name)
    assert not lab.fault_healthy(fault.name), f"{fault.name} did not break anything"

    deadline = time.monotonic() + 150
    opened: list[dict] = []
    while not opened:
        assert time.monotonic() < deadline, f"{fault.alert} never opened a {fault.scenario} incident"
        opened = [r for r in store.recent_alerts(100) if r["id"] not in seen
                  and r["disposition"] == "opened" and r["source"] == "alertmanager"
                  and r["scenario"] == f"{fault.scenario}/{fault.scenario}"]
        time.sleep(0.5)
    incident_id = opened[0]["incident_id"]

    approved = []
    while (inc := store.incident(incident_id)).status != "closed":
        assert time.monotonic() < deadline, f"the remediation did not finish: {inc}"
        if inc.flow_run_id and _paused(inc.flow_run_id):  # a step no policy covers: a human approves
            resume_flow_run(UUID(inc.flow_run_id), run_input={"decision": "approve", "reason": "on-call: go",
                                                              "approver": "on-call engineer"})
            approved.append(inc.flow_run_id)
        time.sleep(0.5)
    assert inc.outcome == "Completed", f"{fault.scenario} ended {inc.outcome}"
    assert lab.fault_healthy(fault.name), f"{fault.name} is still broken after a Completed run"

    while "alertmanager reports the alert RESOLVED" not in (text := report(incident_id)):
        assert time.monotonic() < deadline, "Alertmanager's resolved notification never reached the record"
        time.sleep(1)
    labels_line = next((line for line in text.splitlines() if line.startswith("- labels: ")), "")
    assert f"alertname={fault.alert}" in labels_line, "the record names the alert that started it"
    if approved:
        assert "| approved | on-call engineer | on-call: go |" in text
    assert store.incident(incident_id).resolved_at is not None
    firing = [r for r in store.recent_alerts(500) if r["incident_id"] == incident_id]
    assert sum(r["disposition"] == "opened" for r in firing) == 1, "one remediation per incident"
    others = [r["scenario"] for r in store.recent_alerts(500) if r["id"] not in seen
              and r["disposition"] == "opened" and r["incident_id"] != incident_id]
    assert others == [], f"one outage, one incident (Alertmanager inhibits the symptoms): also {others}"
