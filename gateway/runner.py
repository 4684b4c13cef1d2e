"""A runner: the process that executes the remediations the gateway's intake queued.

The intake and the execution are apart. The gateway accepts an alert, decides, creates the
incident's flow run (Pending, visible in the UI at once) and queues it in its store; it never
executes a flow. Runners - one or more long-lived processes (``python -m gateway runner``),
on this machine or others - take queued runs from the gateway and execute them in their
threads: no worker poll, no new Python process per run, so the first task runs well under a
second after the alert, and a storm of alerts is accepted at the intake's own speed whatever
the runners are doing.

The runner's protocol with the gateway (``/runner/*``, Bearer ``RUNBOOKS_GATEWAY_RUNNER_TOKEN``):

* ``claim``: a long poll. The runner asks for as many runs as it has free working slots; the
  gateway answers at once when runs are queued, else when one is queued, else after
  ``wait_s`` with none. Each claimed run is the runner's until its claim's lease ends;
* ``heartbeat``: every ``lease_s / 3`` the runner renews the claims of the runs it has, and
  reports its load (``/healthz`` shows every runner's);
* ``done``: the run ended (its state name closes the incident in the gateway's store).

A runner killed mid-run stops renewing. When its leases run out the gateway settles each of
its runs (:meth:`gateway.intake.Dispatcher.settle_expired_claims`): a run still Pending (never
started) goes back to the queue for another runner; a run that ended closes its incident; a
run caught Running or Paused is marked Crashed, its record closed with what it changed and
what not, and escalated - never re-run blindly, a change may have been half made. Nothing the
intake accepted is lost.

Inside a runner, ``max_parallel_runs`` runs work at once (:class:`gateway.slots.RunnerSlots`);
a run that waits for a person or a lock gives its slot back (``incident.waiting``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from uuid import UUID

import httpx
from pydantic import BaseModel, SecretStr

from gateway.slots import RunnerLoad, RunnerSlots
from incident.settings import REPO_ROOT
from incident.waiting import register_slot, unregister_slot

log = logging.getLogger("gateway.runner")

#: how long a claim holds without a heartbeat (the runner renews it every third of that)
DEFAULT_LEASE_S = 30.0
#: how long one claim request may wait at the gateway for a run
CLAIM_WAIT_S = 20.0


class ClaimedRun(BaseModel):
    """A queued run the gateway gave this runner."""

    incident_id: str
    flow_run_id: str
    scenario: str
    target: str
    entrypoint: str


class Claims(BaseModel):
    runs: list[ClaimedRun]
    lease_s: float


class Heartbeat(BaseModel):
    runner: str
    incident_ids: list[str]
    load: RunnerLoad


class ClaimRequest(BaseModel):
    runner: str
    limit: int
    wait_s: float = CLAIM_WAIT_S


class RunDone(BaseModel):
    runner: str
    incident_id: str
    outcome: str
    started: bool = True
    """False: the runner did not start the run (it was no longer Pending); the gateway settles it"""


def runner_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@lru_cache(maxsize=32)
def _flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(REPO_ROOT / entrypoint))


def preload_flows() -> list[str]:
    """Import every deployment's flow of prefect.yaml now, so that no alert's first run in this
    process pays for importing its runbook (seconds). A flow that does not load is logged and
    left for its first run to report."""
    import yaml

    loaded = []
    for deployment in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text()).get("deployments", []):
        entrypoint = deployment.get("entrypoint")
        if not entrypoint:
            continue
        try:
            _flow(entrypoint)
            loaded.append(entrypoint)
        except Exception:
            log.exception("runner: the flow %s does not load; its runs will fail until it does", entrypoint)
    return loaded


class GatewayClient:
    """The runner's side of ``/runner/*``; every call has a timeout."""

    def __init__(self, url: str, token: SecretStr) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=10.0,
                                  headers={"Authorization": f"Bearer {token.get_secret_value()}"})

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: BaseModel, timeout: float = 10.0) -> httpx.Response:
        resp = self._http.post(path, content=body.model_dump_json(), timeout=timeout,
                               headers={"Content-Type": "application/json"})
        if resp.status_code == 401:
            raise PermissionError(f"the gateway refused this runner's token ({resp.text[:200]}): give the "
                                  "runner the gateway's RUNBOOKS_GATEWAY_RUNNER_TOKEN")
        resp.raise_for_status()
        return resp

    def claim(self, runner: str, limit: int, wait_s: float) -> Claims:
        return Claims.model_validate_json(
            self._post("/runner/claim", ClaimRequest(runner=runner, limit=limit, wait_s=wait_s),
                       timeout=wait_s + 10.0).content)

    def heartbeat(self, beat: Heartbeat) -> list[str]:
        return self._post("/runner/heartbeat", beat).json()["held"]

    def done(self, done: RunDone) -> None:
        self._post("/runner/done", done)


class Runner:
    """Executes the runs it claims from the gateway, ``max_parallel`` at a time."""

    def __init__(self, gateway_url: str, token: SecretStr, name: str | None = None,
                 max_parallel: int = 16, max_waiting: int = 64, claim_wait_s: float = CLAIM_WAIT_S) -> None:
        self.name = name or runner_name()
        self.gateway_url = gateway_url
        self.slots = RunnerSlots(max_parallel, max_waiting, max_queued=max_parallel + max_waiting)
        self.claim_wait_s = claim_wait_s
        self._client = GatewayClient(gateway_url, token)
        self._pool = ThreadPoolExecutor(max_parallel + max_waiting, thread_name_prefix="remediation")
        self._active: dict[str, ClaimedRun] = {}  # incident id -> run, from claim to done
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._lease_s = DEFAULT_LEASE_S  # the gateway's, from its first answer to a claim
        self._threads: list[threading.Thread] = []

    # -- life -------------------------------------------------------------------------------
    def start(self, preload: bool = True) -> Runner:
        """Claim and execute in background threads until ``stop``; ``preload``: import every
        runbook's flow first (before the first claim)."""
        if preload:
            preload_flows()
        for target, what in ((self._claim_loop, "claim"), (self._heartbeat_loop, "heartbeat")):
            t = threading.Thread(target=target, name=f"runner-{what}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("runner %s takes runs from %s (%d working slots)", self.name, self.gateway_url,
                 self.slots.max_parallel)
        return self

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def stop(self, wait: bool = True) -> None:
        """Claim no more; runs not started yet go back to the gateway's queue (their lease runs
        out); running and waiting runs finish (``wait``)."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self.slots.close()
        self._pool.shutdown(wait=wait, cancel_futures=True)
        for t in self._threads:
            t.join(timeout=self.claim_wait_s + 15)
        self._client.close()

    def load(self) -> RunnerLoad:
        return self.slots.load()

    # -- claiming ---------------------------------------------------------------------------
    def _free(self) -> int:
        """Runs this runner can take now: free working slots with a thread for each."""
        load = self.slots.load()
        threads_free = load.max_parallel + load.max_waiting - (load.working + load.waiting + load.queued)
        return max(0, min(load.max_parallel - load.working - load.queued - load.resuming, threads_free))

    def _claim_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            free = self._free()
            if free == 0:
                with self._changed:
                    self._changed.wait(1.0)
                continue
            try:
                claims = self._client.claim(self.name, free, self.claim_wait_s)
            except (httpx.TransportError, httpx.HTTPStatusError, PermissionError) as exc:
                if self._stop.is_set():
                    return
                log.warning("runner %s cannot claim runs from %s (%s: %s); trying again in %.1f s",
                            self.name, self.gateway_url, type(exc).__name__, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            self._lease_s = claims.lease_s
            for run in claims.runs:
                self._accept(run)

    def _accept(self, run: ClaimedRun) -> None:
        with self._lock:
            self._active[run.incident_id] = run
        self.slots.enqueue()
        try:
            self._pool.submit(self._execute, run)
        except RuntimeError:  # stopping: the claim lapses and the gateway queues the run again
            self.slots.unqueue()
            with self._lock:
                self._active.pop(run.incident_id, None)

    # -- executing --------------------------------------------------------------------------
    def _execute(self, claimed: ClaimedRun) -> None:
        from prefect.client.orchestration import get_client
        from prefect.flow_engine import run_flow

        outcome, started = None, True
        try:
            slot = self.slots.start(claimed.flow_run_id)
            if slot is None:
                log.info("runner %s stops: run %s of %s never started; it goes back to the queue",
                         self.name, claimed.flow_run_id, claimed.incident_id)
                return
            register_slot(claimed.flow_run_id, slot)
            try:
                with get_client(sync_client=True) as client:
                    run = client.read_flow_run(UUID(claimed.flow_run_id))
                if run.state is not None and not (run.state.is_pending() or run.state.is_scheduled()):
                    log.error("runner %s did not start run %s of %s: it is %s, not Pending (another "
                              "process executed it); the gateway settles it", self.name,
                              claimed.flow_run_id, claimed.incident_id, run.state.name)
                    started = False
                    outcome = f"not started: the run was {run.state.name}"
                    return
                state = run_flow(_flow(claimed.entrypoint), flow_run=run, parameters=run.parameters,
                                 return_type="state")
                outcome = state.name or state.type.value  # type: ignore[union-attr]
            except Exception as exc:  # the flow's own hooks closed its record; the gateway is told
                log.exception("run %s of %s failed in runner %s", claimed.flow_run_id,
                              claimed.incident_id, self.name)
                outcome = f"runner error: {type(exc).__name__}: {exc}"
            finally:
                unregister_slot(claimed.flow_run_id)
                slot.done()
        finally:
            with self._lock:
                self._active.pop(claimed.incident_id, None)
            with self._changed:
                self._changed.notify_all()
        if outcome is not None:
            self._report_done(claimed, outcome, started)

    def _report_done(self, claimed: ClaimedRun, outcome: str, started: bool, attempts: int = 5) -> None:
        """Tell the gateway; if it cannot be reached, its lease check finds the run final and
        closes the incident itself."""
        for attempt in range(attempts):
            try:
                self._client.done(RunDone(runner=self.name, incident_id=claimed.incident_id, outcome=outcome,
                                         started=started))
                return
            except (httpx.TransportError, httpx.HTTPStatusError, PermissionError) as exc:
                if attempt == attempts - 1:
                    log.warning("runner %s could not tell the gateway that %s ended (%s); the "
                                "gateway closes it when the claim's lease runs out",
                                self.name, claimed.incident_id, type(exc).__name__)
                    return
                time.sleep(0.5 * 2 ** attempt)

    # -- heartbeats -------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        """Renew every third of the lease the gateway gave (it says which in each claim)."""
        last = time.monotonic()
        while not self._stop.wait(0.25):
            if time.monotonic() - last < self._lease_s / 3:
                continue
            last = time.monotonic()
            with self._lock:
                ids = list(self._active)
            try:
                held = set(self._client.heartbeat(Heartbeat(runner=self.name, incident_ids=ids,
                                                            load=self.slots.load())))
            except (httpx.TransportError, httpx.HTTPStatusError, PermissionError) as exc:
                log.warning("runner %s could not renew its claims at %s (%s); its runs go on, and "
                            "the gateway settles them if the claims lapse", self.name,
                            self.gateway_url, type(exc).__name__)
                continue
            for lost in set(ids) - held:
                log.error("runner %s lost its claim on %s (the gateway settled it after the claim "
                          "lapsed); the run's record says what the gateway decided", self.name, lost)


def serve_runner(url: str, token: SecretStr, max_parallel: int, max_waiting: int) -> None:
    """``python -m gateway runner``: run until SIGTERM/SIGINT."""
    import signal

    runner = Runner(url, token, max_parallel=max_parallel, max_waiting=max_waiting)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    runner.start()
    while not stop.wait(1.0):
        pass
    log.info("runner %s stops: running runs finish first", runner.name)
    runner.stop()
