"""From accepted alerts to remediations: store, dedup, route, dispatch.

Two ways to start a scenario's deployment for a new incident (``RUNBOOKS_GATEWAY_DISPATCH``):

* ``runner`` (default): the gateway creates the flow run from the deployment (so it is
  the deployment's run in the UI, with its parameters) in state Pending - workers only
  take Scheduled runs - and executes it at once in this long-lived process's thread pool.
  No worker poll, no new Python process: the first task runs well under a second
  after the alert. Measured in ``bench/alert_latency.py``.
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

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Literal

import anyio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.events import emit_event
from prefect.flow_engine import run_flow
from prefect.flow_runs import resume_flow_run
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.states import Pending

from gateway.models import Alert, Delivery
from gateway.routing import Router
from gateway.store import AlertStore, Incident, Outcome
from incident.record import Trigger, add_alert_update
from incident.settings import REPO_ROOT

log = logging.getLogger("gateway.intake")

DISPATCH_EVENT = "runbooks.incident.dispatch"
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
    def __init__(self, store: AlertStore, mode: Literal["runner", "automation", "shadow"] = "runner",
                 max_parallel: int = 16) -> None:
        self.store = store
        self.mode = mode
        self._runs = ThreadPoolExecutor(max_parallel, thread_name_prefix="remediation")
        self._notes = ThreadPoolExecutor(4, thread_name_prefix="alert-update")
        self._deployments: dict[str, Any] = {}

    def shutdown(self) -> None:
        self._notes.shutdown(wait=True)
        self._runs.shutdown(wait=True)

    # -- what the intake calls (never blocks the request) ---------------------------------
    def handle(self, outcome: Outcome) -> None:
        if self.mode == "shadow":
            return
        if outcome.disposition == "opened":
            self._runs.submit(self._guard, self._open, outcome)
        elif outcome.disposition in ("resolved", "attached") and outcome.incident:
            self._notes.submit(self._guard, self._update, outcome)

    def _guard(self, fn, outcome: Outcome) -> None:
        """Worker-thread boundary: a failure is logged and written to the store, then re-raised
        into the executor's future (nothing is swallowed silently)."""
        try:
            fn(outcome)
        except Exception as exc:
            inc = outcome.incident
            log.exception("dispatch of %s failed", inc.incident_id if inc else outcome.alert.fingerprint)
            if inc and outcome.disposition == "opened":
                self.store.close_incident(inc.incident_id, f"dispatch failed: {type(exc).__name__}: {exc}")
            raise

    # -- opening ------------------------------------------------------------------------
    def _open(self, outcome: Outcome) -> None:
        inc = outcome.incident
        params = {"target": inc.target, "incident_id": inc.incident_id,
                  "trigger": trigger_of(outcome.alert).model_dump(mode="json")}
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
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters=params, state=Pending(message="started by the alert gateway"),
                tags=[f"alert:{outcome.alert.source}"])
        self.store.set_flow_run(inc.incident_id, str(run.id))
        state = run_flow(_flow(deployment.entrypoint), flow_run=run, parameters=run.parameters,
                         return_type="state")
        self.store.close_incident(inc.incident_id, state.name or state.type.value)

    def _deployment(self, name: str):
        if name not in self._deployments:
            with get_client(sync_client=True) as client:
                self._deployments[name] = client.read_deployment_by_name(name)
        return self._deployments[name]

    # -- later notifications ------------------------------------------------------------
    def _update(self, outcome: Outcome) -> None:
        inc = outcome.incident
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
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        if state and state.is_paused():
            resume_flow_run(run_id, run_input={
                "decision": "stand-down",
                "reason": f"alert resolved ({alert.source}) while waiting for approval: "
                          "resolved without action"})

    def _flow_run_of(self, inc: Incident, wait_s: float = 30.0):
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


class AlertIntake:
    """The gateway's intake: one store transaction per delivery, then dispatch."""

    def __init__(self, store: AlertStore, router: Router, dispatcher: Dispatcher) -> None:
        self.store = store
        self.router = router
        self.dispatcher = dispatcher

    async def accept(self, alerts: list[Alert], delivery: Delivery) -> dict[str, Any]:
        routes = self.router.route_all(alerts)
        outcomes = await anyio.to_thread.run_sync(self.store.record_delivery, delivery, alerts, routes)
        for outcome in outcomes:
            self.dispatcher.handle(outcome)
        return {
            "accepted": len(outcomes),
            "alerts": [{"fingerprint": o.alert.fingerprint, "status": o.alert.status,
                        "disposition": o.disposition,
                        "incident_id": o.incident.incident_id if o.incident else None,
                        "reason": o.reason or None} for o in outcomes],
        }
