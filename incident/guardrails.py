"""Guardrails: what keeps the automation itself from doing harm.

The scenario kit's ``change()`` (the one choke point of every changing step) asks
``check_step`` before it asks for approval, and ``begin()`` takes the target's lock
(``incident/locks.py``) before the diagnosis. The rules are data, in
``policies/guardrails.yaml`` (``RUNBOOKS_GUARDRAILS``), reviewed like code:

* **kill switch** - the Prefect Variable ``runbooks_kill_switch`` (``on``/``off``, visible and
  editable in the UI): on, every changing step becomes a plan; the run still diagnoses,
  records and escalates, and its record says the switch was on.
* **shadow mode** per scenario (``mode: shadow``): the whole run is recorded, its changing
  steps say what they would have done (and who would have approved them) and do nothing.
* **loop guard** per (scenario, target): at most ``max_automatic_fixes`` fixes approved by a
  policy within ``window_s``, of which at most ``max_failed_fixes`` failed; a "resolved" fix
  followed by a new run for the same target within ``cool_down_s`` counts as failed. Past
  either limit the step is held back and escalated with the history.
* **blast radius**: one run changes at most ``max_targets_per_run`` targets; across scenarios,
  at most ``max_restarts_per_service`` runs restart one service within ``window_s``.

The loop guard and the restart budget read the run history in the Prefect server's database
(runs are tagged ``auto-fix`` and ``restarted`` before such a step starts), so they survive
restarts of every process and show in the UI: the runs *are* the history.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterStartTime,
                                            FlowRunFilterTags)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from incident.errors import ConfigurationError
from incident.inventory import cached_file, load_yaml
from incident.record import IncidentRecord
from incident.settings import get_settings

#: The Prefect Variable that turns every changing step into a plan (``make up`` creates it, off).
KILL_SWITCH = "runbooks_kill_switch"
_OFF = {None, False, "off", "false", "0", "no", ""}
_ON = {True, "on", "true", "1", "yes"}

#: Run tags the guards count (kept on the run: they are not the record's managed tags).
AUTO_FIX_TAG = "auto-fix"       # a step approved by a policy started in this run
RESTARTED_TAG = "restarted"     # a restart action (blast_radius.restart_actions) started
SHADOW_TAG = "shadow"
KILL_SWITCH_TAG = "kill-switch-on"

Mode = Literal["act", "shadow"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScenarioRules(_Strict):
    mode: Mode = "act"
    max_automatic_fixes: int = Field(default=3, ge=0)
    max_failed_fixes: int = Field(default=2, ge=0)
    window_s: int = Field(default=3600, ge=1)
    cool_down_s: int = Field(default=600, ge=0)


class BlastRadius(_Strict):
    max_targets_per_run: int = Field(default=2, ge=1)
    restart_actions: list[str] = ["restart_container", "rollback_container", "start_redis"]
    max_restarts_per_service: int = Field(default=5, ge=0)
    window_s: int = Field(default=3600, ge=1)


class LockRules(_Strict):
    wait_s: int = Field(default=1200, ge=0)
    lease_s: int = Field(default=60, ge=60, description="the server refuses leases under 60 s")
    poll_s: float = Field(default=2.0, gt=0)


class GuardrailRules(_Strict):
    defaults: ScenarioRules = Field(default_factory=ScenarioRules)
    scenarios: dict[str, dict[str, Any]] = {}
    blast_radius: BlastRadius = Field(default_factory=BlastRadius)
    lock: LockRules = Field(default_factory=LockRules)

    def for_scenario(self, scenario: str) -> ScenarioRules:
        return ScenarioRules.model_validate({**self.defaults.model_dump(),
                                             **self.scenarios.get(scenario, {})})


def _parse_rules(raw: bytes) -> GuardrailRules:
    rules = GuardrailRules.model_validate(load_yaml(raw) or {})
    for name in rules.scenarios:
        rules.for_scenario(name)  # every override must be valid, not only the one in use
    return rules


def load_rules(path: Path | None = None) -> GuardrailRules:
    """The reviewed rules; a missing file means the defaults, a broken one is an error.
    Parsed again only when the file changed (a copy each call: callers may not share it)."""
    path = path or get_settings().guardrails
    try:
        return cached_file(path, "guardrails", _parse_rules).model_copy(deep=True)
    except FileNotFoundError:
        return GuardrailRules()
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(str(path), f"invalid guardrail rules ({exc})",
                                 "a valid guardrails file (see policies/guardrails.yaml)",
                                 "fix the file (RUNBOOKS_GUARDRAILS); no run changes anything "
                                 "until it loads") from None


# -- the kill switch --------------------------------------------------------------------------
def kill_switch_on() -> bool:
    """Whether ``runbooks_kill_switch`` is on. Unset or off/false: off. Any value it does not
    know (a typo) counts as on: a switch someone tried to set must never be taken for off."""
    with get_client(sync_client=True) as client:
        try:
            variable = client.read_variable_by_name(KILL_SWITCH)
        except ObjectNotFound:
            return False
    value: object = None if variable is None else variable.value
    if isinstance(value, str):
        value = value.strip().lower()
    return value not in _OFF


# -- the history in Prefect ---------------------------------------------------------------------
class PastRun(BaseModel):
    """One earlier run, as the guards see it."""

    name: str
    started: datetime
    ended: datetime | None
    outcome: str          # from the run's outcome tag; "open" while it runs
    auto_fix: bool
    restarted: bool

    @classmethod
    def of(cls, run: FlowRun) -> PastRun:
        outcome = next((t.split(":", 1)[1].replace("-", " ") for t in run.tags
                        if t.startswith("outcome:")), "open")
        if outcome == "open" and run.state is not None and run.state.is_final():
            outcome = "failed" if not run.state.is_completed() else "closed"
        return cls(name=run.name, started=run.start_time or run.expected_start_time or _now(),
                   ended=run.end_time, outcome=outcome, auto_fix=AUTO_FIX_TAG in run.tags,
                   restarted=RESTARTED_TAG in run.tags)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def runs_since(tags: list[str], since: datetime, exclude: str | None) -> list[PastRun]:
    """Runs carrying every tag in ``tags`` started after ``since``, oldest first, without
    ``exclude`` (the current run's id) and without dry runs and shadow runs (they change
    nothing, so they are neither fixes nor re-fires)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags),
                                          start_time=FlowRunFilterStartTime.model_validate({"after_": since})),
            sort=FlowRunSort.START_TIME_ASC, limit=200)
    return [PastRun.of(r) for r in runs if str(r.id) != str(exclude)
            and "dry-run" not in r.tags and SHADOW_TAG not in r.tags]


class LoopVerdict(BaseModel):
    fixes: list[PastRun]
    failed: list[str]     # why each failed fix counts as failed
    held: str | None      # why the next automatic fix must not run, or None

    def history(self) -> str:
        if not self.fixes:
            return "no automatic fix in the window"
        return "; ".join(f"{f.name} at {f.started:%H:%M:%S}Z: {f.outcome}" for f in self.fixes)


def judge_loop(record: IncidentRecord, rules: ScenarioRules, current_run: str | None,
               now: datetime | None = None) -> LoopVerdict:
    """The loop guard's verdict for one more automatic fix of ``record``'s target."""
    now = now or _now()
    since = now - timedelta(seconds=rules.window_s)
    runs = runs_since([f"scenario:{record.scenario}", f"service:{record.target}"], since, current_run)
    fixes = [r for r in runs if r.auto_fix]
    failed: list[str] = []
    for fix in fixes:
        if fix.outcome == "failed":
            failed.append(f"{fix.name} ended failed")
            continue
        if fix.outcome == "open" or fix.ended is None:
            continue  # still running (it would hold the target's lock): not judged yet
        later = [r.started for r in runs if r.started > fix.started] + [now]
        refire = min(later)
        gap = (refire - fix.ended).total_seconds()
        if gap < rules.cool_down_s:
            failed.append(f"{fix.name} ended {fix.outcome} but the target needed this runbook "
                          f"again {max(gap, 0):.0f} s later (cool-down {rules.cool_down_s} s)")
    held = None
    if len(fixes) >= rules.max_automatic_fixes:
        held = (f"the loop guard allows {rules.max_automatic_fixes} automatic fixes of "
                f"{record.target} by {record.scenario} per {rules.window_s} s and "
                f"{len(fixes)} ran")
    elif len(failed) >= rules.max_failed_fixes:
        held = (f"the loop guard allows {rules.max_failed_fixes} failed automatic fixes of "
                f"{record.target} by {record.scenario} per {rules.window_s} s and "
                f"{len(failed)} failed ({'; '.join(failed)})")
    return LoopVerdict(fixes=fixes, failed=failed, held=held)


def judge_blast_radius(record: IncidentRecord, plan_action: str, plan_target: str,
                       rules: BlastRadius, current_run: str | None,
                       now: datetime | None = None) -> str | None:
    """Why this step would exceed the blast-radius budget, or None."""
    touched = {a.target for a in record.actions if a.changed}
    if plan_target not in touched and len(touched) >= rules.max_targets_per_run:
        return (f"this run already changed {len(touched)} targets ({', '.join(sorted(touched))}); "
                f"the budget is {rules.max_targets_per_run} per run")
    if plan_action not in rules.restart_actions:
        return None
    since = (now or _now()) - timedelta(seconds=rules.window_s)
    restarts = [r for r in runs_since([f"service:{record.target}", RESTARTED_TAG], since, current_run)]
    if len(restarts) >= rules.max_restarts_per_service:
        names = ", ".join(f"{r.name} at {r.started:%H:%M:%S}Z" for r in restarts)
        return (f"{len(restarts)} runs restarted {record.target} in the last {rules.window_s} s "
                f"(any scenario; budget {rules.max_restarts_per_service}): {names}")
    return None
