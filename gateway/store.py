"""The intake store: every alert the gateway accepted, and the incidents they opened.

SQLite (WAL) in the state dir: one transaction per delivery, so what was answered
202 is on disk. Exactly-once is enforced by the database, not by timing:

* ``seen.key`` (source + episode + state) is the primary key: a redelivery of the state an
  episode is in is a duplicate. A state change is not: a resolve forgets the episode's
  firing keys, so a regression after it (Sentry ``unresolved``, PagerDuty ``reopened``) is
  news, and a new firing forgets the resolved key, so the next resolve is news too;
* ``incidents (source, episode_key) WHERE resolved_at IS NULL`` is unique: a firing episode
  opens at most one incident until it resolves; a regression after the resolve opens a new one;
* a partial unique index on ``incidents.fingerprint WHERE status = 'open'``: a re-fire
  (new episode, same alert) while an incident is open is attached to it, not a new run;
* one incident per remediation target: a firing alert that routes to a (scenario, target)
  with an open, unresolved incident joins it ("attached"), whatever its source and labels
  (Alertmanager and Grafana both alerting on the same outage start one run, not two that
  change the same service). Decided in the delivery's write transaction (``BEGIN
  IMMEDIATE``, one writer at a time), so two deliveries cannot both open one;
* ``incident_alerts`` keeps every alert (source + episode) that joined an incident, the
  opening one included. A resolve lands only on an alert of its own source and episode, and
  resolves the incident only once every alert that joined it has resolved: until then it is
  "resolved-partial" and the run goes on (a paused run is not stood down while another
  alert about the same target still fires).

What is kept (the file is 0600, its directory private): the normalised fields the
gateway needs - identity, status, labels, summary, severity, times, links, what was
decided - never the raw payload or its unknown fields. ``retention_days`` prunes old
deliveries and alerts; open incidents (and their alerts) and the dedup keys still being
redelivered within the retention period are kept.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from gateway.models import Alert, Delivery
from gateway.routing import RouteDecision

log = logging.getLogger("gateway.store")

Disposition = Literal["opened", "attached", "duplicate", "unrouted", "resolved", "resolved-partial",
                      "resolved-unknown", "acknowledged"]

SCHEMA_VERSION = 4
PRUNE_EVERY = timedelta(hours=1)

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
CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, last_seen TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (
    incident_id TEXT PRIMARY KEY, source TEXT NOT NULL, episode_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL, scenario TEXT NOT NULL, target TEXT NOT NULL,
    severity TEXT NOT NULL, status TEXT NOT NULL, opened_at TEXT NOT NULL, resolved_at TEXT,
    closed_at TEXT, outcome TEXT, flow_run_id TEXT, runner TEXT, lease_until TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS one_incident_per_unresolved_episode
    ON incidents(source, episode_key) WHERE resolved_at IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS one_open_incident_per_alert
    ON incidents(fingerprint) WHERE status = 'open';
CREATE INDEX IF NOT EXISTS incidents_by_episode ON incidents(source, episode_key);
CREATE INDEX IF NOT EXISTS open_incidents_by_target ON incidents(scenario, target) WHERE status = 'open';
CREATE INDEX IF NOT EXISTS runs_for_runners ON incidents(opened_at)
    WHERE status = 'open' AND flow_run_id IS NOT NULL AND runner IS NULL;
CREATE TABLE IF NOT EXISTS incident_alerts (
    id INTEGER PRIMARY KEY, incident_id TEXT NOT NULL REFERENCES incidents(incident_id),
    source TEXT NOT NULL, episode_key TEXT NOT NULL, fingerprint TEXT NOT NULL, summary TEXT,
    joined_at TEXT NOT NULL, resolved_at TEXT, UNIQUE (incident_id, source, episode_key));
CREATE INDEX IF NOT EXISTS incident_alerts_by_episode ON incident_alerts(source, episode_key);
CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts(received_at);
CREATE INDEX IF NOT EXISTS alerts_by_incident ON alerts(incident_id);
CREATE INDEX IF NOT EXISTS deliveries_by_time ON deliveries(received_at);
CREATE INDEX IF NOT EXISTS seen_by_time ON seen(last_seen);
"""

#: the normalised fields of an alert the store keeps (``alerts.body``, JSON): what the
#: incident's trigger and a restart need. Never ``annotations`` or ``extra`` (free-form and
#: unknown fields of the sender's payload) nor the sender's raw ids.
STORED_FIELDS = ("source", "status", "acknowledged", "fingerprint", "fingerprint_origin",
                 "episode_key", "labels", "summary", "service", "severity", "starts_at", "ends_at",
                 "links", "event_type")

#: schema 1 kept each alert's whole JSON, the payload's unknown fields included, and keyed
#: dedup and incidents without the source; the alerts' bodies are rewritten in Python
_MIGRATE_FROM_1 = [
    "ALTER TABLE incidents RENAME TO incidents_v1",
    "ALTER TABLE seen RENAME TO seen_v1",
    "DROP INDEX IF EXISTS one_open_incident_per_alert",
    *[s.strip() for s in SCHEMA.split(";") if s.strip()],
    """INSERT INTO incidents (incident_id, source, episode_key, fingerprint, scenario, target,
           severity, status, opened_at, resolved_at, closed_at, outcome, flow_run_id)
       SELECT i.incident_id,
           COALESCE((SELECT a.source FROM alerts a WHERE a.incident_id = i.incident_id
                     AND a.disposition = 'opened' LIMIT 1),
                    substr(i.episode_key, 1, instr(i.episode_key, ':') - 1)),
           i.episode_key, i.fingerprint, i.scenario, i.target, i.severity, i.status, i.opened_at,
           i.resolved_at, i.closed_at, i.outcome, i.flow_run_id FROM incidents_v1 i""",
    """INSERT INTO seen (key, last_seen)
       SELECT substr(dedup_key, 1, instr(dedup_key, ':') - 1) || '|' || dedup_key, :now
       FROM seen_v1""",
    "DROP TABLE incidents_v1",
    "DROP TABLE seen_v1",
]

#: schema 2 knew only the alert that opened an incident (and re-fires, as attached alert rows):
#: both are back-filled as its joined alerts. Schema 2 kept no per-alert resolve, so each takes
#: the incident's: a resolved incident stays resolved, an unresolved one has all its alerts firing.
_MIGRATE_FROM_2 = [
    *[s.strip() for s in SCHEMA.split(";") if s.strip()],
    """INSERT OR IGNORE INTO incident_alerts (incident_id, source, episode_key, fingerprint, summary,
           joined_at, resolved_at)
       SELECT i.incident_id, i.source, i.episode_key, i.fingerprint,
           (SELECT a.summary FROM alerts a WHERE a.incident_id = i.incident_id
            AND a.disposition = 'opened' ORDER BY a.id LIMIT 1),
           i.opened_at, i.resolved_at FROM incidents i""",
    """INSERT OR IGNORE INTO incident_alerts (incident_id, source, episode_key, fingerprint, summary,
           joined_at, resolved_at)
       SELECT a.incident_id, a.source, a.episode_key, a.fingerprint, a.summary, MIN(a.received_at),
           i.resolved_at
       FROM alerts a JOIN incidents i ON i.incident_id = a.incident_id
       WHERE a.disposition = 'attached' GROUP BY a.incident_id, a.source, a.episode_key""",
]


def stored_body(alert: Alert) -> str:
    """Only the kept fields are serialised: ``extra`` (the sender's, any shape) never is."""
    return json.dumps(alert.model_dump(mode="json", include=set(STORED_FIELDS)))


#: a dedup key (``{key}``) of the episode of a joined alert ``j``: "<source>|<episode>|<state>"
_KEY_OF_JOINED = ("substr({key}, 1, length(j.source) + length(j.episode_key) + 2)"
                  " = j.source || '|' || j.episode_key || '|'")

#: an incident among whose joined alerts is this source + episode (``_find`` condition)
_JOINED_BY_EPISODE = ("incident_id IN (SELECT incident_id FROM incident_alerts"
                      " WHERE source = ? AND episode_key = ?)")


class TrackedIncident(BaseModel):
    """The gateway's row for an incident it opened: which alert episode, which run, open or
    closed. Not the incident record itself (``incident.record.Incident``, kept by the run)."""

    incident_id: str
    source: str
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
    runner: str | None = None
    """the runner process that claimed the run (None: queued for a runner, or not created yet)"""
    lease_until: datetime | None = None
    """until when the runner's claim holds unless it renews it"""


class JoinedAlert(BaseModel):
    """One alert (source + episode) that joined an incident: the one that opened it, or a
    later one that attached to it. The incident resolves when all of them have."""

    incident_id: str
    source: str
    episode_key: str
    fingerprint: str
    summary: str | None = None
    joined_at: datetime
    resolved_at: datetime | None = None


class IntakeResult(BaseModel):
    """What the intake decided for one alert of a delivery (not a run's outcome: that is
    ``incident.record.Outcome``)."""

    alert: Alert
    disposition: Disposition
    incident: TrackedIncident | None = None
    route: RouteDecision | None = None
    reason: str = ""
    still_firing: int = 0
    """resolved-partial: how many other alerts of the incident still fire."""


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(at: datetime) -> str:
    """Stored times: UTC ISO 8601, so that they compare as text."""
    return at.astimezone(UTC).isoformat()


def new_incident_id(at: datetime) -> str:
    """INC-YYYYMMDD-A<7 random hex>: unique beyond this store, so a new or restored store
    never reuses an id that already names runs (and idempotency keys) in Prefect."""
    return f"INC-{at:%Y%m%d}-A{secrets.token_hex(4)[:7]}"


def seen_key(alert: Alert, state: str | None = None) -> str:
    """The dedup key of an alert's state, qualified by its source."""
    if state is None:
        return f"{alert.source}|{alert.dedup_key}"
    return f"{alert.source}|{alert.episode_key}|{state}"


def private_file(path: Path) -> None:
    """Create ``path`` (and its directory) readable by this user only; tighten them if they exist.

    A directory made by the gateway is 0700; an existing one others can enter loses their
    access, unless it is a shared sticky directory (such as /tmp), which is left alone with a
    warning - the file itself is 0600 either way.
    """
    parent = path.parent
    if not parent.exists():
        os.makedirs(parent, mode=0o700, exist_ok=True)
    mode = parent.stat().st_mode
    if mode & 0o077:
        if mode & stat.S_ISVTX:
            log.warning("the store's directory %s is shared (sticky, mode %o); keep the store in a "
                        "private directory (RUNBOOKS_GATEWAY_STORE)", parent, stat.S_IMODE(mode))
        else:
            parent.chmod(stat.S_IMODE(mode) & 0o700)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and stat.S_IMODE(file.stat().st_mode) != 0o600:
            file.chmod(0o600)


#: deliveries one group commit may hold (record_delivery)
GROUP_MAX = 256


class _Pending:
    """A delivery waiting for its group commit."""

    __slots__ = ("delivery", "alerts", "routes", "now", "done", "result", "error")

    def __init__(self, delivery: Delivery, alerts: list[Alert], routes: list[RouteDecision],
                 now: datetime) -> None:
        self.delivery, self.alerts, self.routes, self.now = delivery, alerts, routes, now
        self.done = False
        self.result: list[IntakeResult] | None = None
        self.error: BaseException | None = None


class AlertStore:
    def __init__(self, path: Path, retention_days: int = 30) -> None:
        private_file(path)
        self.path = path
        self.retention = timedelta(days=retention_days)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self._group = threading.Condition()  # group commit (record_delivery)
        self._queued: list[_Pending] = []
        self._writing = False
        self._migrate()
        self._last_prune: datetime | None = None
        self.prune()

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION, in one transaction: a new store is created, an
        older one migrated step by step (1 -> 2 -> 3 -> 4)."""
        db = self._db
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                migrated_from = version if version < SCHEMA_VERSION and "incidents" in tables else None
                if migrated_from is not None:
                    self._migrate_to_4(db)  # first: the schema's index on them needs the columns
                if migrated_from is None and version < SCHEMA_VERSION:
                    for statement in (s.strip() for s in SCHEMA.split(";")):
                        if statement:
                            db.execute(statement)
                if migrated_from is not None and migrated_from < 2:
                    self._migrate_from_1(db)
                if migrated_from is not None and migrated_from < 3:
                    for statement in _MIGRATE_FROM_2:
                        db.execute(statement)
                if migrated_from is not None:  # indexes new since (all IF NOT EXISTS)
                    for statement in (s.strip() for s in SCHEMA.split(";")):
                        if statement:
                            db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if migrated_from is not None and migrated_from < 2:
            db.execute("VACUUM")  # the dropped payload fields must not linger in free pages
            log.warning("migrated the intake store %s from schema 1: payload fields beyond the "
                        "normalised alert dropped", self.path)
        if migrated_from is not None and migrated_from < 3:
            log.warning("migrated the intake store %s to schema %d: the alerts that joined each "
                        "incident are back-filled (its opening alert and re-fires)", self.path, SCHEMA_VERSION)

    @staticmethod
    def _migrate_to_4(db: sqlite3.Connection) -> None:
        """Schema 4: which runner process claimed an incident's run, and until when its claim
        holds (a runner renews it while it runs; an expired claim is the gateway's to settle)."""
        columns = {r[1] for r in db.execute("PRAGMA table_info(incidents)")}
        for column in ("runner", "lease_until"):
            if column not in columns:
                db.execute(f"ALTER TABLE incidents ADD COLUMN {column} TEXT")

    @staticmethod
    def _migrate_from_1(db: sqlite3.Connection) -> None:
        for statement in _MIGRATE_FROM_1:
            db.execute(statement, {"now": _ts(_now())} if ":now" in statement else ())
        for row_id, body in db.execute("SELECT id, body FROM alerts").fetchall():
            kept = {k: v for k, v in json.loads(body).items() if k in STORED_FIELDS}
            db.execute("UPDATE alerts SET body = ? WHERE id = ?", (json.dumps(kept), row_id))

    # -- intake -------------------------------------------------------------------------
    def record_delivery(self, delivery: Delivery, alerts: list[Alert],
                        routes: list[RouteDecision]) -> list[IntakeResult]:
        """Record one delivery - each alert with its disposition, new incidents - and return
        once it is committed.

        Group commit: deliveries that arrive while a transaction is being written wait, and the
        next writer takes them all (up to ``GROUP_MAX``) into one transaction, each under a
        savepoint of its own. The decisions are those of one transaction per delivery, in
        arrival order; a delivery that fails is rolled back alone; none returns before the
        COMMIT that holds it. A burst costs one commit per batch, not one per delivery."""
        now = delivery.received_at
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        job = _Pending(delivery, alerts, routes, now)
        with self._group:
            self._queued.append(job)
            while True:
                while self._writing and not job.done:
                    self._group.wait()
                if job.done:
                    break
                self._writing = True
                batch, self._queued = self._queued[:GROUP_MAX], self._queued[GROUP_MAX:]
                self._group.release()
                try:
                    self._write(batch)
                finally:
                    self._group.acquire()
                    self._writing = False
                    self._group.notify_all()
        if job.error is not None:
            raise job.error
        if self._last_prune is None or now - self._last_prune >= PRUNE_EVERY:
            self.prune(now)
        assert job.result is not None
        return job.result

    def _write(self, batch: list[_Pending]) -> None:
        """One transaction for ``batch``; every job ends done, with its result or its error."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                for job in batch:
                    db.execute("SAVEPOINT delivery")
                    try:
                        job.result = self._record(db, job)
                        db.execute("RELEASE delivery")
                    except Exception as exc:
                        db.execute("ROLLBACK TO delivery")
                        db.execute("RELEASE delivery")
                        job.result, job.error = None, exc
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                for job in batch:
                    job.result, job.error = None, job.error or exc
                if not isinstance(exc, Exception):
                    raise
            finally:
                for job in batch:
                    job.done = True

    def _record(self, db: sqlite3.Connection, job: _Pending) -> list[IntakeResult]:
        delivery, alerts, now = job.delivery, job.alerts, job.now
        cur = db.execute(
            "INSERT INTO deliveries (received_at, source, delivery_id, remote_addr, alerts)"
            " VALUES (?, ?, ?, ?, ?)",
            (_ts(now), delivery.source, delivery.delivery_id, delivery.remote_addr, len(alerts)))
        delivery_row = cur.lastrowid
        outcomes = [self._decide(db, alert, route, now) for alert, route in zip(alerts, job.routes)]
        for o in outcomes:
            db.execute(
                "INSERT INTO alerts (delivery, received_at, source, status, fingerprint,"
                " episode_key, dedup_key, service, severity, summary, disposition,"
                " incident_id, route, reason, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (delivery_row, _ts(now), o.alert.source, o.alert.status,
                 o.alert.fingerprint, o.alert.episode_key, o.alert.dedup_key, o.alert.service,
                 o.alert.severity.value, o.alert.summary, o.disposition,
                 o.incident.incident_id if o.incident else None,
                 o.route.rule if o.route and o.route.routed else None, o.reason,
                 stored_body(o.alert)))
        return outcomes

    def _decide(self, db: sqlite3.Connection, alert: Alert, route: RouteDecision,
                now: datetime) -> IntakeResult:
        key = seen_key(alert)
        if db.execute("INSERT OR IGNORE INTO seen (key, last_seen) VALUES (?, ?)",
                      (key, _ts(now))).rowcount == 0:
            db.execute("UPDATE seen SET last_seen = ? WHERE key = ?", (_ts(now), key))
            return IntakeResult(alert=alert, disposition="duplicate", route=route,
                                reason="already received (redelivery)")
        if alert.status == "resolved":
            # the episode is over: its next firing (a regression) is news, not a redelivery
            db.execute("DELETE FROM seen WHERE key IN (?, ?)",
                       (seen_key(alert, "firing"), seen_key(alert, "acknowledged")))
            return self._resolve(db, alert, route, now)
        db.execute("DELETE FROM seen WHERE key = ?", (seen_key(alert, "resolved"),))
        if alert.acknowledged:
            inc = self._find(db, _JOINED_BY_EPISODE, alert.source, alert.episode_key)
            return IntakeResult(alert=alert, disposition="acknowledged", incident=inc, route=route,
                                reason="acknowledged by a human: no new remediation")
        if not route.routed:
            return IntakeResult(alert=alert, disposition="unrouted", route=route, reason=route.reason)
        found = self._open_incident_for(db, alert, route)
        if found is not None:
            open_inc, reason = found
            self._join(db, open_inc.incident_id, alert, now)
            return IntakeResult(alert=alert, disposition="attached", incident=open_inc, route=route,
                                reason=reason)
        inc = TrackedIncident(incident_id=new_incident_id(now), source=alert.source,
                              episode_key=alert.episode_key, fingerprint=alert.fingerprint,
                              scenario=route.scenario or "", target=route.target or "",
                              severity=route.severity.value, status="open", opened_at=now)
        db.execute(
            "INSERT INTO incidents (incident_id, source, episode_key, fingerprint, scenario, target,"
            " severity, status, opened_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (inc.incident_id, inc.source, inc.episode_key, inc.fingerprint, inc.scenario, inc.target,
             inc.severity, inc.status, _ts(now)))
        self._join(db, inc.incident_id, alert, now)
        return IntakeResult(alert=alert, disposition="opened", incident=inc, route=route)

    def _open_incident_for(self, db: sqlite3.Connection, alert: Alert,
                           route: RouteDecision) -> tuple[TrackedIncident, str] | None:
        """The open incident a new firing alert joins, and why; None: it opens its own.

        In this order: an unresolved incident its episode already joined (a regression of
        a joined alert); the unresolved incident of its (scenario, target), whatever the
        source and labels: one remediation per target at a time; an open incident of the
        same alert (fingerprint), even resolved, while its run still goes on.
        """
        inc = self._find(db, f"resolved_at IS NULL AND {_JOINED_BY_EPISODE}", alert.source, alert.episode_key)
        if inc is not None:
            return inc, f"incident {inc.incident_id} already open for it"
        inc = self._find(db, "scenario = ? AND target = ? AND status = 'open' AND resolved_at IS NULL",
                         route.scenario or "", route.target or "")
        if inc is not None:
            return inc, (f"incident {inc.incident_id} is already open for {inc.scenario} on {inc.target}: "
                         "the alert joined it, no new run")
        inc = self._find(db, "fingerprint = ? AND status = 'open'", alert.fingerprint)
        if inc is not None:
            return inc, f"incident {inc.incident_id} still open for this alert (its run goes on)"
        return None

    @staticmethod
    def _join(db: sqlite3.Connection, incident_id: str, alert: Alert, now: datetime) -> None:
        """The alert joins the incident; an episode that joined before fires again (not resolved)."""
        db.execute(
            "INSERT INTO incident_alerts (incident_id, source, episode_key, fingerprint, summary, joined_at)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (incident_id, source, episode_key)"
            " DO UPDATE SET resolved_at = NULL",
            (incident_id, alert.source, alert.episode_key, alert.fingerprint, alert.summary, _ts(now)))

    def _resolve(self, db: sqlite3.Connection, alert: Alert, route: RouteDecision,
                 now: datetime) -> IntakeResult:
        """A resolve lands on the joined alert of its own source and episode (the one still
        firing first, then an open incident's); the incident resolves with its last alert."""
        row = db.execute(
            "SELECT ia.id AS joined_id, i.* FROM incident_alerts ia"
            " JOIN incidents i ON i.incident_id = ia.incident_id"
            " WHERE ia.source = ? AND ia.episode_key = ?"
            " ORDER BY ia.resolved_at IS NULL DESC, i.status = 'open' DESC, ia.joined_at DESC LIMIT 1",
            (alert.source, alert.episode_key)).fetchone()
        if row is None:
            return IntakeResult(alert=alert, disposition="resolved-unknown", route=route,
                                reason=f"resolved, but no incident was opened or joined by this "
                                       f"{alert.source} alert (episode {alert.episode_key})")
        inc = TrackedIncident.model_validate(dict(row))
        db.execute("UPDATE incident_alerts SET resolved_at = ? WHERE id = ?", (_ts(now), row["joined_id"]))
        firing = db.execute("SELECT COUNT(*) FROM incident_alerts WHERE incident_id = ? AND resolved_at IS NULL",
                            (inc.incident_id,)).fetchone()[0]
        if firing:
            return IntakeResult(alert=alert, disposition="resolved-partial", incident=inc, route=route,
                                still_firing=firing,
                                reason=f"{firing} other alert{'s' if firing > 1 else ''} still firing on "
                                       f"{inc.incident_id}: the incident stays open")
        db.execute("UPDATE incidents SET resolved_at = ? WHERE incident_id = ?", (_ts(now), inc.incident_id))
        return IntakeResult(alert=alert, disposition="resolved", route=route,
                            incident=inc.model_copy(update={"resolved_at": now}))

    def _find(self, db: sqlite3.Connection, where: str, *args: str,
              order: str = "opened_at DESC") -> TrackedIncident | None:
        row = db.execute(f"SELECT * FROM incidents WHERE {where} ORDER BY {order} LIMIT 1",
                         args).fetchone()
        return TrackedIncident.model_validate(dict(row)) if row else None

    # -- retention ------------------------------------------------------------------------
    def prune(self, now: datetime | None = None) -> dict[str, int]:
        """Forget what is older than the retention period; keep what dedup and recovery need.

        Kept: open incidents, all their alerts and the dedup keys of every episode that joined
        them; dedup keys redelivered within the period (a duplicate refreshes its key); closed
        incidents (and their joined alerts) while a key of one of their episodes is kept.
        """
        now = now or _now()
        cutoff = _ts(now - self.retention)
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                counts = {
                    "alerts": db.execute(
                        "DELETE FROM alerts WHERE received_at < ? AND (incident_id IS NULL OR"
                        " incident_id NOT IN (SELECT incident_id FROM incidents WHERE status = 'open'))",
                        (cutoff,)).rowcount,
                    "deliveries": db.execute(
                        "DELETE FROM deliveries WHERE received_at < ? AND NOT EXISTS"
                        " (SELECT 1 FROM alerts a WHERE a.delivery = deliveries.id)", (cutoff,)).rowcount,
                    "seen": db.execute(
                        "DELETE FROM seen WHERE last_seen < ? AND NOT EXISTS (SELECT 1 FROM incident_alerts j"
                        " JOIN incidents i ON i.incident_id = j.incident_id WHERE i.status = 'open'"
                        f" AND {_KEY_OF_JOINED.format(key='seen.key')})", (cutoff,)).rowcount,
                    "incidents": db.execute(
                        "DELETE FROM incidents WHERE status = 'closed' AND closed_at < ? AND NOT EXISTS"
                        " (SELECT 1 FROM incident_alerts j JOIN seen s"
                        f" ON {_KEY_OF_JOINED.format(key='s.key')}"
                        " WHERE j.incident_id = incidents.incident_id)", (cutoff,)).rowcount,
                    "incident_alerts": db.execute(
                        "DELETE FROM incident_alerts WHERE incident_id NOT IN"
                        " (SELECT incident_id FROM incidents)").rowcount,
                }
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._last_prune = now
        if any(counts.values()):
            log.info("pruned the intake store (older than %s): %s", cutoff, counts)
        return counts

    # -- incident lifecycle -----------------------------------------------------------------
    def set_flow_run(self, incident_id: str, flow_run_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE incidents SET flow_run_id = ? WHERE incident_id = ?",
                             (flow_run_id, incident_id))

    def close_incident(self, incident_id: str, outcome: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE incidents SET status = 'closed', closed_at = ?, outcome = ?, lease_until = NULL"
                " WHERE incident_id = ?", (_ts(_now()), outcome, incident_id))

    # -- the runners' queue: open incidents whose run is created and not claimed ---------------
    def claim_runs(self, runner: str, limit: int, lease_s: float) -> list[TrackedIncident]:
        """Give ``runner`` up to ``limit`` queued runs, oldest first, each claimed until
        now + ``lease_s`` (one transaction: two runners never get the same run)."""
        until = _ts(_now() + timedelta(seconds=lease_s))
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(
                    "UPDATE incidents SET runner = ?, lease_until = ? WHERE incident_id IN"
                    " (SELECT incident_id FROM incidents WHERE status = 'open' AND flow_run_id IS NOT NULL"
                    "  AND runner IS NULL ORDER BY opened_at LIMIT ?) RETURNING *",
                    (runner, until, limit)).fetchall()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return sorted((TrackedIncident.model_validate(dict(r)) for r in rows), key=lambda i: i.opened_at)

    def renew_claims(self, runner: str, incident_ids: list[str], lease_s: float) -> list[str]:
        """Extend ``runner``'s claims on these open incidents; returns the ids it still holds
        (one it no longer holds was settled by the gateway: its run must not go on)."""
        until = _ts(_now() + timedelta(seconds=lease_s))
        held: list[str] = []
        with self._lock:
            for incident_id in incident_ids:
                cur = self._db.execute(
                    "UPDATE incidents SET lease_until = ? WHERE incident_id = ? AND runner = ?"
                    " AND status = 'open'", (until, incident_id, runner))
                if cur.rowcount:
                    held.append(incident_id)
        return held

    def extend_claims(self, lease_s: float) -> int:
        """Give every open claim ``lease_s`` from now (a gateway that was down could not
        renew them: its runners get the time to renew before any claim counts as lost)."""
        with self._lock:
            return self._db.execute(
                "UPDATE incidents SET lease_until = ? WHERE status = 'open' AND runner IS NOT NULL",
                (_ts(_now() + timedelta(seconds=lease_s)),)).rowcount

    def expired_claims(self) -> list[TrackedIncident]:
        """Open incidents whose runner stopped renewing its claim (died, or cut off)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM incidents WHERE status = 'open' AND runner IS NOT NULL"
                " AND lease_until < ? ORDER BY opened_at", (_ts(_now()),)).fetchall()
        return [TrackedIncident.model_validate(dict(r)) for r in rows]

    def requeue(self, incident_id: str) -> None:
        """Put a claimed run back in the queue (its runner died before it started it)."""
        with self._lock:
            self._db.execute("UPDATE incidents SET runner = NULL, lease_until = NULL"
                             " WHERE incident_id = ? AND status = 'open'", (incident_id,))

    def queued_runs(self) -> int:
        """Runs created and not yet claimed by a runner."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM incidents WHERE status = 'open' AND flow_run_id IS NOT NULL"
                " AND runner IS NULL").fetchone()[0]

    def incident(self, incident_id: str) -> TrackedIncident | None:
        with self._lock:
            return self._find(self._db, "incident_id = ?", incident_id)

    def open_incidents(self) -> list[TrackedIncident]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM incidents WHERE status = 'open' ORDER BY opened_at").fetchall()
        return [TrackedIncident.model_validate(dict(r)) for r in rows]

    def joined_alerts(self, incident_id: str) -> list[JoinedAlert]:
        """The alerts that joined the incident, the opening one first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT incident_id, source, episode_key, fingerprint, summary, joined_at, resolved_at"
                " FROM incident_alerts WHERE incident_id = ? ORDER BY joined_at, id", (incident_id,)).fetchall()
        return [JoinedAlert.model_validate(dict(r)) for r in rows]

    def first_alert(self, incident_id: str) -> Alert:
        """The alert that opened the incident, from its stored normalised fields."""
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM alerts WHERE incident_id = ? AND disposition = 'opened'"
                " ORDER BY id LIMIT 1", (incident_id,)).fetchone()
        if row is None:
            raise LookupError(f"no opening alert stored for {incident_id}; the store at "
                              f"{self.path} is inconsistent - close the incident by hand")
        return Alert.model_validate(json.loads(row[0]))

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

