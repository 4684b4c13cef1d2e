"""Drill: prove every month that a runbook still heals its fault, the way it would at 3 a.m.

Runbook material: 001 "Post-incident" (regular reviews and drills of the response, MTTD and
MTTR), 002 "P0 timeline" (alert T+0 ... verify T+45: the drill times detection and recovery
against it), 004 "Escalation Matrix" (who is told; the drill's run tells them, marked
[DRILL]). What a drill does, in order:

1. **Preflight** - the target is a drill target (the lab or a drill environment, or
   ``drill_target: true`` in the inventory; never production), the fault belongs to the
   scenario, and the part it breaks is at its baseline (reset first if an earlier run left
   it otherwise).
2. **Mark the target** (``incident/drills.py``): the remediation run that starts on it is the
   drill's run: tagged ``drill``, its approvals answered by the drill policy (mode "policy")
   or by a person in the UI (mode "game-day").
3. **Inject the fault** from the lab's fault registry (``lab/faults.py``).
4. **Detect the real way** where the scenario has an alert and the lab's alerting runs:
   exporter -> Prometheus -> Alertmanager -> alert gateway -> run. Otherwise the drill starts
   the scenario's flow itself, as a subflow.
5. **Let the remediation run** to its end, within the deadline.
6. **Verify**: the part is healthy again, the run ended as the fault's runbook should (healed,
   or escalated for a fault no runbook may heal), one outage opened one incident, and the
   alert's resolve reached the record.
7. **Reset the fault whatever happened**, take the mark off.
8. **Report**: a markdown artifact ``drill-<scenario>`` (detected or not, time to detect, time
   to recover, the steps, the approvals and who answered, pass or fail with the reason, the
   trend against earlier drills as a table and a chart) and a table artifact
   ``drill-results-<scenario>`` (one row per drill: the trend's source). The run ends
   Completed "Drill Passed" or Failed, tagged ``drill-result:pass`` / ``drill-result:fail``.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from uuid import UUID

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName,
                                            FlowRunFilter, FlowRunFilterStartTime, FlowRunFilterTags)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import ArtifactSort
from prefect.flows import load_flow_from_entrypoint
from prefect.runtime import flow_run as current_run
from prefect.states import Completed, Failed, State
from pydantic import BaseModel

from incident.drills import DrillMode, load_drills, mark_target, unmark_target
from incident.errors import ConfigurationError
from incident.inventory import load_target
from incident.record import (DRILL_TAG, IncidentRecord, Trigger, add_run_tags, load_record,
                             read_alert_updates)
from incident.settings import REPO_ROOT, get_settings

if TYPE_CHECKING:
    from lab import Lab
    from lab.faults import Fault

DRILL_FLOW = "drill"
RESULT_TAG = "drill-result:"
POLL_S = 0.5  # how often the drill looks at the run it watches (the times it reports are the run's own)
#: Outcomes a run may end with when its fault is one no runbook may heal (heals=False).
ESCALATED = ("failed", "held back", "not approved")


class DrillResult(BaseModel):
    """One drill, as its report and the trend table keep it."""

    scenario: str
    fault: str
    target: str
    mode: DrillMode
    started_at: datetime
    detection: str = "-"                 # "alert" (the real pipeline) or "drill" (started directly)
    detected: bool = False
    time_to_detect_s: float | None = None  # fault injected -> remediation run started
    time_to_recover_s: float | None = None  # fault injected -> verified healthy
    run_id: str | None = None
    incident_id: str | None = None
    outcome: str = "-"
    steps: list[str] = []
    approvals: list[str] = []
    checks: list[tuple[str, bool, str]] = []  # (what, ok, detail)
    reset: str = "-"
    passed: bool = False
    reason: str = ""

    def check(self, what: str, ok: bool, detail: str) -> bool:
        self.checks.append((what, ok, detail))
        return ok

    def row(self) -> dict[str, object]:
        return {"started": f"{self.started_at:%Y-%m-%d %H:%M}", "result": "pass" if self.passed else "fail",
                "mode": self.mode, "fault": self.fault, "detected": self.detected,
                "time_to_detect_s": _r(self.time_to_detect_s), "time_to_recover_s": _r(self.time_to_recover_s),
                "outcome": self.outcome, "reason": self.reason, "run": str(current_run.get_id() or "")}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@flow(name=DRILL_FLOW, log_prints=False)
def drill(scenario: str, mode: DrillMode = "policy", fault: str | None = None,
          target: str | None = None, deadline_s: float | None = None) -> State:
    """Drill ``scenario`` (see the module docstring); ``fault``, ``target`` and ``deadline_s``
    default to the scenario's entry in policies/drills.yaml."""
    from lab import Lab
    from lab.faults import FAULTS

    logger = get_run_logger()
    spec = load_drills().spec(scenario)
    fault_name, target_name = fault or spec.fault, target or spec.target
    deadline = deadline_s or spec.deadline_s
    if fault_name not in FAULTS or FAULTS[fault_name].scenario != scenario:
        raise ConfigurationError(fault_name, "not a fault of this scenario in the lab's registry",
                                 f"one of {sorted(n for n, f in FAULTS.items() if f.scenario == scenario)}",
                                 "fix the fault in policies/drills.yaml or the parameter")
    chosen = FAULTS[fault_name]
    service = load_target(target_name)
    if not service.service.drillable:
        raise ConfigurationError(target_name, f"environment {service.service.environment} is not a drill "
                                 "target", "a lab or drill service, or drill_target: true",
                                 "drill a drill target: a drill breaks its target on purpose")
    run_id = str(current_run.get_id() or "")
    add_run_tags(DRILL_TAG, f"scenario:{scenario}", f"service:{target_name}")
    lab = Lab(get_settings().lab_dir)
    result = DrillResult(scenario=scenario, fault=fault_name, target=target_name, mode=mode,
                         started_at=_now())
    try:
        if not chosen.is_at_baseline(lab):
            lab.reset_fault(fault_name)
            logger.info("preflight: %s was not at its baseline; reset before the drill", fault_name)
        mark_target(target_name, run_id, scenario, mode, deadline)
        injected = _now()
        ends = time.monotonic() + deadline
        lab.inject(fault_name)
        logger.info("injected %s into %s: %s", fault_name, target_name, chosen.description)
        if chosen.alert and lab.alerting_enabled():
            result.detection = "alert"
            run = _wait_for_run(scenario, target_name, run_id, injected, ends)
        else:
            result.detection = "drill"
            run = _start_run(scenario, target_name, injected)
        if run is not None:
            result.detected, result.run_id = True, str(run.id)
            result.time_to_detect_s = ((run.start_time or run.created or injected) - injected).total_seconds()
            run = _wait_final(run.id, ends)
        _grade(result, chosen, run, lab, injected, run_id, ends)
    except Exception as exc:
        result.check("the drill ran to its end", False, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        _reset(result, lab, fault_name)
        unmark_target(target_name, run_id)
        failed = [f"{what}: {detail}" for what, ok, detail in result.checks if not ok]
        result.passed = not failed and result.checks != []
        result.reason = "; ".join(failed) or "every check passed"
        add_run_tags(f"{RESULT_TAG}{'pass' if result.passed else 'fail'}")
        _publish(result)
    summary = (f"drill of {scenario} ({fault_name} on {target_name}): "
               f"{'PASS' if result.passed else 'FAIL'} - {result.reason}")
    logger.info(summary)
    return Completed(name="Drill Passed", message=summary) if result.passed else Failed(message=summary)


# -- the steps ----------------------------------------------------------------------------------
def _runs(scenario: str | None, target: str, since: datetime, tags: list[str]) -> list[FlowRun]:
    flow_filter = FlowFilter(name=FlowFilterName(any_=[scenario])) if scenario else None
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=flow_filter,
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"service:{target}", *tags]),
                                          start_time=FlowRunFilterStartTime.model_validate({"after_": since})),
            limit=50)


def _wait_for_run(scenario: str, target: str, drill_run_id: str, since: datetime,
                  ends: float) -> FlowRun | None:
    """The remediation run the real alert started (tagged ``drill`` by the mark), or None."""
    while time.monotonic() < ends:
        found = [r for r in _runs(scenario, target, since, [DRILL_TAG]) if str(r.id) != drill_run_id]
        if found:
            return min(found, key=lambda r: r.start_time or since)
        time.sleep(POLL_S)
    return None


def _start_run(scenario: str, target: str, since: datetime) -> FlowRun | None:
    """No alert covers the fault (or the lab's alerting is off): run the scenario's flow as a
    subflow, as a person would start its deployment."""
    entry = next(d for d in _deployments() if d["name"] == scenario)
    scenario_flow: Flow[..., State] = load_flow_from_entrypoint(str(REPO_ROOT / entry["entrypoint"]))
    state: State = scenario_flow(target=target, trigger=Trigger(kind="drill", source="drill",
                                                                summary=f"drill of {scenario}"),
                                 return_state=True)
    if state.state_details.flow_run_id is None:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def _deployments() -> list[dict]:
    import yaml

    return yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]


def _wait_final(flow_run_id: UUID, ends: float) -> FlowRun:
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if (run.state and run.state.is_final()) or time.monotonic() >= ends:
                return run
            time.sleep(POLL_S)


def _grade(result: DrillResult, chosen: Fault, run: FlowRun | None, lab: Lab, injected: datetime,
           drill_run_id: str, ends: float) -> None:
    if run is None:
        result.check("detected", False, f"no {result.scenario} run started before the deadline")
        return
    how = f"the real alert {chosen.alert}" if result.detection == "alert" else "started by the drill"
    result.check("detected", True, f"a {result.scenario} run started {result.time_to_detect_s or 0:.1f} s "
                 f"after the fault ({how})")
    record = load_record(run.id)
    final = bool(run.state and run.state.is_final())
    result.check("the run ended within the deadline", final,
                 f"{run.state.name if run.state else '?'}" + ("" if final else " when the deadline came"))
    if record is None:
        result.check("the run kept a record", False, "no saved record on the run")
        return
    _from_record(result, record)
    healed = chosen.healthy(lab)
    if chosen.heals:
        result.check("the runbook healed the fault", record.outcome == "resolved" and healed,
                     f"the run ended {record.outcome}; {result.fault} healthy: {healed}")
        if healed and record.verified_at is not None:
            result.time_to_recover_s = (record.verified_at - injected).total_seconds()
    else:
        result.check("the runbook escalated a fault it must not heal", record.outcome in ESCALATED,
                     f"the run ended {record.outcome} and escalated: {bool(record.escalations)}")
    others = [r for r in _runs(None, result.target, injected, []) if str(r.id) not in (str(run.id), drill_run_id)
              and any(t.startswith("incident:") for t in r.tags)]
    result.check("one outage, one incident", not others,
                 "no other incident opened on the target" if not others
                 else f"also {[r.name for r in others]}")
    if result.detection == "alert" and record.outcome == "resolved":
        resolved = _alert_resolved(run.id, min(ends, time.monotonic() + 60))
        result.check("the alert's resolve reached the record", resolved,
                     "the alert source reported it resolved" if resolved else "no resolve within 60 s")


def _from_record(result: DrillResult, record: IncidentRecord) -> None:
    result.incident_id, result.outcome = record.incident_id, record.outcome
    result.steps = [f"{a.action} on {a.target}: {'changed' if a.changed else 'no change'} ({a.detail})"
                    for a in record.actions]
    result.approvals = [f"{a.action}: {a.decision} by {a.by}"
                        + (f" after {(a.at - a.asked_at).total_seconds():.0f} s" if a.asked_at else "")
                        for a in record.approvals]


def _alert_resolved(flow_run_id: UUID, until: float) -> bool:
    while True:
        if any("RESOLVED" in update for update in read_alert_updates(flow_run_id)):
            return True
        if time.monotonic() >= until:
            return False
        time.sleep(POLL_S)


def _reset(result: DrillResult, lab: Lab, fault_name: str) -> None:
    """Put the lab back whatever happened; a reset that fails fails the drill."""
    from lab.faults import FAULTS

    try:
        if FAULTS[fault_name].is_at_baseline(lab):
            result.reset = "at its baseline after the drill: nothing to reset"
        else:
            lab.reset_fault(fault_name)
            result.reset = "reset by the drill"
        result.check("the lab is back at its baseline", FAULTS[fault_name].is_at_baseline(lab), result.reset)
    except Exception as exc:
        result.reset = f"reset FAILED ({type(exc).__name__}: {exc}): reset it by hand: python -m lab reset {fault_name}"
        result.check("the lab is back at its baseline", False, result.reset)
        raise


# -- the report -------------------------------------------------------------------------------
def _earlier(scenario: str) -> list[dict]:
    """Earlier drills of ``scenario``: every version of its results table, oldest first."""
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"drill-results-{scenario}"])),
            sort=ArtifactSort.CREATED_DESC, limit=24)
    rows: list[dict] = []
    for artifact in reversed(versions):
        data = artifact.data
        table = json.loads(data) if isinstance(data, str) else data
        rows.extend(table if isinstance(table, list) else [])
    return rows


def _chart(rows: list[dict]) -> list[str]:
    """Time to recover per drill as a bar chart in text (renders wherever markdown does)."""
    values = [r.get("time_to_recover_s") for r in rows]
    top = max((v for v in values if isinstance(v, (int, float))), default=0) or 1
    lines = ["```", "time to recover (s)"]
    for r, v in zip(rows, values):
        bar = "█" * max(1, round(30 * v / top)) if isinstance(v, (int, float)) else "✗ not recovered"
        lines.append(f"{r['started']}  {bar} {v if v is not None else ''} {'' if r['result'] == 'pass' else '(fail)'}")
    return lines + ["```"]


def _publish(result: DrillResult) -> None:
    earlier = _earlier(result.scenario)
    rows = [*earlier, result.row()][-12:]
    create_table_artifact(table=[result.row()], key=f"drill-results-{result.scenario}",
                          description=f"Drill of {result.scenario}: one row per drill (the trend's source)")
    ttd = f"{result.time_to_detect_s:.1f} s" if result.time_to_detect_s is not None else "-"
    ttr = f"{result.time_to_recover_s:.1f} s" if result.time_to_recover_s is not None else "-"
    lines = [
        f"# Drill of {result.scenario}: {'PASS' if result.passed else 'FAIL'}", "",
        f"**Fault:** {result.fault} on {result.target}  **Mode:** {result.mode}  "
        f"**Started:** {result.started_at:%Y-%m-%d %H:%M:%S} UTC", "",
        f"**Result:** {'pass' if result.passed else 'fail'}: {result.reason}", "",
        "| Detected | How | Time to detect | Time to recover | Run outcome | Incident |",
        "|---|---|---|---|---|---|",
        f"| {'yes' if result.detected else 'no'} | {result.detection} | {ttd} | {ttr} | {result.outcome} | "
        f"{result.incident_id or '-'} |",
        "", "## Checks", "", "| Check | Result | Detail |", "|---|---|---|",
        *[f"| {w} | {'ok' if ok else '**FAIL**'} | {d.replace('|', '/')} |" for w, ok, d in result.checks],
        "", "## Steps the runbook took", "", *([f"- {s}" for s in result.steps] or ["- none"]),
        "", "## Approvals asked and how they were answered", "",
        *([f"- {a}" for a in result.approvals] or ["- none needed"]),
        "", f"## Reset\n\n{result.reset}",
        "", f"## Trend (last {len(rows)} drills of {result.scenario})", "",
        "| Started (UTC) | Result | Mode | Detected | TTD (s) | TTR (s) | Outcome |", "|---|---|---|---|---|---|---|",
        *[f"| {r['started']} | {r['result']} | {r['mode']} | {r['detected']} | {r['time_to_detect_s'] or '-'} | "
          f"{r['time_to_recover_s'] or '-'} | {r['outcome']} |" for r in rows],
        "", *_chart(rows),
    ]
    create_markdown_artifact(markdown="\n".join(lines), key=f"drill-{result.scenario}",
                             description=f"Drill report: {result.scenario} {'pass' if result.passed else 'fail'}")


@flow(name="drill-all", log_prints=False)
def drill_all(mode: DrillMode = "policy") -> State:
    """A drill of every scenario in policies/drills.yaml, one after the other (one lab)."""
    results = {s: drill(scenario=s, mode=mode, return_state=True) for s in load_drills().drills}
    failed = [s for s, st in results.items() if not st.is_completed()]
    text = f"{len(results) - len(failed)}/{len(results)} drills passed" + (f"; failed: {failed}" if failed else "")
    return Failed(message=text) if failed else Completed(name="Drills Passed", message=text)
