"""Runs that wait give their runner slot back.

A run waiting for a human (an approval) or for another run (a target's lock) does no work;
it must not keep a slot that a new incident's run needs. Whoever executes runs (the alert
gateway's runner) registers a ``RunnerSlot`` for each run it executes; the approval gate and
the target lock wrap their waits in ``waiting(...)``, which gives the slot back for the
duration of the wait and takes it again before the run goes on.

A run executed elsewhere (a Prefect worker, ``python flows/x.py``) has no registered slot:
``waiting`` then does nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from prefect.runtime import flow_run as current_run


class RunnerSlot(Protocol):
    """One run's place among the runner's working runs."""

    def release(self, why: str) -> None:
        """The run starts waiting: the slot may serve another run meanwhile."""

    def reacquire(self) -> None:
        """The run goes on: block until it has a working slot again."""


_SLOTS: dict[str, RunnerSlot] = {}
_LOCK = threading.Lock()


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
    if slot is None:
        yield
        return
    slot.release(why)
    try:
        yield
    finally:
        slot.reacquire()
