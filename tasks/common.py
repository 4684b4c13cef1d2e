"""What every task shares: the two task presets and the result type of changing tasks.

Every task that touches a live system is one of two kinds, declared with a preset:

* ``@read_only_task``: looks, never changes. No result cache (a live system must be read
  afresh), retried only on errors marked transient (a target that did not answer).
* ``@changing_task``: changes the system. No result cache, never retried blindly, tagged
  ``changing``. It checks the state first and returns ``changed=False`` ("already fine")
  instead of acting twice. Flows call it only through the scenario kit's ``change()``
  (``incident/kit.py``), the one choke point where plans are approved and actions recorded;
  ``tests/deployments/test_contract.py`` checks that no flow calls one directly.
"""

from __future__ import annotations

import time
from typing import Any, Callable, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from incident.errors import RunbookError

READ_ONLY_TAG = "read-only"
CHANGING_TAG = "changing"

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def only_transient_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only errors marked transient."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - inspected, not swallowed
            exc = raised
    return isinstance(exc, RunbookError) and exc.transient


def read_only_task(fn: Callable[P, R]) -> Task[P, R]:
    """A task that only reads a live system: no cache, retried on transient errors only."""
    return task(
        cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
        retry_condition_fn=only_transient_errors, tags=[READ_ONLY_TAG],
    )(fn)


def changing_task(fn: Callable[P, R]) -> Task[P, R]:
    """A task that changes a live system: no cache, no retries, tagged ``changing``."""
    return task(cache_policy=NO_CACHE, retries=0, tags=[CHANGING_TAG])(fn)


def count_consecutive(check: Callable[[], T], good: Callable[[T], bool], consecutive: int, deadline_s: float,
                      interval_s: float, streak_so_far: int = 0) -> tuple[int, int, T]:
    """The one verify loop: ``check()`` every ``interval_s`` until ``consecutive`` good results in
    a row, or the deadline passes. Returns (the streak at the end, checks made, the last result).

    ``streak_so_far``: good results already seen in a row just before (e.g. the probe that showed
    a restart worked); the streak continues from there, one interval later.
    """
    deadline = time.monotonic() + deadline_s
    streak, checks = streak_so_far, 0
    if streak:
        time.sleep(interval_s)
    while True:
        last = check()
        checks += 1
        streak = streak + 1 if good(last) else 0
        if streak >= consecutive or time.monotonic() >= deadline:
            return streak, checks, last
        time.sleep(interval_s)


class DependencyCheck(BaseModel):
    """A connection check of a dependency: a failed check is an observation, not an error."""

    name: str
    address: str
    ok: bool
    detail: str


class ActionResult(BaseModel):
    """What a changing task did: ``changed=False`` means it found the target already fine."""

    action: str
    target: str
    changed: bool
    detail: str
