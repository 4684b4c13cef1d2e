"""From accepted alerts to remediations: store, dedup, route, dispatch.

Two ways to start a scenario's deployment for a new incident (``RUNBOOKS_GATEWAY_DISPATCH``):

* ``runner`` (default): the gateway creates the flow run from the deployment (so it is
  the deployment's run in the UI, with its parameters) in state Pending - workers only
  take Scheduled runs - and queues it in its store; a runner process (``gateway.runner``)
  claims it at once and executes it in a thread. No worker poll, no new Python process:
  the first task runs well under a second after the alert, and the intake never waits
  behind running remediations. Measured in ``bench/alert_intake.py``.
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
from typing import Any, Literal

import anyio
import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.flow_runs import resume_flow_run
from prefect.input import keyset_from_paused_state
from prefect.client.schemas.objects import FlowRun
from prefect.states import Crashed, Pending

from gateway.errors import RunnerBusy
from gateway.models import Alert, Delivery
from gateway.routing import Router
from gateway.runner import DEFAULT_LEASE_S, ClaimedRun, Claims, Heartbeat, RunDone
from gateway.slots import RunnerLoad
from gateway.store import AlertStore, TrackedIncident, IntakeResult
from incident.errors import RunbookError
from incident.escalation import EscalationNotice
from incident.inventory import load_target
from incident.kit import close_run_from_outside
from incident.record import ALL_ALERTS_RESOLVED, Trigger, add_alert_update

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


class Dispatcher:
    """Starts remediations for new incidents and passes later notifications on.

    Runner mode: a small pool creates each flow run at once (Pending, visible in the UI with
    its incident tags) and queues it in the store; runner processes claim queued runs
    (:meth:`claim`, a long poll), renew their claims while they run (:meth:`heartbeat`) and
    report the end (:meth:`done`). At most ``max_queued`` runs wait for a runner: beyond that
    the intake refuses new firing alerts (503, :meth:`refuse_if_busy`) rather than queue
    without bound. A claim no runner renews is settled by :meth:`settle_expired_claims`.
    """

    def __init__(self, store: AlertStore, mode: Literal["runner", "automation", "shadow"] = "runner",
                 max_queued: int = 32, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.store = store
        self.mode = mode
        self.max_queued = max_queued
        self.lease_s = lease_s
        self._starts = ThreadPoolExecutor(4, thread_name_prefix="remediation-start")
        self._notes = ThreadPoolExecutor(4, thread_name_prefix="alert-update")
        self._deployments: dict[str, Any] = {}
        self._creating = 0  # runs being created: they count as queued
        self._queue = threading.Condition()  # notified when a run is queued or the gateway stops
        self._closed = False
        self._runners: dict[str, tuple[float, RunnerLoad]] = {}  # name -> (last heartbeat, load)
        #: runners get runs only once ``recover`` has settled what a previous gateway left
        self.recovered = threading.Event()
        if mode != "runner":
            self.recovered.set()

    def shutdown(self) -> None:
        """Stop creating runs; queued ones stay queued in the store (and Pending in Prefect):
        runners take them from the next gateway. Long polls end at once."""
        with self._queue:
            self._closed = True
            self._queue.notify_all()
        self._starts.shutdown(wait=True, cancel_futures=True)
        self._notes.shutdown(wait=True)

    def load(self) -> dict[str, Any]:
        """The runners' queue and each runner's last reported load (``/healthz``)."""
        now = time.monotonic()
        with self._queue:
            runners = {name: {"seen_s_ago": round(now - seen, 1), **load.model_dump()}
                       for name, (seen, load) in self._runners.items()
                       if now - seen < 3 * self.lease_s}
            creating = self._creating
        return {"queued": self.store.queued_runs() + creating, "max_queued": self.max_queued,
                "runners": runners}

    def refuse_if_busy(self, firing: int) -> None:
        """Raise RunnerBusy when the runners' queue is full (runner mode): a delivery with
        ``firing`` alerts that may open incidents is refused before anything is recorded, so
        the sender's retry is news, not a duplicate."""
        if self.mode != "runner":
            return
        with self._queue:
            creating = self._creating
        queued = self.store.queued_runs() + creating
        if queued < self.max_queued:
            return
        raise RunnerBusy(
            f"{queued} runs are queued for a runner (RUNBOOKS_GATEWAY_MAX_QUEUED_RUNS={self.max_queued}); "
            f"the delivery ({firing} firing alerts) was not recorded: deliver it again after "
            f"{RETRY_AFTER_S} s (senders that retry on 5xx do). If this lasts, start more runners "
            "(`python -m gateway runner`), raise RUNBOOKS_GATEWAY_MAX_PARALLEL_RUNS, or look at what "
            "the working runs wait for (GET /healthz lists the runners and their load)",
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
        """Create the incident's run (and queue it for a runner); in runner mode it counts as
        queued from now on."""
        with self._queue:
            self._creating += 1
        try:
            self._starts.submit(self._guard, self._open, inc, alert)
        except BaseException:  # the dispatcher is shut down: the next start recovers the incident
            with self._queue:
                self._creating -= 1
            raise

    def _guard(self, fn, inc: TrackedIncident, *args, closes: bool = True) -> None:
        """Worker-thread boundary: a failure is logged (and, when starting, the incident closed
        with it in the store), then re-raised into the executor's future: nothing is
        swallowed silently."""
        try:
            fn(inc, *args)
        except Exception as exc:
            log.exception("dispatch of %s failed", inc.incident_id)
            if closes:
                self.store.close_incident(inc.incident_id, f"dispatch failed: {type(exc).__name__}: {exc}")
            raise

    # -- opening ------------------------------------------------------------------------
    def _open(self, inc: TrackedIncident, alert: Alert) -> None:
        try:
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
            run = self._create_run(inc, deployment.id, params, [f"alert:{alert.source}"], self._queue_note())
            self.store.set_flow_run(inc.incident_id, str(run.id))  # queued: a runner may claim it now
        finally:
            with self._queue:
                self._creating -= 1
                self._queue.notify_all()

    def _queue_note(self) -> str:
        """The new run's Pending message: how many runs wait for a runner before it."""
        ahead = self.store.queued_runs()
        return ("started by the alert gateway; queued for a runner"
                + (f" ({ahead} runs ahead of it)" if ahead else ""))

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

    # -- the runners' side --------------------------------------------------------------
    def claim(self, runner: str, limit: int, wait_s: float) -> Claims:
        """Up to ``limit`` queued runs for ``runner``, waiting up to ``wait_s`` for one."""
        deadline = time.monotonic() + max(0.0, min(wait_s, 60.0))
        if not self.recovered.wait(max(0.0, deadline - time.monotonic())):
            return Claims(runs=[], lease_s=self.lease_s)
        while True:
            claimed = self.store.claim_runs(runner, max(1, limit), self.lease_s)
            if claimed:
                runs = [ClaimedRun(incident_id=i.incident_id, flow_run_id=str(i.flow_run_id),
                                   scenario=i.scenario, target=i.target,
                                   entrypoint=self._deployment(i.scenario).entrypoint) for i in claimed]
                log.info("runner %s claimed %s", runner, ", ".join(r.incident_id for r in runs))
                return Claims(runs=runs, lease_s=self.lease_s)
            with self._queue:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return Claims(runs=[], lease_s=self.lease_s)
                self._queue.wait(min(remaining, 5.0))  # notified when a run is queued

    def heartbeat(self, beat: Heartbeat) -> list[str]:
        """Renew ``beat.runner``'s claims; returns those it still holds."""
        with self._queue:
            self._runners[beat.runner] = (time.monotonic(), beat.load)
        return self.store.renew_claims(beat.runner, beat.incident_ids, self.lease_s)

    def done(self, report: RunDone) -> None:
        inc = self.store.incident(report.incident_id)
        if inc is None or inc.status != "open":
            return
        if not report.started:
            self._settle(inc, f"runner {report.runner} found the run already {report.outcome.split()[-1]} "
                              "when it claimed it (the process that executed it is gone)")
            return
        if inc.runner != report.runner:
            log.warning("runner %s reports %s ended, but it is %s's claim; closing it anyway",
                        report.runner, report.incident_id, inc.runner or "no runner")
        self.store.close_incident(report.incident_id, report.outcome)

    def settle_expired_claims(self) -> dict[str, int]:
        """Settle the runs of runners that stopped renewing their claims (killed, cut off): a
        run never started goes back to the queue, an ended one closes its incident, one caught
        Running or Paused is marked Crashed, its record closed and escalated."""
        counts = {"requeued": 0, "closed": 0, "crashed": 0}
        for inc in self.store.expired_claims():
            try:
                counts[self._settle(inc, f"its runner {inc.runner} stopped renewing its claim "
                                         f"(killed or cut off)")] += 1
            except Exception:
                log.exception("could not settle %s (claimed by %s); trying again at the next check",
                              inc.incident_id, inc.runner)
        if any(counts.values()):
            log.warning("settled the runs of runners that went away: %s", counts)
        return counts

    def _settle(self, inc: TrackedIncident, why: str, requeue: bool = True) -> str:
        """Settle an incident's run by its state: still Pending -> "requeued" (``requeue``: its
        claim is dropped so another runner takes it) or "queued" (left as it is); ended ->
        "closed"; otherwise -> "crashed" (marked Crashed, record closed, escalated, ``why``)."""
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(str(inc.flow_run_id)))
        state = run.state
        if state is None or state.is_pending() or state.is_scheduled():
            if not requeue:
                return "queued"
            self.store.requeue(inc.incident_id)
            with self._queue:
                self._queue.notify_all()
            return "requeued"
        if state.is_final():
            self.store.close_incident(inc.incident_id, state.name or state.type.value)
            return "closed"
        self._crash_orphan(inc, state.name, why)
        return "crashed"

    # -- after a restart ------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Runner mode, at start-up: pick up what a previous gateway process left open.

        Claims get a fresh lease (their runners could not renew while the gateway was away;
        they renew now, or are settled when it lapses). Open incidents whose run was never
        created are started; runs still queued stay queued; unclaimed runs already final close
        their incident; unclaimed runs left Running or Paused (executed by a gateway of an
        earlier version) are marked Crashed and escalated, never re-run blindly.
        """
        counts = {"started": 0, "queued": 0, "claimed": 0, "closed": 0, "crashed": 0}
        if self.mode != "runner":
            return counts
        failed: list[str] = []
        try:
            self.store.extend_claims(self.lease_s)
            for inc in self.store.open_incidents():
                try:
                    counts[self._recover_one(inc)] += 1
                except Exception:
                    log.exception("could not recover %s; it stays open in the store", inc.incident_id)
                    failed.append(inc.incident_id)
        finally:
            self.recovered.set()  # runs that could not be settled are refused by the runners
        if any(counts.values()):
            log.warning("open incidents after a restart: %s", counts)
        if failed:
            raise RuntimeError(f"{len(failed)} open incidents could not be recovered ({', '.join(failed)}); "
                               "see the log above, fix the cause and restart the gateway")
        return counts

    def _recover_one(self, inc: TrackedIncident) -> str:
        if inc.flow_run_id is None:
            self._start(inc, self.store.first_alert(inc.incident_id))
            return "started"
        if inc.runner is not None:
            return "claimed"
        return self._settle(inc, "the alert gateway restarted", requeue=False)

    def _crash_orphan(self, inc: TrackedIncident, was: str | None, cause: str) -> None:
        why = (f"{cause} while this run was {was or 'executing'}; it will not "
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
        self.store.close_incident(inc.incident_id, f"Crashed ({cause})")

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
