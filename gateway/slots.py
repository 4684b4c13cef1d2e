"""The runner's working slots: how many runs work at once, and which wait or queue.

The gateway's runner executes flow runs in threads of its own process. A run that waits -
for a human's approval, for another run's lock on its target - does no work; if it kept
its slot, 16 runs paused for approval would stop every new incident's run. So:

* ``max_parallel`` working slots: a run works only while it holds one;
* a run that starts waiting gives its slot back (``RunnerSlot.release``, called by
  ``incident.waiting.waiting``) and takes one again when it goes on (``reacquire``);
  a run that goes on is served before runs that never started: it has made changes
  and holds locks, a new one has not;
* runs not yet working are queued; ``full()`` tells the intake to refuse new firing
  alerts (503, the sender retries) instead of queueing without bound.

The threads are the dispatcher's (``max_parallel + max_waiting`` of them); this class only
counts and blocks, so it can be tested with plain threads.
"""

from __future__ import annotations

import logging
import threading

from pydantic import BaseModel

log = logging.getLogger("gateway.runner")


class RunnerLoad(BaseModel):
    """What the runner does now (``GET /healthz``, ``runner``)."""

    working: int
    """runs holding a working slot"""
    waiting: int
    """runs that gave their slot back while they wait (approval, target lock), including
    those done waiting that wait for a slot to go on (``resuming``)"""
    resuming: int
    """waiting runs that are done waiting and wait for a working slot"""
    queued: int
    """runs created (or being created) that have not had a working slot yet"""
    max_parallel: int
    max_waiting: int
    max_queued: int


class RunnerSlots:
    """The working slots of one runner, shared by its runs' threads."""

    def __init__(self, max_parallel: int = 16, max_waiting: int = 64, max_queued: int = 32) -> None:
        if max_parallel < 1 or max_waiting < 0 or max_queued < 1:
            raise ValueError(f"runner limits must be max_parallel >= 1, max_waiting >= 0, max_queued >= 1; "
                             f"got {max_parallel}, {max_waiting}, {max_queued}")
        self.max_parallel = max_parallel
        self.max_waiting = max_waiting
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._working = 0
        self._waiting = 0
        self._resuming = 0
        self._queued = 0
        self._closed = False

    # -- the queue ------------------------------------------------------------------------
    def enqueue(self) -> None:
        """A run will be executed: it counts as queued until ``start`` gives it a slot."""
        with self._cond:
            self._queued += 1

    def unqueue(self) -> None:
        """A queued run will not be executed after all (its creation failed)."""
        with self._cond:
            self._queued -= 1

    def full(self) -> bool:
        with self._cond:
            return self._queued >= self.max_queued

    def load(self) -> RunnerLoad:
        with self._cond:
            return RunnerLoad(working=self._working, waiting=self._waiting, resuming=self._resuming,
                              queued=self._queued, max_parallel=self.max_parallel,
                              max_waiting=self.max_waiting, max_queued=self.max_queued)

    # -- a run's life -----------------------------------------------------------------------
    def start(self, run_id: str) -> RunSlot | None:
        """Block until a working slot is free (and no waiting run wants to go on); the queued
        run then holds it. None when the runner closed meanwhile: the run never started."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (
                self._working < self.max_parallel and not self._resuming))
            self._queued -= 1
            if self._closed:
                return None
            self._working += 1
            return RunSlot(self, run_id)

    def close(self) -> None:
        """Queued runs blocked in ``start`` give up; working and waiting runs go on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _release(self, run_id: str, why: str) -> None:
        with self._cond:
            self._working -= 1
            self._waiting += 1
            self._cond.notify_all()
        log.info("run %s waits (%s): its runner slot is free", run_id, why)

    def _reacquire(self) -> None:
        with self._cond:
            self._resuming += 1
            try:
                self._cond.wait_for(lambda: self._working < self.max_parallel)
            finally:
                self._resuming -= 1
                self._cond.notify_all()  # runs that never started may go once no one resumes
            self._waiting -= 1
            self._working += 1

    def _done(self, holding: bool) -> None:
        with self._cond:
            if holding:
                self._working -= 1
            else:
                self._waiting -= 1
            self._cond.notify_all()


class RunSlot:
    """One run's working slot (an ``incident.waiting.RunnerSlot``). Waits may nest (a wait
    inside a wait): the slot is given back by the outermost and taken again when it ends."""

    def __init__(self, slots: RunnerSlots, run_id: str) -> None:
        self._slots = slots
        self.run_id = run_id
        self._waits = 0  # only the run's own thread changes it

    def release(self, why: str) -> None:
        self._waits += 1
        if self._waits == 1:
            self._slots._release(self.run_id, why)

    def reacquire(self) -> None:
        if self._waits == 0:
            raise RuntimeError(f"run {self.run_id} takes its runner slot again but never gave it back: "
                               "call reacquire() only after release() (incident.waiting.waiting does)")
        self._waits -= 1
        if self._waits == 0:
            self._slots._reacquire()

    def done(self) -> None:
        """The run ended (holding its slot, or while it waited): the runner counts it no more."""
        self._slots._done(holding=self._waits == 0)
