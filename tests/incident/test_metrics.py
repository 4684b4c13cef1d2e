"""The incident metrics and one incident's durations, computed from hand-built records."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from incident.inventory import Severity
from incident.metrics import (Durations, DrillResult, Rate, TimeStat, compute_metrics, find_repeats,
                              format_duration, postmortem_lines)
from incident.record import ActionTaken, ApprovalRecord, IncidentRecord, Trigger

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
S = timedelta(seconds=1)


def rec(incident_id: str, *, at: datetime = T0, scenario: str = "service-down", target: str = "web",
        severity: Severity = Severity.P0, fired_s: float | None = None, fingerprint: str | None = None,
        outcome: str = "resolved", verified_s: float | None = None, closed_s: float | None = 60,
        approvals: list[ApprovalRecord] | None = None, dry_run: bool = False, shadow: bool = False,
        environment: str = "lab") -> IncidentRecord:
    """A record opened at ``at``; the alert fired ``fired_s`` before it; verified and closed
    ``verified_s`` / ``closed_s`` after it."""
    return IncidentRecord(
        incident_id=incident_id, scenario=scenario, target=target, environment=environment,
        severity=severity, dry_run=dry_run, shadow=shadow, opened_at=at, outcome=outcome,
        trigger=Trigger(kind="alert" if fired_s is not None else "manual",
                        source="alertmanager" if fired_s is not None else None,
                        fingerprint=fingerprint, fired_at=at - fired_s * S if fired_s is not None else None),
        verified_at=at + verified_s * S if verified_s is not None else None,
        verification="3/3 consecutive good probes" if verified_s is not None else None,
        closed_at=at + closed_s * S if closed_s is not None else None,
        approvals=approvals or [],
    )


def policy(at: datetime, action: str = "restart_container") -> ApprovalRecord:
    return ApprovalRecord(at=at, action=action, decision="approved", by="policy:restart-stateless",
                          reason="stateless")


def human(asked: datetime, answered_s: float, decision: str = "approved",
          by: str = "Ada Lovelace", action: str = "rollback_container") -> ApprovalRecord:
    return ApprovalRecord(at=asked + answered_s * S, asked_at=asked, action=action,
                          decision=decision, by=by, reason="bad release")


WINDOW = dict(window_start=T0 - timedelta(days=1), window_end=T0 + timedelta(days=30))


def test_durations_of_one_alert_started_incident():
    r = rec("INC-1", fired_s=40, verified_s=50, closed_s=55,
            approvals=[policy(T0 + 5 * S), human(T0 + 10 * S, 25), human(T0 + 40 * S, 3)])
    d = Durations.of(r)
    assert d == Durations(detect_s=40, acknowledge_s=25, recover_s=90, total_s=95, starts_at="alert")


def test_durations_without_alert_start_count_from_the_run():
    r = rec("INC-2", verified_s=30, closed_s=31)
    d = Durations.of(r)
    assert (d.detect_s, d.acknowledge_s, d.recover_s, d.total_s, d.starts_at) == (None, None, 30, 31, "run")


def test_durations_unknown_when_not_answered_not_recovered_or_open():
    timed_out = ApprovalRecord(at=T0 + 20 * S, asked_at=T0 + 5 * S, action="rollback_container",
                               decision="timed out", by="nobody")
    r = rec("INC-3", fired_s=10, outcome="failed", verified_s=15, closed_s=20, approvals=[timed_out])
    d = Durations.of(r)
    assert d.detect_s == 10 and d.acknowledge_s is None, "a timeout is not an acknowledgement"
    assert d.recover_s is None, "verified but failed is not recovered"
    assert d.total_s == 30
    still_open = rec("INC-4", fired_s=10, outcome="open", closed_s=None)
    assert Durations.of(still_open).total_s is None
    stood_down = human(T0 + 5 * S, 4, decision="stood down", by="alert-gateway (alertmanager resolved)")
    assert Durations.of(rec("INC-5", approvals=[stood_down])).acknowledge_s is None


def test_clock_skew_never_makes_a_negative_duration():
    r = rec("INC-6", fired_s=-3, verified_s=10)  # the alert source's clock is 3 s ahead
    assert Durations.of(r).detect_s == 0


def test_metrics_of_a_known_month():
    t = T0
    records = [
        # auto-fixed and resolved: detect 40, recover 100
        rec("A", at=t, fired_s=40, fingerprint="fp-web", verified_s=60, approvals=[policy(t + 5 * S)]),
        # auto-fixed, then a human rejected the rollback: ack 30
        rec("B", at=t + timedelta(hours=1), outcome="not approved",
            approvals=[policy(t + timedelta(hours=1)), human(t + timedelta(hours=1, seconds=10), 30, "rejected")]),
        # a human approved: ack 90; resolved: detect 20, recover 20 + 200
        rec("C", at=t + timedelta(days=2), scenario="redis-down", severity=Severity.P1, fired_s=20,
            verified_s=200, approvals=[human(t + timedelta(days=2, seconds=10), 90)]),
        # nothing wrong when checked
        rec("D", at=t + timedelta(days=3), severity=Severity.P2, outcome="already fine"),
        # a dry run with a policy approval: not an auto-fix attempt
        rec("E", at=t + timedelta(days=4), outcome="dry run", dry_run=True, approvals=[policy(t)]),
        # auto-fixed, failed; detect 10 (no verification time counted)
        rec("F", at=t + timedelta(days=5), scenario="disk-full", fired_s=10, outcome="failed",
            verified_s=30, approvals=[policy(t + timedelta(days=5))], environment="staging"),
        # outside the window: ignored
        rec("G", at=t + timedelta(days=40), fired_s=1000),
    ]
    drills = [DrillResult(name="d1", scenario="service-down", passed=True, at=t),
              DrillResult(name="d2", scenario="service-down", passed=False, at=t + S),
              DrillResult(name="d3", scenario="redis-down", passed=True, at=t + 2 * S),
              DrillResult(name="d4", scenario="redis-down", passed=True, at=t + timedelta(days=31))]
    m = compute_metrics(records, drills, **WINDOW)

    assert m.incidents == 6
    assert m.by_severity == {"P0": 4, "P1": 1, "P2": 1, "P3": 0}
    assert m.by_scenario == {"disk-full": 1, "redis-down": 1, "service-down": 4}
    assert m.by_outcome == {"already fine": 1, "dry run": 1, "failed": 1, "not approved": 1, "resolved": 2}
    assert m.by_environment == {"lab": 5, "staging": 1}
    assert m.mttd == TimeStat(samples=3, mean_s=70 / 3, median_s=20)
    assert m.mtta == TimeStat(samples=2, mean_s=60, median_s=60)
    assert m.mttr == TimeStat(samples=2, mean_s=160, median_s=160)
    assert m.auto_fix == Rate(hits=1, total=3, rate=1 / 3), "A resolved; B not approved, F failed"
    assert m.drills == Rate(hits=2, total=3, rate=2 / 3)
    assert m.drills_by_scenario == {"redis-down": Rate(hits=1, total=1, rate=1.0),
                                    "service-down": Rate(hits=1, total=2, rate=0.5)}
    assert m.approvals_timed_out == 0
    # B repeats A (scenario and target, after 1 h); E repeats B; D (already fine) does not count
    assert [(r.incident_id, r.repeats, r.matched_on, r.after_s) for r in m.repeats] == [
        ("B", "A", "scenario and target", 3600.0), ("E", "B", "scenario and target", (4 * 86400) - 3600.0)]

    cell = {(b.scenario, b.severity): b for b in m.breakdown}
    assert list(cell) == [("disk-full", "P0"), ("redis-down", "P1"), ("service-down", "P0"),
                          ("service-down", "P2")]
    sd = cell[("service-down", "P0")]
    assert (sd.incidents, sd.mttd.mean_s, sd.mtta.mean_s, sd.mttr.mean_s) == (3, 40, 30, 100)
    assert sd.auto_fix == Rate(hits=1, total=2, rate=0.5)
    assert cell[("redis-down", "P1")].mttr.mean_s == 220


def test_no_incidents_gives_no_samples_and_no_rates():
    m = compute_metrics([], [], **WINDOW)
    assert m.incidents == 0 and m.by_severity == {"P0": 0, "P1": 0, "P2": 0, "P3": 0}
    assert m.mttd == TimeStat() and m.mttd.mean_s is None and m.mttr.median_s is None
    assert m.auto_fix.rate is None and m.drills.rate is None and m.repeats == []
    with pytest.raises(ValueError, match="must end after it starts"):
        compute_metrics([], window_start=T0, window_end=T0)


def test_open_and_shadow_incidents_are_not_auto_fix_attempts():
    records = [rec("O", outcome="open", closed_s=None, approvals=[policy(T0)]),
               rec("S", outcome="shadow", shadow=True, approvals=[policy(T0)])]
    assert compute_metrics(records, **WINDOW).auto_fix == Rate(hits=0, total=0, rate=None)


def test_repeats_30_day_edge_and_fingerprints():
    month = timedelta(days=30)
    first = rec("R1", at=T0, fingerprint="fp-1")
    exactly = rec("R2", at=T0 + month, scenario="db-locks", fingerprint="fp-1")       # same alert, 30 days on
    too_late = rec("R3", at=T0 + 2 * month + S, scenario="disk-full", target="web")  # 30 d + 1 s after R2
    other_target = rec("R4", at=T0 + 2 * month + 2 * S, scenario="db-locks", target="api")
    found = find_repeats([first, exactly, too_late, other_target], T0 - S, T0 + 3 * month)
    assert [(r.incident_id, r.repeats, r.matched_on) for r in found] == [("R2", "R1", "fingerprint")]

    just_within = rec("R5", at=T0 + 2 * month, scenario="db-locks")  # same scenario+target as R2, 30 d on
    found = find_repeats([first, exactly, just_within], T0 - S, T0 + 3 * month)
    assert [(r.incident_id, r.repeats, r.matched_on) for r in found] == [
        ("R2", "R1", "fingerprint"), ("R5", "R2", "scenario and target")]
    over = rec("R6", at=T0 + 2 * month + S, scenario="db-locks")
    assert [r.incident_id for r in find_repeats([first, exactly, over], T0 - S, T0 + 3 * month)] == ["R2"]


def test_an_earlier_incident_before_the_window_still_makes_a_repeat():
    before = rec("OLD", at=T0 - timedelta(days=10))
    inside = rec("NEW", at=T0 + S)
    m = compute_metrics([before, inside], window_start=T0, window_end=T0 + timedelta(days=30))
    assert m.incidents == 1, "the earlier incident is not counted in the window"
    assert [(r.incident_id, r.repeats, r.after_s) for r in m.repeats] == [("NEW", "OLD", 10 * 86400 + 1)]


def test_timed_out_asks_are_counted():
    timed_out = ApprovalRecord(at=T0 + 20 * S, asked_at=T0, action="rollback_container",
                               decision="timed out", by="nobody")
    m = compute_metrics([rec("X", outcome="failed", approvals=[timed_out])], **WINDOW)
    assert m.approvals_timed_out == 1 and m.mtta.samples == 0


@pytest.mark.parametrize("seconds,shown", [(None, "-"), (0.43, "0.4 s"), (9.96, "10.0 s"), (45.4, "45 s"),
                                           (185, "3 min 05 s"), (7620, "2 h 07 min"),
                                           (100800, "1 d 04 h")])
def test_format_duration(seconds, shown):
    assert format_duration(seconds) == shown


def test_postmortem_lines_durations_and_computed_timeline():
    r = rec("INC-PM", fired_s=40, verified_s=50, closed_s=55,
            approvals=[policy(T0 + 5 * S), human(T0 + 10 * S, 25)])
    r.actions = [ActionTaken(at=T0 + 6 * S, action="restart_container", target="lab-web", changed=True,
                             detail="restarted"),
                 ActionTaken(at=T0 + 36 * S, action="rollback_container", target="lab-web", changed=True,
                             detail="lab-web:1.1")]
    r.summary = "web healthy again"
    lines = postmortem_lines(r)
    text = "\n".join(lines)
    assert lines[0] == "## Durations"
    assert "| Time to detect | alert started | run started | 40 s |" in lines
    assert "| Time to acknowledge | approval asked (rollback_container) | answered | 25 s |" in lines
    assert "| Time to recover | alert started | verified | 1 min 30 s |" in lines
    assert "| Total | alert started | closed | 1 min 35 s |" in lines
    rows = [line for line in lines[lines.index("## Timeline (computed)"):] if line.startswith("| 2026")]
    cells = [row.strip("| ").split(" | ") for row in rows]
    events = [c[2] for c in cells]
    assert [c[1] for c in cells] == ["+0.0 s", "+40 s", "+45 s", "+46 s", "+50 s", "+1 min 15 s",
                                                     "+1 min 16 s", "+1 min 30 s", "+1 min 35 s"]
    assert events[0] == "alert fired (alertmanager)"
    assert events[1] == "runbook run started: service-down on web (alert trigger)"
    assert events[2] == "approval approved: restart_container by policy:restart-stateless"
    assert events[3] == "action restart_container on lab-web: changed; restarted"
    assert events[4] == "approval asked: rollback_container"
    assert events[5] == "approval approved: rollback_container by Ada Lovelace (bad release)"
    assert events[6] == "action rollback_container on lab-web: changed; lab-web:1.1"
    assert events[7] == "verified: 3/3 consecutive good probes"
    assert events[8] == "closed: resolved - web healthy again"
    assert rows[0].startswith("| 2026-03-01 11:59:20 |")
    assert "## Timeline (computed)" in text


def test_postmortem_lines_say_why_a_duration_is_unknown_and_escape_outside_text():
    hostile = "x | y `id` [a](http://e.example) <img src=x>"
    r = rec("INC-Q", outcome="not approved", approvals=[human(T0 + S, 2, "rejected", by=hostile)])
    r.summary = hostile
    lines = postmortem_lines(r)
    assert "| Time to detect | alert started | run started | - (no alert start known (not alert-started)) |" in lines
    assert "| Time to recover | run started | verified | - (not recovered (not approved)) |" in lines
    text = "\n".join(lines)
    for raw in ("`id`", "[a](", "<img", "x | y"):
        assert not re.search(r"(?<!\\)" + re.escape(raw), text), f"{raw!r} reached the markdown unescaped"
    nobody = postmortem_lines(rec("INC-R", outcome="already fine"))
    assert "| Time to acknowledge | approval asked | answered | - (nobody was asked) |" in nobody


def test_an_unreachable_prefect_api_is_a_clear_error(monkeypatch):
    """Reading the history from an API that does not answer fails after a bounded number of
    tries, saying what was read, where, and what to do."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.stack import free_port
    from incident import history

    pauses: list[float] = []
    monkeypatch.setattr(history, "time", SimpleNamespace(sleep=pauses.append))  # its own pauses only
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with temporary_settings(updates={PREFECT_API_URL: url}), \
            pytest.raises(history.HistoryUnavailableError) as caught:
        history.read_history(T0, T0 + timedelta(days=30))
    message = str(caught.value)
    assert url in message and "flow runs tagged severity:P0" in message, message
    assert f"{history.ATTEMPTS} attempts" in message and "PREFECT_API_URL" in message, message
    assert pauses == [1, 2], "tried again twice, 1 s then 2 s apart"


def test_report_windows():
    from flows.incident_metrics import report_window

    now = datetime(2026, 6, 1, 8, 0, tzinfo=timezone.utc)  # the first Monday of June 2026
    assert report_window(now=now) == (now - timedelta(days=30), now)
    assert report_window(days=7, until=datetime(2026, 5, 8)) == (datetime(2026, 5, 1, tzinfo=timezone.utc),
                                                                datetime(2026, 5, 8, tzinfo=timezone.utc))
    assert report_window(previous_month=True, now=now) == (datetime(2026, 5, 1, tzinfo=timezone.utc),
                                                           datetime(2026, 6, 1, tzinfo=timezone.utc))
    assert report_window(previous_month=True, until=datetime(2026, 3, 2, 8, tzinfo=timezone.utc)) == (
        datetime(2026, 2, 1, tzinfo=timezone.utc), datetime(2026, 3, 1, tzinfo=timezone.utc))
    assert report_window(previous_month=True, now=datetime(2027, 1, 4, 8, tzinfo=timezone.utc)) == (
        datetime(2026, 12, 1, tzinfo=timezone.utc), datetime(2027, 1, 1, tzinfo=timezone.utc))
    assert report_window(since=now - timedelta(minutes=5), now=now) == (now - timedelta(minutes=5), now)
    with pytest.raises(ValueError, match="either since or previous_month"):
        report_window(since=now, previous_month=True)
    with pytest.raises(ValueError, match="at least 1"):
        report_window(days=0, now=now)
    with pytest.raises(ValueError, match="must end after it starts"):
        report_window(since=now, now=now)
