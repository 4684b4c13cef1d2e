"""Runbook: incident metrics, reviewed monthly, and the figures of the post-incident reviews.

Automates these hand-written steps from ../shared/runbooks/:
- 001 "Incident Metrics" ("Track and review monthly"): MTTD (incident start to detection),
  MTTR (to resolution), incident count by severity, repeat incidents; and the "Continuous
  Improvement" monthly review (review all incidents, identify patterns) and its goals (reduce
  MTTR, reduce the incident count, eliminate repeat incidents).
- 001 "Post-Incident Review" agenda, 2. "Timeline Review": detection, response and resolution
  times (each incident's report carries its own computed durations and timeline).

What it does: reads the run history through the Prefect client (every runbook run is an
incident; its record is saved with the run, so it outlives Prefect's 7-day event retention),
leaves out the remediation runs of drills, and computes (``incident/metrics.py`` has the exact
definitions): incidents by severity, scenario and outcome; MTTD (alert start -> run start), MTTA
(approval asked -> answered), MTTR (alert start -> verified), mean and median; the
auto-remediation success rate; repeat incidents (same fingerprint, or same scenario and target,
within 30 days); the drill pass rate. It publishes them on its run as a markdown artifact
(``incident-metrics``, with the chart embedded), a table artifact (``incident-metrics-table``:
scenario x severity) and a PNG chart written under ``<state dir>/reports/``; it returns the
``IncidentMetrics``. Scheduled monthly; runnable at any time for any window.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from incident.history import History, read_history
from incident.metrics import (REPEAT_WINDOW, SEVERITIES, IncidentMetrics, Rate, TimeStat,
                              compute_metrics, format_duration, markdown_text, utc)
from incident.settings import get_settings

MARKDOWN_KEY = "incident-metrics"
TABLE_KEY = "incident-metrics-table"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@flow(name="incident-metrics", log_prints=False)
def incident_metrics(
    days: int = 30,
    until: datetime | None = None,
    since: datetime | None = None,
    previous_month: bool = False,
    repeat_lookback_days: int = REPEAT_WINDOW.days,
) -> IncidentMetrics:
    """Incident metrics of a window of the run history, published on this run.

    Args:
        days: the window's length, ending at ``until``.
        until: the window's end (UTC; a time without zone is taken as UTC); now when empty.
        since: the window's start instead of ``until - days`` (a report on a known stretch,
            e.g. since a drill day began).
        previous_month: the last whole calendar month before ``until`` instead (UTC): what the
            monthly schedule reports, so that consecutive reports neither overlap nor leave gaps.
        repeat_lookback_days: how far before the window earlier incidents are looked up, so that
            a repeat of an incident from before the window counts (0: within the window only).
    """
    logger = get_run_logger()
    start, end = report_window(days, until, since, previous_month)
    if not 0 <= repeat_lookback_days <= REPEAT_WINDOW.days:
        raise ValueError(f"repeat_lookback_days must be 0..{REPEAT_WINDOW.days} (got {repeat_lookback_days})")

    history = read_history(start - timedelta(days=repeat_lookback_days), end)
    metrics = compute_metrics(history.incidents, history.drills, window_start=start, window_end=end)
    drilled = history.left_out_between(start, end, "drill")
    unreadable = [r for why in ("no record", "unreadable record") for r in history.left_out_between(start, end, why)]
    metrics = metrics.model_copy(update={"drill_remediation_runs": len(drilled),
                                         "runs_without_record": len(unreadable)})
    for run in unreadable:
        logger.warning("left out: %s (%s%s)", run.name, run.why, f": {run.detail}" if run.detail else "")
    logger.info("%d incidents from %s to %s (%d drill remediation runs and %d runs without a "
                "record left out); %d drills", metrics.incidents, f"{start:%Y-%m-%d %H:%M:%S}",
                f"{end:%Y-%m-%d %H:%M:%S} UTC", len(drilled), len(unreadable), metrics.drills.total)

    png = render_chart(metrics)
    path = write_chart(png, end)
    logger.info("chart written to %s", path)
    create_markdown_artifact(markdown=render_markdown(metrics, history, png, path), key=MARKDOWN_KEY,
                             description=f"Incident metrics {start:%Y-%m-%d} .. {end:%Y-%m-%d}")
    create_table_artifact(table=table_rows(metrics), key=TABLE_KEY,
                          description=f"Incidents by scenario and severity, {start:%Y-%m-%d} .. {end:%Y-%m-%d}")
    return metrics


def report_window(days: int = 30, until: datetime | None = None, since: datetime | None = None,
                  previous_month: bool = False, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The report's window [start, end) in UTC, from the flow's parameters."""
    end = utc(until) if until else utc(now or datetime.now(timezone.utc))
    if previous_month:
        if since is not None:
            raise ValueError("give either since or previous_month, not both")
        end = end.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        start = (end - timedelta(days=1)).replace(day=1)
    elif since is not None:
        start = utc(since)
    elif days < 1:
        raise ValueError(f"days must be at least 1 (got {days})")
    else:
        start = end - timedelta(days=days)
    if start >= end:
        raise ValueError(f"the window must end after it starts: since {start:%Y-%m-%d %H:%M:%S} UTC, "
                         f"until {end:%Y-%m-%d %H:%M:%S} UTC")
    return start, end


# -- the table ---------------------------------------------------------------------------------
def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def table_rows(metrics: IncidentMetrics) -> list[dict[str, Any]]:
    """One row per scenario x severity: counts and mean times (seconds)."""
    rows = [{"scenario": b.scenario, "severity": b.severity, "incidents": b.incidents,
             "mttd_mean_s": _round(b.mttd.mean_s), "mtta_mean_s": _round(b.mtta.mean_s),
             "mttr_mean_s": _round(b.mttr.mean_s), "auto_fixes": b.auto_fix.total,
             "auto_fixes_resolved": b.auto_fix.hits} for b in metrics.breakdown]
    return rows or [{"scenario": "(no incidents in the window)", "severity": "", "incidents": 0,
                     "mttd_mean_s": None, "mtta_mean_s": None, "mttr_mean_s": None,
                     "auto_fixes": 0, "auto_fixes_resolved": 0}]


# -- the chart ---------------------------------------------------------------------------------
_SEVERITY_COLORS = {"P0": "#c0392b", "P1": "#e67e22", "P2": "#f1c40f", "P3": "#7f8c8d"}


def render_chart(metrics: IncidentMetrics) -> bytes:
    """A PNG: incidents by scenario and severity, MTTD/MTTA/MTTR, the two rates."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (counts, times, rates) = plt.subplots(1, 3, figsize=(13, 4.2), dpi=80)
    try:
        fig.suptitle(f"Incidents {metrics.window_start:%Y-%m-%d %H:%M} .. "
                     f"{metrics.window_end:%Y-%m-%d %H:%M} UTC: {metrics.incidents}")
        scenarios = sorted(metrics.by_scenario)
        bottom = [0] * len(scenarios)
        for severity in SEVERITIES:
            heights = [sum(b.incidents for b in metrics.breakdown
                           if b.scenario == s and b.severity == severity) for s in scenarios]
            if any(heights):
                counts.bar(scenarios, heights, bottom=bottom, label=severity, color=_SEVERITY_COLORS[severity])
                bottom = [x + h for x, h in zip(bottom, heights)]
        counts.set_title("Incidents by scenario and severity")
        counts.set_ylabel("incidents")
        if scenarios:
            counts.legend()
            counts.tick_params(axis="x", labelrotation=20)
        else:
            counts.text(0.5, 0.5, "no incidents", ha="center", va="center", transform=counts.transAxes)
            counts.set_xticks([])
        counts.yaxis.get_major_locator().set_params(integer=True)

        stats: dict[str, TimeStat] = {"MTTD": metrics.mttd, "MTTA": metrics.mtta, "MTTR": metrics.mttr}
        biggest = max([s.mean_s or 0.0 for s in stats.values()] + [s.median_s or 0.0 for s in stats.values()])
        unit, scale = ("min", 60.0) if biggest >= 120 else ("s", 1.0)
        xs = range(len(stats))
        means = [(s.mean_s or 0.0) / scale for s in stats.values()]
        medians = [(s.median_s or 0.0) / scale for s in stats.values()]
        times.bar([x - 0.2 for x in xs], means, width=0.4, label="mean", color="#2c7fb8")
        times.bar([x + 0.2 for x in xs], medians, width=0.4, label="median", color="#7fcdbb")
        times.set_xticks(list(xs), [f"{k}\n(n={s.samples})" for k, s in stats.items()])
        times.set_title("Mean and median times")
        times.set_ylabel(unit)
        times.set_ylim(0, max(means + medians) * 1.3 or 1.0)  # room for the legend
        times.legend(loc="upper left", ncols=2)

        shown: dict[str, Rate] = {"auto-remediation\nsuccess": metrics.auto_fix, "drill\npass": metrics.drills}
        values = [100 * (r.rate or 0.0) for r in shown.values()]
        rates.bar(list(shown), values, color=["#31a354", "#756bb1"])
        for i, r in enumerate(shown.values()):
            label = f"{100 * r.rate:.0f} % ({r.hits}/{r.total})" if r.rate is not None else "n/a"
            rates.text(i, min(values[i], 100) + 2, label, ha="center")
        rates.set_ylim(0, 115)
        rates.set_ylabel("%")
        rates.set_title("Rates")
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out.getvalue()


def write_chart(png: bytes, end: datetime) -> Path:
    """The PNG under ``<state dir>/reports/``, named after the window's end and this run."""
    folder = get_settings().state_dir / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    run = str(flow_run.get_id() or "local").replace("-", "")[:8]
    path = folder / f"incident-metrics-{end:%Y%m%dT%H%M%SZ}-{run}.png"
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
    return path


# -- the markdown ------------------------------------------------------------------------------
def _time(stat: TimeStat) -> str:
    if not stat.samples:
        return "- (no sample)"
    return f"mean {format_duration(stat.mean_s)}, median {format_duration(stat.median_s)}"


def _rate(rate: Rate) -> str:
    return f"{100 * rate.rate:.0f} % ({rate.hits} of {rate.total})" if rate.rate is not None else "- (none)"


def _at(at: datetime) -> str:
    return f"{utc(at):%Y-%m-%d %H:%M:%S}"


def _path(path: Path) -> str:
    return f"`{path}`" if "`" not in str(path) else markdown_text(str(path))


def render_markdown(metrics: IncidentMetrics, history: History, png: bytes, path: Path) -> str:
    m = metrics
    lines = [
        f"# Incident metrics {_at(m.window_start)} .. {_at(m.window_end)} UTC", "",
        f"Runs started in the window; remediation runs of drills left out: {m.drill_remediation_runs}; "
        f"incident runs without a readable record left out: {m.runs_without_record}"
        + ("; **the history was cut at the reader's limit: the figures are partial**" if history.truncated else "")
        + ".", "",
        "| Measure | Value | Samples |", "|---|---|---|",
        f"| Incidents | {m.incidents} | |",
        f"| MTTD (alert start -> run start) | {_time(m.mttd)} | {m.mttd.samples} |",
        f"| MTTA (approval asked -> answered) | {_time(m.mtta)} | {m.mtta.samples} |",
        f"| MTTR (alert start, else run start -> verified) | {_time(m.mttr)} | {m.mttr.samples} |",
        f"| Auto-remediation success rate | {_rate(m.auto_fix)} | {m.auto_fix.total} |",
        f"| Repeat incidents (within {REPEAT_WINDOW.days} days) | {len(m.repeats)} | |",
        f"| Drill pass rate | {_rate(m.drills)} | {m.drills.total} |",
        f"| Approvals nobody answered in time | {m.approvals_timed_out} | |",
        "", "## Incidents by severity", "", "| Severity | Incidents |", "|---|---|",
    ]
    lines += [f"| {s} | {n} |" for s, n in m.by_severity.items()]
    lines += ["", "## Incidents by scenario", "", "| Scenario | Incidents |", "|---|---|"]
    lines += [f"| {markdown_text(s)} | {n} |" for s, n in m.by_scenario.items()] or ["| - | 0 |"]
    lines += ["", "## Outcomes", "", "| Outcome | Incidents |", "|---|---|"]
    lines += [f"| {o} | {n} |" for o, n in m.by_outcome.items()] or ["| - | 0 |"]
    lines += ["", "## By scenario and severity", "",
              "| Scenario | Severity | Incidents | MTTD | MTTA | MTTR | Auto-remediation |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {markdown_text(b.scenario)} | {b.severity} | {b.incidents} | {_time(b.mttd)} | "
              f"{_time(b.mtta)} | {_time(b.mttr)} | {_rate(b.auto_fix)} |" for b in m.breakdown] \
        or ["| - | - | 0 | - | - | - | - |"]
    lines += ["", f"## Repeat incidents (same fingerprint, or same scenario and target, within "
                  f"{REPEAT_WINDOW.days} days)", "",
              "| Incident | Scenario | Target | Opened (UTC) | Repeats | Matched on | After |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {markdown_text(r.incident_id)} | {markdown_text(r.scenario)} | {markdown_text(r.target)} | "
              f"{_at(r.opened_at)} | {markdown_text(r.repeats)} | {r.matched_on} | {format_duration(r.after_s)} |"
              for r in m.repeats] or ["| - | | | | | | |"]
    lines += ["", "## Drills", "", "| Scenario | Passed | Failed | Pass rate |", "|---|---|---|---|"]
    lines += [f"| {markdown_text(s)} | {r.hits} | {r.total - r.hits} | {_rate(r)} |"
              for s, r in m.drills_by_scenario.items()]
    lines += [f"| **all** | {m.drills.hits} | {m.drills.total - m.drills.hits} | {_rate(m.drills)} |"]
    lines += ["", "## Chart", "",
              f"![Incident metrics chart](data:image/png;base64,{base64.b64encode(png).decode()})", "",
              f"PNG file: {_path(path)}", "",
              "## Definitions", "",
              "- MTTD: the alert started -> the runbook run started (alert-started incidents only).",
              "- MTTA: a human was asked to approve a step -> the answer (first ask per incident; "
              "asks nobody answered are counted apart).",
              "- MTTR: the alert started (else the run started) -> the fix was verified, for "
              "incidents that ended resolved.",
              "- Auto-remediation success rate: of the incidents in which a step approved by a "
              "policy ran (dry runs, shadow runs and open incidents left out), the share that "
              "ended resolved.",
              f"- Repeat incident: opened within {REPEAT_WINDOW.days} days after an earlier one with "
              "the same alert fingerprint, or the same scenario and target; runs that found "
              "nothing wrong (already fine) do not count.",
              "- Drill pass rate: passed / (passed + failed) drill runs.", ""]
    return "\n".join(lines)
