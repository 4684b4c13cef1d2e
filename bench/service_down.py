"""Benchmark: service-down fault -> verified healthy, flow vs the bare operation.

Not a test. Starts its own Prefect server and lab (like the test suite), then N times:
  flow: kill the web container, run the service-down flow, stop the clock at the run's
        final state "verified healthy" (same probe rule as below);
  bare: kill the web container, `docker restart` it, poll /health until the same
        number of consecutive healthy answers.
Prints JSON with per-run seconds, medians and the ratio flow/bare (goal <= 1.5).

    .venv/bin/python bench/service_down.py [--runs 5]
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

PROBES = 3
INTERVAL_S = 1.0  # the flow's default probe_interval_s


def bare(lab) -> float:
    from tasks.http_checks import check_health

    client = lab.docker_client()
    lab.kill_web()
    t0 = time.perf_counter()
    client.containers.get(lab.info.container_name).restart(timeout=10)
    streak = 0
    while streak < PROBES:
        streak = streak + 1 if check_health(lab.info.health_url, timeout_s=2).healthy else 0
        if streak < PROBES:
            time.sleep(INTERVAL_S)
    return time.perf_counter() - t0


def with_flow(lab) -> float:
    from flows.service_down import service_down

    lab.kill_web()
    t0_wall = time.time()
    state = service_down(target="web", healthy_probes=PROBES, probe_interval_s=INTERVAL_S,
                         return_state=True)
    if not state.is_completed():
        raise SystemExit(f"flow did not heal the service: {state.message}")
    # when the run recorded "verified healthy" (its final state), not when the engine's
    # teardown returned (it joins a heartbeat thread that sleeps in 1 s steps)
    return state.timestamp.timestamp() - t0_wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from lab import Lab

    pid, _ = start_prefect_server(STATE / "prefect", PORT, STATE, ui=False)
    lab = Lab(STATE / "lab")
    try:
        lab.up()
        with_flow(lab)  # warm-up: imports, first API round trips
        flows, bares = [], []
        for _ in range(args.runs):
            lab.reset_web()
            flows.append(with_flow(lab))
            lab.reset_web()
            bares.append(bare(lab))
        result = {
            "benchmark": "service-down: fault -> verified healthy",
            "runs": args.runs,
            "verify_rule": f"{PROBES} consecutive healthy probes, {INTERVAL_S}s apart",
            "flow_s": [round(x, 3) for x in flows],
            "bare_s": [round(x, 3) for x in bares],
            "flow_median_s": round(statistics.median(flows), 3),
            "bare_median_s": round(statistics.median(bares), 3),
            "ratio": round(statistics.median(flows) / statistics.median(bares), 2),
            "goal_ratio": 1.5,
        }
        print(json.dumps(result, indent=2))
    finally:
        lab.down()
        stop_pid(pid)
        shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    main()
