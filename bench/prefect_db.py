"""Benchmark: the Prefect server on SQLite vs on PostgreSQL (deployments/prefect_db.py).

Not a test. For each database in turn: a Prefect server of its own (own state dir), one
deployment of a trivial flow, then for --seconds (60) the load a remediation makes (a thread
running small flows with a few tasks and log lines, so the event persister writes) while the
main thread calls ``create_flow_run_from_deployment`` every 0.5 s and times each call (the
client's own retries included: a 503 costs a 2 s sleep). The servers run with
PREFECT_SERVER_LOG_RETRYABLE_ERRORS=true and their "database is locked" lines are counted:
SQLite refuses a read->write upgrade while another connection writes, whatever the busy timeout.

Prints JSON: per database p50/p99/max of the create latency, the calls over 1 s, and the CPU
seconds per load flow run of the server (utime+stime of the server and its children, from
/proc), and for PostgreSQL also of its cluster.

    .venv/bin/python bench/prefect_db.py [--seconds 60] [--databases sqlite,postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _state import STATE  # noqa: E402  (first: sets the state dir)
from _proc import tree_cpu_s  # noqa: E402

INTERVAL_S = 0.5
SLOW_S = 1.0


# --------------------------------------------------------------------------- the load (child)
def child(args: argparse.Namespace) -> None:
    """Runs in its own process with PREFECT_API_URL set to one server: the load and the timing."""
    from prefect import flow, get_run_logger, task
    from prefect.client.orchestration import get_client

    @task
    def step(i: int) -> int:
        get_run_logger().info("step %d of a remediation-like flow", i)
        return i

    @flow(name="bench-load")
    def small_flow() -> int:
        log = get_run_logger()
        log.info("checking the target")
        total = sum(step(i) for i in range(4))
        log.info("verified: %d", total)
        return total

    @flow(name="bench-trivial")
    def trivial() -> int:
        return 1

    import logging

    retries: list[str] = []  # the client's retries (a 503 from the server: a 2 s sleep)

    class CountRetries(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Another attempt will be made" in record.getMessage():
                retries.append(record.getMessage().split(". Another")[0])

    client_logger = logging.getLogger("prefect.client")
    client_logger.addHandler(CountRetries(logging.DEBUG))
    client_logger.setLevel(logging.DEBUG)
    client_logger.propagate = False  # counted, not printed

    stop = threading.Event()
    done = [0, 0]  # load flow runs completed, failed

    def load() -> None:
        while not stop.is_set():
            state = small_flow(return_state=True)
            done[0 if state.is_completed() else 1] += 1

    small_flow()  # warm-up: imports, first round trips
    with get_client(sync_client=True) as client:
        deployment = client.create_deployment(flow_id=client.create_flow(trivial), name="bench")
        client.create_flow_run_from_deployment(deployment)
        thread = threading.Thread(target=load, daemon=True)
        cpu0 = {name: tree_cpu_s(pid) for name, pid in args.pids.items()}
        t_start = time.monotonic()
        thread.start()
        latencies: list[float] = []
        next_t = t_start
        while time.monotonic() - t_start < args.seconds:
            time.sleep(max(0.0, next_t - time.monotonic()))
            t0 = time.perf_counter()
            client.create_flow_run_from_deployment(deployment)
            latencies.append(time.perf_counter() - t0)
            next_t = max(next_t + INTERVAL_S, time.monotonic())
        stop.set()
        thread.join(120)
        elapsed = time.monotonic() - t_start
        cpu = {name: tree_cpu_s(pid) - cpu0[name] for name, pid in args.pids.items()}
    Path(args.out).write_text(json.dumps({"latencies": latencies, "load_runs": done[0], "load_failed": done[1],
                                          "elapsed_s": elapsed, "cpu_s": cpu, "client_retries": retries}))


# --------------------------------------------------------------------------- one database
def run_one(database: str, seconds: float) -> dict:
    from deployments import prefect_db
    from deployments.stack import free_port, prefect_env, start_prefect_server, stop_pid

    state = STATE / database
    state.mkdir()
    os.environ["PREFECT_SERVER_LOG_RETRYABLE_ERRORS"] = "true"  # the server logs each "database is locked"
    t0 = time.monotonic()
    pid, api_url = start_prefect_server(state / "prefect", free_port(), state, ui=False, database=database)
    started_s = time.monotonic() - t0
    try:
        pids = {"server": pid}
        if database == "postgres":
            pg = prefect_db.status(state)[1]
            assert pg is not None, "the Prefect server's PostgreSQL does not run"
            pids["postgres"] = pg
        out = state / "result.json"
        env = {**prefect_env(state / "prefect", api_url), "PREFECT_LOGGING_LEVEL": "INFO"}
        with open(state / "logs" / "bench-client.log", "wb") as log:
            subprocess.run([sys.executable, __file__, "--child", "--seconds", str(seconds), "--out", str(out),
                            "--pids", json.dumps(pids)], env=env, stdout=log, stderr=subprocess.STDOUT,
                           check=True, timeout=seconds + 300, cwd=Path(__file__).parent)
        r = json.loads(out.read_text())
    finally:
        stop_pid(pid)
        if database == "postgres":
            prefect_db.remove_postgres(state)
    server_log = (state / "logs" / "prefect-server.log").read_text(errors="replace")
    lat = sorted(r["latencies"])
    runs = max(r["load_runs"], 1)
    result = {
        "server_start_s": round(started_s, 1),
        "create_calls": len(lat),
        "create_p50_s": round(statistics.median(lat), 3),
        "create_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
        "create_max_s": round(lat[-1], 3),
        "create_calls_over_1s": sum(1 for x in lat if x > SLOW_S),
        "load_flow_runs": r["load_runs"],
        "load_flow_runs_failed": r["load_failed"],
        "load_flow_runs_per_s": round(r["load_runs"] / r["elapsed_s"], 2),
        "server_cpu_s": round(r["cpu_s"]["server"], 1),
        "server_cpu_s_per_load_flow_run": round(r["cpu_s"]["server"] / runs, 3),
        # with PREFECT_SERVER_LOG_RETRYABLE_ERRORS=true each lock failure is logged with its traceback
        "database_is_locked_log_lines": sum(1 for line in server_log.splitlines() if "database is locked" in line),
        "database_is_locked_errors": sum(1 for line in server_log.splitlines()
                                         if line.startswith("sqlalchemy.exc.OperationalError")
                                         and "database is locked" in line),
        "client_retries": len(r["client_retries"]),
        "client_retries_on_503": sum(1 for m in r["client_retries"] if "status code 503" in m),
    }
    if "postgres" in r["cpu_s"]:
        result["postgres_cpu_s"] = round(r["cpu_s"]["postgres"], 1)
        result["postgres_cpu_s_per_load_flow_run"] = round(r["cpu_s"]["postgres"] / runs, 3)
        result["total_cpu_s_per_load_flow_run"] = round((r["cpu_s"]["server"] + r["cpu_s"]["postgres"]) / runs, 3)
    else:
        result["total_cpu_s_per_load_flow_run"] = result["server_cpu_s_per_load_flow_run"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--pids", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            child(args)
        finally:
            shutil.rmtree(STATE, ignore_errors=True)  # the child's own (unused) state dir of _state
        return
    try:
        results = {db: run_one(db, args.seconds) for db in args.databases.split(",")}
        print(json.dumps({
            "benchmark": "Prefect server database: create_flow_run_from_deployment under flow load",
            "seconds": args.seconds, "create_every_s": INTERVAL_S, "slow_s": SLOW_S,
            "cpus": os.cpu_count(), "loadavg_after": os.getloadavg()[0],
            "results": results,
        }, indent=2))
    finally:
        if not os.environ.get("RUNBOOKS_KEEP_BENCH_STATE"):
            shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    main()
