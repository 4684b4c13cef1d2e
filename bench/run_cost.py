"""Benchmark: what one remediation run costs the Prefect server (API calls, server CPU).

Not a test. Starts its own Prefect server and lab (like the test suite), then N times each:
  broken: kill the web container (as bench/service_down.py does), run the service-down flow;
  healthy: the web up, run the service-down flow ("Already Fine").
Prints JSON with, per run kind and per run: the API requests this process made by method and
path template (counted by wrapping the Prefect client's httpx transport, sync and async), task
runs, log lines, artifact versions, flow-run inputs created (counted from the requests: the
record's previous copies are deleted), the Prefect server's CPU seconds (utime+stime of the
server and its child processes, from /proc, before/after) and the wall time.

    .venv/bin/python bench/run_cost.py [--runs 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from _state import STATE  # noqa: E402  (first: sets the state dir)
from _proc import tree_cpu_s  # noqa: E402

from deployments.stack import free_port, prefect_env, start_prefect_server, stop_pid  # noqa: E402

PORT = free_port()
os.environ.update(prefect_env(STATE / "prefect", f"http://127.0.0.1:{PORT}/api"))
# the runs log as in production (INFO reaches the API); this script's console stays quiet
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")

PROBES = 3
INTERVAL_S = 1.0

# -- counting the requests ------------------------------------------------------------------
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_REQUESTS: collections.Counter[str] = collections.Counter()
_COUNTING = threading.Event()
_LOCK = threading.Lock()


def template(method: str, path: str) -> str:
    """``POST /flow_runs/{id}/input``: UUIDs and names/keys in a path become placeholders."""
    path = path.split("?", 1)[0]
    path = re.sub(r"^.*?/api(?=/)", "", path)
    path = _UUID.sub("{id}", path)
    path = re.sub(r"(/input/)(?!filter$)[^/]+", r"\1{key}", path)
    path = re.sub(r"(/variables/name/)[^/]+", r"\1{name}", path)
    path = re.sub(r"(/artifacts/)(?!filter$|latest/|count$)([^/{]+)(/latest)", r"\1{key}\3", path)
    path = re.sub(r"(/concurrency_limits/v2/)(?!filter$|increment|decrement|leases)([^/{]+)$",
                  r"\1{name}", path)
    path = re.sub(r"(/deployments/name/|/flows/name/|/block_documents/name/)[^/]+", r"\1{name}", path)
    return f"{method} {path}"


def _count(request: Any) -> None:
    if _COUNTING.is_set():
        with _LOCK:
            _REQUESTS[template(request.method, request.url.path)] += 1


def patch_clients() -> None:
    from prefect.client import base

    sync_send = base.PrefectHttpxSyncClient.send
    async_send = base.PrefectHttpxAsyncClient.send

    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        _count(request)
        return sync_send(self, request, *args, **kwargs)

    async def asend(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        _count(request)
        return await async_send(self, request, *args, **kwargs)

    base.PrefectHttpxSyncClient.send = send  # type: ignore[method-assign]
    base.PrefectHttpxAsyncClient.send = asend  # type: ignore[method-assign]


# -- the server's CPU -----------------------------------------------------------------------
def server_cpu_s(root: int) -> float:
    """utime+stime of the server process and every process below it (uvicorn, workers)."""
    return tree_cpu_s(root, reaped=False)


# -- one run ----------------------------------------------------------------------------------
def _flush_logs() -> None:
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)


def measure(kind: str, lab: Any, server_pid: int) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                FlowRunFilter, FlowRunFilterId, LogFilter,
                                                LogFilterFlowRunId)

    from flows.service_down import service_down

    lab.reset_web()
    if kind == "broken":
        lab.kill_web()
    with _LOCK:
        _REQUESTS.clear()
    cpu0 = server_cpu_s(server_pid)
    t0 = time.perf_counter()
    _COUNTING.set()
    state = service_down(target="web", healthy_probes=PROBES, probe_interval_s=INTERVAL_S,
                         return_state=True)
    wall = time.perf_counter() - t0
    _flush_logs()
    _COUNTING.clear()
    cpu = server_cpu_s(server_pid) - cpu0
    expected = "Completed" if kind == "broken" else "Already Fine"
    if state.name != expected:
        raise SystemExit(f"{kind}: the run ended {state.name} ({state.message}), not {expected}")
    run_id = state.state_details.flow_run_id
    with _LOCK:
        requests = dict(_REQUESTS)
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                limit=200)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])), limit=200)
    inputs = sum(n for k, n in requests.items() if re.fullmatch(r"POST /flow_runs/\{id\}/input", k))
    return {"requests": requests, "task_runs": len(tasks), "log_lines": len(logs),
            "artifact_versions": len(artifacts), "inputs_created": inputs,
            "server_cpu_s": cpu, "wall_s": wall}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(runs)
    per_template: collections.Counter[str] = collections.Counter()
    for r in runs:
        per_template.update(r["requests"])
    total = [sum(r["requests"].values()) for r in runs]
    return {
        "runs": n,
        "requests_per_run": round(statistics.mean(total), 1),
        "requests_per_run_by_template": {k: round(v / n, 1) for k, v in
                                         sorted(per_template.items(), key=lambda kv: -kv[1])},
        "task_runs_per_run": round(statistics.mean(r["task_runs"] for r in runs), 1),
        "log_lines_per_run": round(statistics.mean(r["log_lines"] for r in runs), 1),
        "artifact_versions_per_run": round(statistics.mean(r["artifact_versions"] for r in runs), 1),
        "flow_run_inputs_created_per_run": round(statistics.mean(r["inputs_created"] for r in runs), 1),
        "server_cpu_s_per_run": round(sum(r["server_cpu_s"] for r in runs) / n, 3),
        "wall_s_per_run": round(statistics.mean(r["wall_s"] for r in runs), 3),
        "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
        "wall_s": [round(r["wall_s"], 3) for r in runs],
        "server_cpu_s": [round(r["server_cpu_s"], 3) for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    from lab import Lab

    patch_clients()
    pid, _ = start_prefect_server(STATE / "prefect", PORT, STATE, ui=False)
    lab = Lab(STATE / "lab")
    try:
        lab.up()
        measure("broken", lab, pid)  # warm-up: imports, first API round trips, the lock's limit
        measure("healthy", lab, pid)
        idle0 = server_cpu_s(pid)
        time.sleep(5)
        idle = (server_cpu_s(pid) - idle0) / 5
        results: dict[str, list[dict[str, Any]]] = {"broken": [], "healthy": []}
        for _ in range(args.runs):
            for kind in results:
                results[kind].append(measure(kind, lab, pid))
        out = {
            "benchmark": "service-down: cost per run (broken web -> resolved; healthy -> already fine)",
            "runs_per_kind": args.runs,
            "server_idle_cpu_s_per_s": round(idle, 3),
            "broken": summary(results["broken"]),
            "healthy": summary(results["healthy"]),
        }
        text = json.dumps(out, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    finally:
        lab.down()
        stop_pid(pid)
        shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    main()
