"""What a run tells people about its incident, in the runbooks' own words.

One :class:`Message` per moment of the incident (declared, acknowledged, an update, escalated,
resolved); every notifier renders it for its provider. :func:`render_text` is the plain-text
form, following the runbooks' communication templates (shared runbooks 001 and 002):

    INCIDENT DECLARED: [Severity] - [Brief Description]      (001, "Declare incident")
    IC: [Name]
    Status: Investigating

    UPDATE: [HH:MM UTC]                                      (001, "Status Updates", every 15 min)
    Status: [Investigating/Identified/Fixing/Monitoring/Resolved]
    Impact: / Actions: / ETA: / Next Update:

    INCIDENT RESOLVED: [Time]                                (001, "Close incident")
    Duration: / Root Cause: / Fix: / Follow-up:

:func:`render_status_page` is the public wording of runbook 002's status page templates
(Investigating / Identified / Resolved). A drill's texts all start with ``[DRILL] ``.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Kind = Literal["declared", "acknowledged", "update", "escalated", "resolved"]
Status = Literal["investigating", "identified", "fixing", "monitoring", "resolved"]

DRILL_PREFIX = "[DRILL] "
#: runbook 001: "Post update every 15 minutes" while a P0/P1 (Sev 1/2) is open
UPDATE_EVERY = timedelta(minutes=15)
UPDATED_SEVERITIES = ("P0", "P1")

_HEADLINES: dict[str, str] = {
    "declared": "INCIDENT DECLARED",
    "acknowledged": "INCIDENT ACKNOWLEDGED",
    "update": "UPDATE",
    "escalated": "INCIDENT ESCALATED",
    "resolved": "INCIDENT RESOLVED",
}


class Message(BaseModel):
    """One notification about one incident; ``incident_id`` is the dedup key everywhere."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    incident_id: str = Field(min_length=1, max_length=255)
    scenario: str
    target: str
    environment: str
    severity: str = Field(pattern=r"^P[0-3]$", description="P0 (critical) .. P3 (low)")
    status: Status
    summary: str = Field(min_length=1, description="one line: what is wrong / what happened")
    impact: str = ""
    actions: str = Field("", description="what the run is doing / did")
    level: str = Field("", description='escalation level, e.g. "L2 DevOps lead + engineering lead"')
    root_cause: str = Field("", description="resolved: root cause (automated findings)")
    fix: str = Field("", description="resolved: what was done")
    opened_at: datetime
    at: datetime = Field(description="when this message was written (UTC)")
    next_update_at: datetime | None = None
    run_url: str = Field("", description="link to the Prefect run")
    drill: bool = Field(False, description='a drill: every text starts with "[DRILL] ", '
                        "Statuspage is never told")

    @field_validator("summary")
    @classmethod
    def _one_line(cls, v: str) -> str:
        return " ".join(v.split())

    @field_validator("opened_at", "at", "next_update_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        """Naive times are taken as UTC; aware ones are converted to UTC."""
        if v is None:
            return None
        return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)


def next_update_at(severity: str, at: datetime) -> datetime | None:
    """When the next update is due after ``at``: 15 minutes for a P0/P1, none for a P2/P3."""
    return at + UPDATE_EVERY if severity in UPDATED_SEVERITIES else None


def prefix(msg: Message) -> str:
    return DRILL_PREFIX if msg.drill else ""


def hhmm(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%H:%M UTC")


def duration(start: datetime, end: datetime) -> str:
    """``45 s``, ``27 min``, ``2 h 05 min``."""
    seconds = max(0, int((end - start).total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def title(msg: Message) -> str:
    """One line for alert titles and headers: ``[DRILL] P1 UPDATE: web is down``."""
    return f"{prefix(msg)}{msg.severity} {_HEADLINES[msg.kind]}: {msg.summary}"


def headline(msg: Message) -> str:
    """The first line of the runbook template for ``msg.kind`` (with the drill prefix)."""
    if msg.kind in ("update", "resolved"):
        return f"{prefix(msg)}{_HEADLINES[msg.kind]}: {hhmm(msg.at)}"
    return f"{prefix(msg)}{_HEADLINES[msg.kind]}: {msg.severity} - {msg.summary}"


def fields(msg: Message) -> list[tuple[str, str]]:
    """The template's ``Label: value`` lines after the headline, in the runbook's order."""
    status = msg.status.capitalize()
    impact = msg.impact or "being assessed"
    actions = msg.actions or "none yet"
    next_update = hhmm(msg.next_update_at) if msg.next_update_at else "when the status changes"
    if msg.kind == "declared":
        rows = [("IC", f"runbook automation ({msg.scenario} run) until a human takes over"),
                ("Status", status), ("Impact", impact), ("Actions", actions)]
        return rows + ([("Next Update", next_update)] if msg.next_update_at else [])
    if msg.kind == "acknowledged":
        return [("Status", status), ("Actions", actions), ("Next Update", next_update)]
    if msg.kind == "update":
        return [("Status", status), ("Impact", impact), ("Actions", actions),
                ("ETA", "not estimated (automated run)"), ("Next Update", next_update)]
    if msg.kind == "escalated":
        return [("Level", msg.level or "the next level of the escalation policy"),
                ("Status", status), ("Impact", impact), ("Actions", actions),
                ("Next Update", next_update)]
    follow_up = ("post-incident review within 48 hours" if msg.severity in UPDATED_SEVERITIES
                 else "review the incident report")
    return [("Duration", duration(msg.opened_at, msg.at)),
            ("Root Cause", msg.root_cause or "not determined by the run (see the incident report)"),
            ("Fix", msg.fix or "not recorded"),
            ("Follow-up", follow_up)]


def footer(msg: Message) -> list[str]:
    """Which incident this is (the headline of an update or resolve does not say) and its run."""
    where = f"{msg.scenario} on {msg.target}, {msg.environment}"
    if msg.kind in ("update", "resolved"):
        lines = [f"Incident: {msg.incident_id} - {msg.severity} - {msg.summary} ({where})"]
    else:
        lines = [f"Incident: {msg.incident_id} ({where})"]
    return lines + ([f"Run: {msg.run_url}"] if msg.run_url else [])


def render_text(msg: Message) -> str:
    """The runbook template for ``msg.kind``, as plain text."""
    lines = [headline(msg), *(f"{label}: {value}" for label, value in fields(msg)), *footer(msg)]
    return "\n".join(lines)


def render_status_page(msg: Message) -> str:
    """The public status page text of runbook 002 for ``msg.status`` (no internal detail)."""
    issue = (msg.impact or msg.summary).rstrip(". ")
    later = ""
    if msg.next_update_at and msg.status != "resolved":
        minutes = max(1, round((msg.next_update_at - msg.at).total_seconds() / 60))
        later = f" We will provide an update in {minutes} minutes."
    if msg.status == "investigating":
        return f"We are currently investigating reports of {issue}.{later}"
    if msg.status in ("identified", "fixing"):
        return f"We have identified the issue: {issue}. Our team is working on a fix.{later}"
    if msg.status == "monitoring":
        return f"A fix has been implemented and we are monitoring the results.{later}"
    return ("The issue has been resolved. All services are now operational.\n"
            "We apologize for any inconvenience.")
