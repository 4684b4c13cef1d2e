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

from gateway.errors import RunnerBusy
from gateway.models import Alert, Delivery
from gateway.routing import Router
from gateway.slots import RunnerLoad, RunnerSlots
from gateway.store import AlertStore, TrackedIncident, IntakeResult
from incident.errors import RunbookError
from incident.escalation import EscalationNotice
from incident.inventory import load_target
from incident.kit import close_run_from_outside
from incident.record import ALL_ALERTS_RESOLVED, Trigger, add_alert_update
from incident.settings import REPO_ROOT
from incident.waiting import register_slot, unregister_slot

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
#: what a 503 "runner busy" asks the sender to wait before it delivers again
RETRY_AFTER_S = 30


def trigger_of(alert: Alert) -> Trigger:
    return Trigger(kind="alert", source=alert.source, summary=_summary_of(alert),
                   fingerprint=alert.fingerprint, fired_at=alert.starts_at,
                   labels=alert.labels, links=list(alert.links.values()))


@lru_cache(maxsize=32)
def _flow(entrypoint: str) -> Flow:
    return load_flow_from_entrypoint(str(REPO_ROOT / entrypoint))


class Dispatcher:
    """Starts remediations for new incidents and passes later notifications on.

    Runner mode has two stages so that a busy runner never hides an incident: a small
    pool creates each flow run at once (Pending, visible in the UI with its incident
    tags), then the run waits for one of ``max_parallel`` working slots
    (:class:`gateway.slots.RunnerSlots`). A run that waits (approval, target lock) gives its
    slot back and keeps only its thread: there are ``max_parallel + max_waiting`` of them.
    At most ``max_queued`` runs wait for a first slot: beyond that the intake refuses new
    firing alerts (503, :meth:`refuse_if_busy`) rather than queue without bound.
    """

    def __init__(self, store: AlertStore, mode: Literal["runner", "automation", "shadow"] = "runner",
                 slots: RunnerSlots | None = None) -> None:
        self.store = store
        self.mode = mode
        self.slots = slots or RunnerSlots()
        self._starts = ThreadPoolExecutor(4, thread_name_prefix="remediation-start")
        self._runs = ThreadPoolExecutor(self.slots.max_parallel + self.slots.max_waiting,
                                        thread_name_prefix="remediation")
        self._notes = ThreadPoolExecutor(4, thread_name_prefix="alert-update")
        self._deployments: dict[str, Any] = {}

    def shutdown(self) -> None:
        """Let running (and waiting) remediations finish; drop queued ones - they stay open in
        the store (and Pending in Prefect) and the next start's ``recover`` runs them."""
        self._starts.shutdown(wait=True, cancel_futures=True)
        self._notes.shutdown(wait=True)
        self.slots.close()
        self._runs.shutdown(wait=True, cancel_futures=True)

    def load(self) -> RunnerLoad:
        """How many runs work, wait and queue in this runner (runner mode; ``/healthz``)."""
        return self.slots.load()

    def refuse_if_busy(self, firing: int) -> None:
        """Raise RunnerBusy when the runner's queue is full (runner mode): a delivery with
        ``firing`` alerts that may open incidents is refused before anything is recorded, so
        the sender's retry is news, not a duplicate."""
        if self.mode != "runner" or not self.slots.full():
            return
        load = self.slots.load()
        raise RunnerBusy(
            f"the runner has {load.queued} runs queued for a slot (RUNBOOKS_GATEWAY_MAX_QUEUED_RUNS="
            f"{load.max_queued}), {load.working} of {load.max_parallel} working and {load.waiting} waiting; "
            f"the delivery ({firing} firing alerts) was not recorded: deliver it again after "
            f"{RETRY_AFTER_S} s (senders that retry on 5xx do). If this lasts, raise "
            "RUNBOOKS_GATEWAY_MAX_PARALLEL_RUNS or look at what the working runs wait for",
            retry_after_s=RETRY_AFTER_S)

    # -- what the intake calls (never blocks the request) ---------------------------------
    def handle(self, outcome: IntakeResult) -> None:
        if self.mode == "shadow":
            return
        if outcome.disposition == "opened" and outcome.incident:
            self._start(outcome.incident, outcome.alert)
        elif outcome.disposition in ("resolved", "resolved-partial", "attached") and outcome.incident:
            self._notes.submit(self._guard, self._update, outcome.incident, outcome, closes=False)

    def _start(self, inc: TrackedIncident, alert: Alert) -> None:
        """Create and run the incident's run; in runner mode it counts as queued from now
        until it has a working slot (or its creation fails)."""
        queued = self.mode == "runner"
        if queued:
            self.slots.enqueue()
        try:
            self._starts.submit(self._guard, self._open, inc, alert)
        except BaseException:  # the dispatcher is shut down: the next start recovers the incident
            if queued:
                self.slots.unqueue()
            raise

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
        try:
            emit_event(OPENED_EVENT, resource=resource, related=related, payload=params)
            deployment = self._deployment(inc.scenario)
            run = self._create_run(inc, deployment.id, params, [f"alert:{alert.source}"], self._queue_note())
            self.store.set_flow_run(inc.incident_id, str(run.id))
            self._runs.submit(self._guard, self._execute, inc, run, deployment.entrypoint)
        except BaseException:
            self.slots.unqueue()  # it will not run: it must not hold a place in the queue
            raise

    def _queue_note(self) -> str:
        """The new run's Pending message: whether it waits for a working slot."""
        load = self.slots.load()
        if load.working + load.resuming < load.max_parallel:
            return "started by the alert gateway"
        return (f"started by the alert gateway; queued: all {load.max_parallel} runner slots are "
                f"busy, {load.queued - 1} other runs queued")

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
        """Run the flow once it has a working slot; its waits give the slot back
        (``incident.waiting``), so a paused run keeps only its thread."""
        run_id = str(run.id)
        slot = self.slots.start(run_id)
        if slot is None:
            log.info("the gateway stops: run %s of %s never started; it stays Pending and the "
                     "next start of the gateway runs it", run_id, inc.incident_id)
            return
        register_slot(run_id, slot)
        try:
            state: State = run_flow(_flow(entrypoint), flow_run=run,  # type: ignore[assignment]
                                    parameters=run.parameters, return_type="state")
        finally:
            unregister_slot(run_id)
            slot.done()
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
            self._start(inc, self.store.first_alert(inc.incident_id))
            return "started"
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(inc.flow_run_id))
        state = run.state
        if state is None or state.is_pending() or state.is_scheduled():
            entrypoint = self._deployment(inc.scenario).entrypoint
            self.slots.enqueue()
            try:
                self._runs.submit(self._guard, self._execute, inc, run, entrypoint)
            except BaseException:
                self.slots.unqueue()
                raise
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
        """The run's record lists every alert that joined the incident and every resolve; only
        the resolve of its last firing alert stands a paused run down."""
        run_id = self._flow_run_of(inc)
        add_alert_update(run_id, inc.incident_id, update_text(outcome))
        if outcome.disposition != "resolved":
            return
        if self.mode == "automation":
            self.store.close_incident(inc.incident_id, "alert resolved")
        self._stand_down(run_id, outcome.alert.source)

    def _stand_down(self, run_id, source: str, settle_s: float = 30.0) -> None:
        """A run paused for an approval ends Resolved Without Action: the gateway answers the
        approval form with ``stand-down``, signed as itself (never as a human).

        A run that has not paused yet reads the resolve (the alert update just sent) before it
        pauses and stands down by itself; one caught between that check and its pause is waited
        for here, up to ``settle_s``."""
        deadline = time.monotonic() + settle_s
        with get_client(sync_client=True) as client:
            while True:
                state = client.read_flow_run(run_id).state
                if state is None or state.is_final() or state.is_paused():
                    break
                if time.monotonic() > deadline:
                    return  # still working: it reads the resolve before any pause
                time.sleep(0.5)
            if not state or not state.is_paused():
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


def update_text(outcome: IntakeResult) -> str:
    """The line an attached or resolved alert adds to the run's record ("Alert updates")."""
    alert = outcome.alert
    what = f"{_summary_of(alert)} (fingerprint {alert.fingerprint})"
    ended = f" (ended {alert.ends_at:%H:%M:%S} UTC)" if alert.ends_at else ""
    if outcome.disposition == "resolved":
        return f"{alert.source} reports the alert RESOLVED{ended}: {what}; {ALL_ALERTS_RESOLVED}"
    if outcome.disposition == "resolved-partial":
        firing = outcome.still_firing
        return (f"{alert.source} reports an alert resolved{ended}: {what}; the incident stays open: "
                f"{firing} other alert{'s' if firing != 1 else ''} still fire{'' if firing != 1 else 's'}")
    return f"{alert.source} alert joined: {what}: attached to this incident, no new run"


def _summary_of(alert: Alert) -> str:
    return alert.summary or ", ".join(f"{k}={v}" for k, v in alert.labels.items())


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
        """Record, decide, dispatch. Raises RunnerBusy, before recording anything, when the
        runner's queue is full and the delivery carries an alert that may open an incident
        (firing, not acknowledged); resolves are always accepted: they free runs."""
        firing = sum(a.status == "firing" and not a.acknowledged for a in alerts)
        if firing:
            self.dispatcher.refuse_if_busy(firing)
        outcomes = await anyio.to_thread.run_sync(self._record, alerts, delivery)
        for outcome in outcomes:
            self.dispatcher.handle(outcome)
        return {
            "accepted": len(outcomes),
            "alerts": [{"fingerprint": o.alert.fingerprint, "status": o.alert.status,
                        "disposition": o.disposition,
                        "incident_id": o.incident.incident_id if o.incident else None,
                        "reason": o.reason or None,
                        **({"still_firing": o.still_firing} if o.disposition == "resolved-partial" else {})}
                       for o in outcomes],
        }
