"""People hear from an open incident, as the runbooks ask (001 "Declare incident", "Status
Updates", "Close incident"; 002 "Communication Templates"; 004 "Escalation Matrix").

The incident's own run keeps the clock and sends, through the notifiers configured
(``comms/``: PagerDuty, Opsgenie, Slack, Statuspage):

- **declared** when the run has found a real problem (its first changing step, or an
  escalation): it starts at the ladder's first level (``policies/escalation.yaml``);
- **acknowledged** when a person answers an approval: someone is on it;
- **escalated** when the time of its level is up while it is open and not verified, and at
  once when a remediation fails, an approval is left unanswered or a step is held back;
- **update** every ``update_every_minutes`` of its severity (P0/P1: 15) while open;
- **resolved** with the root cause (the findings) and the fix (what was changed).

A run that finds nothing wrong, a dry run and a shadow run tell nobody. A failing notifier
never stops a remediation: each delivery, delivered or not, is on the record ("Comms").
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Literal

from prefect.runtime import flow_run as current_run
from prefect.settings import PREFECT_UI_URL

from comms.messages import Kind, Message
from comms.notifiers import Delivery, Notifiers
from incident.errors import ConfigurationError
from incident.ladder import EscalationPolicy, Rung, load_escalation_policy
from incident.record import CommsRecord, Incident, IncidentRecord
from incident.waiting import register_clock, unregister_clock

Status = Literal["investigating", "identified", "fixing", "monitoring", "resolved"]
_log = logging.getLogger("runbooks.comms")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _silent(record: IncidentRecord) -> bool:
    return record.dry_run or record.shadow


def _run_url(flow_run_id: object) -> str:
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui and flow_run_id else ""


def _status(record: IncidentRecord) -> Status:
    phase = record.timeline[-1].phase if record.timeline else "detect"
    if record.verified_at is not None:
        return "monitoring"
    return {"fix": "fixing", "verify": "monitoring"}.get(phase, "identified")  # type: ignore[return-value]


def message(record: IncidentRecord, kind: Kind, *, flow_run_id: object = "", status: Status | None = None,
            note: str = "", policy: EscalationPolicy | None = None) -> Message:
    """The message of ``kind`` about ``record`` (the runbooks' templates render it)."""
    now = _now()
    problems = [f.detail for f in record.findings if not f.ok]
    changed = [f"{a.action} on {a.target}: {a.detail}" for a in record.actions if a.changed]
    level = ""
    if record.comms.level:
        level = (policy.rung(record.comms.level).describe() if policy else record.comms.level)
    every = policy.update_every(record.severity) if policy else None
    return Message(
        kind=kind, incident_id=record.incident_id, scenario=record.scenario, target=record.target,
        environment=record.environment, severity=record.severity.value,
        status=status or ("resolved" if kind == "resolved" else _status(record)),
        summary=record.trigger.summary or (problems[0] if problems else f"{record.scenario} on {record.target}"),
        impact=f"{record.target} ({record.environment})",
        actions=note or (record.timeline[-1].event if record.timeline else ""),
        level=level,
        root_cause="; ".join(problems[:3]) or "to be confirmed",
        fix="; ".join(changed) or record.summary or "nothing was changed",
        opened_at=record.opened_at, at=now,
        next_update_at=(now + every) if every and kind != "resolved" else None,
        run_url=_run_url(flow_run_id), drill=record.drill is not None,
    )


def send(record: IncidentRecord, kind: Kind, *, flow_run_id: object = "", note: str = "",
         status: Status | None = None, policy: EscalationPolicy | None = None,
         notifiers: Notifiers | None = None) -> list[Delivery]:
    """Send one message through every configured notifier (``notifiers``, else those of the
    settings); the deliveries go on the record. Never raises for a notifier: a misconfigured
    one is recorded as not delivered."""
    msg = message(record, kind, flow_run_id=flow_run_id, note=note, status=status, policy=policy)
    try:
        notifiers = notifiers or Notifiers.from_settings()
    except ConfigurationError as exc:
        _log.warning("comms: %s not sent: %s", kind, exc)
        sent = [Delivery(provider="comms", kind=kind, delivered=False, attempts=0, at=_now(),
                         detail=f"not sent, the notifiers are misconfigured: {exc.observed}; {exc.next_step}")]
    else:
        sent = notifiers.send(msg, record.comms.deliveries)
    record.comms.deliveries.extend(sent)
    return sent


def _told(incident: Incident, kind: str, sent: list[Delivery], why: str = "") -> None:
    if not sent:
        return
    ok = [d.provider for d in sent if d.delivered]
    failed = [f"{d.provider} ({d.detail})" for d in sent if not d.delivered]
    text = f"told {', '.join(ok) or 'nobody'}: {kind}" + (f" ({why})" if why else "")
    if failed:
        text += f"; NOT delivered to {'; '.join(failed)}"
    incident.note(incident.record.timeline[-1].phase if incident.record.timeline else "detect", text)


def _open_ladder(c: CommsRecord, policy: EscalationPolicy) -> None:
    """Declared now, at the ladder's first level."""
    now = _now()
    c.declared_at, c.level, c.level_since, c.last_update_at = now, policy.first.level, now, now


def _climb(c: CommsRecord, policy: EscalationPolicy) -> Rung | None:
    """One level up now; None at the top of the ladder (the level stays)."""
    nxt = policy.above(c.level or policy.first.level)
    if nxt is not None:
        c.level, c.level_since = nxt.level, _now()
    return nxt


class Clock:
    """The comms of one live incident: declare, acknowledge, escalate, update, resolve."""

    def __init__(self, incident: Incident, flow_run_id: object = "") -> None:
        self.incident = incident
        self.flow_run_id = flow_run_id
        self._policy: EscalationPolicy | None = None
        self._notifiers: Notifiers | None = None  # one per run: credentials resolved once

    @property
    def policy(self) -> EscalationPolicy:
        if self._policy is None:
            self._policy = load_escalation_policy()
        return self._policy

    @property
    def record(self) -> IncidentRecord:
        return self.incident.record

    def _send(self, kind: Kind, note: str = "", status: Status | None = None) -> list[Delivery]:
        if self._notifiers is None:
            try:
                self._notifiers = Notifiers.from_settings()
            except ConfigurationError:
                pass  # send() records it as not delivered, each time, until it is fixed
        return send(self.record, kind, flow_run_id=self.flow_run_id, note=note, status=status,
                    policy=self.policy, notifiers=self._notifiers)

    def declare(self) -> None:
        """The run found a real problem: the incident starts at the ladder's first level."""
        c = self.record.comms
        if _silent(self.record) or c.declared_at is not None:
            return
        _open_ladder(c, self.policy)
        sev = self.policy.severities[self.record.severity]
        why = (f"{self.record.severity.value} {sev.name}: respond within {sev.respond_within_minutes:g} min; "
               f"{self.policy.first.describe()}")
        self.incident.note("contain", f"incident declared, {why}")
        _told(self.incident, "declared", self._send("declared", status="identified"), why)

    def acknowledge(self, by: str) -> None:
        c = self.record.comms
        if _silent(self.record) or c.declared_at is None or c.acknowledged_at is not None:
            return
        c.acknowledged_at = _now()
        _told(self.incident, "acknowledged", self._send("acknowledged", note=f"{by} answered"), by)

    def escalate_now(self, reason: str) -> None:
        """A failed remediation, an unanswered approval, a held-back step: one level up now."""
        if _silent(self.record):
            return
        self.declare()
        nxt = _climb(self.record.comms, self.policy)
        where = nxt.describe() if nxt else f"{self.record.comms.level} (the top of the ladder)"
        _told(self.incident, "escalated", self._send("escalated", note=f"{reason}; now {where}"), where)

    def tick(self) -> None:
        """Move up the ladder when the level's time is up, and send a due status update; only
        while the incident is declared, open and not verified."""
        rec, c = self.record, self.record.comms
        if (_silent(rec) or c.declared_at is None or c.level is None or c.level_since is None
                or rec.outcome != "open" or rec.verified_at is not None):
            return
        now = _now()
        for rung, since in self.policy.due_moves(rec.severity, c.level, c.level_since, now):
            was = c.level
            c.level, c.level_since = rung.level, since
            why = f"{was} had {self.policy.limit(rec.severity, was)} and the incident is still open"
            _told(self.incident, "escalated",
                  self._send("escalated", note=f"time is up: {why}; now {rung.describe()}"), why)
        every = self.policy.update_every(rec.severity)
        if every is not None and c.last_update_at is not None and c.last_update_at + every <= now:
            c.last_update_at = now
            _told(self.incident, "update", self._send("update"), f"every {every}")

    def tick_while_waiting(self) -> None:
        """``tick`` from the clock thread of a waiting run (incident/waiting.py): what it
        recorded is published at once, the run's own next step may be far off."""
        before = len(self.record.timeline)
        self.tick()
        if len(self.record.timeline) != before:
            self.incident.publish()

    def resolve(self) -> None:
        """The run closed its incident: resolved (root cause and fix) to everyone told before."""
        rec = self.record
        if _silent(rec) or rec.comms.declared_at is None:
            return
        if rec.outcome in ("resolved", "resolved without action", "already fine"):
            _told(self.incident, "resolved", self._send("resolved", status="resolved"), rec.outcome)
        # other outcomes (failed, held back, plan only, not approved) escalated already


def tell_from_outside(record: IncidentRecord, reason: str, flow_run_id: object) -> None:
    """A run that cannot speak any more (killed, crashed, closed from outside): everyone hears
    it escalated, even when the run had not declared the incident yet."""
    if _silent(record):
        return
    policy = load_escalation_policy()
    if record.comms.level is None:
        _open_ladder(record.comms, policy)
    _climb(record.comms, policy)
    send(record, "escalated", flow_run_id=flow_run_id, note=reason, policy=policy)


# -- one clock per live run ---------------------------------------------------------------------
_CLOCKS: dict[str, Clock] = {}


def start_clock(incident: Incident) -> Clock:
    """The clock of the current run's incident (``begin``): it ticks at every timeline event,
    and every ``RUNBOOKS_COMMS_TICK_S`` while the run waits (incident/waiting.py)."""
    run_id = current_run.get_id()
    clock = Clock(incident, run_id)
    incident.on_event = clock.tick
    if run_id:
        _CLOCKS[str(run_id)] = clock
        register_clock(str(run_id), clock.tick_while_waiting)
    return clock


def clock_for(incident: Incident) -> Clock:
    """The clock ``start_clock`` gave the current run's incident (a new one if it has none)."""
    run_id = current_run.get_id()
    clock = _CLOCKS.get(str(run_id)) if run_id else None
    return clock if clock is not None and clock.incident is incident else Clock(incident, run_id)


def stop_clock(flow_run_id: str) -> Clock | None:
    """The run ended: its clock stops; returns it (for the last word, ``resolve``)."""
    unregister_clock(flow_run_id)
    return _CLOCKS.pop(flow_run_id, None)
