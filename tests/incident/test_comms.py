"""The incident's comms in real runs against the real lab: declared, moved up the escalation
ladder by the clock while an approval waits, updated, acknowledged when a person answers and
resolved with the root cause and the fix - through PagerDuty, Opsgenie, Slack and Statuspage
(a local server that checks each request against the provider's documented schema). A provider
that keeps failing does not stop the remediation, and the record says what was not delivered.
"""

from __future__ import annotations

import pytest
from prefect.flow_runs import resume_flow_run

from flows.service_down import service_down
from incident.record import load_record
from tests.helpers import report, run_id_of, start_flow, wait_for, wait_paused

pytestmark = pytest.mark.lab

#: Seconds, not minutes: L1 3 s, L2 3 s, then L3 (no limit); a status update every 4 s.
FAST_LADDER = """
severities:
  P0: {name: Critical, respond_within_minutes: 0, update_every_minutes: 0.0667, status_page: true,
       minutes: {L1: 0.05, L2: 0.05}}
  P1: {name: High, respond_within_minutes: 15, status_page: true}
  P2: {name: Medium, respond_within_minutes: 60}
  P3: {name: Low, respond_within_minutes: 1440}
ladder:
  - {level: L1, who: On-call engineer, minutes: 30}
  - {level: L2, who: DevOps lead + engineering lead, minutes: 30}
  - {level: L3, who: Engineering manager + CTO}
  - {level: L4, who: Executive team}
"""


@pytest.fixture
def told(fake, comms_env, monkeypatch, tmp_path):
    """Every notifier configured against the fake providers, a ladder in seconds, a fast clock."""
    ladder = tmp_path / "escalation.yaml"
    ladder.write_text(FAST_LADDER)
    comms_env({**fake.env(), "RUNBOOKS_NOTIFY_BACKOFF_S": "0.05", "RUNBOOKS_NOTIFY_BUDGET_S": "3"})
    monkeypatch.setenv("RUNBOOKS_ESCALATION_POLICY", str(ladder))
    monkeypatch.setenv("RUNBOOKS_COMMS_TICK_S", "0.5")
    return fake


def test_a_waiting_p0_climbs_the_ladder_and_everyone_hears_it_resolved(prefect_api, healthy_web, told):
    lab = healthy_web
    lab.deploy_broken_web()  # the rollback needs a person: the run waits, the clock runs
    thread, incident_id = start_flow(service_down, target="web", restart_deadline_s=8, verify_deadline_s=40)
    run_id = run_id_of(incident_id)
    wait_paused(run_id)
    pd = lambda: [r.body["event_action"] for r in told.requests("pagerduty")]  # noqa: E731
    # declared, escalated twice (L2, L3), an update: all while the run waits for a person
    wait_for(lambda: len(told.requests("slack")) >= 4, "the clock to move the waiting incident up", timeout_s=30)
    resume_flow_run(run_id, run_input={"decision": "approve", "reason": "roll back", "approver": "Ada Lovelace"})
    thread.join(timeout=120)
    assert thread.state is not None and thread.state.is_completed(), thread.state

    record = load_record(run_id)
    assert record is not None
    kinds = [d.kind for d in record.comms.deliveries if d.provider == "slack"]
    assert kinds[0] == "declared" and kinds[-1] == "resolved", kinds
    assert kinds.count("escalated") == 2 and "update" in kinds and "acknowledged" in kinds, kinds
    assert record.comms.level == "L3", "L1 3 s, L2 3 s: the run waited past both"
    assert all(d.delivered for d in record.comms.deliveries), record.comms.deliveries

    requests = told.requests()
    assert requests and all(r.valid for r in requests), [(r.provider, r.problems) for r in requests if not r.valid]
    actions = pd()
    assert actions[0] == "trigger" and actions[-1] == "resolve" and "acknowledge" in actions, actions
    assert {r.body["dedup_key"] for r in told.requests("pagerduty")} == {incident_id}, "one stable dedup_key"
    opsgenie = told.requests("opsgenie")
    assert opsgenie[0].body["alias"] == incident_id and opsgenie[-1].path.endswith("/close")
    statuspage = told.requests("statuspage")
    assert statuspage[0].method == "POST" and statuspage[-1].body["incident"]["status"] == "resolved"
    texts = [r.body["text"] for r in told.requests("slack")]
    assert texts[0].startswith("INCIDENT DECLARED: P0"), texts[0]
    assert any(t.startswith("UPDATE:") for t in texts), texts
    assert texts[-1].startswith("INCIDENT RESOLVED") and "rollback_container" in texts[-1], texts[-1]

    text = report(incident_id)
    assert "## Comms" in text and "| pagerduty | resolved | yes |" in text
    assert "escalation level: L3" in text


def test_a_provider_that_keeps_failing_does_not_stop_the_remediation(prefect_api, healthy_web, told):
    lab = healthy_web
    told.fail_next("slack", 503, times=1000)
    lab.inject("web-killed")
    thread, incident_id = start_flow(service_down, target="web", restart_deadline_s=8, verify_deadline_s=40)
    thread.join(timeout=120)
    told.clear()  # nothing more fails after the test

    assert thread.state is not None and thread.state.is_completed() and thread.state.name == "Completed"
    assert lab.fault_healthy("web-killed")
    record = load_record(run_id_of(incident_id))
    assert record is not None
    slack = [d for d in record.comms.deliveries if d.provider == "slack"]
    assert slack and not any(d.delivered for d in slack), slack
    assert all(d.attempts >= 2 for d in slack), "a 503 is retried within bounds"
    others = [d for d in record.comms.deliveries if d.provider != "slack"]
    assert others and all(d.delivered for d in others), others
    text = report(incident_id)
    assert "| slack | declared | **no** |" in text and "| pagerduty | resolved | yes |" in text
    assert "NOT delivered to slack" in text
