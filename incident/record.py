"""The incident record: the flow run *is* the incident.

``open_incident`` names the run (incident id, scenario, target), tags it
(severity, scenario, service, environment) and keeps a markdown report artifact,
keyed per incident, current as the flow moves through its phases. The report
ends with a post-mortem skeleton following the runbooks' post-incident template.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Literal
from uuid import UUID, uuid4

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.states import Completed, State
from pydantic import BaseModel, Field

from comms.notifiers import Delivery
from incident.inventory import Severity, Target
from incident.metrics import postmortem_lines

Phase = Literal["detect", "diagnose", "contain", "fix", "verify", "close"]
Outcome = Literal["open", "resolved", "already fine", "not approved", "dry run", "failed",
                  "resolved without action", "held back", "shadow", "plan only"]
ALERT_UPDATE_PREFIX = "alert-update-"
#: Runs of a drill (the drill flow and the remediation it provoked): kept out of the metrics.
DRILL_TAG = "drill"
#: In an alert update, the words that say every alert of the incident has resolved (the alert
#: gateway writes them; the approval gate stands down on them instead of pausing).
ALL_ALERTS_RESOLVED = "no alert of the incident fires any more"
#: A report published within this many seconds of the last read of the alert updates (or of
#: the start of the incident) reuses that read (one API call less per publish); the approval
#: gate, a close and every explicit ``Incident.publish()`` read them afresh.
ALERT_UPDATES_FRESH_S = 5.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Trigger(BaseModel):
    """What started the run: an alert, a person, a drill or a schedule."""

    kind: Literal["manual", "alert", "drill", "schedule"] = "manual"
    source: str | None = Field(None, description="alertmanager, grafana, sentry, ... or a user")
    summary: str | None = None
    fingerprint: str | None = None
    fired_at: datetime | None = None
    labels: dict[str, str] = {}
    links: list[str] = []


class TimelineEntry(BaseModel):
    at: datetime
    phase: Phase
    event: str


class Finding(BaseModel):
    at: datetime
    check: str
    ok: bool
    detail: str


class ActionTaken(BaseModel):
    at: datetime
    action: str
    target: str
    changed: bool
    detail: str


class ApprovalRecord(BaseModel):
    """One decision on a changing step: when, on what, which decision, by whom and why."""

    at: datetime = Field(description="when the decision was taken (UTC)")
    action: str
    decision: Literal["approved", "rejected", "timed out", "dry run", "stood down"]
    by: str = Field(description="who decided: the approver's name as given in the approval form "
                                "(self-declared unless single sign-on fronts the UI), "
                                "'policy:<name>', 'dry run' or 'nobody' (timed out)")
    reason: str | None = None
    asked_at: datetime | None = Field(
        default=None, description="when a human was asked (the run paused); None when nobody "
        "was asked (a policy, a dry run, a stand-down before the pause)")


class CommsRecord(BaseModel):
    """Who was told what (incident/comms.py): the ladder level and every delivery."""

    level: str | None = Field(default=None, description="escalation level now (L1..L4); None: "
                              "nobody was told yet (the run had not found a problem)")
    level_since: datetime | None = None
    declared_at: datetime | None = None
    acknowledged_at: datetime | None = None
    last_update_at: datetime | None = None
    deliveries: list[Delivery] = []


class DrillMark(BaseModel):
    """The run was started by a drill (flows/drill.py): approvals follow the drill policy (or a
    person in game-day mode), and the run stays out of the real-incident metrics."""

    drill_run_id: str
    scenario: str
    mode: Literal["policy", "game-day"] = "policy"


class IncidentRecord(BaseModel):
    incident_id: str
    scenario: str
    target: str
    environment: str
    severity: Severity
    dry_run: bool
    trigger: Trigger
    opened_at: datetime
    closed_at: datetime | None = None
    outcome: Outcome = "open"
    summary: str = ""
    timeline: list[TimelineEntry] = []
    findings: list[Finding] = []
    actions: list[ActionTaken] = []
    approvals: list[ApprovalRecord] = []
    verification: str | None = None
    verified_at: datetime | None = Field(default=None, description="when the fix was verified")
    escalations: list[str] = []
    comms: CommsRecord = CommsRecord()
    drill: DrillMark | None = None
    shadow: bool = Field(default=False, description="shadow mode (policies/guardrails.yaml): the "
                         "changing steps only say what they would have done")
    kill_switch: bool = Field(default=False, description="the kill switch was on when a changing "
                              "step came: it became a plan")
    guardrails: list[str] = Field(default=[], description="what the guardrails did in this run "
                                  "(the target's lock, held-back steps)")
    in_progress: str | None = Field(
        default=None, description="The changing step running now ('<action> on <target>'): "
        "saved before the step starts, so a run that dies mid-step leaves a true record")
    alert_updates: list[str] = Field(
        default=[], description="Later notifications about the alert (re-fires, resolved), "
                                "delivered to the run as flow run inputs by the alert gateway")

    @property
    def artifact_key(self) -> str:
        return artifact_key_for(self.incident_id)

    @property
    def tags(self) -> list[str]:
        """The run's managed tags: incident, severity, scenario, service, env, outcome."""
        tags = [f"incident:{self.incident_id}", f"severity:{self.severity.value}",
                f"scenario:{self.scenario}", f"service:{self.target}", f"env:{self.environment}"]
        if self.dry_run:
            tags.append("dry-run")
        if self.drill:
            tags.append(DRILL_TAG)
        if self.shadow:
            tags.append("shadow")
        if self.kill_switch:
            tags.append("kill-switch-on")
        if self.outcome != "open":
            tags.append(f"outcome:{self.outcome.replace(' ', '-')}")
        return tags

    def changes(self) -> str:
        """What this run changed and what not, in one true sentence (for closing messages)."""
        changed = [f"{a.action} on {a.target} ({a.detail})" for a in self.actions if a.changed]
        said = f"this run changed: {'; '.join(changed)}" if changed else "this run changed nothing"
        if self.in_progress:
            said += (f"; {self.in_progress} was started and did not report back: its effect is "
                     "unknown, check the target")
        return said


def artifact_key_for(incident_id: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "incident-" + "".join(c if c.isalnum() else "-" for c in incident_id.lower())


def new_incident_id(at: datetime | None = None) -> str:
    """INC-YYYYMMDD-<8 hex of the flow run id>: unique and findable in the UI."""
    at = at or _now()
    run_id = flow_run.get_id()
    suffix = str(run_id).replace("-", "")[:8] if run_id else at.strftime("%H%M%S")
    return f"INC-{at:%Y%m%d}-{suffix}"


class Incident:
    """The live incident of one flow run.

    The report artifact (and the saved record) is republished at phase changes, actions,
    approvals, escalations, guardrail events and the close; notes, findings, the severity and
    the verification go out with the next of those. Inside ``deferred()`` (one step's events
    in a row: a plan approved and started, an escalation and the close) they go out once, at
    the end. A record that did not change since it was last published is not published again.
    """

    def __init__(self, record: IncidentRecord) -> None:
        self.record = record
        self._logger = get_run_logger()
        self._saved: str | None = None  # key of the saved copy of the record (save_record)
        self._publishing = threading.Lock()  # a waiting run's comms clock publishes from a thread
        #: called after every timeline event (incident/comms.py starts the comms clock here)
        self.on_event: Callable[[], None] | None = None
        self._in_event = False
        self._published: str | None = None  # the record (JSON) last published
        #: monotonic time of the last read of the alert updates; a run that has just started
        #: has none to read yet (the gateway sends them to a run it knows): its first reports
        #: reuse that, the close and the approval gate always read
        self._alerts_read_at: float | None = time.monotonic()
        self._deferring = 0
        self._pending = False  # an event asked for a publish inside deferred()

    # -- recording -------------------------------------------------------------------
    def enter(self, phase: Phase, event: str) -> None:
        self._log(phase, event)

    def note(self, phase: Phase, event: str) -> None:
        """A timeline line; the report is republished at the next phase, action or decision."""
        self._log(phase, event, publish=False)

    def guardrail(self, phase: Phase, event: str) -> None:
        """What a guardrail did (took or waited for the lock, held a step back), on the
        timeline and in the report's Guardrails section."""
        self.record.guardrails.append(event)
        self._log(phase, event)

    def finding(self, check: str, ok: bool, detail: str) -> None:
        self.record.findings.append(Finding(at=_now(), check=check, ok=ok, detail=detail))
        self._logger.info("finding %s: %s - %s", check, "ok" if ok else "PROBLEM", detail)

    def action(self, action: str, target: str, changed: bool, detail: str) -> None:
        self.record.actions.append(
            ActionTaken(at=_now(), action=action, target=target, changed=changed, detail=detail)
        )
        self._log("fix", f"{action} on {target}: {detail}")

    def approval(self, entry: ApprovalRecord) -> None:
        self.record.approvals.append(entry)
        who = entry.by + (f" ({entry.reason})" if entry.reason else "")
        self._log("fix", f"approval for {entry.action}: {entry.decision} by {who}")

    def escalated(self, reason: str) -> None:
        self.record.escalations.append(reason)
        self._log(self.record.timeline[-1].phase if self.record.timeline else "detect",
                  f"escalated to humans: {reason}")

    def set_severity(self, severity: Severity, why: str) -> None:
        """The new severity tags the run at once; the report shows it at the next publish."""
        self.record.severity = severity
        _set_run(tags=self.tags)
        self._log("contain", f"severity {severity.value}: {why}", publish=False)

    def verified(self, detail: str) -> None:
        """The verification; published with what follows it (the close or an escalation)."""
        self.record.verification = detail
        self.record.verified_at = _now()
        self._log("verify", detail, publish=False)

    # -- closing ---------------------------------------------------------------------
    def close(self, outcome: Outcome, summary: str) -> State:
        """End the incident; the returned state is what the flow returns."""
        self.record.outcome = outcome
        self.record.summary = summary
        self.record.closed_at = _now()
        self._log("close", f"{outcome}: {summary}")
        _set_run(tags=self.tags)
        return Completed(name=outcome.title() if outcome != "resolved" else "Completed",
                         message=f"{self.record.incident_id} {outcome}: {summary}")

    def fail(self, summary: str) -> None:
        """Mark the record failed before the flow raises (the run ends Failed)."""
        self.record.outcome = "failed"
        self.record.summary = summary
        self.record.closed_at = _now()
        self._log("close", f"failed: {summary}")
        _set_run(tags=self.tags)

    # -- presentation ----------------------------------------------------------------
    @property
    def tags(self) -> list[str]:
        return self.record.tags

    def _log(self, phase: Phase, event: str, publish: bool = True) -> None:
        self.record.timeline.append(TimelineEntry(at=_now(), phase=phase, event=event))
        self._logger.info("[%s] %s", phase, event)
        if self.on_event is not None and not self._in_event:
            self._in_event = True
            try:
                self.on_event()
            finally:
                self._in_event = False
        if publish:
            if self._deferring:
                self._pending = True
            else:
                self.publish(fresh=phase == "close")

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Several events of one step in a row publish once, when the block ends (also when
        it raises). An explicit ``publish()`` inside still publishes at once (a run about to
        wait shows what it waits for)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring and self._pending:
                self.publish(fresh=self.record.outcome != "open")

    def alert_updates(self) -> list[str]:
        """Fetch what the gateway sent about this incident's alert since the run started."""
        run_id = _run_id()
        if not run_id:
            return []
        self._alerts_read_at = time.monotonic()
        self.record.alert_updates = read_alert_updates(run_id)
        return self.record.alert_updates

    def publish(self, fresh: bool = True) -> None:
        """Republish the report artifact and save the record where a closer can find it.

        ``fresh``: read the alert updates first; otherwise a read of the last
        ``ALERT_UPDATES_FRESH_S`` seconds is reused. Nothing is sent when the record is the
        same as the one published last."""
        with self._publishing:
            self._pending = False
            read_at = self._alerts_read_at
            if fresh or read_at is None or time.monotonic() - read_at >= ALERT_UPDATES_FRESH_S:
                self.alert_updates()
            current = self.record.model_dump_json()
            if current == self._published:
                return
            create_markdown_artifact(
                markdown=render_report(self.record),
                key=self.record.artifact_key,
                description=_description(self.record),
            )
            run_id = _run_id()
            if run_id:
                self._saved = save_record(run_id, self.record, self._saved)
            self._published = current


def read_alert_updates(flow_run_id: UUID) -> list[str]:
    """What the alert gateway sent about the run's incident (re-fires, resolves), oldest first."""
    with get_client(sync_client=True) as client:
        inputs = client.filter_flow_run_input(flow_run_id, ALERT_UPDATE_PREFIX, 100, set())
    return [i.decoded_value for i in sorted(inputs, key=lambda i: str(i.created))]


def _run_id() -> UUID | None:
    """The current flow run's id (None outside a flow run)."""
    run_id = flow_run.get_id()
    return UUID(run_id) if run_id else None


_MANAGED_TAGS = ("incident:", "severity:", "scenario:", "service:", "env:", "outcome:", "dry-run",
                 "shadow", "kill-switch-on", DRILL_TAG)

#: The tags of this process's own flow runs as last written by this module: a run's tags are
#: set when it is created (deployment, gateway) and after that only by its own code, so they
#: are known without reading the run again. Runs of other processes are read first.
_RUN_TAGS: dict[UUID, list[str]] = {}
_RUN_TAGS_LOCK = threading.Lock()


def _known_tags(run_id: UUID) -> list[str] | None:
    """The current run's tags without an API call: the last ones written here, else the ones
    the run was created with (its context); None for any other run."""
    if run_id != _run_id():
        return None
    with _RUN_TAGS_LOCK:
        if run_id in _RUN_TAGS:
            return list(_RUN_TAGS[run_id])
    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None and context.flow_run.id == run_id:
        return list(context.flow_run.tags)
    return None


def _retag(run_id: UUID, change: Callable[[list[str]], list[str]], name: str | None = None) -> None:
    """Update the run's tags to ``change(current tags)`` (and its name) in one call when the
    tags are known, else read the run first."""
    with get_client(sync_client=True) as client:
        current = _known_tags(run_id)
        if current is None:
            current = client.read_flow_run(run_id).tags
        tags = change(current)
        client.update_flow_run(run_id, name=name, tags=tags)
    if run_id == _run_id():
        with _RUN_TAGS_LOCK:
            _RUN_TAGS[run_id] = list(tags)
            while len(_RUN_TAGS) > 1024:  # runs whose end was not seen here (forget_run_tags)
                _RUN_TAGS.pop(next(iter(_RUN_TAGS)))


def _set_run(name: str | None = None, tags: list[str] | None = None,
             run_id: UUID | None = None) -> None:
    """Rename/retag the flow run (this one by default); tags set by others (deployment,
    gateway) are kept."""
    run_id = run_id or _run_id()
    if not run_id:
        return
    if tags is None:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name, tags=None)
        return
    new = tags
    _retag(run_id, lambda current: [t for t in current if not t.startswith(_MANAGED_TAGS)] + new,
           name=name)


def add_run_tags(*tags: str, run_id: UUID | None = None) -> None:
    """Add tags to the flow run (this one by default) and keep the ones it has: the marks the
    guardrails count in the run history (``auto-fix``, ``restarted``, ``lock:<service>``)."""
    run_id = run_id or _run_id()
    if not run_id:
        return
    _retag(run_id, lambda current: current + [t for t in tags if t not in current])


def forget_run_tags(run_id: UUID | str) -> None:
    """The run ended: its tags are no longer kept in memory."""
    with _RUN_TAGS_LOCK:
        _RUN_TAGS.pop(UUID(str(run_id)), None)


def _description(r: IncidentRecord) -> str:
    return f"Incident report {r.incident_id} ({r.scenario} on {r.target}): {r.outcome}"


# -- the saved record: what a closer outside the run reads ---------------------------------
RECORD_INPUT_PREFIX = "incident-record-"


def save_record(flow_run_id: UUID, record: IncidentRecord, previous: str | None) -> str:
    """Save the record as a flow run input of its run; the newest key wins, the previous copy
    is deleted once the new one is stored (a crash in between leaves two, never none)."""
    with get_client(sync_client=True) as client:
        key = f"{RECORD_INPUT_PREFIX}{_now():%Y%m%d%H%M%S%f}"
        client.create_flow_run_input(flow_run_id, key, record.model_dump_json(), sender="incident")
        if previous:
            client.delete_flow_run_input(flow_run_id, previous)
    return key


def load_record(flow_run_id: UUID) -> IncidentRecord | None:
    """The newest saved record of a run, or None if the run never opened one."""
    with get_client(sync_client=True) as client:
        saved = client.filter_flow_run_input(flow_run_id, RECORD_INPUT_PREFIX, 100, set())
    if not saved:
        return None
    newest = max(saved, key=lambda i: i.key)
    return IncidentRecord.model_validate_json(newest.value)


def close_from_outside(flow_run_id: UUID, record: IncidentRecord, why: str) -> IncidentRecord:
    """Close the open, saved ``record`` (``load_record``) of a run that can no longer close it
    itself (killed, crashed in another process, left behind by a restart): outcome failed,
    ``why``, what the run changed and what not, the report republished and the run retagged."""
    summary = f"{why}; {record.changes()}"
    record.outcome, record.summary, record.closed_at = "failed", summary, _now()
    record.escalations.append(summary)
    record.timeline.append(TimelineEntry(at=record.closed_at, phase="close", event=f"failed: {summary}"))
    record.alert_updates = read_alert_updates(flow_run_id)
    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(
            key=record.artifact_key, type="markdown", data=render_report(record),
            description=_description(record), flow_run_id=flow_run_id))
    save_record(flow_run_id, record, None)
    _set_run(tags=record.tags, run_id=flow_run_id)
    return record


def open_incident(
    scenario: str,
    target: Target,
    trigger: Trigger | None,
    incident_id: str | None,
    dry_run: bool,
    drill: DrillMark | None = None,
) -> Incident:
    """Start the record: names and tags the flow run, publishes the first report."""
    trigger = trigger or Trigger(kind="manual", source=None)
    record = IncidentRecord(
        incident_id=incident_id or new_incident_id(),
        scenario=scenario,
        target=target.name,
        environment=target.service.environment,
        severity=target.service.severity_degraded,
        dry_run=dry_run,
        trigger=trigger,
        opened_at=_now(),
        drill=drill,
    )
    incident = Incident(record)
    _set_run(name=f"{record.incident_id} {scenario} {target.name}", tags=incident.tags)
    what = trigger.summary or f"{scenario} runbook started for {target.name}"
    incident.enter("detect", f"{trigger.kind} trigger ({trigger.source or 'n/a'}): {what}"
                   + (" [DRY RUN: nothing will be changed]" if dry_run else ""))
    return incident


# -- the report ----------------------------------------------------------------------------
def _t(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at else "-"


_MARKDOWN = re.compile(r"([\\`\[\]<>|])")


def _md(text: str) -> str:
    """Text from outside (alert summaries, labels, links, reasons, error messages) as plain
    text in markdown, on one line, with what could make markup escaped (backslash, backtick,
    brackets, angle brackets, pipe): nothing an alert says can add a link, an image, HTML, a
    code span or a table cell to the report. Emphasis characters are left (harmless, and
    paths and globs stay readable)."""
    return _MARKDOWN.sub(r"\\\1", " ".join(text.splitlines()))


_cell = _md


ALERT_UPDATES_HEADING = "## Alert updates"


def render_report(r: IncidentRecord) -> str:
    duration = (r.closed_at or _now()) - r.opened_at
    lines = [
        f"# Incident {r.incident_id}: {r.scenario} on {r.target}",
        "",
        f"**Status:** {r.outcome}{' (DRY RUN)' if r.dry_run else ''}"
        f"{' (SHADOW MODE)' if r.shadow else ''}{' (KILL SWITCH ON)' if r.kill_switch else ''}  ",
        f"**Severity:** {r.severity.value}  **Environment:** {r.environment}  ",
        f"**Opened:** {_t(r.opened_at)}  **Closed:** {_t(r.closed_at)}  "
        f"**Duration:** {int(duration.total_seconds())} s",
        "",
        "## Trigger",
        f"- kind: {r.trigger.kind}; source: {_md(r.trigger.source or '-')}",
        f"- summary: {_md(r.trigger.summary or '-')}",
    ]
    if r.trigger.labels:
        lines.append("- labels: " + ", ".join(_md(f"{k}={v}") for k, v in r.trigger.labels.items()))
    if r.trigger.fingerprint:
        lines.append(f"- fingerprint: {_md(r.trigger.fingerprint)}; fired at {_t(r.trigger.fired_at)}")
    for link in r.trigger.links:
        lines.append(f"- link: {_md(link)}")
    lines += ["", "## Timeline", "", "| Time (UTC) | Phase | Event |", "|---|---|---|"]
    lines += [f"| {e.at:%H:%M:%S} | {e.phase} | {_cell(e.event)} |" for e in r.timeline]
    lines += ["", "## Findings", "", "| Check | Result | Detail |", "|---|---|---|"]
    lines += [f"| {f.check} | {'ok' if f.ok else '**problem**'} | {_cell(f.detail)} |"
              for f in r.findings] or ["| - | - | - |"]
    lines += ["", "## Approvals", "", "| Time | Action | Decision | By | Reason |",
              "|---|---|---|---|---|"]
    lines += [f"| {a.at:%H:%M:%S} | {a.action} | {a.decision} | {_cell(a.by)} | {_cell(a.reason or '-')} |"
              for a in r.approvals] or ["| - | - | none needed | - | - |"]
    lines += ["", "## Actions taken", "", "| Time | Action | Target | Changed | Detail |",
              "|---|---|---|---|---|"]
    lines += [f"| {a.at:%H:%M:%S} | {a.action} | {a.target} | {'yes' if a.changed else 'no'} | "
              f"{_cell(a.detail)} |" for a in r.actions] or ["| - | none | - | - | - |"]
    if r.guardrails:
        lines += ["", "## Guardrails", ""] + [f"- {_md(g)}" for g in r.guardrails]
    lines += ["", "## Verification", "", r.verification or "_not run yet_"]
    if r.escalations:
        lines += ["", "## Escalations", ""] + [f"- {_md(e)}" for e in r.escalations]
    lines += _comms_section(r)
    lines += ["", ALERT_UPDATES_HEADING, ""] + ([f"- {_md(u)}" for u in r.alert_updates] or ["- none"])
    problems = [f for f in r.findings if not f.ok]
    lines += [
        "", "---", "", "# Post-Incident Report (skeleton)", "",
        "## Incident Summary", "",
        f"- **Incident ID**: {r.incident_id}",
        f"- **Severity**: {r.severity.value}",
        f"- **Duration**: {int(duration.total_seconds())} s",
        f"- **Impact**: {r.target} ({r.environment}) - _fill in users/services affected_",
        "- **Root Cause**: _to be confirmed_; automated findings: "
        + ("; ".join(_cell(f.detail) for f in problems[:3]) or "none"),
        f"- **Outcome**: {r.outcome} - {r.summary or 'in progress'}",
        "",
    ]
    lines += postmortem_lines(r)  # durations and the computed timeline
    lines += [
        "", "## Root Cause", "", "_Detailed explanation of what caused the incident._", "",
        "## Impact", "", "- **Users Affected**:", f"- **Services Affected**: {r.target}",
        "- **Data Loss**:", "", "## Response", "", "### What Went Well", "", "- ", "",
        "### What Could Be Improved", "", "- ", "", "## Action Items", "",
        "| Action | Owner | Deadline | Status |", "|---|---|---|---|", "| | | | [ ] |", "",
    ]
    return "\n".join(lines)


def _comms_section(r: IncidentRecord) -> list[str]:
    c = r.comms
    if c.level is None and not c.deliveries:
        return []
    lines = ["", "## Comms", "", f"- escalation level: {c.level or '-'} since {_t(c.level_since)}"]
    if c.deliveries:
        lines += ["", "| Time | Provider | Message | Delivered | Attempts | Detail |", "|---|---|---|---|---|---|"]
        lines += [f"| {d.at:%H:%M:%S} | {d.provider} | {d.kind} | {'yes' if d.delivered else '**no**'} | "
                  f"{d.attempts} | {_cell(d.detail)} |" for d in c.deliveries]
    else:
        lines.append("- no notifier is configured: only the Prefect event and the escalation webhook "
                     "(README, Comms)")
    return lines


def add_alert_update(flow_run_id: UUID, incident_id: str, text: str) -> None:
    """Record a later notification about the alert (re-fire, resolved) on the incident.

    Delivered as a flow run input, which the running flow folds into its report at the
    next publish; if the run has already ended, the report artifact gets a new version
    with the line added, so the record stays complete either way.
    """
    stamped = f"{_now():%Y-%m-%d %H:%M:%S UTC} {text}"
    with get_client(sync_client=True) as client:
        client.create_flow_run_input(flow_run_id, f"{ALERT_UPDATE_PREFIX}{uuid4().hex[:12]}",
                                     json.dumps(stamped), sender="alert-gateway")
        run = client.read_flow_run(flow_run_id)
        if not (run.state and run.state.is_final()):
            return
        key = artifact_key_for(incident_id)
        latest = client.request("GET", "/artifacts/{key}/latest", path_params={"key": key}).json()
        markdown = str(latest["data"])
        head, sep, tail = markdown.partition(ALERT_UPDATES_HEADING + "\n\n")
        if not sep:
            return
        tail = tail.replace("- none\n", "", 1) if tail.startswith("- none\n") else tail
        client.create_artifact(ArtifactCreate(
            key=key, type="markdown", data=f"{head}{sep}- {_md(stamped)}\n{tail}",
            description=latest.get("description"), flow_run_id=flow_run_id,
        ))
