"""The one approval gate: a plan, then a human (or a written policy) decides.

Before a changing step the flow shows a plan - what will run, on which target,
the expected effect and how to undo it - and pauses with a typed form in the
Prefect UI. ``decision`` has no default, so a bare "Resume" is refused by the
server's validation: only an explicit ``approve`` approves. A policy in
``policies/approval.yaml`` may approve instead; the record then names it.

Outcomes: approved -> the step runs; rejected -> the flow ends "Not Approved"
with nothing changed; stand-down (a person, or the alert gateway when the alert
resolves while the run waits) -> "Resolved Without Action", nothing changed; no
decision before the timeout -> nothing changed, an escalation fires and the run fails
saying so; dry run -> recorded, not asked.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import yaml
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.runtime import flow_run
from prefect.states import Running
from pydantic import BaseModel, Field, ValidationError

from incident.errors import ApprovalTimedOutError, ConfigurationError
from incident.escalation import escalate
from incident.inventory import Target
from incident.record import ApprovalRecord, Incident
from incident.settings import get_settings


class ActionPlan(BaseModel):
    """What a changing step will do, shown to the approver and kept in the record."""

    action: str = Field(description="task name, e.g. rollback_container")
    target: str
    runs: str = Field(description="the operation, as a human would type it")
    expected_effect: str
    undo: str
    destructive: bool

    def markdown(self, scenario: str, incident_id: str) -> str:
        return (
            f"### Approve `{self.action}` on `{self.target}`?\n\n"
            f"Incident **{incident_id}** ({scenario}).\n\n"
            f"- **Will run:** `{self.runs}`\n"
            f"- **Expected effect:** {self.expected_effect}\n"
            f"- **How to undo:** {self.undo}\n"
            f"- **Destructive:** {'yes' if self.destructive else 'no'}\n\n"
            "Choose **approve** to run it, **reject** to stop without changing anything, or "
            "**stand-down** if the system recovered by itself; give a reason (it goes into the "
            "incident record)."
        )


class ApprovalForm(RunInput):
    """The form shown in the Prefect UI when a run waits for approval."""

    decision: Literal["approve", "reject", "stand-down"] = Field(
        description="approve runs the step; reject ends the run with nothing changed; "
        "stand-down: the system recovered by itself - end as 'resolved without action'"
    )
    reason: str = Field(min_length=1, description="Why - kept in the incident record")


class Decision(BaseModel):
    approved: bool
    record: ApprovalRecord


# -- policies -----------------------------------------------------------------------------
class AutoApprovalPolicy(BaseModel):
    name: str
    description: str
    actions: list[str]
    environments: list[str]
    scenarios: list[str] | None = None
    require_stateless: bool = True

    def allows(self, plan: ActionPlan, target: Target, scenario: str) -> bool:
        return (
            plan.action in self.actions
            and target.service.environment in self.environments
            and (self.scenarios is None or scenario in self.scenarios)
            and (target.service.stateless or not self.require_stateless)
        )


class PolicyFile(BaseModel):
    policies: list[AutoApprovalPolicy] = []


def load_policies(path: Path | None = None) -> list[AutoApprovalPolicy]:
    path = path or get_settings().policies
    try:
        return PolicyFile.model_validate(yaml.safe_load(path.read_text()) or {}).policies
    except FileNotFoundError:
        return []
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(str(path), f"invalid policy file ({exc})", "a valid policy file",
                                 "fix the policy file; until then every step needs a human") from None


def matching_policy(plan: ActionPlan, target: Target, scenario: str) -> AutoApprovalPolicy | None:
    return next((p for p in load_policies() if p.allows(plan, target, scenario)), None)


def _leave_expired_pause() -> None:
    """An expired pause leaves the run Paused on the server, which would replace our
    final Failed state (and its message saying what to do) with a generic one. The run
    does go on (it records and escalates), so it is marked Running again, explicitly."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            str(flow_run.get_id()), Running(message="approval timed out: recording and escalating"),
            force=True,
        )


# -- the gate -----------------------------------------------------------------------------
def request_approval(incident: Incident, plan: ActionPlan, target: Target) -> Decision:
    """Ask for approval of ``plan``; see the module docstring for the outcomes."""
    rec = incident.record
    now = lambda: datetime.now(timezone.utc)  # noqa: E731
    incident.note("fix", f"plan: {plan.action} on {plan.target}: {plan.runs} "
                         f"(expect: {plan.expected_effect}; undo: {plan.undo})")
    if rec.dry_run:
        entry = ApprovalRecord(at=now(), action=plan.action, decision="dry run", by="dry run",
                               reason="dry run: the plan is shown, not executed")
        incident.approval(entry)
        return Decision(approved=False, record=entry)

    policy = matching_policy(plan, target, rec.scenario)
    if policy is not None:
        entry = ApprovalRecord(at=now(), action=plan.action, decision="approved",
                               by=f"policy:{policy.name}", reason=policy.description)
        incident.approval(entry)
        return Decision(approved=True, record=entry)

    settings = get_settings()
    incident.note("fix", f"waiting for a human decision on {plan.action} "
                         f"(times out in {settings.approval_timeout_s} s)")
    incident.publish()  # the report shows the plan while the run waits
    form = ApprovalForm.with_initial_data(description=plan.markdown(rec.scenario, rec.incident_id))
    try:
        answer = pause_flow_run(
            wait_for_input=form,
            timeout=settings.approval_timeout_s,
            poll_interval=settings.approval_poll_s,
            key="approve-" + plan.action.replace("_", "-"),  # keys: lowercase, digits, dashes
        )
    except FlowPauseTimeout:
        _leave_expired_pause()
        entry = ApprovalRecord(at=now(), action=plan.action, decision="timed out", by="nobody",
                               reason=f"no decision within {settings.approval_timeout_s} s")
        incident.approval(entry)
        escalate(incident, f"approval of {plan.action} on {plan.target} timed out; nothing changed")
        incident.fail(f"approval of {plan.action} timed out; nothing was changed")
        raise ApprovalTimedOutError(
            plan.target, f"no decision on {plan.action} within {settings.approval_timeout_s} s",
            "approve or reject in the Prefect UI",
            "a human must take over the incident: nothing was changed by this run",
        ) from None
    approved = answer.decision == "approve"
    decision: dict[str, Literal["approved", "rejected", "stood down"]] = {
        "approve": "approved", "reject": "rejected", "stand-down": "stood down"}
    entry = ApprovalRecord(at=now(), action=plan.action, decision=decision[answer.decision],
                           by="human", reason=answer.reason)
    incident.approval(entry)
    return Decision(approved=approved, record=entry)
