"""The logs-backlog runbook against the real lab: a consumer that stopped consuming (restarted,
the drain measured) from a real QueueBacklogHigh alert; a flooded log rotated over real SSH
under the application's own flock with no line lost, together with a stuck consumer; and a
consumer stuck again right after its restart (escalated with the measured rate)."""

from __future__ import annotations

import gzip
import re
import threading
import time
from pathlib import Path
from uuid import UUID

import pytest

from flows.logs_backlog import logs_backlog
from incident.inventory import load_target
from lab.proc import LabError
from tasks.redis import redis_client
from tests.helpers import (alert_ids, escalations, new_incident_id, report, wait_for, wait_for_alert_incident,
                           wait_run_final)

pytestmark = pytest.mark.lab

SCENARIO = "logs-backlog"
CONSUMER_POLICY = "| restart_container | approved | policy:restart-stateless-container-in-lab |"
ROTATE_POLICY = "| rotate_log_file | approved | policy:rotate-log-in-lab |"
SEQ = re.compile(rb"^seq=(\d+) ")
#: short verification windows: the lab's consumer drains its whole list in one tick
FAST = dict(backlog_samples=3, sample_interval_s=0.5, drain_deadline_s=15, hold_s=2, first_line_wait_s=10)


def _queue(lab):
    target = load_target("web", lab.inventory_path)
    return target, target.service.app.queue


def _fill_backlog(lab, jobs: int = 120) -> None:
    """Jobs on the stalled queue, beyond max_backlog at once (the traffic alone takes seconds)."""
    target, queue = _queue(lab)
    client = redis_client(target.app_redis)
    try:
        client.lpush(queue.key, *(f"test-{i}" for i in range(jobs)))
    finally:
        client.close()
    wait_for(lambda: (lab.app.backlog() or 0) > queue.max_backlog, "the backlog over max_backlog", 10)


def _seqs(data: bytes) -> list[int]:
    """The seq of every complete line."""
    lines = data.split(b"\n")[:-1]  # a line being written (no newline yet) is not counted
    return [int(m.group(1)) for m in (SEQ.match(line) for line in lines) if m]


def _started_at(container) -> str:
    container.reload()
    return container.attrs["State"]["StartedAt"]


def test_stuck_consumer_from_alert_is_restarted_and_drain_measured(quiet_pipeline):
    lab, store = quiet_pipeline
    since = alert_ids(store)
    lab.inject("queue-consumer-stuck")
    _fill_backlog(lab)  # past max_backlog now, not after seconds of traffic

    row = wait_for_alert_incident(store, SCENARIO, since)
    run = wait_run_final(UUID(row["flow_run_id"]))

    assert run.state.is_completed() and run.state.name == "Completed", run.state.message
    assert lab.fault_healthy("queue-consumer-stuck")
    text = report(row["incident_id"])
    assert "**Status:** resolved" in text
    assert "alertname=QueueBacklogHigh" in text
    assert CONSUMER_POLICY in text
    assert "| restart_container | lab-worker | yes |" in text
    findings = text.split("## Findings", 1)[1].split("## Approvals", 1)[0]
    assert "| queue backlog | **problem** |" in findings and "growing" in findings, "the trend before the fix"
    assert "it does not consume (stuck)" in findings, "the consumer runs, yet the backlog grows"
    verification = text.split("## Verification", 1)[1].split("##", 1)[0]
    assert "drained" in verification and "NOT drained" not in verification
    assert re.search(r"measured drain rate at least \d+\.\d jobs/s \(required 1\)", verification), verification
    assert "LLEN samples after the fix: " in verification
    assert "| rotate_log_file |" not in text, "the log was within its limit: not rotated"


def test_flooded_log_and_stuck_consumer_are_both_fixed_with_no_line_lost(prefect_api, healthy_lab):
    lab = healthy_lab
    spec = load_target("web", lab.inventory_path).service.app.log
    log = Path(spec.path)
    older = [Path(f"{spec.path}.{n}.gz") for n in range(1, spec.keep + 1)]
    for n, path in enumerate(older, 1):  # copies of earlier rotations: they shift, the last one goes
        path.write_bytes(gzip.compress(f"copy {n}\n".encode()))
    last_before = max(_seqs(log.read_bytes()) or [0])
    lab.inject("app-log-flood")
    lab.inject("queue-consumer-stuck")
    _fill_backlog(lab)
    incident_id = new_incident_id()
    try:
        state = logs_backlog(target="web", incident_id=incident_id, return_state=True, **FAST)

        assert state.is_completed() and state.name == "Completed", state.message
        assert lab.fault_healthy("app-log-flood") and lab.fault_healthy("queue-consumer-stuck")
        rotated = gzip.decompress(older[0].read_bytes())
        live = log.read_bytes()
        assert len(rotated) > spec.max_bytes > len(live), "the flood went to the copy; the live file is small"
        seqs = [s for s in _seqs(rotated) + _seqs(live) if s > last_before]
        assert seqs == list(range(last_before + 1, seqs[-1] + 1)), "a line was lost or doubled"
        assert _seqs(rotated)[-1] + 1 == _seqs(live)[0], "the rotation's boundary"
        for n, path in enumerate(older[1:], 1):  # .1 -> .2, .2 -> .3; the former .3 (beyond keep) is gone
            assert gzip.decompress(path.read_bytes()) == f"copy {n}\n".encode()
        assert not Path(f"{spec.path}.1").exists() and not Path(f"{spec.path}.{spec.keep + 1}.gz").exists()

        text = report(incident_id)
        assert "**Status:** resolved" in text
        assert CONSUMER_POLICY in text and ROTATE_POLICY in text
        assert "| restart_container | lab-worker | yes |" in text
        assert re.search(r"\| rotate_log_file \| \S+app\.log on root@127\.0\.0\.1:\d+ \| yes \|", text)
        assert f"removed the oldest copy beyond keep={spec.keep}" in text
        assert "| log file | **problem** |" in text
        verification = text.split("## Verification", 1)[1].split("##", 1)[0]
        assert "gzip -t ok" in verification and "no line lost" in verification
        assert "measured drain rate at least" in verification
    finally:
        for path in log.parent.glob(f"{log.name}.*"):
            path.unlink()


def test_consumer_stuck_again_after_restart_escalates_with_the_measured_rate(prefect_api, healthy_lab):
    lab = healthy_lab
    worker = lab.docker_client().containers.get("lab-worker")
    started = _started_at(worker)
    lab.inject("queue-consumer-stuck")
    _fill_backlog(lab)
    done = threading.Event()

    def stall_again() -> None:
        """As soon as the runbook restarted the consumer, stall it again (a consumer that breaks
        again at once: the restart does not help)."""
        while not done.is_set() and _started_at(worker) == started:
            time.sleep(0.05)
        while not done.is_set():
            try:
                lab.app.worker_chaos("stall=1")
                return
            except LabError:  # not listening yet
                time.sleep(0.05)

    staller = threading.Thread(target=stall_again, daemon=True)
    staller.start()
    incident_id = new_incident_id()
    try:
        state = logs_backlog(target="web", incident_id=incident_id, return_state=True,
                             **{**FAST, "drain_deadline_s": 4})

        assert state.is_failed(), state
        assert "did not drain as required" in state.message and "jobs/s" in state.message, state.message
        assert not lab.fault_healthy("queue-consumer-stuck")
        text = report(incident_id)
        assert "**Status:** failed" in text
        assert CONSUMER_POLICY in text and "| restart_container | lab-worker | yes |" in text
        escalation = text.split("## Escalations", 1)[1]
        assert re.search(r"growing \d+\.\d jobs/s", escalation), "the measured rate belongs in the escalation"
        assert "LLEN samples after the fix" in escalation
        assert "this run changed: restart_container on lab-worker" in escalation
        assert "docker logs lab-worker" in escalation, "what to do next"
        assert escalations(prefect_api, incident_id), "no escalation event reached Prefect"
    finally:
        done.set()
        staller.join(timeout=5)
        lab.reset_fault("queue-consumer-stuck")
    assert lab.fault_healthy("queue-consumer-stuck")


def test_small_log_and_consumed_queue_are_left_alone(prefect_api, healthy_lab):
    lab = healthy_lab
    worker = lab.docker_client().containers.get("lab-worker")
    started = _started_at(worker)
    log = Path(load_target("web", lab.inventory_path).service.app.log.path)
    incident_id = new_incident_id()

    state = logs_backlog(target="web", incident_id=incident_id, return_state=True, backlog_samples=2,
                         sample_interval_s=0.5)

    assert state.is_completed() and state.name == "Already Fine", state.message
    assert _started_at(worker) == started, "a consumer that keeps up was restarted"
    assert not list(log.parent.glob(f"{log.name}.*")), "a log within its limit was rotated"
    text = report(incident_id)
    assert "| - | none | - | - | - |" in text, "an action was recorded"
    assert "| log file | ok |" in text and "| queue backlog | ok |" in text and "| consumer | ok |" in text
