"""The runner's working slots, with real threads: a waiting run gives its slot back, a run
that goes on is served before runs that never started, never more than max_parallel work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from gateway.slots import RunnerSlots, RunSlot

PATIENCE_S = 30.0  # only against a hang: no test waits this long when the slots work


def wait_until(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


class Run:
    """A run on its own thread, as the dispatcher's: queued, then works when it has a slot;
    ``wait()`` makes it give the slot back until ``go_on`` is set."""

    def __init__(self, slots: RunnerSlots, name: str, waits: bool = False) -> None:
        self.slots, self.name, self.waits = slots, name, waits
        self.started, self.released, self.went_on = threading.Event(), threading.Event(), threading.Event()
        self.go_on, self.finish = threading.Event(), threading.Event()
        self.working_seen: list[int] = []  # working runs, seen by this run while it worked
        self.slot: RunSlot | None = None
        slots.enqueue()  # the dispatcher counts a run as queued before its thread runs
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.slot = self.slots.start(self.name)
        if self.slot is None:
            return
        self.started.set()
        self.working_seen.append(self.slots.load().working)
        if self.waits:
            self.slot.release("approval")
            self.released.set()
            self.go_on.wait(PATIENCE_S)
            self.slot.reacquire()
            self.went_on.set()
            self.working_seen.append(self.slots.load().working)
        self.finish.wait(PATIENCE_S)
        self.slot.done()

    def end(self) -> None:
        self.finish.set()
        self.thread.join(PATIENCE_S)
        assert not self.thread.is_alive(), f"{self.name} did not end"


def _counts(slots: RunnerSlots) -> tuple[int, int, int]:
    load = slots.load()
    return load.working, load.waiting, load.queued


def test_at_most_max_parallel_runs_work_and_an_ended_run_lets_the_next_work():
    slots = RunnerSlots(max_parallel=2, max_waiting=0, max_queued=10)
    runs = [Run(slots, f"run-{i}") for i in range(4)]

    def working() -> list[Run]:
        return [r for r in runs if r.started.is_set() and r.thread.is_alive()]

    wait_until("two runs work", lambda: len(working()) == 2)
    assert _counts(slots) == (2, 0, 2)
    working()[0].end()
    wait_until("a queued run works in its place", lambda: sum(r.started.is_set() for r in runs) == 3)
    assert _counts(slots) == (2, 0, 1)
    for run in runs:
        run.end()
    assert _counts(slots) == (0, 0, 0)
    assert max(n for r in runs for n in r.working_seen) == 2


def test_no_more_than_max_parallel_ever_work():
    slots = RunnerSlots(max_parallel=3, max_waiting=0, max_queued=50)
    runs = [Run(slots, f"run-{i}") for i in range(20)]
    for run in runs:
        run.finish.set()
    for run in runs:
        run.end()
    seen = [n for r in runs for n in r.working_seen]
    assert len(seen) == 20 and max(seen) <= 3
    assert _counts(slots) == (0, 0, 0)


def test_a_waiting_run_lets_another_work_and_goes_on_before_runs_that_never_started():
    slots = RunnerSlots(max_parallel=1, max_waiting=4, max_queued=10)
    paused = Run(slots, "paused", waits=True)
    wait_until("the first run waits", paused.released.is_set)
    assert _counts(slots) == (0, 1, 0)

    other = Run(slots, "other")
    wait_until("another run works while the first waits", other.started.is_set)
    assert _counts(slots) == (1, 1, 0)

    paused.go_on.set()  # approved: it wants its slot back, the other run still works
    wait_until("the approved run asks for a slot", lambda: slots.load().resuming == 1)
    newcomer = Run(slots, "newcomer")
    assert not paused.went_on.is_set() and _counts(slots) == (1, 1, 1)

    other.end()
    wait_until("the approved run goes on", paused.went_on.is_set)
    assert not newcomer.started.is_set(), "a run that never started went before a resumed one"
    assert _counts(slots) == (1, 0, 1)
    paused.end()
    wait_until("the newcomer works", newcomer.started.is_set)
    newcomer.end()
    assert _counts(slots) == (0, 0, 0)
    assert max(n for r in (paused, other, newcomer) for n in r.working_seen) == 1


def test_nested_waits_give_the_slot_back_once():
    slots = RunnerSlots(max_parallel=1, max_waiting=0, max_queued=1)
    slots.enqueue()
    slot = slots.start("run")
    assert slot is not None
    slot.release("target lock")
    slot.release("approval, inside it")
    assert _counts(slots) == (0, 1, 0)
    slot.reacquire()
    assert _counts(slots) == (0, 1, 0), "still inside the outer wait"
    slot.reacquire()
    assert _counts(slots) == (1, 0, 0)
    with pytest.raises(RuntimeError, match="never gave it back"):
        slot.reacquire()
    slot.done()
    assert _counts(slots) == (0, 0, 0)


def test_a_run_that_ends_while_it_waits_is_counted_no_more():
    slots = RunnerSlots(max_parallel=1, max_waiting=0, max_queued=1)
    slots.enqueue()
    slot = slots.start("run")
    assert slot is not None
    slot.release("approval")
    slot.done()
    assert _counts(slots) == (0, 0, 0)


def test_the_queue_is_full_at_max_queued():
    slots = RunnerSlots(max_parallel=1, max_waiting=0, max_queued=2)
    slots.enqueue()
    assert not slots.full()
    slots.enqueue()
    assert slots.full()
    slots.unqueue()
    assert not slots.full()


def test_closing_lets_queued_runs_give_up_and_working_ones_go_on():
    slots = RunnerSlots(max_parallel=1, max_waiting=1, max_queued=10)
    working = Run(slots, "working")
    wait_until("a run works", working.started.is_set)
    queued = Run(slots, "queued")
    slots.close()
    queued.thread.join(PATIENCE_S)
    assert not queued.thread.is_alive() and queued.slot is None and not queued.started.is_set()
    assert _counts(slots) == (1, 0, 0)
    working.end()
    assert _counts(slots) == (0, 0, 0)


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_parallel >= 1"):
        RunnerSlots(max_parallel=0)
