"""The one approval gate: a plan, then a human (or a written policy) decides.

Before a changing step the flow shows a plan - what will run, on which target,
the expected effect and how to undo it - and pauses with a typed form in the
Prefect UI. The form asks who decides (``approver``, required, not blank), the
``decision`` (no default, so a bare "Resume" is refused by the server's validation:
only an explicit ``approve`` approves) and a ``reason``; the record keeps all three
with the time. The approver's name is what the person typed: it identifies someone
only when the UI sits behind single sign-on (README, "Production setup"). A policy in
``policies/approval.yaml`` may approve instead; the record then names it.

Outcomes: approved -> the step runs; rejected -> the flow ends "Not Approved"
without running the step; stand-down (a person, or the alert gateway when the alert
resolves while the run waits) -> "Resolved Without Action", the step not run; no
decision before the timeout -> the step is not run, an escalation fires and the run
fails saying what the run did change before it paused and what it did not; dry
run -> recorded, not asked.

The wait rides out Prefect API outages up to the approval timeout: Prefect's own
``pause_flow_run`` gives up after about a minute of connection errors (its client's
retries), which would lose the approval and leave the target half repaired. Here every
call made while waiting has a timeout and no hidden retries; an API that does not answer
is logged (WARNING) and polled again with backoff, its return is logged, and a decision
given after the outage is taken as usual.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal, TypeVar, cast
from uuid import UUID

import httpx
import yaml
from prefect import get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.context import FlowRunContext
from prefect.exceptions import Abort
from prefect.input import RunInput, keyset_from_paused_state
from prefect.runtime import flow_run
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.states import Paused, Running, State
from prefect.utilities.engine import propose_state_sync
from pydantic import BaseModel, Field, StringConstraints, ValidationError

from incident.errors import ApprovalTimedOutError, ConfigurationError
from incident.escalation import escalate
from incident.inventory import Target, cached_file, load_yaml
from incident.record import ALL_ALERTS_RESOLVED, ApprovalRecord, Incident, IncidentRecord
from incident.settings import get_settings
from incident.waiting import waiting

T = TypeVar("T")

#: Every call to the Prefect API made while a run waits for a decision gives up after this long.
API_CALL_TIMEOUT_S = 10.0
#: Longest pause between two checks while the Prefect API does not answer.
API_RETRY_MAX_S = 15.0


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
            "Choose **approve** to run it, **reject** to stop without running it, or "
            "**stand-down** if the system recovered by itself; give a reason and your name as "
            "**approver**. Decision, reason and name go into the incident record."
        )


#: A name: surrounding blanks are dropped; blank or empty is refused (by the server too, via
#: the pattern in the form's JSON schema, so a bad form never reaches the run).
ApproverName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200,
                                                pattern=r"\S")]


class ApprovalForm(RunInput):
    """The form shown in the Prefect UI when a run waits for approval (fields in this order)."""

    decision: Literal["approve", "reject", "stand-down"] = Field(
        description="approve runs the step; reject ends the run without running it; "
        "stand-down: the system recovered by itself - end as 'resolved without action'"
    )
    reason: str = Field(min_length=1, description="Why - kept in the incident record")
    approver: ApproverName = Field(
        description="Who decides: your name (kept in the incident record). The alert gateway "
        "signs its stand-downs 'alert-gateway (<source> resolved)'"
    )


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
        # parsed again only when the file changed; a new list each call
        return list(cached_file(path, "policies",
                                lambda raw: PolicyFile.model_validate(load_yaml(raw) or {}).policies))
    except FileNotFoundError:
        return []
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(str(path), f"invalid policy file ({exc})", "a valid policy file",
                                 "fix the policy file; until then every step needs a human") from None


def matching_policy(plan: ActionPlan, target: Target, scenario: str,
                    extra: Sequence[AutoApprovalPolicy] = ()) -> AutoApprovalPolicy | None:
    """The first written policy that approves ``plan``: the approval policies, then ``extra``
    (a drill's approval policy, incident/drills.py)."""
    return next((p for p in [*load_policies(), *extra] if p.allows(plan, target, scenario)), None)


def _leave_expired_pause() -> None:
    """An expired pause leaves the run Paused on the server, which would replace our
    final Failed state (and its message saying what to do) with a generic one. The run
    does go on (it records and escalates), so it is marked Running again, explicitly."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            str(flow_run.get_id()), Running(message="approval timed out: recording and escalating"),
            force=True,
        )


def what_the_run_changed(record: IncidentRecord, plan: ActionPlan) -> str:
    """The truth about the target after ``plan`` was not run: what this run did change
    before (``record.actions`` with ``changed``), what it looked at and left as it was,
    and that the planned step did not run."""
    left = [f"{a.action} on {a.target}" for a in record.actions if not a.changed]
    text = f"{record.changes()}; not run: {plan.action} on {plan.target} ({plan.runs})"
    if left:
        text += f"; checked and left as they were: {'; '.join(left)}"
    return text


# -- waiting for the decision -------------------------------------------------------------
class RunStoppedWhileWaiting(Exception):
    """The run was cancelled (or otherwise ended on the server) while it waited."""

    def __init__(self, state: str, message: str) -> None:
        super().__init__(f"the run became {state} while waiting: {message}")
        self.state, self.message = state, message


def _api_trouble(exc: Exception) -> bool:
    """The Prefect API did not answer, or answered that it cannot serve now: wait and retry.
    Anything else (401, 404, a bad request) is a real error and is raised."""
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and (
        exc.response.status_code >= 500 or exc.response.status_code in (408, 429))


class _PatientApi:
    """Calls the Prefect API for a run that waits for a decision, through API outages.

    Every call has a timeout (``API_CALL_TIMEOUT_S``); use it under
    ``temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0})`` so that no retries hidden in the
    client hold a call for a minute. A call that fails because the API is away is logged as a
    WARNING and answers None, its connection is dropped, and the next check waits longer
    (doubling, up to ``API_RETRY_MAX_S``). The first answer after an outage is logged as a
    WARNING too. One client (one connection) serves the whole wait while the API answers.
    """

    def __init__(self, logger: logging.LoggerAdapter | logging.Logger, waiting_for: str,
                 poll_s: float) -> None:
        self.logger = logger
        self.waiting_for = waiting_for
        self.poll_s = max(poll_s, 0.5)
        self.down_since: float | None = None
        self.failures = 0
        self.answered = False  # whether the last call got an answer from the API
        self._client: SyncPrefectClient | None = None

    def __enter__(self) -> _PatientApi:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._drop()

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - closing a connection to an API that is away
                pass

    def call(self, fn: Callable[[SyncPrefectClient], T], gives_up_at: float) -> T | None:
        """``fn(client)``, or None (and ``answered`` False) when the API is away."""
        self.answered = False
        try:
            if self._client is None:
                self._client = get_client(
                    sync_client=True, httpx_settings={"timeout": httpx.Timeout(API_CALL_TIMEOUT_S)})
                self._client.__enter__()
            result = fn(self._client)
        except Exception as exc:
            if not _api_trouble(exc):
                raise
            self._drop()  # a fresh connection next time (the server may have restarted)
            self._unreachable(exc, gives_up_at)
            return None
        self.answered = True
        if self.down_since is not None:
            self.logger.warning(
                "The Prefect API answers again after %.0f s away (%d failed checks); still "
                "waiting for %s: decide in the Prefect UI (run page -> Resume).",
                time.monotonic() - self.down_since, self.failures, self.waiting_for)
            self.down_since, self.failures = None, 0
        return result

    def _unreachable(self, exc: Exception, gives_up_at: float) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
        self.failures += 1
        self.logger.warning(
            "The Prefect API is unreachable (%s: %s) while waiting for %s; away for %.0f s, "
            "checking again in %.0f s, giving up in %.0f s. The run keeps waiting: bring the "
            "Prefect server back and the decision can be given as usual.",
            type(exc).__name__, str(exc) or "no detail", self.waiting_for,
            time.monotonic() - self.down_since, self.next_delay(),
            max(gives_up_at - time.monotonic(), 0.0))

    def next_delay(self) -> float:
        if not self.failures:
            return self.poll_s
        return min(self.poll_s * 2 ** self.failures, API_RETRY_MAX_S)


def _wait_for_decision(form: type[ApprovalForm], timeout_s: int, poll_s: float, key: str,
                       waiting_for: str) -> ApprovalForm | None:
    """Pause the run with ``form`` and wait for the answer; None if nobody answered in time.

    What ``prefect.flow_runs.pause_flow_run`` does (the same Paused state, pause key and
    form, so the UI and ``resume_flow_run`` work unchanged), with a wait that rides out
    API outages (``_PatientApi``).
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("an approval can only be asked for inside a flow run")
    run_id = context.flow_run.id
    logger = get_run_logger()
    proposed: State[None] = Paused(timeout_seconds=timeout_s, reschedule=False, pause_key=key)
    keyset = keyset_from_paused_state(proposed)
    proposed.state_details.run_input_keyset = cast(dict[str, str], keyset)
    with get_client(sync_client=True) as client:
        try:
            state = propose_state_sync(client, proposed, flow_run_id=run_id)
        except Abort as exc:
            raise RuntimeError(f"the run cannot be paused for approval: {exc}") from None
    if not state.is_running():  # running: this pause was answered before (same key)
        if not state.is_paused():
            raise RuntimeError(f"the run could not pause for approval: the server set {state!r}")
        form.save(keyset)  # the form's schema: the UI shows it and the server checks answers
        logger.info("Paused: waiting for a decision on %s for up to %d s.", waiting_for, timeout_s)
        deadline = time.monotonic() + timeout_s
        with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}), \
                _PatientApi(logger, waiting_for, poll_s) as api:
            time.sleep(min(timeout_s / 2, poll_s))
            while True:
                run = api.call(lambda c: c.read_flow_run(run_id), deadline)
                if run is not None and run.state is not None and run.state.is_running():
                    break
                if run is not None and run.state is not None and (
                        run.state.is_final() or run.state.is_cancelling()):
                    raise RunStoppedWhileWaiting(run.state.name or run.state.type.value,
                                                 run.state.message or "")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                time.sleep(min(api.next_delay(), left))
            logger.info("Resumed: reading the decision on %s.", waiting_for)
            return _read_answer(form, run_id, keyset["response"], api, timeout_s)
    return _read_answer(form, run_id, keyset["response"], None, timeout_s)


def _read_answer(form: type[ApprovalForm], run_id: UUID, key: str, api: _PatientApi | None,
                 patience_s: float) -> ApprovalForm:
    """The decision the run was resumed with. The run is Running again, so a decision was
    given: an API outage now is waited out (up to ``patience_s``), never taken as a timeout."""
    gives_up_at = time.monotonic() + patience_s

    def read(client: SyncPrefectClient) -> str | None:
        try:
            return client.read_flow_run_input(run_id, key)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return None
            raise

    while True:
        if api is None:
            with get_client(sync_client=True) as client:
                raw = read(client)
            break
        raw = api.call(read, gives_up_at)
        if api.answered:
            break
        if time.monotonic() >= gives_up_at:
            raise RuntimeError(f"the run was resumed but the Prefect API did not answer for "
                               f"{patience_s:.0f} s to give the decision; check the server and "
                               "run the deployment again")
        time.sleep(api.next_delay())
    if raw is None:
        raise RuntimeError("the run was resumed without a decision (set Running by hand?): "
                           "nothing was approved; run the deployment again to decide")
    return form.model_validate(json.loads(raw))


# -- the gate -----------------------------------------------------------------------------
def request_approval(incident: Incident, plan: ActionPlan, target: Target,
                     extra_policies: Sequence[AutoApprovalPolicy] = ()) -> Decision:
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

    policy = matching_policy(plan, target, rec.scenario, extra_policies)
    if policy is not None:
        entry = ApprovalRecord(at=now(), action=plan.action, decision="approved",
                               by=f"policy:{policy.name}", reason=policy.description)
        incident.approval(entry)
        return Decision(approved=True, record=entry)

    settings = get_settings()
    incident.note("fix", f"waiting for a human decision on {plan.action} "
                         f"(times out in {settings.approval_timeout_s} s)")
    incident.publish()  # the report shows the plan while the run waits (and reads alert updates)
    resolved = next((u for u in rec.alert_updates if ALL_ALERTS_RESOLVED in u), None)
    if resolved is not None:  # the alerts resolved while the run diagnosed: nobody is asked
        entry = ApprovalRecord(at=now(), action=plan.action, decision="stood down",
                               by="alert-gateway (resolved before the pause)", reason=resolved)
        incident.approval(entry)
        return Decision(approved=False, record=entry)
    form = ApprovalForm.with_initial_data(description=plan.markdown(rec.scenario, rec.incident_id))
    asked = now()
    waiting_for = f"the approval of {plan.action} on {plan.target} ({rec.incident_id})"
    try:
        with waiting(waiting_for):  # a run waiting for a person frees its runner slot
            answer = _wait_for_decision(
                form, timeout_s=settings.approval_timeout_s, poll_s=settings.approval_poll_s,
                key="approve-" + plan.action.replace("_", "-"),  # keys: lowercase, digits, dashes
                waiting_for=waiting_for,
            )
    except RunStoppedWhileWaiting as stopped:
        # cancelled (from the UI or the API) while waiting: a human decision not to go on
        entry = ApprovalRecord(at=now(), action=plan.action, decision="rejected", asked_at=asked,
                               by=f"run {stopped.state.lower()}", reason=stopped.message or None)
        incident.approval(entry)
        return Decision(approved=False, record=entry)
    if answer is None:
        _leave_expired_pause()
        entry = ApprovalRecord(at=now(), action=plan.action, decision="timed out", by="nobody",
                               asked_at=asked,
                               reason=f"no decision within {settings.approval_timeout_s} s")
        incident.approval(entry)
        what = what_the_run_changed(rec, plan)
        escalate(incident, f"approval of {plan.action} on {plan.target} timed out; {what}")
        incident.fail(f"approval of {plan.action} timed out; {what}")
        raise ApprovalTimedOutError(
            plan.target, f"no decision on {plan.action} within {settings.approval_timeout_s} s",
            "approve or reject in the Prefect UI",
            f"a human must take over the incident: {what}; check the target and finish by hand",
        ) from None
    approved = answer.decision == "approve"
    decision: dict[str, Literal["approved", "rejected", "stood down"]] = {
        "approve": "approved", "reject": "rejected", "stand-down": "stood down"}
    entry = ApprovalRecord(at=now(), action=plan.action, decision=decision[answer.decision],
                           by=answer.approver, reason=answer.reason, asked_at=asked)
    incident.approval(entry)
    return Decision(approved=approved, record=entry)
