"""The per-target lock: two runs never change one target at once.

One Prefect global concurrency limit per target service, ``runbooks-target-<service>``, with
one slot (created on first use; visible under Concurrency in the UI). A run takes the slot
with a **lease** before its diagnosis and keeps it until it ends - across approval pauses,
which a deployment concurrency slot would not survive - renewing the lease every
``lease_s / 3`` from a thread of its own process. A run that dies stops renewing: the server
frees the slot at most ``lease_s`` (plus its 15 s sweep) later. Any run counts - alert-started,
manual, any scenario - because the lock is taken by the flow, not by whoever started it.

The holder is tagged ``lock:<service>`` so that a waiting run can say who it waits for.
A subflow of the holder on the same target (a runbook that runs another one as a step) runs
under its parent's lock instead of waiting for it (``incident/kit.py``, ``parent_run_of``).
Leases live in the Prefect server's lease storage; the stack runs the server with the
file-based storage (``deployments/stack.py``) so that a server restart keeps them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState,
                                            FlowRunFilterStateType, FlowRunFilterTags)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, StateType
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from incident.guardrails import LockRules

log = logging.getLogger("incident.locks")

LOCK_PREFIX = "runbooks-target-"
HOLDER_TAG_PREFIX = "lock:"
#: The holder's lease, on its run: whoever closes a dead run's record frees its lock at once.
LEASE_TAG_PREFIX = "lease:"
CALL_TIMEOUT_S = 10.0
#: Limits this process has seen exist (one read per target and process, not per run). One
#: deleted by hand meanwhile is created again on the next take, never passed unlocked.
_KNOWN_LIMITS: set[str] = set()
#: The states of a run that may hold a lock (a final run has given it back or died).
_LIVE_STATES = [StateType.RUNNING, StateType.PAUSED, StateType.PENDING, StateType.CANCELLING]


def parent_run_of(flow_run_id: UUID) -> UUID | None:
    """The run that called ``flow_run_id`` as a subflow (the run of its parent task run), or
    None for a top-level run."""
    with get_client(sync_client=True, httpx_settings={"timeout": CALL_TIMEOUT_S}) as client:
        run = client.read_flow_run(flow_run_id)
        if run.parent_task_run_id is None:
            return None
        return client.read_task_run(run.parent_task_run_id).flow_run_id


class LockMissingError(RuntimeError):
    """The target's limit vanished between the check and the take: nothing is held."""


def lock_name(target: str) -> str:
    return f"{LOCK_PREFIX}{target}"


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transient(exc: BaseException) -> bool:
    status = _status(exc)
    return isinstance(exc, httpx.TransportError) or (status is not None and status >= 500)


class TargetLock:
    """The lock of one target, for one run (``acquire`` once, ``release`` at the end)."""

    def __init__(self, target: str, run_id: UUID | None, rules: LockRules) -> None:
        self.target = target
        self.name = lock_name(target)
        self.run_id = run_id
        self.rules = rules
        self.lease_id: UUID | None = None
        self.lost: str | None = None  # why the lease is gone while the run still lives
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- taking it ------------------------------------------------------------------------
    def acquire(self, on_wait: Callable[[str], None],
                while_waiting: Callable[[], AbstractContextManager[object]] = nullcontext,
                ) -> float | None:
        """Take the lock, waiting up to ``rules.wait_s``; the seconds waited, or None if it
        stayed busy. ``on_wait(holder)`` is called once, when the run starts waiting, and the
        wait runs inside ``while_waiting()`` (the runner slot is free meanwhile)."""
        self._ensure_limit()
        started = time.monotonic()
        if self._take(started + self.rules.wait_s):
            return 0.0
        on_wait(self.holder())
        with while_waiting():
            while True:
                if self._take(started + self.rules.wait_s):
                    return time.monotonic() - started
                left = started + self.rules.wait_s - time.monotonic()
                if left <= 0:
                    return None
                time.sleep(min(self.rules.poll_s, left))

    def _take(self, deadline: float) -> bool:
        """One try; transient API errors are retried until ``deadline``."""
        while True:
            try:
                self.lease_id = self._try_take()
            except LockMissingError:
                self._ensure_limit()  # created again: try once more at once
                self.lease_id = self._try_take()
            except Exception as exc:
                if not _transient(exc) or time.monotonic() > deadline:
                    raise
                log.warning("taking the lock %s failed (%s); retrying", self.name, exc)
                time.sleep(min(self.rules.poll_s, 5.0))
                continue
            if self.lease_id is not None:
                self._start_renewing()
                return True
            return False

    def _ensure_limit(self) -> None:
        if self.name in _KNOWN_LIMITS:
            return
        with get_client(sync_client=True, httpx_settings={"timeout": CALL_TIMEOUT_S}) as client:
            try:
                client.read_global_concurrency_limit_by_name(self.name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
                        name=self.name, limit=1))
                except ObjectAlreadyExists:
                    pass  # another run created it meanwhile: the same limit
        _KNOWN_LIMITS.add(self.name)

    def _try_take(self) -> UUID | None:
        holder = ConcurrencyLeaseHolder(type="flow_run", id=self.run_id) if self.run_id else None
        with get_client(sync_client=True, httpx_settings={"timeout": CALL_TIMEOUT_S}) as client:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[self.name], slots=1, mode="concurrency",
                    lease_duration=self.rules.lease_s, holder=holder)
            except Exception as exc:
                if _status(exc) == 423:  # held by another run
                    return None
                raise
        taken = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
        if not taken.limits:  # the server grants a missing limit without holding anything
            _KNOWN_LIMITS.discard(self.name)
            raise LockMissingError(f"the concurrency limit {self.name} does not exist (deleted "
                                   "by hand?); the next run creates it again")
        return taken.lease_id

    def holder(self) -> str:
        """Who holds the lock now, as far as the run history says."""
        with get_client(sync_client=True, httpx_settings={"timeout": CALL_TIMEOUT_S}) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[HOLDER_TAG_PREFIX + self.target]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_LIVE_STATES))), limit=20)
        live = [r for r in runs if r.state is not None and not r.state.is_final()
                and str(r.id) != str(self.run_id)]
        if not live:
            return "a run that ended moments ago, or one that died (its lease runs out)"
        run = live[0]
        state = run.state.name if run.state is not None else "?"
        return f"run {run.name!r} ({state})"

    # -- keeping it -------------------------------------------------------------------------
    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_until_stopped, daemon=True,
                                         name=f"lease-{self.name}")
        self._renewer.start()

    def _renew_until_stopped(self) -> None:
        lease = self.lease_id
        assert lease is not None, "renewing a lock that was not taken"
        every = self.rules.lease_s / 3
        last_ok = time.monotonic()
        while not self._stop.wait(every):
            try:
                with get_client(sync_client=True,
                                httpx_settings={"timeout": CALL_TIMEOUT_S}) as client:
                    client.renew_concurrency_lease(lease_id=lease, lease_duration=self.rules.lease_s)
                last_ok = time.monotonic()
            except Exception as exc:
                if _transient(exc) and time.monotonic() - last_ok < self.rules.lease_s:
                    log.warning("renewing the lock %s failed (%s); trying again in %.0f s",
                                self.name, exc, every)
                    continue
                self.lost = (f"the lease on the lock {self.name} could not be renewed "
                             f"({type(exc).__name__}: {exc}); another run may hold it now")
                log.error("%s", self.lost)
                return

    # -- giving it back ---------------------------------------------------------------------
    @staticmethod
    def release_for_dead_run(tags: list[str]) -> list[str]:
        """Free the locks a dead run held (its ``lease:`` tags), instead of waiting for the
        leases to run out; the names of the leases freed. A lease already gone is fine."""
        freed = []
        for tag in tags:
            if not tag.startswith(LEASE_TAG_PREFIX):
                continue
            lease = UUID(tag.removeprefix(LEASE_TAG_PREFIX))
            with get_client(sync_client=True, httpx_settings={"timeout": CALL_TIMEOUT_S}) as client:
                try:
                    client.release_concurrency_slots_with_lease(lease)
                except Exception as exc:
                    if _status(exc) != 404:
                        raise
            freed.append(str(lease))
        return freed

    def release(self) -> None:
        """Give the lock back. A failure is logged: the lease then runs out by itself."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=CALL_TIMEOUT_S)
        if self.lease_id is None:
            return
        lease, self.lease_id = self.lease_id, None
        try:
            with get_client(sync_client=True, httpx_settings={"timeout": CALL_TIMEOUT_S}) as client:
                client.release_concurrency_slots_with_lease(lease)
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself; say so
            log.warning("could not give back the lock %s (%s: %s); it frees itself within %d s "
                        "when its lease runs out", self.name, type(exc).__name__, exc,
                        self.rules.lease_s)
