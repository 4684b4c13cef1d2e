"""Benchmark: approval submitted -> the approved step starts (not a test).

Starts its own Prefect server and lab. With no auto-approval policy, N times: kill the web
container, run the service-down flow in a thread (as a worker or the gateway's runner
does), wait until it pauses for the restart's approval, submit the approval
(``resume_flow_run`` with the form, as the UI does) and stop the clock when the run
records "starting restart_container" - saved just before the changing task runs - and
when the task run itself starts on the server. The paused run polls for the decision every
``RUNBOOKS_APPROVAL_POLL_S`` (default 2 s): that bounds the figure.

    .venv/bin/python bench/approval.py [--runs 5] [--poll-s 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

from _state import STATE  # noqa: E402  (first: sets the state dir)

from deployments.stack import free_port, prefect_env, start_prefect_server, stop_pid  # noqa: E402

PORT = free_port()
os.environ.update(prefect_env(STATE / "prefect", f"http://127.0.0.1:{PORT}/api"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
NO_POLICIES = STATE / "no-policies.yaml"
NO_POLICIES.write_text("policies: []\n")
os.environ["RUNBOOKS_POLICIES"] = str(NO_POLICIES)

APPROVE = {"decision": "approve", "reason": "benchmark", "approver": "bench"}


def one(lab) -> tuple[float, float]:
    """Seconds from the approval to (the record's "starting" line, the task run's start)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.flow_runs import resume_flow_run

    from flows.service_down import service_down
    from incident.record import load_record
    from tests.helpers import FlowThread, new_incident_id, run_id_of, wait_paused

    lab.reset_web()
    lab.kill_web()
    incident_id = new_incident_id()
    thread = FlowThread(service_down, target="web", incident_id=incident_id, restart_deadline_s=15)
    thread.start()
    run_id = run_id_of(incident_id)
    wait_paused(run_id)
    t0 = time.time()
    resume_flow_run(run_id, run_input=APPROVE)
    thread.join(timeout=120)
    record = load_record(run_id)
    assert record is not None and record.outcome == "resolved", record and record.summary
    starting = next(e.at.timestamp() for e in record.timeline
                    if e.event.startswith("starting restart_container"))
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    task_start = next(t.start_time.timestamp() for t in tasks
                      if t.name.startswith("restart_container") and t.start_time)
    return starting - t0, task_start - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--poll-s", type=int, default=2, help="RUNBOOKS_APPROVAL_POLL_S")
    args = parser.parse_args()
    os.environ["RUNBOOKS_APPROVAL_POLL_S"] = str(args.poll_s)
    from lab import Lab

    pid, _ = start_prefect_server(STATE / "prefect", PORT, STATE, ui=False)
    lab = Lab(STATE / "lab")
    try:
        lab.up()
        one(lab)  # warm-up: imports, first API round trips
        recorded, started = zip(*(one(lab) for _ in range(args.runs)))
        print(json.dumps({
            "benchmark": "approval submitted -> the approved step starts",
            "runs": args.runs, "approval_poll_s": args.poll_s,
            "to_record_starting_s": [round(x, 3) for x in recorded],
            "to_task_run_started_s": [round(x, 3) for x in started],
            "median_record_s": round(statistics.median(recorded), 3),
            "median_task_run_s": round(statistics.median(started), 3),
            "max_task_run_s": round(max(started), 3),
        }, indent=2))
    finally:
        lab.down()
        stop_pid(pid)
        shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    main()
