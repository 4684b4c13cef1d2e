"""A run waiting for approval against the real lab and the real Prefect server rides out an
API outage. (When nobody answers, the message says truly what the run had changed before it
paused: tests/flows/test_service_down.py, the approval timeout.)

The outage test stops the session's Prefect server (by the PID it recorded), keeps it down
longer than Prefect's own pause loop survives (its client gives up after ~60 s of connection
errors), starts it again on the same port with the same database, and approves. The outage
length is ``RUNBOOKS_TEST_API_OUTAGE_S`` (default 75 s); for a long run by hand::

    RUNBOOKS_TEST_API_OUTAGE_S=660 .venv/bin/python -m pytest tests/incident/test_approval_outage.py -k outage
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel
from prefect.events import emit_event
from prefect.flow_runs import resume_flow_run

from flows.service_down import service_down
from lab.proc import wait_until
from tasks.http_checks import check_health
from tests.helpers import report, run_id_of, start_flow, wait_paused

pytestmark = pytest.mark.lab

OUTAGE_S = float(os.environ.get("RUNBOOKS_TEST_API_OUTAGE_S", "75"))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _health(lab) -> int | None:
    return check_health(lab.info.health_url, timeout_s=2).status_code


def _event_reaches_the_server(api_url: str) -> bool:
    """Emit a fresh event from this process and find it on the server (the events client
    reconnects after the restart: escalations of later tests need it)."""
    marker = f"runbooks.test.{uuid.uuid4().hex[:12]}"
    emit_event("runbooks.test.after-restart", resource={"prefect.resource.id": marker})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        resp = httpx.post(f"{api_url}/events/filter", timeout=10, json={
            "filter": {"resource": {"id": [marker]}}, "limit": 1})
        if resp.status_code == 200 and resp.json()["events"]:
            return True
        time.sleep(1)
    return False


@pytest.mark.timeout(OUTAGE_S + 600)
def test_waiting_run_rides_out_an_api_outage_and_is_approved_after_it(
        restartable_prefect, healthy_web, monkeypatch):
    lab, server = healthy_web, restartable_prefect
    monkeypatch.setenv("RUNBOOKS_APPROVAL_TIMEOUT_S", str(int(OUTAGE_S) + 300))
    lab.deploy_broken_web()
    assert _health(lab) is None

    warnings = _Collect()
    logging.getLogger("prefect.flow_runs").addHandler(warnings)
    try:
        thread, incident_id = start_flow(service_down, target="web", restart_deadline_s=8,
                                         verify_deadline_s=40)
        run_id = run_id_of(incident_id)
        wait_paused(run_id)  # restarted (lab policy), still down: waits for the rollback approval

        server.stop()
        try:
            time.sleep(OUTAGE_S)
            assert thread.is_alive(), f"the waiting run died during the API outage: {thread.state}"
        finally:
            server.start()

        assert thread.is_alive(), "the run stopped waiting while the API was away"
        resume_flow_run(run_id, run_input={"approver": "Grace Hopper", "decision": "approve",
                                           "reason": "broken release after the outage"})
        thread.join(timeout=240)
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(warnings)

    assert thread.state is not None and thread.state.is_completed(), thread.state
    assert thread.state.name == "Completed", thread.state
    assert _health(lab) == 200
    container = lab.docker_client().containers.get(lab.info.container_name)
    assert container.image.tags[0] == "lab-web:1.1", "the approved rollback did not run"

    text = report(incident_id)
    assert "**Status:** resolved" in text
    assert "| rollback_container | approved | Grace Hopper | broken release after the outage |" in text
    assert "| rollback_container | lab-web | yes |" in text

    unreachable = [w for w in warnings.lines if "Prefect API is unreachable" in w]
    assert len(unreachable) >= 2, f"expected a WARNING per failed check, got {warnings.lines}"
    assert any("answers again" in w for w in warnings.lines), warnings.lines
    def back_in_the_runs_logs() -> bool:  # shipped by Prefect's log worker, in its own time
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[run_id]), level=LogFilterLevel(ge_=logging.WARNING)))
        return any("answers again" in log.message for log in logs)

    assert wait_until(back_in_the_runs_logs, 30, 1.0), "the 'answers again' warning never reached the run's logs"

    assert server.answers() and _event_reaches_the_server(server.api_url), \
        "after the restart the session's server must answer on the same URL, events included"
