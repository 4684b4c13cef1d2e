"""The incident history, read back from Prefect's run history.

Every scenario flow run is an incident and keeps its record with the run, as a flow run input
(``incident.record.save_record``): Prefect keeps flow runs and their inputs, while its events
are kept 7 days by default. Drill runs (flow ``drill``) end tagged ``drill-result:pass`` or
``drill-result:fail`` and ``scenario:<s>``; the remediation runs a drill starts are tagged
``drill`` and are not incidents.

Two queries, both filtered by the server and paged (``limit``/``offset``, oldest first): runs
tagged with any severity (every incident run has one: its record's managed tags) and runs tagged
with a drill result, each started in [since, until]. Each call has a timeout, the client's own
retries are off (the connection's own connect retries stay: about 1.5 s), and a call that
meets an API that is away is tried ``ATTEMPTS`` times in all, 1 s then 2 s apart, before
``HistoryUnavailableError`` says so: a refused connection fails in seconds, an API that never
answers in about two minutes at worst.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Literal, TypeVar

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from pydantic import BaseModel, Field, ValidationError

from incident.errors import TargetUnreachableError
from incident.metrics import SEVERITIES, DrillResult, utc
from incident.record import DRILL_TAG, RECORD_INPUT_PREFIX, IncidentRecord

T = TypeVar("T")

API_CALL_TIMEOUT_S = 10.0
ATTEMPTS = 3            # per call, when the API is away or overloaded (1 s, then 2 s between)
PAGE_SIZE = 200         # the server's default limit
MAX_RUNS = 20_000       # per query: a bound on the work, far above a month of incidents
DRILL_RESULT_PREFIX = "drill-result:"
DRILL_RESULTS = (f"{DRILL_RESULT_PREFIX}pass", f"{DRILL_RESULT_PREFIX}fail")
INCIDENT_TAG_PREFIX = "incident:"


class HistoryUnavailableError(TargetUnreachableError):
    """The Prefect API did not answer while the run history was read."""


class LeftOut(BaseModel):
    """A run tagged as an incident that is not counted as one, and why."""

    name: str
    started: datetime
    why: Literal["drill", "no record", "unreadable record"]
    detail: str = ""


class History(BaseModel):
    """What the run history holds for [since, until]."""

    since: datetime
    until: datetime
    incidents: list[IncidentRecord] = Field(description="incident records, drills left out")
    drills: list[DrillResult] = Field(description="finished drill runs")
    left_out: list[LeftOut] = Field(
        default=[], description="remediation runs of drills, runs without a (readable) record")
    truncated: bool = Field(default=False, description=f"a query stopped at {MAX_RUNS} runs")

    def left_out_between(self, start: datetime, end: datetime, why: str) -> list[LeftOut]:
        return [r for r in self.left_out if r.why == why and utc(start) <= r.started < utc(end)]


def _transient(exc: Exception) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and (
        exc.response.status_code >= 500 or exc.response.status_code in (408, 429))


def _call(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, tried again on an API that is away; then a clear error."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn()
        except Exception as exc:
            if not _transient(exc):
                raise
            if attempt == ATTEMPTS:
                url = PREFECT_API_URL.value() or "(PREFECT_API_URL is not set)"
                raise HistoryUnavailableError(
                    f"Prefect API {url}",
                    f"no answer while reading {what} ({type(exc).__name__}: {exc or 'no detail'}; "
                    f"{ATTEMPTS} attempts, {API_CALL_TIMEOUT_S:.0f} s timeout each)",
                    "the run history",
                    "check that the Prefect server runs and that PREFECT_API_URL points to it, "
                    "then run incident-metrics again",
                ) from exc
            time.sleep(attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _runs(client: SyncPrefectClient, tags: list[str], since: datetime, until: datetime,
          page_size: int, max_runs: int) -> tuple[list[FlowRun], bool]:
    """Runs with any of ``tags`` started in [since, until], oldest first; and whether the
    query stopped at ``max_runs``."""
    flt = FlowRunFilter(
        tags=FlowRunFilterTags(any_=tags),
        start_time=FlowRunFilterStartTime.model_validate({"after_": since, "before_": until}))
    runs: list[FlowRun] = []
    while True:
        offset, limit = len(runs), min(page_size, max_runs - len(runs))
        if limit <= 0:
            return runs, True
        page = _call(f"flow runs tagged {' or '.join(tags)} (offset {offset})",
                     lambda: client.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.START_TIME_ASC,
                                                   limit=limit, offset=offset))
        runs += page
        if len(page) < limit:
            return runs, False


def _record(client: SyncPrefectClient, run: FlowRun) -> IncidentRecord | None:
    """The run's newest saved record (the keys sort by time), or None."""
    saved = _call(f"the saved record of {run.name}",
                  lambda: client.filter_flow_run_input(run.id, RECORD_INPUT_PREFIX, 100, set()))
    if not saved:
        return None
    return IncidentRecord.model_validate_json(max(saved, key=lambda i: i.key).value)


def _started(run: FlowRun, fallback: datetime) -> datetime:
    return utc(run.start_time or run.expected_start_time or run.created or fallback)


def _scenario(tags: list[str]) -> str | None:
    return next((t.split(":", 1)[1] for t in tags if t.startswith("scenario:")), None)


def read_history(since: datetime, until: datetime, *, page_size: int = PAGE_SIZE,
                 max_runs: int = MAX_RUNS) -> History:
    """The incident records and drill results of the runs started in [since, until].

    Incident runs are those tagged ``incident:<id>`` with a saved record; a run of a drill
    (tagged ``drill``, its record marked as a drill's, or started by a drill trigger) is counted
    in ``left_out`` instead, as is a run with no readable record. Raises
    ``HistoryUnavailableError`` when the Prefect API does not answer.
    """
    since, until = utc(since), utc(until)
    incidents: list[IncidentRecord] = []
    drills: list[DrillResult] = []
    left_out: list[LeftOut] = []
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}), \
            get_client(sync_client=True, httpx_settings={"timeout": httpx.Timeout(API_CALL_TIMEOUT_S)}) as client:
        tagged, cut_a = _runs(client, [f"severity:{s}" for s in SEVERITIES], since, until, page_size, max_runs)
        finished, cut_b = _runs(client, list(DRILL_RESULTS), since, until, page_size, max_runs)
        for run in tagged:
            if any(t.startswith(DRILL_RESULT_PREFIX) for t in run.tags):
                continue  # a drill's own run: read below
            if not any(t.startswith(INCIDENT_TAG_PREFIX) for t in run.tags):
                continue
            started = _started(run, until)
            try:
                record = _record(client, run)
            except ValidationError as exc:
                left_out.append(LeftOut(name=run.name, started=started, why="unreadable record",
                                        detail=f"{exc.error_count()} validation errors"))
                continue
            if record is None:
                left_out.append(LeftOut(name=run.name, started=started, why="no record"))
            elif DRILL_TAG in run.tags or record.drill is not None or record.trigger.kind == "drill":
                left_out.append(LeftOut(name=run.name, started=started, why="drill"))
            else:
                incidents.append(record)
    for run in finished:
        drills.append(DrillResult(name=run.name, scenario=_scenario(run.tags),
                                  passed=DRILL_RESULTS[0] in run.tags,
                                  at=_started(run, until)))
    return History(since=since, until=until, incidents=incidents, drills=drills, left_out=left_out,
                   truncated=cut_a or cut_b)
