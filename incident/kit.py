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

``change`` is the **one choke point for changing steps**: plan -> approval gate (a human,
or a written policy) -> guardrails -> the changing task -> the action recorded. Every
destructive step of every flow goes through it (``tests/deployments/test_contract.py`` checks
that no flow calls a changing task directly), so a guardrail added to ``GUARDRAILS`` covers
every scenario at once.

The flow-parameter contract (the gateway, the deployment triggers and drills rely on it):
every scenario flow takes ``target`` (inventory service), ``dry_run``, ``trigger`` and
``incident_id``; extra parameters must have defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, NoReturn, TypeVar

from prefect import Flow, Task, flow
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run as current_run
from prefect.states import State
from pydantic import BaseModel, ConfigDict

from incident.approval import ActionPlan, request_approval
from incident.errors import ConfigurationError, NeedsHumanError, RunbookError
from incident.escalation import escalate
from incident.inventory import Target, load_target
from incident.record import Incident, Trigger, open_incident
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


#: A guardrail looks at a planned step and returns why it must not run now, or None.
Guardrail = Callable[[Incident, Target, ActionPlan], "str | None"]
#: Checked for every changing step of every flow, after approval, before the task runs.
GUARDRAILS: list[Guardrail] = []


#: The open incident of each flow run of this process, for the state hooks below.
_LIVE: dict[str, Incident] = {}


def runbook_flow(scenario: str) -> Callable[[Callable[..., State]], Flow[..., State]]:
    """``@runbook_flow(SCENARIO)``: the Prefect flow of a scenario, named after it, whose record
    is closed and escalated whatever ends the run (see ``close_stopped_run``)."""
    return flow(name=scenario, log_prints=False, on_failure=[close_stopped_run],
                on_crashed=[close_stopped_run], on_completion=[_forget_run])


def begin(scenario: str, target: str, trigger: Trigger | None, incident_id: str | None,
          dry_run: bool) -> tuple[Incident, Target]:
    """Load the target from the inventory and open the incident record (names the run)."""
    service = load_target(target)
    incident = open_incident(scenario, service, trigger, incident_id, dry_run)
    run_id = current_run.get_id()
    if run_id:
        _LIVE[str(run_id)] = incident
    return incident, service


def close_stopped_run(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """State hook (Failed, Crashed): a run that stopped on an unexpected error still ends with a
    closed, true record - what it saw, what it changed and what not - and an escalation.

    Runs that failed on purpose (``escalate_and_fail``, an approval timeout) closed their record
    already: nothing more is done for them.
    """
    incident = _LIVE.pop(str(flow_run.id), None)
    if incident is None or incident.record.outcome != "open":
        return
    changed = [f"{a.action} on {a.target}" for a in incident.record.actions if a.changed]
    what = (f"it changed: {'; '.join(changed)}" if changed else "it changed nothing")
    why = (f"the run stopped unexpectedly ({state.name}: {state.message or 'no message'}) in phase "
           f"{incident.record.timeline[-1].phase if incident.record.timeline else 'detect'}; {what}; "
           "check the target by hand")
    escalate(incident, why)
    incident.fail(why)


def _forget_run(flow: Flow, flow_run: FlowRun, state: State) -> None:
    _LIVE.pop(str(flow_run.id), None)


def already_fine(incident: Incident, seen: Diagnosis) -> State:
    return incident.close("already fine", f"{seen.summary}; nothing to do")


def change(incident: Incident, target: Target, plan: ActionPlan, task: Task[..., R],
           *args: Any, **kwargs: Any) -> Step[R]:
    """Run one changing step: plan -> approval -> guardrails -> task -> record.

    Not approved (dry run, rejected, stood down) or held back by a guardrail: nothing
    runs, the incident is closed saying so, and ``Step.closed`` is what the flow returns.
    A task that raises is noted on the record (its effect unknown) and the error goes on.
    """
    if CHANGING_TAG not in task.tags or plan.action != task.name:
        raise ConfigurationError(
            plan.action, f"task {task.name} (tags {sorted(task.tags)}) is not the plan's "
            "changing task", f"a @changing_task named {plan.action}",
            "declare the task with tasks.common.changing_task and name the plan after it",
        )
    decision = request_approval(incident, plan, target)
    if not decision.approved:
        return Step[R](taken=False, closing=close_unapproved(incident, decision.record.decision, plan))
    for guardrail in GUARDRAILS:
        held = guardrail(incident, target, plan)
        if held:
            escalate(incident, f"{plan.action} on {plan.target} held back: {held}")
            return Step[R](taken=False, closing=incident.close(
                "held back", f"{plan.action} was approved but held back ({held}); nothing changed"))
    try:
        result = task(*args, **kwargs)
    except RunbookError as exc:
        incident.note("fix", f"{plan.action} on {plan.target} failed: {exc.observed}")
        raise
    except Exception as exc:
        incident.note("fix", f"{plan.action} on {plan.target} raised {type(exc).__name__}; "
                             "what it changed is unknown: check the target by hand")
        raise
    incident.action(result.action, result.target, result.changed, result.detail)
    return Step[R](taken=True, done=result)


def close_unapproved(incident: Incident, decision: str, plan: ActionPlan) -> State:
    """Close the incident after a step that was not approved; nothing was changed by it."""
    if decision == "dry run":
        return incident.close("dry run", f"would run {plan.action}: {plan.runs}; nothing changed")
    if decision == "stood down":
        return incident.close("resolved without action",
                              f"stood down before {plan.action}: the alert resolved; nothing changed")
    return incident.close("not approved", f"{plan.action} was {decision}; nothing changed")


def escalate_and_fail(incident: Incident, why: str, expected: str = "the service healthy",
                      error: type[NeedsHumanError] = NeedsHumanError) -> NoReturn:
    """Hand the incident to humans with what the run saw, and end the run Failed."""
    escalate(incident, why)
    incident.fail(why)
    rec = incident.record
    raise error(
        rec.target, why, expected, f"a human must take over incident {rec.incident_id}; "
        "the report artifact has the findings, the timeline and what was changed",
    )
