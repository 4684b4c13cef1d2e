from __future__ import annotations

import re
from datetime import datetime, timezone

from incident.inventory import Severity
from incident.record import (ActionTaken, ApprovalRecord, Finding, IncidentRecord, TimelineEntry,
                             Trigger, render_report)

T = datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc)


def test_report_follows_the_post_incident_template():
    rec = IncidentRecord(
        incident_id="INC-20261123-AB12", scenario="service-down", target="web", environment="lab",
        severity=Severity.P0, dry_run=False, opened_at=T,
        trigger=Trigger(kind="alert", source="alertmanager", summary="ServiceDown web",
                        fingerprint="a1bc48475b20e73d", fired_at=T),
        timeline=[TimelineEntry(at=T, phase="detect", event="alert | received")],
        findings=[Finding(at=T, check="container", ok=False, detail="exited, exit code 137")],
        actions=[ActionTaken(at=T, action="restart_container", target="lab-web", changed=True, detail="ok")],
        approvals=[ApprovalRecord(at=T, action="restart_container", decision="approved", by="policy:p")],
    )
    md = render_report(rec)
    for heading in ("## Trigger", "## Timeline", "## Findings", "## Approvals", "## Actions taken",
                    "## Verification", "# Post-Incident Report", "## Incident Summary", "## Root Cause",
                    "## Impact", "### What Went Well", "### What Could Be Improved", "## Action Items"):
        assert heading in md, heading
    assert "alert \\| received" in md, "table cells must escape pipes"
    assert "exited, exit code 137" in md.split("# Post-Incident Report")[1], "findings feed the root cause"
    assert rec.artifact_key == "incident-inc-20261123-ab12"


def test_alert_text_cannot_add_markup_to_the_report():
    """Labels, summaries and links come from outside: they stay plain text in the report."""
    hostile = "web; touch /tmp/x `id` [click](http://evil.example) <img src=x onerror=alert(1)> | cell"
    rec = IncidentRecord(
        incident_id="INC-20261123-AB12", scenario="service-down", target="web", environment="lab",
        severity=Severity.P1, dry_run=False, opened_at=T,
        trigger=Trigger(kind="alert", source="grafana", summary=hostile, labels={"service": hostile},
                        links=[hostile]),
        timeline=[TimelineEntry(at=T, phase="detect", event=hostile)],
        alert_updates=[hostile], escalations=[hostile],
    )
    md = render_report(rec)
    assert hostile not in md
    for raw in ("`id`", "[click](", "<img", "| cell"):
        assert not re.search(r"(?<!\\)" + re.escape(raw), md), f"{raw!r} reached the report unescaped"
    assert "\\`id\\`" in md and "\\[click\\]" in md and "\\<img" in md and "\\| cell" in md
