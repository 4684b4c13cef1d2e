"""Incident metrics from the incident records, and the computed durations of one incident.

Pure computation: no Prefect client here. ``incident/history.py`` reads the records (saved on
each run as a flow run input, kept with the run, unlike Prefect's events) and the drill results
(the drill runs' tags); ``flows/incident_metrics.py`` publishes what is computed here.

Definitions (all times in seconds, UTC):

* **MTTD** (time to detect): the alert started (``trigger.fired_at``) -> the runbook run started
  (``opened_at``). Only alert-started incidents have one.
* **MTTA** (time to acknowledge): a human was asked to approve a step (``asked_at``) -> the answer
  (``at``). The first ask of each incident counts; an ask nobody answered (timed out) or that the
  alert gateway stood down has none (the timed-out asks are counted apart).
* **MTTR** (time to recover): the alert started (or, without an alert, the run started) -> the
  fix was verified (``verified_at``), for incidents that ended ``resolved`` with a verification.
* Each is given as mean and median over its samples, with the sample count; None without samples.
* **Auto-remediation success rate**: of the incidents in which a step approved by a policy ran
  (an approval ``by`` ``policy:<name>``: the step starts right after it), the share that ended
  ``resolved``. Dry runs and shadow runs are left out (nothing runs in them), as are incidents
  still open (not concluded yet).
* **Repeat incident**: an incident opened within 30 days after an earlier one with the same
  alert fingerprint, or the same scenario and target. Runs that ended ``already fine`` (nothing
  was wrong when checked) neither repeat nor are repeated. Each repeat names the latest earlier
  incident it repeats.
* **Drill pass rate**: passed / (passed + failed) drill runs, overall and per scenario.

Remediation runs made during drills are not incidents: the history reader leaves them out.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # record.py renders postmortem_lines in its report: no import at run time
    from incident.record import ApprovalRecord, IncidentRecord

#: How close an earlier incident must be for a later one to count as its repeat.
REPEAT_WINDOW = timedelta(days=30)
SEVERITIES = ("P0", "P1", "P2", "P3")
#: Outcomes in which nothing was wrong when the run looked: not a recurrence of a problem.
NOT_A_PROBLEM = ("already fine",)


def utc(at: datetime) -> datetime:
    """``at`` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    """``end - start`` in seconds, never negative (clock skew between an alert source and the
    runner counts as 0); None when either end is unknown."""
    if start is None or end is None:
        return None
    return max(0.0, (utc(end) - utc(start)).total_seconds())


# -- one incident ------------------------------------------------------------------------------
def first_ask(record: IncidentRecord) -> ApprovalRecord | None:
    """The first approval for which a human was asked (the run paused), if any."""
    return next((a for a in record.approvals if a.asked_at is not None), None)


def answered(approval: ApprovalRecord) -> bool:
    """A human answered the ask: not a timeout, not the alert gateway standing the run down."""
    return (approval.asked_at is not None and approval.decision != "timed out"
            and not approval.by.startswith("alert-gateway"))


def auto_fixed(record: IncidentRecord) -> bool:
    """A step approved by a written policy ran in this incident (the run is tagged auto-fix)."""
    return any(a.decision == "approved" and a.by.startswith("policy:") for a in record.approvals)


def recovered(record: IncidentRecord) -> bool:
    """The incident ended resolved and its fix was verified."""
    return record.outcome == "resolved" and record.verified_at is not None


class Durations(BaseModel):
    """The durations of one incident, each None when unknown (see the module's definitions)."""

    detect_s: float | None = Field(description="alert started -> run started")
    acknowledge_s: float | None = Field(description="first approval asked -> answered by a human")
    recover_s: float | None = Field(description="alert started (else run started) -> verified")
    total_s: float | None = Field(description="alert started (else run started) -> closed")
    starts_at: Literal["alert", "run"] = Field(
        description="what recover_s and total_s count from: the alert's start when known")

    @classmethod
    def of(cls, record: IncidentRecord) -> Durations:
        fired = record.trigger.fired_at
        start = fired or record.opened_at
        ask = first_ask(record)
        return cls(
            detect_s=_seconds(fired, record.opened_at),
            acknowledge_s=_seconds(ask.asked_at, ask.at) if ask is not None and answered(ask) else None,
            recover_s=_seconds(start, record.verified_at) if recovered(record) else None,
            total_s=_seconds(start, record.closed_at),
            starts_at="alert" if fired is not None else "run",
        )


# -- the metrics -------------------------------------------------------------------------------
class TimeStat(BaseModel):
    """Mean and median of a duration over its samples (None without samples)."""

    samples: int = 0
    mean_s: float | None = None
    median_s: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> TimeStat:
        if not values:
            return cls()
        return cls(samples=len(values), mean_s=statistics.fmean(values),
                   median_s=float(statistics.median(values)))


class Rate(BaseModel):
    """``hits`` of ``total``; ``rate`` is hits / total, None when total is 0."""

    hits: int = 0
    total: int = 0
    rate: float | None = None

    @classmethod
    def of(cls, hits: int, total: int) -> Rate:
        return cls(hits=hits, total=total, rate=hits / total if total else None)


class DrillResult(BaseModel):
    """One finished drill run: its scenario and whether it passed."""

    name: str
    scenario: str | None = None
    passed: bool
    at: datetime = Field(description="when the drill run started")


class RepeatIncident(BaseModel):
    """An incident that repeats an earlier one (see the module's definition)."""

    incident_id: str
    scenario: str
    target: str
    opened_at: datetime
    repeats: str = Field(description="the incident id of the latest earlier incident it repeats")
    repeats_opened_at: datetime
    matched_on: Literal["fingerprint", "scenario and target"]
    after_s: float = Field(description="time between the two incidents' starts")


class Breakdown(BaseModel):
    """One scenario x severity cell: how many incidents and their mean times."""

    scenario: str
    severity: str
    incidents: int
    mttd: TimeStat
    mtta: TimeStat
    mttr: TimeStat
    auto_fix: Rate


class IncidentMetrics(BaseModel):
    """The incident metrics of a window (see the module's definitions)."""

    window_start: datetime
    window_end: datetime
    incidents: int
    by_severity: dict[str, int] = Field(description="P0..P3, each present (0 when none)")
    by_scenario: dict[str, int]
    by_outcome: dict[str, int]
    by_environment: dict[str, int]
    breakdown: list[Breakdown] = Field(description="per scenario x severity, sorted")
    mttd: TimeStat
    mtta: TimeStat
    mttr: TimeStat
    approvals_timed_out: int = Field(description="asks of a human that nobody answered in time")
    auto_fix: Rate = Field(description="auto-remediation: resolved (hits) of policy-approved fixes")
    repeats: list[RepeatIncident]
    drills: Rate = Field(description="drill runs passed (hits) of passed + failed")
    drills_by_scenario: dict[str, Rate]
    drill_remediation_runs: int = Field(
        default=0, description="remediation runs made during drills, left out (set by the reader)")
    runs_without_record: int = Field(
        default=0, description="incident runs with no readable saved record, left out (set by the reader)")


def _times(records: Iterable[IncidentRecord]) -> tuple[TimeStat, TimeStat, TimeStat]:
    found = [Durations.of(r) for r in records]
    return (TimeStat.of([d.detect_s for d in found if d.detect_s is not None]),
            TimeStat.of([d.acknowledge_s for d in found if d.acknowledge_s is not None]),
            TimeStat.of([d.recover_s for d in found if d.recover_s is not None]))


def _auto_fix_rate(records: Iterable[IncidentRecord]) -> Rate:
    tried = [r for r in records if auto_fixed(r) and not r.dry_run and not r.shadow and r.outcome != "open"]
    return Rate.of(sum(r.outcome == "resolved" for r in tried), len(tried))


def find_repeats(records: Iterable[IncidentRecord], window_start: datetime, window_end: datetime,
                 within: timedelta = REPEAT_WINDOW) -> list[RepeatIncident]:
    """The incidents opened in [window_start, window_end) that repeat an earlier one (which may
    be before the window) within ``within``, oldest first."""
    start, end = utc(window_start), utc(window_end)
    problems = sorted((r for r in records if r.outcome not in NOT_A_PROBLEM), key=lambda r: utc(r.opened_at))
    found: list[RepeatIncident] = []
    for i, rec in enumerate(problems):
        opened = utc(rec.opened_at)
        if not start <= opened < end:
            continue
        for earlier in reversed(problems[:i]):  # the latest earlier incident first
            gap = opened - utc(earlier.opened_at)
            if gap > within:
                break
            fingerprint = rec.trigger.fingerprint
            if fingerprint and fingerprint == earlier.trigger.fingerprint:
                matched: Literal["fingerprint", "scenario and target"] = "fingerprint"
            elif (rec.scenario, rec.target) == (earlier.scenario, earlier.target):
                matched = "scenario and target"
            else:
                continue
            found.append(RepeatIncident(
                incident_id=rec.incident_id, scenario=rec.scenario, target=rec.target, opened_at=opened,
                repeats=earlier.incident_id, repeats_opened_at=utc(earlier.opened_at),
                matched_on=matched, after_s=gap.total_seconds()))
            break
    return found


def compute_metrics(records: Iterable[IncidentRecord], drills: Iterable[DrillResult] = (), *,
                    window_start: datetime, window_end: datetime,
                    repeat_window: timedelta = REPEAT_WINDOW) -> IncidentMetrics:
    """The metrics of the incidents opened in [window_start, window_end) and the drills run then.

    ``records`` are incidents only (no drill remediation runs); those opened before the window
    are used only as the earlier incidents of repeats, those after it are ignored.
    """
    start, end = utc(window_start), utc(window_end)
    if end <= start:
        raise ValueError(f"the window must end after it starts ({start} .. {end})")
    every = list(records)
    inside = sorted((r for r in every if start <= utc(r.opened_at) < end), key=lambda r: utc(r.opened_at))
    mttd, mtta, mttr = _times(inside)

    cells: dict[tuple[str, str], list[IncidentRecord]] = {}
    for rec in inside:
        cells.setdefault((rec.scenario, rec.severity.value), []).append(rec)
    breakdown = []
    for (scenario, severity), recs in sorted(cells.items()):
        d, a, r = _times(recs)
        breakdown.append(Breakdown(scenario=scenario, severity=severity, incidents=len(recs),
                                   mttd=d, mtta=a, mttr=r, auto_fix=_auto_fix_rate(recs)))

    drill_runs = [d for d in drills if start <= utc(d.at) < end]
    per_scenario: dict[str, list[DrillResult]] = {}
    for drill in drill_runs:
        per_scenario.setdefault(drill.scenario or "unknown", []).append(drill)
    severity_counts = Counter(r.severity.value for r in inside)
    return IncidentMetrics(
        window_start=start, window_end=end, incidents=len(inside),
        by_severity={s: severity_counts.get(s, 0) for s in SEVERITIES},
        by_scenario=dict(sorted(Counter(r.scenario for r in inside).items())),
        by_outcome=dict(sorted(Counter(r.outcome for r in inside).items())),
        by_environment=dict(sorted(Counter(r.environment for r in inside).items())),
        breakdown=breakdown, mttd=mttd, mtta=mtta, mttr=mttr,
        approvals_timed_out=sum(a.decision == "timed out" for r in inside for a in r.approvals),
        auto_fix=_auto_fix_rate(inside),
        repeats=find_repeats(every, start, end, repeat_window),
        drills=Rate.of(sum(d.passed for d in drill_runs), len(drill_runs)),
        drills_by_scenario={s: Rate.of(sum(d.passed for d in ds), len(ds))
                            for s, ds in sorted(per_scenario.items())},
    )


# -- presentation helpers ----------------------------------------------------------------------
_MARKDOWN = re.compile(r"([\\`\[\]<>|])")


def markdown_text(text: str) -> str:
    """Text from outside (alert data, reasons, details) as plain text on one markdown line:
    what could make markup (backslash, backtick, brackets, angle brackets, pipe) is escaped."""
    return _MARKDOWN.sub(r"\\\1", " ".join(text.splitlines()))


def format_duration(seconds: float | None) -> str:
    """``12.5 s``, ``45 s``, ``3 min 05 s``, ``2 h 07 min``, ``1 d 04 h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def _at(at: datetime) -> str:
    return f"{utc(at):%Y-%m-%d %H:%M:%S}"


def timeline_events(record: IncidentRecord) -> list[tuple[datetime, str]]:
    """The incident's computed timeline, oldest first: alert fired, run started, each approval
    asked and answered, each action, verified, closed (events at the same time keep this order)."""
    rec, trig = record, record.trigger
    events: list[tuple[datetime, str]] = []
    if trig.fired_at is not None:
        what = ", ".join(x for x in (trig.source, f"fingerprint {trig.fingerprint}" if trig.fingerprint else None,
                                     trig.summary) if x)
        events.append((trig.fired_at, "alert fired" + (f" ({what})" if what else "")))
    events.append((rec.opened_at, f"runbook run started: {rec.scenario} on {rec.target} "
                                  f"({trig.kind} trigger{', dry run' if rec.dry_run else ''})"))
    for a in rec.approvals:
        if a.asked_at is not None:
            events.append((a.asked_at, f"approval asked: {a.action}"))
        events.append((a.at, f"approval {a.decision}: {a.action} by {a.by}"
                             + (f" ({a.reason})" if a.reason and not a.by.startswith("policy:") else "")))
    for act in rec.actions:
        events.append((act.at, f"action {act.action} on {act.target}: "
                               f"{'changed' if act.changed else 'no change'}; {act.detail}"))
    if rec.verified_at is not None:
        events.append((rec.verified_at, f"verified: {rec.verification or '-'}"))
    if rec.closed_at is not None:
        events.append((rec.closed_at, f"closed: {rec.outcome}" + (f" - {rec.summary}" if rec.summary else "")))
    return sorted(events, key=lambda e: utc(e[0]))


def _why_unknown(record: IncidentRecord, measure: str) -> str:
    if measure == "detect":
        return "no alert start known (not alert-started)"
    if measure == "acknowledge":
        ask = first_ask(record)
        if ask is None:
            return "nobody was asked"
        return f"the ask was not answered ({ask.decision} by {ask.by})"
    if record.outcome == "open":
        return "still open"
    if measure == "recover":
        return f"not recovered ({record.outcome})"
    return "not closed"


def postmortem_lines(record: IncidentRecord) -> list[str]:
    """The post-mortem draft's "Durations" block and computed timeline, as markdown lines."""
    d = Durations.of(record)
    start = "alert started" if d.starts_at == "alert" else "run started"
    ask = first_ask(record)
    rows = [
        ("Time to detect", "alert started", "run started", d.detect_s, "detect"),
        ("Time to acknowledge", f"approval asked ({ask.action})" if ask else "approval asked",
         "answered", d.acknowledge_s, "acknowledge"),
        ("Time to recover", start, "verified", d.recover_s, "recover"),
        ("Total", start, "closed", d.total_s, "total"),
    ]
    lines = ["## Durations", "", "| Measure | From | To | Duration |", "|---|---|---|---|"]
    for name, frm, to, value, measure in rows:
        shown = format_duration(value) if value is not None else f"- ({_why_unknown(record, measure)})"
        lines.append(f"| {name} | {markdown_text(frm)} | {to} | {markdown_text(shown)} |")
    events = timeline_events(record)
    origin = utc(events[0][0])
    lines += ["", "## Timeline (computed)", "", "| Time (UTC) | Since start | Event |", "|---|---|---|"]
    lines += [f"| {_at(at)} | +{format_duration(_seconds(origin, at))} | {markdown_text(event)} |"
              for at, event in events]
    return lines
