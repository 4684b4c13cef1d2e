"""What every task shares: the retry rule and the result type of changing tasks.

Tasks that only read may be retried, and only on transient errors (a target that
did not answer). Changing tasks are never retried blindly: they check the state
first and report "already fine" instead of acting twice.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from incident.errors import RunbookError


def only_transient_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only errors marked transient."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - inspected, not swallowed
            exc = raised
    return isinstance(exc, RunbookError) and exc.transient


#: keyword arguments for read-only tasks that touch a live system
READ_ONLY = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=only_transient_errors)


class ActionResult(BaseModel):
    """What a changing task did: ``changed=False`` means it found the target already fine."""

    action: str
    target: str
    changed: bool
    detail: str
