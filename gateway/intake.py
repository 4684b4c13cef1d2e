"""From accepted alerts to remediations: store, dedup, route, dispatch.

Two ways to start a scenario's deployment for a new incident (``RUNBOOKS_GATEWAY_DISPATCH``):

* ``runner`` (default): the gateway creates the flow run from the deployment (so it is
  the deployment's run in the UI, with its parameters) in state Pending - workers only
  take Scheduled runs - and executes it at once in this long-lived process's thread pool.
  No worker poll, no new Python process: the first task runs well under a second
  after the alert. Measured in ``bench/alert_intake.py``.
* ``shadow``: intake, dedup and routing as usual, incidents recorded, nothing started
  (to trial new routes against live alerts; also what the storm benchmark measures).
* ``automation``: Prefect's default path. The gateway emits ``runbooks.incident.dispatch``
  and the deployment trigger declared in ``prefect.yaml`` starts the run on a worker
  (worker poll + process start: seconds).

Either way the decision "is this a new incident?" is taken once, in the store's
transaction, before anything is started: Prefect automations cannot see whether an
incident is already open for an alert, nor stand a paused run down when it resolves.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from uuid import UUID
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Literal

import anyio
import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.flow_engine import run_flow
from prefect.flow_runs import resume_flow_run
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.input import keyset_from_paused_state
from prefect.client.schemas.objects import FlowRun
from prefect.states import Crashed, Pending, State

from gateway.models import Alert, Delivery
from gateway.routing import Router
from gateway.store import AlertStore, TrackedIncident, IntakeResult
from incident.errors import RunbookError
from incident.escalation import EscalationNotice
from incident.inventory import load_target
from incident.kit import close_run_from_outside
from incident.record import Trigger, add_alert_update
from incident.settings import REPO_ROOT

log = logging.getLogger("gateway.intake")


def _environment_of(target: str) -> str:
    """The target's inventory environment, or "unknown" when it is not in the inventory."""
    try:
        return load_target(target).service.environment
    except RunbookError:
        return "unknown"

DISPATCH_EVENT = "runbooks.incident.dispatch"
CREATE_RUN_PATIENCE_S = 300.0
OPENED_EVENT = "runbooks.incident.opened"


def trigger_of(alert: Alert) -> Trigger:
    return Trigger(kind="alert", source=alert.source,
                   summary=alert.summary or ", ".join(f"{k}={v}" for k, v in alert.labels.items()),
                   fingerprint=alert.fingerprint, fired_at=alert.starts_at,
                   labels=alert.labels, links=list(alert.links.values()))


@lru_cache(maxsize=32)
def _flow(entrypoint: str) -> Flow:
    return load_flow_from_entrypoint(str(REPO_ROOT / entrypoint))


class Dispatcher:
    """Starts remediations for new incidents and passes later notifications on.

    Runner mode has two stages so that a busy runner never hides an incident: a small
    pool creates each flow run at once (Pending, visible in the UI with its incident
    tags), then the run waits for one of ``max_parallel`` executor threads. Runs that wait
    for an approval hold their thread, so ``max_parallel`` bounds remediations in flight.
    """

    def __init__(self, store: AlertStore, mode: Literal["runner", "automation", "shadow"] = "runner",
                 max_parallel: int = 16) -> None:
        self.store = store
        self.mode = mode
        self.max_parallel = max_parallel
        self._starts = ThreadPoolExecutor(4, thread_name_prefix="remediation-start")
        self._runs = ThreadPoolExecutor(max_parallel, thread_name_prefix="remediation")
        self._notes = ThreadPoolExecutor(4, thread_name_prefix="alert-update")
        self._deployments: dict[str, Any] = {}
        self._in_flight = 0
        self._lock = threading.Lock()

    def shutdown(self) -> None:
        """Let running remediations finish; drop queued ones - they stay open in the store
        (and Pending in Prefect) and the next start's ``recover`` runs them."""
        self._starts.shutdown(wait=True, cancel_futures=True)
        self._notes.shutdown(wait=True)
        self._runs.shutdown(wait=True, cancel_futures=True)

    # -- what the intake calls (never blocks the request) ---------------------------------
    def handle(self, outcome: IntakeResult) -> None:
        if self.mode == "shadow":
            return
        if outcome.disposition == "opened" and outcome.incident:
            self._starts.submit(self._guard, self._open, outcome.incident, outcome.alert)
        elif outcome.disposition in ("resolved", "attached") and outcome.incident:
            self._notes.submit(self._guard, self._update, outcome.incident, outcome, closes=False)

    def _guard(self, fn, inc: TrackedIncident, *args, closes: bool = True) -> None:
        """Worker-thread boundary: a failure is logged (and, when starting or running, the
        incident closed with it in the store), then re-raised into the executor's future:
        nothing is swallowed silently."""
        try:
            fn(inc, *args)
        except Exception as exc:
            log.exception("dispatch of %s failed", inc.incident_id)
            if closes:
                self.store.close_incident(inc.incident_id, f"dispatch failed: {type(exc).__name__}: {exc}")
            raise

    # -- opening ------------------------------------------------------------------------
    def _open(self, inc: TrackedIncident, alert: Alert) -> None:
        params = {"target": inc.target, "incident_id": inc.incident_id,
                  "trigger": trigger_of(alert).model_dump(mode="json")}
        resource = {"prefect.resource.id": f"runbooks.incident.{inc.incident_id}",
                    "prefect.resource.name": inc.incident_id}
        flow_name = inc.scenario.split("/", 1)[0]
        related = [{"prefect.resource.id": f"runbooks.scenario.{flow_name}",
                    "prefect.resource.role": "scenario"},
                   {"prefect.resource.id": f"runbooks.service.{inc.target}",
                    "prefect.resource.role": "service"}]
        if self.mode == "automation":
            emit_event(DISPATCH_EVENT, resource=resource, related=related, payload=params)
            return
        emit_event(OPENED_EVENT, resource=resource, related=related, payload=params)
        deployment = self._deployment(inc.scenario)
        ahead = self._in_flight - self.max_parallel + 1  # runs before this one gets a thread
        message = "started by the alert gateway" + (f"; queued behind {ahead} runs" if ahead > 0 else "")
        run = self._create_run(inc, deployment.id, params, [f"alert:{alert.source}"], message)
        self.store.set_flow_run(inc.incident_id, str(run.id))
        self._submit_run(inc, run, deployment.entrypoint)

    def _submit_run(self, inc: TrackedIncident, run: FlowRun, entrypoint: str) -> None:
        with self._lock:
            self._in_flight += 1
        self._runs.submit(self._guard, self._execute, inc, run, entrypoint)

    def _create_run(self, inc: TrackedIncident, deployment_id, params: dict, tags: list[str],
                    message: str) -> FlowRun:
        """Create the incident's run; transient API failures are retried with backoff.

        Safe to retry: the incident id is the idempotency key, so the server hands back the
        run it already made instead of a second one. A busy Prefect server on SQLite answers
        503 under bursts; the incident stays open (and is recovered after a restart) meanwhile.
        """
        delay, deadline = 0.5, time.monotonic() + CREATE_RUN_PATIENCE_S
        while True:
            try:
                with get_client(sync_client=True) as client:
                    return client.create_flow_run_from_deployment(
                        deployment_id, parameters=params, tags=tags,
                        idempotency_key=f"runbooks-gateway:{inc.incident_id}",
                        state=Pending(message=message))
            except (httpx.TransportError, PrefectHTTPStatusError) as exc:
                status = exc.response.status_code if isinstance(exc, PrefectHTTPStatusError) else None
                if (status is not None and status < 500 and status != 429) or time.monotonic() > deadline:
                    raise
                log.warning("creating the run of %s failed (%s); retrying in %.1f s",
                            inc.incident_id, status or type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _execute(self, inc: TrackedIncident, run: FlowRun, entrypoint: str) -> None:
        try:
            state: State = run_flow(_flow(entrypoint), flow_run=run,  # type: ignore[assignment]
                                    parameters=run.parameters, return_type="state")
        finally:
            with self._lock:
                self._in_flight -= 1
        self.store.close_incident(inc.incident_id, state.name or state.type.value)

    # -- after a restart ------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Runner mode, at start-up: finish what a previous gateway process left open.

        Open incidents whose run was never created are started; runs still Pending (created,
        never executed) are executed; runs already final close their incident; runs left
        Running or Paused died with the old process - they are marked Crashed and escalated,
        never re-run blindly (a change may have been half made).
        """
        counts = {"started": 0, "resumed": 0, "closed": 0, "crashed": 0}
        if self.mode != "runner":
            return counts
        failed: list[str] = []
        for inc in self.store.open_incidents():
            try:
                counts[self._recover_one(inc)] += 1
            except Exception:
                log.exception("could not recover %s; it stays open in the store", inc.incident_id)
                failed.append(inc.incident_id)
        if any(counts.values()):
            log.warning("recovered open incidents after a restart: %s", counts)
        if failed:
            raise RuntimeError(f"{len(failed)} open incidents could not be recovered ({', '.join(failed)}); "
                               "see the log above, fix the cause and restart the gateway")
        return counts

    def _recover_one(self, inc: TrackedIncident) -> str:
        if inc.flow_run_id is None:
            alert = self.store.first_alert(inc.incident_id)
            self._starts.submit(self._guard, self._open, inc, alert)
            return "started"
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(inc.flow_run_id))
        state = run.state
        if state is None or state.is_pending() or state.is_scheduled():
            self._submit_run(inc, run, self._deployment(inc.scenario).entrypoint)
            return "resumed"
        if state.is_final():
            self.store.close_incident(inc.incident_id, state.name or state.type.value)
            return "closed"
        self._crash_orphan(inc, state.name)
        return "crashed"

    def _crash_orphan(self, inc: TrackedIncident, was: str | None) -> None:
        why = (f"the alert gateway restarted while this run was {was or 'executing'}; it will not "
               "continue. Check the target's health and the record's last action, then run the "
               "deployment again by hand if it still needs fixing")
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(str(inc.flow_run_id), Crashed(message=why), force=True)
        # The run's own record is closed (what it changed and what not) and escalated with the
        # schema every escalation uses; a run that died before opening its record is escalated
        # with what the gateway knows.
        close_run_from_outside(UUID(str(inc.flow_run_id)), why, fallback=EscalationNotice(
            incident_id=inc.incident_id, scenario=inc.scenario.split("/")[0], target=inc.target,
            environment=_environment_of(inc.target), severity=inc.severity, reason=why,
            flow_run_id=inc.flow_run_id or "", outcome="failed"))
        self.store.close_incident(inc.incident_id, "Crashed (gateway restarted)")

    def _deployment(self, name: str):
        if name not in self._deployments:
            with get_client(sync_client=True) as client:
                self._deployments[name] = client.read_deployment_by_name(name)
        return self._deployments[name]

    # -- later notifications ------------------------------------------------------------
    def _update(self, inc: TrackedIncident, outcome: IntakeResult) -> None:
        run_id = self._flow_run_of(inc)
        alert = outcome.alert
        if outcome.disposition == "resolved":
            text = (f"{alert.source} reports the alert RESOLVED"
                    + (f" (ended {alert.ends_at:%H:%M:%S} UTC)" if alert.ends_at else ""))
        else:
            text = f"{alert.source} fired again (episode {alert.episode_key}): attached, no new run"
        add_alert_update(run_id, inc.incident_id, text)
        if outcome.disposition != "resolved":
            return
        if self.mode == "automation":
            self.store.close_incident(inc.incident_id, "alert resolved")
        self._stand_down(run_id, alert.source)

    def _stand_down(self, run_id, source: str) -> None:
        """A run paused for an approval ends Resolved Without Action: the gateway answers the
        approval form with ``stand-down``, signed as itself (never as a human)."""
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
            if not (state and state.is_paused()):
                return
            keyset = state.state_details.run_input_keyset or keyset_from_paused_state(state)
            fields = _form_fields(client, run_id, keyset["schema"])
        answer = stand_down_input(source)
        if fields is not None:  # only what this run's form declares (a form without approver)
            answer = {k: v for k, v in answer.items() if k in fields}
        resume_flow_run(run_id, run_input=answer)

    def _flow_run_of(self, inc: TrackedIncident, wait_s: float = 30.0):
        """The incident's flow run: from the store, or by its incident tag (automation mode)."""
        deadline = time.monotonic() + wait_s
        while True:
            current = self.store.incident(inc.incident_id)
            if current and current.flow_run_id:
                return current.flow_run_id
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        tags=FlowRunFilterTags(all_=[f"incident:{inc.incident_id}"])),
                    limit=1)
            if runs:
                return runs[0].id
            if time.monotonic() > deadline:
                raise LookupError(f"no flow run found for {inc.incident_id} after {wait_s:.0f} s; "
                                  "check the gateway log and the deployment's automation")
            time.sleep(0.5)


def stand_down_input(source: str) -> dict[str, str]:
    """The approval form's answer when ``source`` reports the alert resolved."""
    return {"decision": "stand-down", "approver": f"alert-gateway ({source} resolved)",
            "reason": f"alert resolved ({source}) while waiting for approval: resolved without action"}


def _form_fields(client, run_id, schema_key: str, wait_s: float = 15.0) -> set[str] | None:
    """The fields of the paused run's input form; the flow saves its schema just after it
    pauses, so it may take a moment to appear. None if it never does (then the server
    refuses any answer, and the error says so)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            schema = json.loads(client.read_flow_run_input(run_id, schema_key))
            return set(schema.get("properties", {}))
        except (ObjectNotFound, PrefectHTTPStatusError) as exc:
            if isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code != 404:
                raise
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


class AlertIntake:
    """The gateway's intake: one store transaction per delivery, then dispatch."""

    def __init__(self, store: AlertStore, router: Router, dispatcher: Dispatcher) -> None:
        self.store = store
        self.router = router
        self.dispatcher = dispatcher

    def _record(self, alerts: list[Alert], delivery: Delivery) -> list[IntakeResult]:
        """Off the event loop: routing reads the inventory, the store writes SQLite."""
        return self.store.record_delivery(delivery, alerts, self.router.route_all(alerts))

    async def accept(self, alerts: list[Alert], delivery: Delivery) -> dict[str, Any]:
        outcomes = await anyio.to_thread.run_sync(self._record, alerts, delivery)
        for outcome in outcomes:
            self.dispatcher.handle(outcome)
        return {
            "accepted": len(outcomes),
            "alerts": [{"fingerprint": o.alert.fingerprint, "status": o.alert.status,
                        "disposition": o.disposition,
                        "incident_id": o.incident.incident_id if o.incident else None,
                        "reason": o.reason or None} for o in outcomes],
        }
