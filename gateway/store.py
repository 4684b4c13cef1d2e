"""The intake store: every alert the gateway accepted, and the incidents they opened.

SQLite (WAL) in the state dir: one transaction per delivery, so what was answered
202 is on disk. Exactly-once is enforced by the database, not by timing:

* ``seen.dedup_key`` (episode + state) is the primary key: a redelivery is a duplicate;
* ``incidents.episode_key`` is unique: one firing episode opens at most one incident;
* a partial unique index on ``incidents.fingerprint WHERE status = 'open'``: a re-fire
  (new episode, same alert) while an incident is open is attached to it, not a new run.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from gateway.models import Alert, Delivery
from gateway.routing import RouteDecision

Disposition = Literal["opened", "attached", "duplicate", "unrouted", "resolved", "resolved-unknown",
                      "acknowledged"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY, received_at TEXT NOT NULL, source TEXT NOT NULL,
    delivery_id TEXT, remote_addr TEXT, alerts INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, delivery INTEGER NOT NULL REFERENCES deliveries(id),
    received_at TEXT NOT NULL, source TEXT NOT NULL, status TEXT NOT NULL,
    fingerprint TEXT NOT NULL, episode_key TEXT NOT NULL, dedup_key TEXT NOT NULL,
    service TEXT, severity TEXT, summary TEXT, disposition TEXT NOT NULL,
    incident_id TEXT, route TEXT, reason TEXT, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen (dedup_key TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS incidents (
    incident_id TEXT PRIMARY KEY, episode_key TEXT NOT NULL UNIQUE, fingerprint TEXT NOT NULL,
    scenario TEXT NOT NULL, target TEXT NOT NULL, severity TEXT NOT NULL,
    status TEXT NOT NULL, opened_at TEXT NOT NULL, resolved_at TEXT, closed_at TEXT,
    outcome TEXT, flow_run_id TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_incident_per_alert
    ON incidents(fingerprint) WHERE status = 'open';
CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts(received_at);
"""


class TrackedIncident(BaseModel):
    """The gateway's row for an incident it opened: which alert episode, which run, open or
    closed. Not the incident record itself (``incident.record.Incident``, kept by the run)."""

    incident_id: str
    episode_key: str
    fingerprint: str
    scenario: str
    target: str
    severity: str
    status: Literal["open", "closed"]
    opened_at: datetime
    resolved_at: datetime | None = None
    closed_at: datetime | None = None
    outcome: str | None = None
    flow_run_id: str | None = None


class IntakeResult(BaseModel):
    """What the intake decided for one alert of a delivery (not a run's outcome: that is
    ``incident.record.Outcome``)."""

    alert: Alert
    disposition: Disposition
    incident: TrackedIncident | None = None
    route: RouteDecision | None = None
    reason: str = ""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def new_incident_id(at: datetime) -> str:
    """INC-YYYYMMDD-A<7 random hex>: unique beyond this store, so a new or restored store
    never reuses an id that already names runs (and idempotency keys) in Prefect."""
    return f"INC-{at:%Y%m%d}-A{secrets.token_hex(4)[:7]}"


class AlertStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    # -- intake -------------------------------------------------------------------------
    def record_delivery(self, delivery: Delivery, alerts: list[Alert],
                        routes: list[RouteDecision]) -> list[IntakeResult]:
        """One transaction: the delivery, each alert with its disposition, new incidents."""
        now = _now()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "INSERT INTO deliveries (received_at, source, delivery_id, remote_addr, alerts)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (delivery.received_at.isoformat(), delivery.source, delivery.delivery_id,
                     delivery.remote_addr, len(alerts)))
                delivery_row = cur.lastrowid
                outcomes = [self._decide(db, alert, route, now) for alert, route in zip(alerts, routes)]
                for o in outcomes:
                    db.execute(
                        "INSERT INTO alerts (delivery, received_at, source, status, fingerprint,"
                        " episode_key, dedup_key, service, severity, summary, disposition,"
                        " incident_id, route, reason, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (delivery_row, now.isoformat(), o.alert.source, o.alert.status,
                         o.alert.fingerprint, o.alert.episode_key, o.alert.dedup_key, o.alert.service,
                         o.alert.severity.value, o.alert.summary, o.disposition,
                         o.incident.incident_id if o.incident else None,
                         o.route.rule if o.route and o.route.routed else None, o.reason,
                         o.alert.model_dump_json()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return outcomes

    def _decide(self, db: sqlite3.Connection, alert: Alert, route: RouteDecision,
                now: datetime) -> IntakeResult:
        if db.execute("INSERT OR IGNORE INTO seen (dedup_key) VALUES (?)",
                      (alert.dedup_key,)).rowcount == 0:
            return IntakeResult(alert=alert, disposition="duplicate", route=route,
                           reason="already received (redelivery)")
        if alert.status == "resolved":
            inc = self._find(db, "episode_key = ?", alert.episode_key) or \
                self._find(db, "fingerprint = ? AND status = 'open'", alert.fingerprint)
            if inc is None:
                return IntakeResult(alert=alert, disposition="resolved-unknown", route=route,
                               reason="resolved, but no incident was opened for it")
            db.execute("UPDATE incidents SET resolved_at = ? WHERE incident_id = ?",
                       (now.isoformat(), inc.incident_id))
            return IntakeResult(alert=alert, disposition="resolved", route=route,
                           incident=inc.model_copy(update={"resolved_at": now}))
        if alert.acknowledged:
            inc = self._find(db, "episode_key = ?", alert.episode_key)
            return IntakeResult(alert=alert, disposition="acknowledged", incident=inc, route=route,
                           reason="acknowledged by a human: no new remediation")
        if not route.routed:
            return IntakeResult(alert=alert, disposition="unrouted", route=route, reason=route.reason)
        open_inc = self._find(db, "episode_key = ?", alert.episode_key) or \
            self._find(db, "fingerprint = ? AND status = 'open'", alert.fingerprint)
        if open_inc is not None:
            return IntakeResult(alert=alert, disposition="attached", incident=open_inc, route=route,
                           reason=f"incident {open_inc.incident_id} already {open_inc.status} for it")
        inc = TrackedIncident(incident_id=new_incident_id(now), episode_key=alert.episode_key,
                       fingerprint=alert.fingerprint, scenario=route.scenario or "",
                       target=route.target or "", severity=route.severity.value,
                       status="open", opened_at=now)
        db.execute(
            "INSERT INTO incidents (incident_id, episode_key, fingerprint, scenario, target,"
            " severity, status, opened_at) VALUES (?,?,?,?,?,?,?,?)",
            (inc.incident_id, inc.episode_key, inc.fingerprint, inc.scenario, inc.target,
             inc.severity, inc.status, now.isoformat()))
        return IntakeResult(alert=alert, disposition="opened", incident=inc, route=route)

    def _find(self, db: sqlite3.Connection, where: str, arg: str) -> TrackedIncident | None:
        row = db.execute(f"SELECT * FROM incidents WHERE {where} ORDER BY opened_at DESC LIMIT 1",
                         (arg,)).fetchone()
        return TrackedIncident.model_validate(dict(row)) if row else None

    # -- incident lifecycle -----------------------------------------------------------------
    def set_flow_run(self, incident_id: str, flow_run_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE incidents SET flow_run_id = ? WHERE incident_id = ?",
                             (flow_run_id, incident_id))

    def close_incident(self, incident_id: str, outcome: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE incidents SET status = 'closed', closed_at = ?, outcome = ?"
                " WHERE incident_id = ?", (_now().isoformat(), outcome, incident_id))

    def incident(self, incident_id: str) -> TrackedIncident | None:
        with self._lock:
            return self._find(self._db, "incident_id = ?", incident_id)

    def open_incidents(self) -> list[TrackedIncident]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM incidents WHERE status = 'open' ORDER BY opened_at").fetchall()
        return [TrackedIncident.model_validate(dict(r)) for r in rows]

    def first_alert(self, incident_id: str) -> Alert:
        """The alert that opened the incident, as it was accepted."""
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM alerts WHERE incident_id = ? AND disposition = 'opened'"
                " ORDER BY id LIMIT 1", (incident_id,)).fetchone()
        if row is None:
            raise LookupError(f"no opening alert stored for {incident_id}; the store at "
                              f"{self.path} is inconsistent - close the incident by hand")
        stored = json.loads(row[0])
        return Alert.model_validate({k: v for k, v in stored.items()
                                     if k not in Alert.model_computed_fields})

    # -- reading ----------------------------------------------------------------------------
    def recent_alerts(self, limit: int = 50) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT a.id, a.received_at, a.source, a.status, a.fingerprint, a.service, a.severity,"
                " a.summary, a.disposition, a.incident_id, a.route, a.reason,"
                " i.status AS incident_status, i.outcome, i.flow_run_id, i.scenario"
                " FROM alerts a LEFT JOIN incidents i ON i.incident_id = a.incident_id"
                " ORDER BY a.id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT disposition, COUNT(*) FROM alerts GROUP BY disposition").fetchall()
            incidents = self._db.execute("SELECT COUNT(*) FROM incidents").fetchone()[0]
        return {**{r[0]: r[1] for r in rows}, "incidents": incidents}
