"""The scenario kit: the phases every runbook flow shares.

A scenario flow reads like its runbook and leaves the mechanics here::

    @runbook_flow(SCENARIO)                        # the record is closed whatever stops the run
    def scenario(target, dry_run, trigger, incident_id, ...) -> State:
        incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)
        seen = diagnose(...)                       # read-only tasks -> a Diagnosis
        if seen.healthy:
            return already_fine(incident, seen)
        step = change(incident, service, plan, restart_container, service)
        if not step.taken:
            return step.closed                     # dry run, rejected, stood down, held back
        ...
        return incident.close("resolved", ...)     # or escalate_and_fail(incident, why)

``change`` is the **one choke point for changing steps**: plan -> guardrails (kill switch,
shadow mode, the lock still held, blast radius, loop guard; ``incident/guardrails.py``) ->
approval gate (a human, or a written policy) -> the changing task -> the action recorded.
Every destructive step of every flow goes through it (``tests/deployments/test_contract.py``
checks that no flow calls a changing task directly), so a guardrail there covers every
scenario at once. ``begin`` takes the target's lock (``incident/locks.py``) before the
diagnosis, so what a run diagnoses is never changed under it by another run.

The flow-parameter contract (the gateway, the deployment triggers and drills rely on it):
every scenario flow takes ``target`` (inventory service), ``dry_run``, ``trigger`` and
``incident_id``; extra parameters must have defaults.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, NoReturn, TypeVar
from uuid import UUID

from prefect import Flow, Task, flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run as current_run
from prefect.states import State
from pydantic import BaseModel, ConfigDict

from incident.approval import ActionPlan, matching_policy, request_approval
from incident.comms import clock_for, start_clock, stop_clock, tell_from_outside
from incident.drills import drill_on, drill_policies
from incident.errors import ConfigurationError, NeedsHumanError, RunbookError
from incident.escalation import EscalationNotice, escalate, send_escalation
from incident.guardrails import (AUTO_FIX_TAG, KILL_SWITCH, RESTARTED_TAG, SHADOW_TAG,
                                 GuardrailRules, judge_blast_radius, judge_loop, kill_switch_on,
                                 load_rules)
from incident.inventory import Target, load_target
from incident.locks import HOLDER_TAG_PREFIX, LEASE_TAG_PREFIX, TargetLock, parent_run_of
from incident.record import (Incident, IncidentRecord, Outcome, Trigger, add_run_tags,
                             close_from_outside, forget_run_tags, load_record, open_incident)
from incident.waiting import waiting
from tasks.common import CHANGING_TAG, ActionResult

R = TypeVar("R", bound=ActionResult)

#: The parameters every scenario flow takes (the contract above).
CONTRACT_PARAMETERS = ("target", "dry_run", "trigger", "incident_id")


class Diagnosis(BaseModel):
    """What the diagnose phase concluded. Scenario flows subclass it with their data."""

    healthy: bool
    summary: str


class Step(BaseModel, Generic[R]):
    """What ``change`` did: ``taken`` with the task's result, or not, with the closed state."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    taken: bool
    done: R | None = None
    closing: State | None = None

    @property
    def result(self) -> R:
        """What the changing task returned (only for a step that was taken)."""
        if self.done is None:
            raise RuntimeError("the step was not taken: there is no result")
        return self.done

    @property
    def closed(self) -> State:
        """The state the flow returns when the step was not taken (the incident is closed)."""
        if self.closing is None:
            raise RuntimeError("the step was taken: the incident is still open")
        return self.closing


class _QuietIntendedFailures(logging.Filter):
    """A run that ends Failed on purpose (it escalated and closed its record, then raised a
    ``NeedsHumanError``) is logged by Prefect's engine as an ERROR with a traceback, as if the
    code had broken. This filter turns those lines into one INFO line saying what happened;
    real errors keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, NeedsHumanError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"the run ends Failed on purpose, handed to humans: {exc}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


logging.getLogger("prefect.flow_runs").addFilter(_QuietIntendedFailures())

#: The open incident of each flow run of this process, for the state hooks below.
_LIVE: dict[str, Incident] = {}
#: The target lock each flow run of this process holds, given back when the run ends.
_LOCKS: dict[str, TargetLock] = {}
#: Runs that waited for their target's lock: who held it (for "stood aside").
_WAITED: dict[str, str] = {}
#: Subflow runs under the lock of the run that called them: subflow run id -> parent run id.
_BORROWED: dict[str, str] = {}


def runbook_flow(scenario: str) -> Callable[[Callable[..., State]], Flow[..., State]]:
    """``@runbook_flow(SCENARIO)``: the Prefect flow of a scenario, named after it, whose record
    is closed and escalated whatever ends the run (see ``close_stopped_run``)."""
    return flow(name=scenario, log_prints=False, on_failure=[close_stopped_run],
                on_crashed=[close_stopped_run], on_cancellation=[close_stopped_run],
                on_completion=[_forget_run])


def begin(scenario: str, target: str, trigger: Trigger | None, incident_id: str | None,
          dry_run: bool) -> tuple[Incident, Target]:
    """Load the target from the inventory, open the incident record (names the run), and,
    unless the run changes nothing (dry run, shadow mode), take the target's lock."""
    service = load_target(target)
    rules = load_rules()
    drill = drill_on(service.name)
    incident = open_incident(scenario, service, trigger, incident_id, dry_run, drill)
    run_id = current_run.get_id()
    start_clock(incident)
    if run_id:
        _LIVE[str(run_id)] = incident
    if drill is not None:
        incident.note("detect", f"DRILL ({drill.mode} mode, drill run {drill.drill_run_id}): approvals "
                      + ("follow the drill policy" if drill.mode == "policy" else "wait for a person"))
    if rules.for_scenario(scenario).mode == "shadow" and not dry_run:
        incident.record.shadow = True
        add_run_tags(SHADOW_TAG)
        incident.guardrail("detect", "SHADOW MODE (policies/guardrails.yaml): the run diagnoses "
                           "and records; its changing steps only say what they would have done")
    if not (dry_run or incident.record.shadow):
        take_target_lock(incident, service, rules, run_id)
    return incident, service


def take_target_lock(incident: Incident, service: Target, rules: GuardrailRules,
                     run_id: str | None) -> None:
    """Hold the target's lock until the run ends (the state hooks give it back); a run that
    has to wait frees its runner slot meanwhile, and says whom it waited for. A subflow of the
    run holding the lock (a runbook run as a step of another, on the same target) runs under
    its parent's lock: waiting would wait for itself."""
    parent = parent_run_of(UUID(run_id)) if run_id and _LOCKS else None  # subflows run in-process
    held = _lock_of(str(parent)) if parent else None
    if run_id and held is not None and held.target == service.name:
        _BORROWED[run_id] = str(parent)
        incident.note("detect", f"runs under the lock on {service.name} held by the run that "
                      f"called it (flow run {parent}): it is a step of that run")
        return
    lock = TargetLock(service.name, UUID(run_id) if run_id else None, rules.lock)

    def told(holder: str) -> None:
        if run_id:
            _WAITED[run_id] = holder
        incident.guardrail("detect", f"waiting for the lock on {service.name}, held by {holder}: "
                           f"another run is on this target (waiting up to {rules.lock.wait_s} s)")

    waited = lock.acquire(told, while_waiting=lambda: waiting(f"the lock on {service.name}"))
    if waited is None:
        escalate_and_fail(incident, f"the lock on {service.name} stayed busy for "
                          f"{rules.lock.wait_s} s (held by {lock.holder()}); this run did not "
                          "diagnose the target", expected="the lock free")
    if run_id:
        _LOCKS[run_id] = lock
    add_run_tags(HOLDER_TAG_PREFIX + service.name, f"{LEASE_TAG_PREFIX}{lock.lease_id}")
    if run_id in _WAITED:
        incident.guardrail("detect", f"took the lock on {service.name} after {waited:.0f} s: "
                           "diagnosing afresh (the other run may have fixed it)")
    else:
        incident.note("detect", f"took the lock on {service.name}")


def _lock_of(run_id: str | None) -> TargetLock | None:
    """The lock a run holds, or the one the run that called it holds for it (a subflow)."""
    while run_id is not None:
        if run_id in _LOCKS:
            return _LOCKS[run_id]
        run_id = _BORROWED.get(run_id)
    return None


def _release_lock(flow_run_id: str) -> None:
    _WAITED.pop(flow_run_id, None)
    _BORROWED.pop(flow_run_id, None)  # the parent's lock stays with the parent
    stop_clock(flow_run_id)
    forget_run_tags(flow_run_id)
    lock = _LOCKS.pop(flow_run_id, None)
    if lock is not None:
        lock.release()


def close_stopped_run(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """State hook (Failed, Crashed, Cancelled): a run that stopped on an unexpected error still
    ends with a closed, true record - what it saw, what it changed and what not - and an
    escalation.

    Runs that failed on purpose (``escalate_and_fail``, an approval timeout) closed their record
    already: nothing more is done for them. A hook running outside the run's process (a
    cancellation handled by the runner) closes the saved record instead.
    """
    why = f"the run stopped unexpectedly ({state.name}: {state.message or 'no message'})"
    incident = _LIVE.pop(str(flow_run.id), None)
    try:
        _close_stopped(flow, flow_run, incident, why)
    finally:
        _release_lock(str(flow_run.id))


def _close_stopped(flow: Flow, flow_run: FlowRun, incident: Incident | None, why: str) -> None:
    if incident is None:  # another process, or the run stopped before it opened its record
        params = flow_run.parameters or {}
        close_run_from_outside(flow_run.id, why, fallback=EscalationNotice(
            incident_id=str(params.get("incident_id") or flow_run.name), scenario=flow.name,
            target=str(params.get("target") or "unknown"), environment="unknown",
            severity="unknown", reason=f"{why}; this run changed nothing (no record was opened)",
            flow_run_id=str(flow_run.id), outcome="failed"))
        return
    if incident.record.outcome != "open":
        return
    rec = incident.record
    why = (f"{why} in phase {rec.timeline[-1].phase if rec.timeline else 'detect'}; "
           f"{rec.changes()}; check the target by hand")
    with incident.deferred():  # escalated and failed: one report
        escalate(incident, why)
        incident.fail(why)


def close_run_from_outside(flow_run_id: UUID, why: str,
                           fallback: EscalationNotice | None = None) -> bool:
    """Close and escalate the record of a run that cannot do it itself any more (killed with
    its process, left by a gateway restart, cancelled from outside). ``fallback`` is sent when
    the run never saved a record (it died before ``begin``). Returns whether it escalated.
    The target lock the run held is freed at once (it would free itself when its lease ran
    out)."""
    with get_client(sync_client=True) as client:
        TargetLock.release_for_dead_run(client.read_flow_run(flow_run_id).tags)
    record = load_record(flow_run_id)
    if record is None:  # it died before opening its record
        if fallback is not None:
            send_escalation(fallback)
        return fallback is not None
    if record.outcome != "open":  # it closed its record itself: nothing to do
        return False
    tell_from_outside(record, f"{why}; {record.changes()}", flow_run_id)  # on the record it saves
    record = close_from_outside(flow_run_id, record, why)
    send_escalation(EscalationNotice.of(record, record.summary, flow_run_id))
    return True


def _forget_run(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """State hook (Completed): the run closed its incident; whoever was told hears it ended."""
    incident = _LIVE.pop(str(flow_run.id), None)
    clock = stop_clock(str(flow_run.id))
    try:
        if incident is not None and clock is not None and incident.record.comms.declared_at:
            clock.resolve()
            incident.publish()  # the resolved deliveries on the record
    finally:
        _release_lock(str(flow_run.id))


def already_fine(incident: Incident, seen: Diagnosis) -> State:
    run_id = current_run.get_id()
    holder = _WAITED.get(str(run_id)) if run_id else None
    if holder:
        return incident.close("already fine", f"{seen.summary}; nothing to do: this run waited "
                              f"for the lock held by {holder} and stood aside, the target is "
                              "fine now")
    return incident.close("already fine", f"{seen.summary}; nothing to do")


def change(incident: Incident, target: Target, plan: ActionPlan, task: Task[..., R],
           *args: Any, **kwargs: Any) -> Step[R]:
    """Run one changing step: plan -> guardrails -> approval -> task -> record.

    Not approved (dry run, rejected, stood down), held back by a guardrail, a plan only (kill
    switch) or shadow mode: nothing runs, the incident is closed saying so, and
    ``Step.closed`` is what the flow returns.
    A task that raises is noted on the record (its effect unknown) and the error goes on.
    """
    if CHANGING_TAG not in task.tags or plan.action != task.name:
        raise ConfigurationError(
            plan.action, f"task {task.name} (tags {sorted(task.tags)}) is not the plan's "
            "changing task", f"a @changing_task named {plan.action}",
            "declare the task with tasks.common.changing_task and name the plan after it",
        )
    clock = clock_for(incident)
    rules = load_rules()  # once per step: the guardrails and the marks below
    # the step's events (declared, plan, approval, starting, or the close) publish once; a run
    # that waits for a person publishes before it waits (request_approval)
    with incident.deferred():
        if not incident.record.dry_run:
            clock.declare()  # the run found a real problem: people hear of it from here on
            stopped = check_guardrails(incident, target, plan, rules)
            if stopped is not None:
                return Step[R](taken=False, closing=stopped)
        decision = request_approval(incident, plan, target, drill_policies(incident.record.drill))
        if decision.record.asked_at is not None and not decision.record.by.startswith("alert-gateway"):
            # a person answered: someone is on it
            clock.acknowledge(decision.record.by)
        if not decision.approved:
            return Step[R](taken=False, closing=close_unapproved(incident, decision.record.decision, plan))
        marks = [AUTO_FIX_TAG] if decision.record.by.startswith("policy:") else []
        if plan.action in rules.blast_radius.restart_actions:
            marks.append(RESTARTED_TAG)
        if marks:  # before the step starts: a run that dies in it still counts for the guards
            add_run_tags(*marks)
        incident.record.in_progress = f"{plan.action} on {plan.target}"
        incident.enter("fix", f"starting {plan.action} on {plan.target}")
        incident.publish(fresh=False)  # saved before it runs, even inside an outer deferred()
    try:
        result = task(*args, **kwargs)
    except RunbookError as exc:
        incident.record.in_progress = None
        incident.action(plan.action, plan.target, False, f"failed: {exc.observed}")
        raise
    except Exception as exc:
        incident.note("fix", f"{plan.action} on {plan.target} raised {type(exc).__name__}; "
                             "what it changed is unknown: check the target by hand")
        raise
    incident.record.in_progress = None
    incident.action(result.action, result.target, result.changed, result.detail)
    return Step[R](taken=True, done=result)


def check_guardrails(incident: Incident, target: Target, plan: ActionPlan,
                     rules: GuardrailRules | None = None) -> State | None:
    """The guardrails of one changing step (``incident/guardrails.py``), before anyone is asked
    to approve it: the closed state when the step must not run, else None. The kill switch is
    read afresh every time."""
    rec = incident.record
    run_id = current_run.get_id()
    rules = rules or load_rules()
    if kill_switch_on():
        rec.kill_switch = True
        add_run_tags("kill-switch-on")
        incident.guardrail("fix", f"the kill switch ({KILL_SWITCH}) is on: {plan.action} on "
                           f"{plan.target} is only a plan")
        escalate(incident, f"the kill switch is on: {plan.action} on {plan.target} ({plan.runs}) "
                 f"was not run; a human must decide; {rec.changes()}")
        return incident.close("plan only", f"kill switch on: would run {plan.action}: {plan.runs}; "
                              f"{_before(rec, plan)}")
    policy = matching_policy(plan, target, rec.scenario, drill_policies(rec.drill))
    if rec.shadow:
        who = (f"policy {policy.name} would have approved it" if policy
               else "a human would have been asked to approve it")
        incident.guardrail("fix", f"shadow: would run {plan.action} on {plan.target}: {plan.runs} ({who})")
        return incident.close("shadow", f"shadow mode: would run {plan.action}: {plan.runs} ({who}); "
                              f"{_before(rec, plan)}")
    lock = _lock_of(str(run_id)) if run_id else None
    held = lock.lost if lock is not None else None
    held = held or judge_blast_radius(rec, plan.action, plan.target, rules.blast_radius, run_id)
    if held is None and policy is not None:  # the loop guard stops automatic fixes only
        verdict = judge_loop(rec, rules.for_scenario(rec.scenario), run_id)
        if verdict.held:
            held = f"{verdict.held}; automatic fixes in the window: {verdict.history()}"
    if held is None:
        return None
    incident.guardrail("fix", f"{plan.action} on {plan.target} held back: {held}")
    escalate(incident, f"{plan.action} on {plan.target} held back by a guardrail: {held}; "
             f"{rec.changes()}; a human must decide")
    return incident.close("held back", f"{plan.action} held back ({held}); {_before(rec, plan)}")


def _before(rec: IncidentRecord, plan: ActionPlan) -> str:
    """What the run changed before a step that did not run, or that nothing changed."""
    if any(a.changed for a in rec.actions):
        return f"{plan.action} did not run; before it, {rec.changes()}"
    return "nothing changed"


def close_unapproved(incident: Incident, decision: str, plan: ActionPlan) -> State:
    """Close the incident after a step that was not approved: that step changed nothing, and
    the summary says what earlier steps of the run did change."""
    rec = incident.record
    changed_before = any(a.changed for a in rec.actions)
    done = _before(rec, plan)
    if decision == "dry run":
        return incident.close("dry run", f"would run {plan.action}: {plan.runs}; {done}")
    if decision == "stood down":
        outcome: Outcome = "resolved" if changed_before else "resolved without action"
        return incident.close(outcome, f"stood down before {plan.action}: the alert resolved; {done}")
    return incident.close("not approved", f"{plan.action} was {decision}; {done}")


def escalate_and_fail(incident: Incident, why: str, expected: str = "the service healthy",
                      error: type[NeedsHumanError] = NeedsHumanError) -> NoReturn:
    """Hand the incident to humans with what the run saw and what it changed, and end the run
    Failed."""
    why = f"{why}; {incident.record.changes()}"
    with incident.deferred():  # escalated and failed: one report
        escalate(incident, why)
        incident.fail(why)
    rec = incident.record
    raise error(
        rec.target, why, expected, f"a human must take over incident {rec.incident_id}; "
        "the report artifact has the findings, the timeline and what was changed",
    )
