"""The sweep for dead runs against the real Prefect server: a run that ended (here: marked
Crashed, as after a lost worker) with its saved record still open gets the record closed, the
outcome tag and an escalation; a run that closed its record is left alone."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect.client.orchestration import get_client
from prefect.states import Crashed

from incident.inventory import Severity
from incident.record import IncidentRecord, TimelineEntry, Trigger, load_record, save_record
from incident.sweeper import sweep_abandoned_runs
from tests.helpers import escalations, new_incident_id, report
from tests.incident.test_kit import kit_probe


def _dead_run_with_an_open_record(outcome: str = "open"):
    incident_id = new_incident_id()
    now = datetime.now(timezone.utc)
    record = IncidentRecord(
        incident_id=incident_id, scenario="kit-probe", target="probe", environment="staging",
        severity=Severity.P2, dry_run=False, trigger=Trigger(), opened_at=now, outcome=outcome,
        in_progress="touch_then_break on probe",
        timeline=[TimelineEntry(at=now, phase="fix", event="starting touch_then_break on probe")])
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(kit_probe, parameters={"incident_id": incident_id, "how": "x"},
                                     tags=record.tags, state=Crashed(message="the worker died"))
    save_record(run.id, record, None)
    return run.id, incident_id


def test_a_dead_run_with_an_open_record_is_closed_and_escalated(prefect_api):
    run_id, incident_id = _dead_run_with_an_open_record()
    closed = sweep_abandoned_runs(stale_after_s=600, final_grace_s=0)
    assert f"incident:{incident_id}" in closed
    record = load_record(run_id)
    assert record is not None and record.outcome == "failed"
    assert "without closing its incident record" in record.summary
    assert "touch_then_break on probe was started and did not report back" in record.summary
    assert "**Status:** failed" in report(incident_id)
    with get_client(sync_client=True) as client:
        assert "outcome:failed" in client.read_flow_run(run_id).tags
    payload = escalations(prefect_api, incident_id)[-1]["payload"]
    assert payload["scenario"] == "kit-probe" and payload["environment"] == "staging"

    # a second sweep finds nothing more to do
    assert f"incident:{incident_id}" not in sweep_abandoned_runs(stale_after_s=600, final_grace_s=0)


def test_a_run_that_closed_its_record_is_left_alone(prefect_api):
    run_id, incident_id = _dead_run_with_an_open_record(outcome="resolved")
    assert f"incident:{incident_id}" not in sweep_abandoned_runs(stale_after_s=600, final_grace_s=0)
    record = load_record(run_id)
    assert record is not None and record.outcome == "resolved"
