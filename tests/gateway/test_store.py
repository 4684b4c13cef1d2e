"""Exactly-once at the store: duplicates, re-fires, resolves, and a concurrent storm."""

from __future__ import annotations

import json
import sqlite3
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from gateway.__main__ import service_down_alert
from gateway.models import Delivery
from gateway.routing import Router
from gateway.sources import PARSERS
from gateway.store import SCHEMA_VERSION, AlertStore
from incident.settings import REPO_ROOT
from tests.gateway.conftest import payload

ROUTER = Router.from_file(REPO_ROOT / "routes.yaml")


@pytest.fixture(autouse=True)
def _inventory(test_inventory):
    """The router checks targets against this inventory (RUNBOOKS_INVENTORY)."""


def _alerts(service="web", status="firing", starts_at=None):
    body = service_down_alert(service, status)
    if starts_at:
        body["alerts"][0]["startsAt"] = starts_at
    return PARSERS["alertmanager"](json.dumps(body).encode(), {})


def _deliver(store, alerts, router=ROUTER, at=None):
    delivery = Delivery(source=alerts[0].source, received_at=at or datetime.now(timezone.utc))
    return store.record_delivery(delivery, alerts, router.route_all(alerts))


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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
    partial = _deliver(store, _alerts(status="resolved", starts_at=t0))[0]
    assert partial.disposition == "resolved-partial", "the re-fire's episode joined and still fires"
    assert partial.incident.incident_id == first.incident.incident_id and partial.still_firing == 1
    resolved = _deliver(store, _alerts(status="resolved", starts_at="2026-11-23T03:05:00Z"))[0]
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


ANY_SOURCE = Router.from_yaml("routes: [{name: any, match: {}, scenario: any/any, target: web}]")


def _sentry_issue(action: str):
    doc = json.loads(payload("sentry/zulip_issue_created_for_exception.json"))
    doc["action"] = action
    return PARSERS["sentry"](json.dumps(doc).encode(), {})


def _pagerduty(event_type: str):
    doc = json.loads(payload("pagerduty/zulip_triggered_v3.json"))
    doc["event"]["event_type"] = event_type
    return PARSERS["pagerduty"](json.dumps(doc).encode(), {})


@pytest.mark.parametrize("alert_in", [
    {"firing": lambda: _sentry_issue("created"), "resolved": lambda: _sentry_issue("resolved"),
     "regressed": lambda: _sentry_issue("unresolved")},
    {"firing": lambda: _pagerduty("incident.triggered"), "resolved": lambda: _pagerduty("incident.resolved"),
     "regressed": lambda: _pagerduty("incident.reopened")},
], ids=["sentry-unresolved", "pagerduty-reopened"])
def test_a_regression_after_a_resolve_opens_a_new_incident(tmp_path, alert_in):
    store = AlertStore(tmp_path / "a.db")
    first = _deliver(store, alert_in["firing"](), ANY_SOURCE)[0]
    assert first.disposition == "opened"
    store.close_incident(first.incident.incident_id, "Completed")
    assert _deliver(store, alert_in["resolved"](), ANY_SOURCE)[0].disposition == "resolved"
    regressed = _deliver(store, alert_in["regressed"](), ANY_SOURCE)[0]
    assert regressed.disposition == "opened", regressed.reason
    assert regressed.incident.incident_id != first.incident.incident_id
    assert regressed.incident.episode_key == first.incident.episode_key
    assert _deliver(store, alert_in["regressed"](), ANY_SOURCE)[0].disposition == "duplicate"
    again = _deliver(store, alert_in["resolved"](), ANY_SOURCE)[0]
    assert again.disposition == "resolved" and again.incident.incident_id == regressed.incident.incident_id
    assert _deliver(store, alert_in["resolved"](), ANY_SOURCE)[0].disposition == "duplicate"


def test_a_regression_while_the_incident_is_still_open_is_attached(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    first = _deliver(store, _sentry_issue("created"), ANY_SOURCE)[0]
    _deliver(store, _sentry_issue("resolved"), ANY_SOURCE)
    regressed = _deliver(store, _sentry_issue("unresolved"), ANY_SOURCE)[0]
    assert regressed.disposition == "attached" and regressed.incident.incident_id == first.incident.incident_id


def test_a_resolve_from_another_source_does_not_touch_the_incident(tmp_path):
    """Grafana and Alertmanager alerts with the same labels share a fingerprint; a Grafana
    resolve must not resolve (nor stand down) what Alertmanager opened."""
    store = AlertStore(tmp_path / "a.db")
    t0 = "2026-11-23T03:00:00Z"
    opened = _deliver(store, _alerts(starts_at=t0))[0]
    grafana_body = service_down_alert("web", "resolved")
    grafana_body["alerts"][0]["startsAt"] = t0
    [grafana] = PARSERS["grafana"](json.dumps(grafana_body).encode(), {})
    assert grafana.fingerprint == opened.alert.fingerprint
    other = _deliver(store, [grafana])[0]
    assert other.disposition == "resolved-unknown" and other.incident is None
    assert "grafana" in other.reason
    assert store.incident(opened.incident.incident_id).resolved_at is None
    mine = _deliver(store, _alerts(status="resolved", starts_at=t0))[0]
    assert mine.disposition == "resolved" and mine.incident.incident_id == opened.incident.incident_id


def test_a_bad_or_unknown_target_is_unrouted_and_opens_nothing(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    for service, why in (("web; touch /tmp/x", "not a service name"),
                         ("payments", "not a service of the inventory")):
        out = _deliver(store, _alerts(service=service))[0]
        assert out.disposition == "unrouted" and out.incident is None and why in out.reason
        assert store.recent_alerts(1)[0]["reason"] == out.reason
    assert store.counts()["incidents"] == 0 and store.open_incidents() == []


def test_the_store_is_private(tmp_path):
    path = tmp_path / "state" / "gateway" / "alerts.db"
    store = AlertStore(path)
    _deliver(store, _alerts())
    assert _mode(path.parent) == 0o700
    for f in (path, path.with_name("alerts.db-wal"), path.with_name("alerts.db-shm")):
        assert _mode(f) == 0o600, f
    store.close()
    path.parent.chmod(0o755)  # made by an older gateway, say
    path.chmod(0o644)
    AlertStore(path).close()
    assert (_mode(path.parent), _mode(path)) == (0o700, 0o600)


def test_the_store_keeps_no_payload_fields_beyond_the_normalised_alert(tmp_path):
    path = tmp_path / "a.db"
    body = service_down_alert()
    body["alerts"][0]["labels"]["team"] = "LABEL-KEPT-4711"
    body["alerts"][0]["annotations"]["description"] = "ANNOTATION-DROPPED-1"
    body["alerts"][0]["x_vendor_token"] = "UNKNOWN-FIELD-DROPPED-2"
    body["receiver"] = "GROUP-FIELD-DROPPED-3"
    alerts = PARSERS["alertmanager"](json.dumps(body).encode(), {})
    assert alerts[0].extra["x_vendor_token"] == "UNKNOWN-FIELD-DROPPED-2"  # the parser keeps it ...
    store = AlertStore(path)
    opened = _deliver(store, alerts)[0]
    assert store.first_alert(opened.incident.incident_id).labels["team"] == "LABEL-KEPT-4711"
    store.close()  # checkpoints the WAL into the file
    raw = b"".join(f.read_bytes() for f in tmp_path.iterdir())
    assert b"LABEL-KEPT-4711" in raw  # ... the store sees the text it keeps
    for dropped in (b"ANNOTATION-DROPPED-1", b"UNKNOWN-FIELD-DROPPED-2", b"GROUP-FIELD-DROPPED-3"):
        assert dropped not in raw


def test_retention_prunes_old_rows_but_keeps_open_incidents_and_live_dedup_keys(tmp_path):
    now = datetime.now(timezone.utc)
    store = AlertStore(tmp_path / "a.db", retention_days=30)
    t0 = "2026-01-01T00:00:00Z"
    opened = _deliver(store, _alerts(service="web", starts_at=t0))[0]
    closed = _deliver(store, _alerts(service="api", starts_at=t0))[0]
    forgotten = _deliver(store, _alerts(service="svc-1", starts_at=t0))[0]
    for out in (closed, forgotten):
        store.close_incident(out.incident.incident_id, "Completed")
    unrouted = _deliver(store, _alerts(service="payments"))[0]
    assert unrouted.disposition == "unrouted"
    # 50 days later the closed incident's alert is still being redelivered: its key is refreshed
    later = now + timedelta(days=50)
    assert _deliver(store, _alerts(service="api", starts_at=t0), at=later)[0].disposition == "duplicate"

    store.prune(now + timedelta(days=61))  # everything from `now` is past the 30 days
    with sqlite3.connect(tmp_path / "a.db") as db:
        assert db.execute("SELECT COUNT(*) FROM deliveries WHERE received_at < ?",
                          (later.isoformat(),)).fetchone()[0] == 1, "only the open incident's delivery"
    rows = store.recent_alerts(100)
    assert sorted((r["disposition"], r["incident_id"] or "") for r in rows) == [
        ("duplicate", ""), ("opened", opened.incident.incident_id)], "the later duplicate and the open incident"
    assert store.first_alert(opened.incident.incident_id).labels["service"] == "web", \
        "an open incident keeps its alerts: a restart needs them"
    assert store.incident(closed.incident.incident_id) is not None
    assert store.incident(forgotten.incident.incident_id) is None
    assert _deliver(store, _alerts(service="web", starts_at=t0))[0].disposition == "duplicate", \
        "an open incident's episode keys are kept"
    assert _deliver(store, _alerts(service="api", starts_at=t0))[0].disposition == "duplicate", \
        "a key still being redelivered is kept"
    assert _deliver(store, _alerts(service="svc-1", starts_at=t0))[0].disposition == "opened", \
        "silent for the whole retention period: forgotten"
    assert AlertStore(tmp_path / "b.db").retention == timedelta(days=30)


SCHEMA_1 = """
CREATE TABLE deliveries (id INTEGER PRIMARY KEY, received_at TEXT NOT NULL, source TEXT NOT NULL,
    delivery_id TEXT, remote_addr TEXT, alerts INTEGER NOT NULL);
CREATE TABLE alerts (id INTEGER PRIMARY KEY, delivery INTEGER NOT NULL REFERENCES deliveries(id),
    received_at TEXT NOT NULL, source TEXT NOT NULL, status TEXT NOT NULL, fingerprint TEXT NOT NULL,
    episode_key TEXT NOT NULL, dedup_key TEXT NOT NULL, service TEXT, severity TEXT, summary TEXT,
    disposition TEXT NOT NULL, incident_id TEXT, route TEXT, reason TEXT, body TEXT NOT NULL);
CREATE TABLE seen (dedup_key TEXT PRIMARY KEY);
CREATE TABLE incidents (incident_id TEXT PRIMARY KEY, episode_key TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL, scenario TEXT NOT NULL, target TEXT NOT NULL, severity TEXT NOT NULL,
    status TEXT NOT NULL, opened_at TEXT NOT NULL, resolved_at TEXT, closed_at TEXT, outcome TEXT,
    flow_run_id TEXT);
CREATE UNIQUE INDEX one_open_incident_per_alert ON incidents(fingerprint) WHERE status = 'open';
CREATE INDEX alerts_by_time ON alerts(received_at);
"""


def test_a_store_of_the_previous_schema_is_migrated_without_its_payloads(tmp_path):
    path = tmp_path / "a.db"
    body = service_down_alert()
    body["alerts"][0]["x_vendor_token"] = "UNKNOWN-FIELD-DROPPED-2"
    [alert] = PARSERS["alertmanager"](json.dumps(body).encode(), {})
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO deliveries VALUES (1, '2026-11-01T00:00:00+00:00', 'alertmanager', NULL, NULL, 1)")
        db.execute("INSERT INTO alerts VALUES (1, 1, '2026-11-01T00:00:00+00:00', 'alertmanager', 'firing', ?,"
                   " ?, ?, 'web', 'P0', 's', 'opened', 'INC-1', 'service-down', '', ?)",
                   (alert.fingerprint, alert.episode_key, alert.dedup_key, alert.model_dump_json()))
        db.execute("INSERT INTO seen VALUES (?)", (alert.dedup_key,))
        db.execute("INSERT INTO incidents (incident_id, episode_key, fingerprint, scenario, target, severity,"
                   " status, opened_at) VALUES ('INC-1', ?, ?, 'service-down/service-down', 'web', 'P0',"
                   " 'open', '2026-11-01T00:00:00+00:00')", (alert.episode_key, alert.fingerprint))
    store = AlertStore(path)
    [inc] = store.open_incidents()
    assert (inc.incident_id, inc.source) == ("INC-1", "alertmanager")
    assert store.first_alert("INC-1").labels == alert.labels
    assert _deliver(store, [alert])[0].disposition == "duplicate"
    store.close()
    assert b"UNKNOWN-FIELD-DROPPED-2" not in b"".join(f.read_bytes() for f in tmp_path.iterdir())


def test_a_deeply_nested_payload_field_never_reaches_the_store(tmp_path):
    body = service_down_alert()
    nested: dict = {}
    cur = nested
    for _ in range(400):
        cur["a"] = {}
        cur = cur["a"]
    body["receiver"] = nested  # kept in the parsed alert's extra, as the sender sent it
    alerts = PARSERS["alertmanager"](json.dumps(body).encode(), {})
    store = AlertStore(tmp_path / "a.db")
    out = _deliver(store, alerts)[0]
    assert out.disposition == "opened"
    assert store.first_alert(out.incident.incident_id).extra == {}


# -- one incident per (scenario, target) ------------------------------------------------------

def _labelled(source="alertmanager", status="firing", service="web", starts_at="2026-11-23T03:00:00Z",
              **labels):
    """A ServiceDown alert of ``source`` (Grafana sends Alertmanager's body) with more labels."""
    body = service_down_alert(service, status)
    body["alerts"][0]["startsAt"] = starts_at
    body["alerts"][0]["labels"].update(labels)
    return PARSERS[source](json.dumps(body).encode(), {})


def test_one_incident_per_scenario_and_target_whatever_the_source_and_labels(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    opened = _deliver(store, _labelled(instance="web-1"))[0]
    assert opened.disposition == "opened"
    grafana = _deliver(store, _labelled("grafana", grafana_folder="ops"))[0]
    other_labels = _deliver(store, _labelled(instance="web-2"))[0]
    for joined in (grafana, other_labels):
        assert joined.alert.fingerprint != opened.alert.fingerprint
        assert joined.disposition == "attached", joined.reason
        assert joined.incident.incident_id == opened.incident.incident_id
        assert "already open for service-down/service-down on web" in joined.reason
    assert _deliver(store, _labelled(service="api"))[0].disposition == "opened", "another target"
    redis = _labelled(alertname="RedisDown")
    assert _deliver(store, redis)[0].disposition == "opened", "another scenario on the same target"
    joined = store.joined_alerts(opened.incident.incident_id)
    assert [(j.source, j.fingerprint, j.resolved_at) for j in joined] == [
        ("alertmanager", opened.alert.fingerprint, None), ("grafana", grafana.alert.fingerprint, None),
        ("alertmanager", other_labels.alert.fingerprint, None)]
    assert joined[1].summary == grafana.alert.summary


def test_a_concurrent_storm_on_one_target_opens_one_incident(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    deliveries = [_labelled(source, instance=f"i-{i}") for i in range(20)
                  for source in ("alertmanager", "grafana")]
    with ThreadPoolExecutor(16) as pool:
        outcomes = [o for batch in pool.map(lambda a: _deliver(store, a), deliveries) for o in batch]
    [opened] = [o for o in outcomes if o.disposition == "opened"]
    assert sum(o.disposition == "attached" for o in outcomes) == 39
    assert {o.incident.incident_id for o in outcomes} == {opened.incident.incident_id}
    assert len(store.joined_alerts(opened.incident.incident_id)) == 40


def test_the_incident_resolves_when_its_last_alert_does(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    opened = _deliver(store, _labelled(instance="web-1"))[0]
    incident_id = opened.incident.incident_id
    _deliver(store, _labelled("grafana", grafana_folder="ops"))
    partial = _deliver(store, _labelled("grafana", "resolved", grafana_folder="ops"))[0]
    assert partial.disposition == "resolved-partial" and partial.incident.incident_id == incident_id
    assert partial.still_firing == 1
    assert partial.reason == f"1 other alert still firing on {incident_id}: the incident stays open"
    assert store.incident(incident_id).resolved_at is None
    assert store.counts()["resolved-partial"] == 1
    assert store.recent_alerts(1)[0]["disposition"] == "resolved-partial"
    last = _deliver(store, _labelled(status="resolved", instance="web-1"))[0]
    assert last.disposition == "resolved" and last.incident.incident_id == incident_id
    assert store.incident(incident_id).resolved_at is not None
    assert all(j.resolved_at is not None for j in store.joined_alerts(incident_id))
    # resolved (its run may still be going on): a new alert on the target is a new incident
    again = _deliver(store, _labelled(instance="web-3"))[0]
    assert again.disposition == "opened" and again.incident.incident_id != incident_id


def test_a_resolve_of_another_episode_of_the_same_alert_does_not_match(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    opened = _deliver(store, _labelled(starts_at="2026-11-23T03:00:00Z"))[0]
    earlier = _deliver(store, _labelled(status="resolved", starts_at="2026-11-22T03:00:00Z"))[0]
    assert earlier.alert.fingerprint == opened.alert.fingerprint
    assert earlier.disposition == "resolved-unknown" and earlier.incident is None
    assert store.incident(opened.incident.incident_id).resolved_at is None
    assert store.joined_alerts(opened.incident.incident_id)[0].resolved_at is None


SCHEMA_2 = """
CREATE TABLE deliveries (id INTEGER PRIMARY KEY, received_at TEXT NOT NULL, source TEXT NOT NULL,
    delivery_id TEXT, remote_addr TEXT, alerts INTEGER NOT NULL);
CREATE TABLE alerts (id INTEGER PRIMARY KEY, delivery INTEGER NOT NULL REFERENCES deliveries(id),
    received_at TEXT NOT NULL, source TEXT NOT NULL, status TEXT NOT NULL, fingerprint TEXT NOT NULL,
    episode_key TEXT NOT NULL, dedup_key TEXT NOT NULL, service TEXT, severity TEXT, summary TEXT,
    disposition TEXT NOT NULL, incident_id TEXT, route TEXT, reason TEXT, body TEXT NOT NULL);
CREATE TABLE seen (key TEXT PRIMARY KEY, last_seen TEXT NOT NULL);
CREATE TABLE incidents (incident_id TEXT PRIMARY KEY, source TEXT NOT NULL, episode_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL, scenario TEXT NOT NULL, target TEXT NOT NULL, severity TEXT NOT NULL,
    status TEXT NOT NULL, opened_at TEXT NOT NULL, resolved_at TEXT, closed_at TEXT, outcome TEXT,
    flow_run_id TEXT);
CREATE UNIQUE INDEX one_incident_per_unresolved_episode ON incidents(source, episode_key)
    WHERE resolved_at IS NULL;
CREATE UNIQUE INDEX one_open_incident_per_alert ON incidents(fingerprint) WHERE status = 'open';
CREATE INDEX incidents_by_episode ON incidents(source, episode_key);
CREATE INDEX alerts_by_time ON alerts(received_at);
CREATE INDEX alerts_by_incident ON alerts(incident_id);
CREATE INDEX deliveries_by_time ON deliveries(received_at);
CREATE INDEX seen_by_time ON seen(last_seen);
PRAGMA user_version = 2;
"""


def _v2_alert(db, row_id: int, alert, disposition: str, incident_id: str, at: str) -> None:
    """What a schema-2 gateway stored for an alert it accepted."""
    db.execute("INSERT INTO deliveries VALUES (?, ?, ?, NULL, NULL, 1)", (row_id, at, alert.source))
    db.execute("INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'P0', ?, ?, ?, 'service-down', '', ?)",
               (row_id, row_id, at, alert.source, alert.status, alert.fingerprint, alert.episode_key,
                alert.dedup_key, alert.service, alert.summary, disposition, incident_id,
                alert.model_dump_json(include={"source", "status", "fingerprint", "fingerprint_origin",
                                               "episode_key", "labels", "summary"})))
    db.execute("INSERT INTO seen VALUES (?, ?)", (f"{alert.source}|{alert.dedup_key}", at))


def test_a_store_of_schema_2_gets_the_joined_alerts_of_its_incidents(tmp_path):
    path = tmp_path / "a.db"
    [first] = _labelled(starts_at="2026-11-01T00:00:00Z")
    [refire] = _labelled(starts_at="2026-11-01T00:05:00Z")
    [api] = _labelled(service="api", starts_at="2026-11-01T00:00:00Z")
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_2)
        for inc_id, alert, resolved_at in (("INC-OPEN", first, None), ("INC-DONE", api, "2026-11-01T01:00:00+00:00")):
            db.execute("INSERT INTO incidents (incident_id, source, episode_key, fingerprint, scenario, target,"
                       " severity, status, opened_at, resolved_at) VALUES (?, ?, ?, ?, 'service-down/service-down',"
                       " ?, 'P0', 'open', '2026-11-01T00:00:00+00:00', ?)",
                       (inc_id, alert.source, alert.episode_key, alert.fingerprint, alert.service, resolved_at))
        _v2_alert(db, 1, first, "opened", "INC-OPEN", "2026-11-01T00:00:00+00:00")
        _v2_alert(db, 2, api, "opened", "INC-DONE", "2026-11-01T00:00:00+00:00")
        _v2_alert(db, 3, refire, "attached", "INC-OPEN", "2026-11-01T00:05:00+00:00")
    path.chmod(0o644)

    store = AlertStore(path)
    assert _mode(path) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [(j.episode_key, j.summary, j.resolved_at) for j in store.joined_alerts("INC-OPEN")] == [
        (first.episode_key, first.summary, None), (refire.episode_key, refire.summary, None)]
    [done] = store.joined_alerts("INC-DONE")
    assert done.resolved_at == datetime(2026, 11, 1, 1, tzinfo=timezone.utc), "resolved as its incident"
    assert _deliver(store, [refire])[0].disposition == "duplicate", "the dedup keys are kept"
    joined = _deliver(store, _labelled("grafana", grafana_folder="ops"))[0]
    assert (joined.disposition, joined.incident.incident_id) == ("attached", "INC-OPEN")
    assert _deliver(store, _labelled(status="resolved", starts_at="2026-11-01T00:05:00Z"))[0].disposition \
        == "resolved-partial"
    assert _deliver(store, _labelled("grafana", "resolved", grafana_folder="ops"))[0].disposition \
        == "resolved-partial"
    last = _deliver(store, _labelled(status="resolved", starts_at="2026-11-01T00:00:00Z"))[0]
    assert (last.disposition, last.incident.incident_id) == ("resolved", "INC-OPEN")
    store.close()
    AlertStore(path).close()  # at the current schema: opening it again changes nothing


# -- the runners' queue ---------------------------------------------------------------------

def _queued(store, service: str, run_id: str):
    """An incident whose run is created and waits for a runner."""
    inc = _deliver(store, _alerts(service))[0].incident
    store.set_flow_run(inc.incident_id, run_id)
    return inc


def test_each_queued_run_is_claimed_by_one_runner_oldest_first(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    first, second = _queued(store, "web", "run-1"), _queued(store, "api", "run-2")
    _deliver(store, _alerts("zulip-integration-testing"))  # no run yet: not for runners
    assert store.queued_runs() == 2
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda i: store.claim_runs(f"runner-{i}", 1, 30), range(8)))
    taken = [(c[0].incident_id, c[0].runner) for c in claims if c]
    assert sorted(i for i, _ in taken) == sorted([first.incident_id, second.incident_id])
    assert len({r for _, r in taken}) == 2, "two runners, one run each"
    assert store.queued_runs() == 0 and store.claim_runs("late", 5, 30) == []


def test_a_claim_lapses_unless_renewed_and_a_lapsed_run_can_be_queued_again(tmp_path):
    store = AlertStore(tmp_path / "a.db")
    inc = _queued(store, "web", "run-1")
    [claimed] = store.claim_runs("r1", 4, lease_s=0.05)
    assert claimed.runner == "r1" and claimed.lease_until is not None
    assert store.renew_claims("r2", [inc.incident_id], 30) == [], "only its holder renews a claim"
    import time
    time.sleep(0.1)
    assert [i.incident_id for i in store.expired_claims()] == [inc.incident_id]
    assert store.renew_claims("r1", [inc.incident_id], 30) == [inc.incident_id]
    assert store.expired_claims() == []
    store.requeue(inc.incident_id)
    assert store.queued_runs() == 1 and store.claim_runs("r2", 1, 30)[0].runner == "r2"
    store.close_incident(inc.incident_id, "Completed")
    assert store.renew_claims("r2", [inc.incident_id], 30) == [], "a closed incident holds no claim"


def test_a_store_of_schema_3_gains_the_runner_columns(tmp_path):
    path = tmp_path / "a.db"
    store = AlertStore(path)
    inc = _queued(store, "web", "run-1")
    store.close()
    with sqlite3.connect(path) as db:  # back to schema 3: no runner columns, no queue index
        db.execute("DROP INDEX runs_for_runners")
        db.execute("ALTER TABLE incidents DROP COLUMN lease_until")
        db.execute("ALTER TABLE incidents DROP COLUMN runner")
        db.execute("PRAGMA user_version = 3")
    store = AlertStore(path)
    assert store.queued_runs() == 1
    assert store.claim_runs("r1", 1, 30)[0].incident_id == inc.incident_id
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'runs_for_runners'").fetchone()
