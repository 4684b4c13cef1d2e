"""The incident-metrics flow over a history of known incidents, made by real runs against the
real lab: real faults healed (or not) by the real runbooks, one approval rejected by a person,
one run of a drill, two drill results; then the figures are asserted."""

from __future__ import annotations

import base64
import json
import re
import statistics
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.flow_runs import resume_flow_run

from flows.incident_metrics import MARKDOWN_KEY, PNG_SIGNATURE, TABLE_KEY, incident_metrics
from flows.redis_down import redis_down
from flows.service_down import service_down
from incident.history import read_history
from incident.metrics import Durations, IncidentMetrics, Rate
from incident.record import DRILL_TAG, IncidentRecord, Trigger, add_run_tags, load_record
from tests.helpers import new_incident_id, run_id_of, start_flow, wait_paused

pytestmark = pytest.mark.lab

WAIT_BEFORE_ANSWER_S = 2.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _alert(fingerprint: str, started_s_ago: float) -> Trigger:
    return Trigger(kind="alert", source="alertmanager", fingerprint=fingerprint,
                   fired_at=_now() - timedelta(seconds=started_s_ago), summary=f"test alert {fingerprint}")


@flow(name="drill")
def fake_drill(scenario: str, passed: bool) -> None:
    """Stands in for the drill flow: tags itself the way a finished drill run is tagged."""
    add_run_tags(DRILL_TAG, f"scenario:{scenario}", f"drill-result:{'pass' if passed else 'fail'}")


def _record(state) -> IncidentRecord:
    record = load_record(state.state_details.flow_run_id)
    assert record is not None, "the run saved no record"
    return record


def test_metrics_from_a_history_of_real_runs(prefect_api, healthy_lab, state_dir: Path):
    lab = healthy_lab
    since = _now()
    fast = dict(target="web", restart_deadline_s=8, verify_deadline_s=30, probe_interval_s=0.5)
    try:
        # 1. web killed, its alert started 40 s before the run: restarted by policy, resolved
        lab.inject("web-killed")
        sent = _now()
        killed = service_down(incident_id=new_incident_id(), trigger=_alert("fp-web-down", 40),
                              return_state=True, **fast)
        killed_took = (_now() - sent).total_seconds()
        assert killed.is_completed() and killed.name == "Completed", killed.message

        # 2. Redis stopped, its alert started 20 s before: started by policy, resolved
        lab.inject("redis-stopped")
        sent = _now()
        redis = redis_down(target="web", incident_id=new_incident_id(), trigger=_alert("fp-redis-down", 20),
                           verify_deadline_s=30, check_interval_s=0.5, return_state=True)
        redis_took = (_now() - sent).total_seconds()
        assert redis.is_completed() and redis.name == "Completed", redis.message

        # 3. a person starts the runbook on a healthy web: already fine
        fine = service_down(incident_id=new_incident_id(), return_state=True, **fast)
        assert fine.name == "Already Fine", fine.message

        # 4. a broken release: restarted by policy (no help), the rollback waits for a person,
        #    who rejects it after WAIT_BEFORE_ANSWER_S
        lab.inject("web-broken-release")
        started = time.monotonic()
        thread, release_id = start_flow(service_down, **fast)
        run_id = run_id_of(release_id)
        wait_paused(run_id)
        time.sleep(WAIT_BEFORE_ANSWER_S)
        resume_flow_run(run_id, run_input={"decision": "reject", "reason": "looking at the release first",
                                           "approver": "Ada Lovelace"})
        thread.join(timeout=120)
        release_took = time.monotonic() - started
        assert thread.state is not None and thread.state.name == "Not Approved", thread.state
        lab.reset_all_faults()

        # 5. a run made during a drill (it heals web-killed too): not an incident
        lab.inject("web-killed")
        drilled = service_down(incident_id=new_incident_id(), trigger=_alert("fp-web-down", 5),
                               return_state=True, **fast)
        assert drilled.is_completed(), drilled.message
        add_run_tags(DRILL_TAG, run_id=drilled.state_details.flow_run_id)
        drilled_record = _record(drilled)

        # 6. two drills: one passed, one failed
        fake_drill("service-down", True)
        fake_drill("redis-down", False)

        state = incident_metrics(since=since, repeat_lookback_days=0, return_state=True)
    finally:
        lab.reset_all_faults()
    assert state.is_completed(), state.message
    metrics = state.result()
    assert isinstance(metrics, IncidentMetrics)

    rec = {name: _record(s) for name, s in
           (("killed", killed), ("redis", redis), ("fine", fine), ("release", thread.state))}
    assert metrics.incidents == 4, metrics.model_dump_json(indent=1)
    assert metrics.by_scenario == {"redis-down": 1, "service-down": 3}
    assert metrics.by_severity == {"P0": 3, "P1": 0, "P2": 1, "P3": 0}, "web down is P0, degraded P2"
    assert metrics.by_outcome == {"already fine": 1, "not approved": 1, "resolved": 2}
    assert metrics.by_environment == {"lab": 4}
    assert metrics.drill_remediation_runs == 1 and metrics.runs_without_record == 0

    # auto-remediation: the restart of 1, the Redis start of 2 (both resolved) and the restart
    # of 4 (then rejected) ran with a policy's approval
    assert metrics.auto_fix == Rate(hits=2, total=3, rate=2 / 3)

    # MTTD: the two alert-started incidents; each at least its alert's known head start, at most
    # that plus the time its run took
    detect = {n: Durations.of(r).detect_s for n, r in rec.items()}
    assert detect["fine"] is None and detect["release"] is None
    assert 40 <= detect["killed"] <= 40 + killed_took, detect
    assert 20 <= detect["redis"] <= 20 + redis_took, detect
    assert metrics.mttd.samples == 2
    assert metrics.mttd.mean_s == pytest.approx((detect["killed"] + detect["redis"]) / 2)
    assert metrics.mttd.median_s == pytest.approx(statistics.median([detect["killed"], detect["redis"]]))
    assert 30 <= metrics.mttd.mean_s <= 30 + max(killed_took, redis_took)

    # MTTA: the one ask of a person, answered after the known wait
    assert metrics.mtta.samples == 1
    ask = rec["release"].approvals[-1]
    assert ask.asked_at is not None and ask.by == "Ada Lovelace" and ask.decision == "rejected"
    assert WAIT_BEFORE_ANSWER_S <= metrics.mtta.mean_s <= release_took
    assert metrics.mtta.mean_s == pytest.approx((ask.at - ask.asked_at).total_seconds())

    # MTTR: alert start -> verified, for the two resolved incidents
    recover = {n: Durations.of(r).recover_s for n, r in rec.items()}
    assert recover["fine"] is None and recover["release"] is None
    assert 40 < recover["killed"] <= 40 + killed_took and 20 < recover["redis"] <= 20 + redis_took
    assert metrics.mttr.samples == 2
    assert metrics.mttr.mean_s == pytest.approx((recover["killed"] + recover["redis"]) / 2)

    # repeats: the broken release repeats the killed web (same scenario and target); the
    # already-fine run and the drill's run do not count
    assert [(r.incident_id, r.repeats, r.matched_on) for r in metrics.repeats] == [
        (rec["release"].incident_id, rec["killed"].incident_id, "scenario and target")]

    assert metrics.drills == Rate(hits=1, total=2, rate=0.5)
    assert metrics.drills_by_scenario == {"redis-down": Rate(hits=0, total=1, rate=0.0),
                                          "service-down": Rate(hits=1, total=1, rate=1.0)}

    # the reader pages through the history: small pages give the same incidents, a bound cuts it
    full = read_history(since, metrics.window_end)
    assert [r.incident_id for r in full.incidents] == [r.incident_id for r in rec.values()]
    assert [(r.name.split()[0], r.why) for r in full.left_out] == [(drilled_record.incident_id, "drill")]
    paged = read_history(since, metrics.window_end, page_size=2)
    assert [r.incident_id for r in paged.incidents] == [r.incident_id for r in full.incidents]
    assert not paged.truncated and not full.truncated
    cut = read_history(since, metrics.window_end, page_size=2, max_runs=3)
    assert cut.truncated and len(cut.incidents) == 3

    # what the run published: the markdown (chart embedded), the table, the PNG file
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert {MARKDOWN_KEY, TABLE_KEY} <= set(by_key), sorted(by_key)
    markdown = str(by_key[MARKDOWN_KEY].data)
    assert by_key[MARKDOWN_KEY].type == "markdown" and by_key[TABLE_KEY].type == "table"
    assert "| Incidents | 4 | |" in markdown
    assert "| Auto-remediation success rate | 67 % (2 of 3) | 3 |" in markdown
    assert "| Drill pass rate | 50 % (1 of 2) | 2 |" in markdown
    assert f"| {rec['release'].incident_id} | service-down | web |" in markdown

    embedded = re.search(r"!\[Incident metrics chart\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert embedded, "the chart is not embedded in the markdown"
    png = base64.b64decode(embedded.group(1))
    assert png.startswith(PNG_SIGNATURE)
    written = re.search(r"PNG file: `([^`]+)`", markdown)
    assert written, "the markdown does not say where the PNG file is"
    path = Path(written.group(1))
    assert path.is_file() and path.is_relative_to(state_dir / "reports")
    assert path.read_bytes() == png

    data = by_key[TABLE_KEY].data
    table = json.loads(data) if isinstance(data, str) else data
    rows = {(r["scenario"], r["severity"]): r for r in table}
    assert set(rows) == {("redis-down", "P0"), ("service-down", "P0"), ("service-down", "P2")}
    assert rows[("service-down", "P0")]["incidents"] == 2
    assert rows[("service-down", "P0")]["mttd_mean_s"] == round(detect["killed"], 1)
    assert rows[("redis-down", "P0")]["mttr_mean_s"] == round(recover["redis"], 1)
    assert rows[("service-down", "P2")]["mttd_mean_s"] is None
