"""Close the records of runs that died without closing them.

A run closes its own record whatever stops it *while its process lives* (the state hooks of
``incident.kit.runbook_flow``). When the process itself is gone - a worker killed with its
runs, a machine lost, a gateway killed (its start-up recovery handles its own runs) - nobody
is left to do it. ``sweep_abandoned_runs`` finds those runs on the Prefect server and closes
their saved records from outside, with an escalation:

* a run that is final (Crashed, Failed, Cancelled) but whose record is still open;
* a run still Running or Paused whose heartbeats (``prefect.flow-run.heartbeat``, every
  ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` s, 180 by default) stopped more than
  ``RUNBOOKS_STALE_RUN_AFTER_S`` ago: it is marked Crashed first, so it never resumes.

The alert gateway runs it every ``RUNBOOKS_GATEWAY_SWEEP_INTERVAL_S``; it is safe to run from
several places at once (closing a closed record does nothing).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterStartTime,
                                            FlowRunFilterState, FlowRunFilterStateType)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Crashed

from incident.kit import close_run_from_outside

log = logging.getLogger("incident.sweeper")

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
_LOOK_BACK = timedelta(days=1)
_FINAL_GRACE = timedelta(seconds=30)  # a run's own failure hook may still be closing it


def _open_incident(run: FlowRun) -> bool:
    tags = run.tags or []
    return any(t.startswith("incident:") for t in tags) and not any(t.startswith("outcome:") for t in tags)


def _last_heartbeat(client: Any, run: FlowRun) -> datetime | None:
    resp = client.request("POST", "/events/filter", json={
        "filter": {"event": {"name": [HEARTBEAT_EVENT]},
                   "resource": {"id": [f"prefect.flow-run.{run.id}"]},
                   "occurred": {"since": (run.start_time or run.created or _now() - _LOOK_BACK).isoformat()},
                   "order": "DESC"},
        "limit": 1,
    })
    events = resp.json().get("events") or []
    return datetime.fromisoformat(events[0]["occurred"].replace("Z", "+00:00")) if events else None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def sweep_abandoned_runs(stale_after_s: float, final_grace_s: float = _FINAL_GRACE.total_seconds()) -> list[str]:
    """Close the open records of dead runs (see the module docstring); their incident tags.
    A run that ended less than ``final_grace_s`` ago is left to its own failure hook."""
    now = _now()
    closed: list[str] = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[
                StateType.RUNNING, StateType.PAUSED, StateType.CRASHED, StateType.FAILED,
                StateType.CANCELLED])),
            start_time=FlowRunFilterStartTime.model_validate({"after_": now - _LOOK_BACK})), limit=200)
        for run in filter(_open_incident, runs):
            state = run.state
            if state is None:
                continue
            if state.is_final():
                ended = run.end_time or state.timestamp
                if ended and (now - ended).total_seconds() < final_grace_s:
                    continue
                why = f"the run ended {state.name} without closing its incident record"
            else:
                beat = _last_heartbeat(client, run) or run.start_time
                if beat is None or (now - beat).total_seconds() < stale_after_s:
                    continue
                why = (f"the run's process stopped answering while {state.name} (no heartbeat for "
                       f"{int((now - beat).total_seconds())} s; its worker or machine died); it was "
                       "marked Crashed and will not continue")
                client.set_flow_run_state(run.id, Crashed(message=why), force=True)
            if close_run_from_outside(UUID(str(run.id)), why):
                tag = next(t for t in run.tags if t.startswith("incident:"))
                log.warning("closed the abandoned record of %s (%s): %s", tag, run.id, why)
                closed.append(tag)
    return closed
