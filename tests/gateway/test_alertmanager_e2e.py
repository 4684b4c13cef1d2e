"""The real pipeline: blackbox -> Prometheus -> Alertmanager -> gateway -> flow -> healed.

No manual step: the test only breaks the lab and watches. Alertmanager's resolved
notification must land on the same incident's record.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from gateway.settings import GatewaySettings
from gateway.store import AlertStore
from tasks.http_checks import check_health
from gateway.__main__ import serving

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def pipeline(deployed, lab, state_dir):
    lab.up(alerting=True)
    token = lab.info.alertmanager_token_file.read_text().strip()
    settings = GatewaySettings(port=lab.info.gateway_port, store=state_dir / "gateway" / "am-e2e.db",
                               alertmanager_bearer_token=token)
    try:
        with serving(settings):
            yield lab, settings
    finally:
        lab.down_alerting()


def test_alertmanager_alert_heals_the_service_and_resolves_the_incident(pipeline, healthy_web):
    lab, settings = pipeline
    store = AlertStore(settings.store_path)
    try:
        lab.kill_web()
        deadline = time.monotonic() + 120
        opened = []
        while not opened:
            assert time.monotonic() < deadline, "Alertmanager's webhook never opened an incident"
            opened = [r for r in store.recent_alerts(50)
                      if r["disposition"] == "opened" and r["source"] == "alertmanager"]
            time.sleep(0.5)
        incident_id = opened[0]["incident_id"]

        while (inc := store.incident(incident_id)).status != "closed":
            assert time.monotonic() < deadline, f"the remediation did not finish: {inc}"
            time.sleep(0.5)
        assert inc.outcome == "Completed"
        assert check_health(lab.info.health_url, timeout_s=2).status_code == 200

        key = "incident-" + incident_id.lower()
        while True:
            report = httpx.get(f"{os.environ['PREFECT_API_URL']}/artifacts/{key}/latest",
                               timeout=10).json()["data"]
            if "alertmanager reports the alert RESOLVED" in report:
                break
            assert time.monotonic() < deadline, "Alertmanager's resolved notification never reached the record"
            time.sleep(1)
        assert store.incident(incident_id).resolved_at is not None
        firing = [r for r in store.recent_alerts(200) if r["incident_id"] == incident_id]
        assert sum(r["disposition"] == "opened" for r in firing) == 1, "one remediation per incident"
    finally:
        store.close()
