"""Helpers shared by the flow tests: run a flow in the background, find its run, wait for
its approval pause, read its incident report, find its escalation events.

Fixtures that start real servers live in ``tests/conftest.py``; these are plain functions.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

from incident.escalation import ESCALATED_EVENT


def new_incident_id() -> str:
    return f"INC-TEST-{uuid.uuid4().hex[:8]}"


def run_id_of(incident_id: str, timeout_s: float = 60.0):
    """The flow run tagged with the incident (the record names and tags its run)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"incident:{incident_id}"]))
            )
            if runs:
                return runs[0].id
            time.sleep(0.5)
    raise AssertionError(f"no flow run tagged incident:{incident_id}")


def wait_paused(run_id, timeout_s: float = 120.0):
    """Wait until the run pauses for approval and its form's schema is saved (the UI needs it)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_paused():
                keyset = run.state.state_details.run_input_keyset or {}
                try:
                    client.read_flow_run_input(run_id, keyset["schema"])
                    return run
                except (KeyError, ObjectNotFound, PrefectHTTPStatusError):
                    pass
            assert not (run.state and run.state.is_final()), f"run ended before pausing: {run.state}"
            time.sleep(0.5)
    raise AssertionError("the run never paused for approval")


def report(incident_id: str, missing_ok: bool = False) -> str:
    """The latest version of the incident's report artifact, as the UI shows it; with
    ``missing_ok``, "" while the run has not published it yet."""
    key = "incident-" + incident_id.lower()
    resp = httpx.get(f"{os.environ['PREFECT_API_URL']}/artifacts/{key}/latest", timeout=10)
    if missing_ok and resp.status_code == 404:
        return ""
    assert resp.status_code == 200, f"no artifact with key {key}: {resp.status_code}"
    return resp.json()["data"]


def wait_for(predicate: Any, what: str, timeout_s: float = 60.0) -> None:
    """Poll ``predicate`` every 0.5 s; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def escalations(api_url: str, incident_id: str, timeout_s: float = 30.0) -> list[dict]:
    """The ``runbooks.incident.escalated`` events of the incident (waits for the first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = httpx.post(f"{api_url}/events/filter", timeout=10, json={
            "filter": {"event": {"name": [ESCALATED_EVENT]},
                       "resource": {"id": [f"runbooks.incident.{incident_id}"]}},
            "limit": 10,
        })
        resp.raise_for_status()
        found = resp.json()["events"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def run_tags(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).tags


class FlowThread(threading.Thread):
    """Run a flow in the background, as a worker would, keeping its final state."""

    def __init__(self, flow: Any, **params: Any) -> None:
        super().__init__(daemon=True)
        self.flow = flow
        self.params = params
        self.state = None

    def run(self) -> None:
        self.state = self.flow(**self.params, return_state=True)


def start_flow(flow: Any, **params: Any) -> tuple[FlowThread, str]:
    """Start ``flow`` in a thread with a fresh incident id; returns (thread, incident_id)."""
    incident_id = params.pop("incident_id", None) or new_incident_id()
    thread = FlowThread(flow, incident_id=incident_id, **params)
    thread.start()
    return thread, incident_id


def alert_ids(store: Any) -> set[int]:
    """The ids of the alerts the gateway's store has seen so far (``since`` for the next call)."""
    return {r["id"] for r in store.recent_alerts(1000)}


def wait_for_alert_incident(store: Any, scenario: str, since: set[int], timeout_s: float = 90.0) -> dict:
    """The first alert (not in ``since``) that opened an incident of ``scenario`` and started its
    run: the gateway store's row (``incident_id``, ``flow_run_id``, ``source``, ``scenario`` ...)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for row in store.recent_alerts(200):
            if (row["id"] not in since and row["disposition"] == "opened" and row.get("flow_run_id")
                    and (row["scenario"] or "").split("/")[0] == scenario):
                return row
        time.sleep(0.25)
    seen = [(r["source"], r["disposition"], r["scenario"]) for r in store.recent_alerts(20) if r["id"] not in since]
    raise AssertionError(f"no alert opened a {scenario} incident within {timeout_s:.0f}s; arrived: {seen}")


def wait_run_final(run_id: Any, timeout_s: float = 180.0) -> Any:
    """The flow run once it reached a final state (Completed, Failed, Crashed, Cancelled)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} did not end within {timeout_s:.0f}s")
