"""Runs that wait give their runner slot back.

A run waiting for a human (an approval) or for another run (a target's lock) does no work;
it must not keep a slot that a new incident's run needs. Whoever executes runs (the alert
gateway's runner) registers a ``RunnerSlot`` for each run it executes; the approval gate and
the target lock wrap their waits in ``waiting(...)``, which gives the slot back for the
duration of the wait and takes it again before the run goes on.

A run executed elsewhere (a Prefect worker, ``python flows/x.py``) has no registered slot:
``waiting`` then only keeps the clock.

The clock: a run that waits does not stop its incident's clock. ``register_clock`` gives
``waiting`` what to call every ``RUNBOOKS_COMMS_TICK_S`` meanwhile (incident/comms.py: move
up the escalation ladder, send the status updates that fall due).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from prefect.runtime import flow_run as current_run

from incident.settings import get_settings


class RunnerSlot(Protocol):
    """One run's place among the runner's working runs."""

    def release(self, why: str) -> None:
        """The run starts waiting: the slot may serve another run meanwhile."""

    def reacquire(self) -> None:
        """The run goes on: block until it has a working slot again."""


_SLOTS: dict[str, RunnerSlot] = {}
_CLOCKS: dict[str, Callable[[], None]] = {}
_LOCK = threading.Lock()
_log = logging.getLogger("runbooks.comms")


def register_clock(flow_run_id: str, tick: Callable[[], None]) -> None:
    with _LOCK:
        _CLOCKS[str(flow_run_id)] = tick


def unregister_clock(flow_run_id: str) -> None:
    with _LOCK:
        _CLOCKS.pop(str(flow_run_id), None)


def _keep_time(tick: Callable[[], None], stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            tick()
        except Exception:  # the wait goes on; the next tick tries again
            _log.exception("the incident's clock failed while the run waited; it tries again "
                           "in %s s", every_s)


def register_slot(flow_run_id: str, slot: RunnerSlot) -> None:
    with _LOCK:
        _SLOTS[str(flow_run_id)] = slot


def unregister_slot(flow_run_id: str) -> None:
    with _LOCK:
        _SLOTS.pop(str(flow_run_id), None)


@contextmanager
def waiting(why: str) -> Iterator[None]:
    """Wrap a wait of the current run: its runner slot is free meanwhile (if it has one)."""
    run_id = current_run.get_id()
    with _LOCK:
        slot = _SLOTS.get(str(run_id)) if run_id else None
        tick = _CLOCKS.get(str(run_id)) if run_id else None
    stop = threading.Event()
    if tick is not None:  # in the run's context, so that what it records lands on this run
        ctx = contextvars.copy_context()
        threading.Thread(target=ctx.run, args=(_keep_time, tick, stop, get_settings().comms_tick_s),
                         name=f"clock-{run_id}", daemon=True).start()
    try:
        if slot is None:
            yield
            return
        slot.release(why)
        try:
            yield
        finally:
            slot.reacquire()
    finally:
        stop.set()
