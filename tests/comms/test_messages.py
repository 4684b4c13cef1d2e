"""The message texts follow the runbooks' templates (shared runbooks 001 and 002), line by line."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from comms import next_update_at, render_status_page, render_text
from comms.messages import duration
from tests.comms.conftest import OPENED


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_declared_follows_the_declare_incident_template(message):
    text = lines(render_text(message("declared")))

    # runbook 001: "INCIDENT DECLARED: [Severity] - [Brief Description]" / "IC: [Name]" / "Status: Investigating"
    assert text[0] == "INCIDENT DECLARED: P0 - web is down: container lab-web exited"
    assert text[1].startswith("IC: ")
    assert text[2] == "Status: Investigating"
    assert "Impact: checkout unavailable" in text and "Next Update: 14:20 UTC" in text
    assert text[-2:] == ["Incident: INC-20250304-5f3a9c1e (service-down on web, production)",
                         "Run: http://127.0.0.1:4200/runs/flow-run/1"]


def test_update_follows_the_status_update_template(message):
    text = lines(render_text(message("update", actions="restarting lab-web")))

    # runbook 001 "Status Updates": UPDATE: [HH:MM UTC] / Status / Impact / Actions / ETA / Next Update
    assert text[:6] == ["UPDATE: 14:05 UTC", "Status: Identified", "Impact: checkout unavailable",
                        "Actions: restarting lab-web", "ETA: not estimated (automated run)", "Next Update: 14:20 UTC"]
    assert text[6] == ("Incident: INC-20250304-5f3a9c1e - P0 - web is down: container lab-web exited "
                       "(service-down on web, production)")


@pytest.mark.parametrize("status", ["investigating", "identified", "fixing", "monitoring", "resolved"])
def test_update_status_is_one_of_the_templates(message, status):
    assert lines(render_text(message("update", status=status)))[1] == f"Status: {status.capitalize()}"


def test_resolved_follows_the_close_incident_template(message):
    text = lines(render_text(message("resolved", minutes=32, root_cause="the release crashed at start",
                                     fix="rolled back to lab-web:1.1")))

    # runbook 001 "Close incident": INCIDENT RESOLVED: [Time] / Duration / Root Cause / Fix / Follow-up
    assert text[:5] == ["INCIDENT RESOLVED: 14:32 UTC", "Duration: 32 min", "Root Cause: the release crashed at start",
                        "Fix: rolled back to lab-web:1.1", "Follow-up: post-incident review within 48 hours"]


def test_resolved_without_findings_says_so(message):
    text = render_text(message("resolved", severity="P3"))
    assert "Root Cause: not determined by the run (see the incident report)" in text
    assert "Follow-up: review the incident report" in text


def test_escalated_names_the_level(message):
    text = lines(render_text(message("escalated", level="L2 DevOps lead + engineering lead")))
    assert text[0] == "INCIDENT ESCALATED: P0 - web is down: container lab-web exited"
    assert text[1:3] == ["Level: L2 DevOps lead + engineering lead", "Status: Fixing"]


@pytest.mark.parametrize("kind", ["declared", "acknowledged", "update", "escalated", "resolved"])
def test_a_drill_starts_with_the_drill_marker(message, kind):
    assert render_text(message(kind, drill=True)).startswith("[DRILL] ")
    assert not render_text(message(kind)).startswith("[DRILL]")


def test_status_page_texts_are_runbook_002s(message):
    # runbook 002 "Status Page - Investigating / Identified / Resolved"
    assert render_status_page(message("declared")) == (
        "We are currently investigating reports of checkout unavailable. We will provide an update in 15 minutes.")
    assert render_status_page(message("update")).startswith(
        "We have identified the issue: checkout unavailable. Our team is working on a fix.")
    assert render_status_page(message("resolved")) == (
        "The issue has been resolved. All services are now operational.\nWe apologize for any inconvenience.")


def test_updates_are_due_every_15_minutes_for_p0_and_p1_only():
    at = datetime(2025, 1, 1, 9, 0, tzinfo=timezone.utc)
    assert next_update_at("P0", at) == next_update_at("P1", at) == at + timedelta(minutes=15)
    assert next_update_at("P2", at) is None and next_update_at("P3", at) is None


def test_times_are_utc_and_the_summary_one_line(message):
    msg = message("update", at=datetime(2025, 3, 4, 16, 5, tzinfo=timezone(timedelta(hours=2))),
                  opened_at=OPENED.replace(tzinfo=None), summary="web is down:\n  exited")
    assert msg.at.tzinfo == timezone.utc and msg.opened_at == OPENED
    assert lines(render_text(msg))[0] == "UPDATE: 14:05 UTC" and msg.summary == "web is down: exited"


def test_a_message_refuses_an_unknown_severity_and_is_frozen(message):
    with pytest.raises(ValidationError):
        message("declared", severity="SEV1")
    with pytest.raises(ValidationError):
        message("declared").summary = "changed"


@pytest.mark.parametrize("seconds, text", [(45, "45 s"), (27 * 60, "27 min"), (125 * 60, "2 h 05 min")])
def test_duration(seconds, text):
    assert duration(OPENED, OPENED + timedelta(seconds=seconds)) == text
