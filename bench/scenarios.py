"""Benchmark: real fault -> exporter -> Prometheus -> Alertmanager -> gateway -> flow -> healthy.

Not a test. Starts its own Prefect server (deployments registered), the lab with its
alerting stack, and the alert gateway (runner dispatch), then for every fault of the lab's
registry that has an alert and is expected to heal (or the ones named), N times:

  inject the fault (t0) -> the first alert of the fault's scenario reaches the gateway
  (alert_s) -> the fault's part is healthy again (healthy_s) -> the incident is closed
  (closed_s, with the run's final state). A step that needs a human (no lab policy covers
  it) is approved the moment the run pauses (approved_at_s), as a waiting on-call would.

Prints JSON with per-run figures and medians per fault.

    .venv/bin/python bench/scenarios.py [--runs 3] [--faults web-killed redis-stopped ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from uuid import UUID

from _state import STATE  # noqa: E402  (first: sets the state dir)

from deployments.stack import free_port, prefect_env, start_prefect_server, stop_pid  # noqa: E402

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.flow_runs import resume_flow_run  # noqa: E402

PORT = free_port()
os.environ.update(prefect_env(STATE / "prefect", f"http://127.0.0.1:{PORT}/api"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
OTHER_SOURCES = ["grafana", "sentry", "pagerduty", "opsgenie", "cloudevents"]  # not posted here


def one_run(lab, store, fault, deadline_s: float = 180.0) -> dict:
    from lab.proc import wait_until

    before = {r["id"] for r in store.recent_alerts(500)}
    t0 = time.monotonic()
    lab.inject(fault.name)
    opened: list = []

    def alert_arrived() -> bool:
        opened[:] = [r for r in store.recent_alerts(100) if r["id"] not in before
                     and r["disposition"] == "opened" and r["scenario"].split("/")[0] == fault.scenario]
        return bool(opened)

    wait_until(alert_arrived, deadline_s, 0.1, what=f"{fault.alert} never opened a {fault.scenario} incident")
    alert_s = time.monotonic() - t0
    incident_id = opened[0]["incident_id"]
    approved: list[float] = []

    def healed() -> bool:
        """Healthy yet? A step no policy covers is approved at once, as an on-call human would."""
        if lab.fault_healthy(fault.name):
            return True
        run_id = store.incident(incident_id).flow_run_id
        if run_id and not approved and _paused(run_id):
            resume_flow_run(UUID(run_id), run_input={"decision": "approve", "reason": "bench", "approver": "bench"})
            approved.append(time.monotonic() - t0)
        return False

    wait_until(healed, deadline_s, 0.1, what=f"{fault.name} never healed")
    healthy_s = time.monotonic() - t0
    wait_until(lambda: store.incident(incident_id).status == "closed", deadline_s, 0.2,
               what=f"incident {incident_id} never closed")
    closed_s = time.monotonic() - t0
    outcome = store.incident(incident_id).outcome
    return {"alert_s": round(alert_s, 2), "healthy_s": round(healthy_s, 2), "closed_s": round(closed_s, 2),
            "approved_at_s": round(approved[0], 2) if approved else None, "outcome": outcome,
            "incident": incident_id}


def _paused(flow_run_id: str) -> bool:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run_id)).state
    return bool(state and state.is_paused())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--faults", nargs="*", help="fault names (default: every fault with an alert that heals)")
    args = parser.parse_args()

    from deployments.stack import deploy_all
    from gateway.__main__ import serving
    from gateway.settings import GatewaySettings
    from gateway.store import AlertStore
    from lab import Lab
    from lab.faults import FAULTS

    faults = [FAULTS[n] for n in args.faults] if args.faults else [
        f for f in FAULTS.values() if f.alert and f.heals]
    pid, api_url = start_prefect_server(STATE / "prefect", PORT, STATE, ui=False)
    lab = Lab(STATE / "lab", alerting=True)
    try:
        deploy_all(prefect_env(STATE / "prefect", api_url))
        lab.up()
        token = lab.info.alertmanager_token_file.read_text().strip()
        # only Alertmanager posts here; the other sources are refused unless listed (loopback)
        settings = GatewaySettings(port=lab.info.gateway_port, store=STATE / "gateway" / "alerts.db",
                                   alertmanager_bearer_token=token, insecure_sources=OTHER_SOURCES)
        results = {}
        with serving(settings):
            store = AlertStore(settings.store_path)
            for fault in faults:
                runs = []
                for _ in range(args.runs):
                    lab.reset_all_faults()
                    time.sleep(5)  # let the previous episode's alerts resolve
                    runs.append(one_run(lab, store, fault))
                results[fault.name] = {
                    "scenario": fault.scenario, "alert": fault.alert, "runs": runs,
                    "median_alert_s": statistics.median(r["alert_s"] for r in runs),
                    "median_healthy_s": statistics.median(r["healthy_s"] for r in runs),
                    "median_closed_s": statistics.median(r["closed_s"] for r in runs),
                }
            lab.reset_all_faults()
            store.close()
        print(json.dumps({"benchmark": "fault -> alert -> remediation -> healthy (real alerting chain)",
                          "runs_per_fault": args.runs, "results": results}, indent=2))
    finally:
        lab.down()
        stop_pid(pid)
        shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    main()
