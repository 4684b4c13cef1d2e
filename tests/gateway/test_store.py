"""Exactly-once at the store: duplicates, re-fires, resolves, and a concurrent storm."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from gateway.__main__ import service_down_alert
from gateway.models import Delivery
from gateway.routing import Router
from gateway.sources import PARSERS
from gateway.store import AlertStore
from incident.settings import REPO_ROOT

ROUTER = Router.from_file(REPO_ROOT / "routes.yaml")


def _alerts(service="web", status="firing", starts_at=None):
    body = service_down_alert(service, status)
    if starts_at:
        body["alerts"][0]["startsAt"] = starts_at
    return PARSERS["alertmanager"](json.dumps(body).encode(), {})


def _deliver(store, alerts):
    delivery = Delivery(source="alertmanager", received_at=datetime.now(timezone.utc))
    return store.record_delivery(delivery, alerts, ROUTER.route_all(alerts))


def test_one_incident_per_episode_and_resolve_lands_on_it(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    t0 = "2026-11-23T03:00:00Z"
    first = _deliver(store, _alerts(starts_at=t0))[0]
    assert first.disposition == "opened" and first.incident.target == "web"
    assert first.incident.scenario == "service-down/service-down"
    again = _deliver(store, _alerts(starts_at=t0))[0]
    assert again.disposition == "duplicate"
    refire = _deliver(store, _alerts(starts_at="2026-11-23T03:05:00Z"))[0]
    assert refire.disposition == "attached" and refire.incident.incident_id == first.incident.incident_id
    resolved = _deliver(store, _alerts(status="resolved", starts_at=t0))[0]
    assert resolved.disposition == "resolved"
    assert resolved.incident.incident_id == first.incident.incident_id
    store.close_incident(first.incident.incident_id, "Completed")
    later = _deliver(store, _alerts(starts_at="2026-11-23T04:00:00Z"))[0]
    assert later.disposition == "opened" and later.incident.incident_id != first.incident.incident_id
    counts = store.counts()
    assert counts["incidents"] == 2 and counts["duplicate"] == 1 and counts["attached"] == 1


def test_unrouted_alerts_are_kept_with_the_reason(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    body = service_down_alert()
    body["alerts"][0]["labels"]["alertname"] = "DiskAlmostFull"
    alerts = PARSERS["alertmanager"](json.dumps(body).encode(), {})
    out = _deliver(store, alerts)[0]
    assert out.disposition == "unrouted" and out.reason
    row = store.recent_alerts(1)[0]
    assert row["disposition"] == "unrouted" and row["reason"] == out.reason


def test_concurrent_storm_opens_exactly_one_incident_per_alert(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    base = datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc)
    distinct = [_alerts(service=f"svc-{i}", starts_at=(base + timedelta(seconds=i)).isoformat())
                for i in range(200)]
    deliveries = [a for a in distinct for _ in range(5)]
    with ThreadPoolExecutor(32) as pool:
        outcomes = [o for batch in pool.map(lambda a: _deliver(store, a), deliveries) for o in batch]
    opened = [o for o in outcomes if o.disposition == "opened"]
    assert len(opened) == 200
    assert len({o.incident.incident_id for o in opened}) == 200
    assert sum(o.disposition == "duplicate" for o in outcomes) == 800
    assert len(store.recent_alerts(2000)) == 1000, "every delivery is recorded"
