"""Benchmarks of the alert path (not tests). Prints one JSON document.

Starts its own Prefect server, lab, deployments, worker and gateways on loopback, then:

1. latency: N distinct ServiceDown alerts (healthy target: each run diagnoses and ends
   "Already Fine"), alert POST -> flow run created, and -> first task running
   (p50/p99), for the gateway's runner dispatch (and, with ``--parts automation``, for
   Prefect's default path: event -> prefect.yaml automation -> polling process worker).
2. sustained: distinct alerts at a steady rate into the runner gateway, each starting a
   real run against the lab: runs created per second, post -> first task running, intake
   latency p99, time until every run ended, remediations per second, server CPU per run.
3. runners: the same at one rate with 1, 2 and 4 runner processes.
4. storm: 1,000 distinct alerts x 10 duplicates, sent concurrently to the intake (shadow
   dispatch: nothing started): incidents opened (goal 1,000), lost (goal 0), intake p99.

    .venv/bin/python bench/alert_intake.py [--database postgres|sqlite] [--runners 2]
        [--latency-alerts 50] [--sustained-rates 1 2 4 8 16] [--runner-counts 1 2 4]
        [--parts latency sustained runners automation intake storm]

The gateway and its runners run as ``make up`` runs them: the gateway (runner dispatch) in a
process of its own, ``--runners`` runner processes (``python -m gateway runner``). The Prefect
server's CPU (and its PostgreSQL's) is counted per run from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from _state import STATE  # noqa: E402  (first: sets the state dir)

from deployments.stack import (_spawn, deploy_all, free_port, prefect_env, spawn_gateway,  # noqa: E402
                               start_prefect_server, start_worker, stop_pid)

PORT = free_port()
# the benchmark posts unsigned bodies on loopback: every source accepted without a secret
ALL_SOURCES = ["alertmanager", "grafana", "sentry", "pagerduty", "opsgenie", "cloudevents"]
os.environ.update(prefect_env(STATE / "prefect", f"http://127.0.0.1:{PORT}/api"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import httpx  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))], 4)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_s": pct(values, 50), "p99_s": pct(values, 99),
            "max_s": round(max(values), 4)} if values else {"n": 0}


def alert_body(instance: str) -> bytes:
    """A ServiceDown alert for the service named ``instance``: one open incident per
    (scenario, target) means distinct incidents need distinct targets (bench_inventory)."""
    from gateway.__main__ import service_down_alert

    body = service_down_alert(instance)
    body["alerts"][0]["labels"]["instance"] = instance
    return json.dumps(body).encode()


def bench_inventory(names: list[str]) -> Path:
    """The lab's inventory plus one alias of the (healthy) web service per name the benchmark
    alerts on; RUNBOOKS_INVENTORY points at it (gateways and runs of this process, and the
    processes started with ``prefect_env``)."""
    import yaml

    inventory = yaml.safe_load((STATE / "lab" / "inventory.yaml").read_text())
    web = inventory["services"]["web"]
    inventory["services"].update({name: dict(web) for name in names})
    path = STATE / "bench-inventory.yaml"
    path.write_text(yaml.safe_dump(inventory))
    os.environ["RUNBOOKS_INVENTORY"] = str(path)
    return path


def names_used(args) -> list[str]:
    """Every service name the parts of this benchmark alert on (see the prefixes below)."""
    names = [f"warm-{i}" for i in range(3)] + [f"lat-{i}" for i in range(args.latency_alerts)]
    names += [f"auto-{i}" for i in range(args.automation_alerts)]
    names += [f"storm-{i}" for i in range(args.storm_distinct)]
    for prefix, rates, seconds in (("r", args.sustained_rates, args.sustained_s),
                                   ("s", args.intake_rates, 10)):
        for rate in rates:
            names += [f"{prefix}{rate:g}-{i}" for i in range(int(rate * seconds * 1.5) + 10)]
    per_count = int(args.runners_rate * args.sustained_s * 1.5) + 10
    for n in args.runner_counts:  # service names: letters, digits, dashes
        names += [f"n{n}r{args.runners_rate:g}-{i}" for i in range(per_count)]
    return names


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def first_task_start(client, run_id) -> float | None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    starts = [t.start_time.timestamp() for t in tasks if t.start_time]
    return min(starts) if starts else None


def post_alert(url: str, instance: str) -> tuple[str, float]:
    body = alert_body(instance)
    t0 = time.time()
    resp = httpx.post(f"{url}/alerts/alertmanager", content=body,
                      headers={"Content-Type": "application/json"}, timeout=10)
    resp.raise_for_status()
    return resp.json()["intake"]["alerts"][0]["incident_id"], t0


def wait_first_tasks(sent: dict[str, float], timeout_s: float, store_path: Path | None = None,
                     flow_running: list[float] | None = None) -> tuple[list[float], list[float]]:
    """For each incident (id -> POST time): seconds until its run was created / first task ran.

    With the gateway's store, an incident closed without a run (dispatch failed) stops
    being waited for; it is missing from the figures (compare ``measured`` with ``alerts``).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from gateway.store import AlertStore

    created, running = [], []
    deadline = time.time() + timeout_s
    store = AlertStore(store_path) if store_path else None
    with get_client(sync_client=True) as client:
        pending = dict(sent)
        while pending and time.time() < deadline:
            for incident_id, t0 in list(pending.items()):
                inc = store.incident(incident_id) if store else None
                if inc and inc.status == "closed" and inc.outcome.startswith("dispatch failed"):
                    del pending[incident_id]
                    continue
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[f"incident:{incident_id}"])), limit=1)
                if not runs:
                    continue
                start = first_task_start(client, runs[0].id)
                if start is None:
                    continue
                created.append(runs[0].created.timestamp() - t0)
                running.append(start - t0)
                if flow_running is not None and runs[0].start_time:
                    flow_running.append(runs[0].start_time.timestamp() - t0)
                del pending[incident_id]
            time.sleep(0.5)
    if store:
        store.close()
    return created, running


def measure_latency(url: str, n: int, prefix: str, spacing_s: float, timeout_s: float,
                    store_path: Path | None = None) -> dict:
    """POST n distinct alerts one by one; for each, when its run was created and its first task started."""
    sent: dict[str, float] = {}
    for i in range(n):
        incident_id, t0 = post_alert(url, f"{prefix}-{i}")
        sent[incident_id] = t0
        time.sleep(spacing_s)
    flow_running: list[float] = []
    created, running = wait_first_tasks(sent, timeout_s, store_path, flow_running)
    return {"alerts": n, "measured": len(running), "post_to_run_created": summary(created),
            "post_to_flow_running": summary(flow_running),
            "post_to_first_task_running": summary(running),
            "slowest_first_task_s": sorted(round(r, 2) for r in running)[-5:]}


def wait_closed(store_path: Path, incident_ids: list[str], timeout_s: float) -> dict[str, int]:
    from gateway.store import AlertStore

    store = AlertStore(store_path)
    deadline = time.time() + timeout_s
    try:
        while True:
            incs = [store.incident(i) for i in incident_ids]
            if all(i and i.status == "closed" for i in incs) or time.time() > deadline:
                outcomes: dict[str, int] = {}
                for i in incs:
                    key = (i.outcome if i and i.status == "closed" else "still open") or "?"
                    outcomes[key] = outcomes.get(key, 0) + 1
                return outcomes
            time.sleep(0.5)
    finally:
        store.close()


def sustained_remediations(url: str, store_path: Path, rate: float, seconds: float,
                           prefix: str | None = None) -> dict:
    """Distinct alerts at a steady rate into the runner gateway: every one starts a real run."""
    result = asyncio.run(steady(url, rate, seconds, prefix or f"r{rate:g}"))
    sent = result.pop("sent")
    t_first = min(sent.values())
    created, running = wait_first_tasks(sent, 600, store_path)
    outcomes = wait_closed(store_path, list(sent), 600)
    created_at = sorted(t0 + c for t0, c in zip(sent.values(), created))
    result.update({
        "runs_created_per_s": round(len(created_at) / max(1e-9, created_at[-1] - t_first), 1) if created_at else 0,
        "post_to_run_created": summary(created),
        "post_to_first_task_running": summary(running),
        "drained_s": round(time.time() - t_first, 1),
        "remediations_per_s": round(len(sent) / max(1e-9, time.time() - t_first), 2),
        "outcomes": outcomes,
    })
    return result


async def blast(url: str, bodies: list[bytes], concurrency: int) -> tuple[list[float], int]:
    """POST every body to the Alertmanager endpoint over ``concurrency`` keep-alive connections;
    each request's latency (send -> whole response read) and how many were not 202.

    A minimal HTTP/1.1 client on asyncio streams: the load generator shares the machine's two
    cores with the gateway, and a full client library costs more CPU per request than the
    intake does, so it would measure itself."""
    target = httpx.URL(url)
    head = (f"POST /alerts/alertmanager HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode()
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker() -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            while not queue.empty():
                body = queue.get_nowait()
                t0 = time.perf_counter()
                writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                failures += status_line.split()[1] != b"202"
        finally:
            writer.close()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failures


async def steady(url: str, rate: float, seconds: float, prefix: str) -> dict:
    latencies: list[float] = []
    sent: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(i: int):
            wall, t0 = time.time(), time.perf_counter()
            r = await client.post(f"{url}/alerts/alertmanager", content=alert_body(f"{prefix}-{i}"),
                                  headers={"Content-Type": "application/json"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            sent[r.json()["intake"]["alerts"][0]["incident_id"]] = wall
        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {"rate_per_s": rate, "alerts": len(latencies), "achieved_per_s": round(len(latencies) / elapsed, 1),
            "intake": summary(latencies), "sent": sent}


def storm(url: str, store_path: Path, distinct: int, dups: int, concurrency: int = 64) -> dict:
    """distinct alerts x dups deliveries, shuffled, sent concurrently: exactly one incident each?"""
    from gateway.store import AlertStore

    store = AlertStore(store_path)
    before = store.counts()
    bodies = [alert_body(f"storm-{i}") for i in range(distinct)]
    deliveries = [b for b in bodies for _ in range(dups)]
    random.Random(7).shuffle(deliveries)
    t0 = time.perf_counter()
    latencies, failures = asyncio.run(blast(url, deliveries, concurrency=concurrency))
    elapsed = time.perf_counter() - t0
    after = store.counts()
    store.close()
    recorded = sum(after.get(k, 0) - before.get(k, 0) for k in ("opened", "duplicate", "attached"))
    return {
        "deliveries": len(deliveries), "distinct": distinct, "concurrency": concurrency,
        "seconds": round(elapsed, 2), "per_s": round(len(deliveries) / elapsed, 1), "non_202": failures,
        "incidents_opened": after["incidents"] - before["incidents"],
        "duplicates": after.get("duplicate", 0) - before.get("duplicate", 0),
        "lost": len(deliveries) - recorded,
        "intake": summary(latencies),
    }


PARTS = {"latency", "sustained", "runners", "automation", "intake", "storm"}
DEFAULT_PARTS = ["latency", "sustained", "runners", "storm"]
TOKEN = "bench-runner-token-0123456789abcdef"


def progress(result: dict) -> None:
    """Figures so far on stderr: a long run that is stopped still says what it measured."""
    print(json.dumps(result), file=sys.stderr, flush=True)


def cpu_s(pids: list[int]) -> float:
    """utime+stime of these processes and every process below them (from /proc)."""
    from _proc import tree_cpu_s

    return sum(tree_cpu_s(pid, reaped=False) for pid in pids)


class RunnerGateway:
    """The gateway (runner dispatch) in its own process and ``n`` runner processes, as ``make
    up`` runs them; ``resize`` stops them all and starts ``n`` new ones."""

    def __init__(self, env: dict[str, str], store_path: Path, runners: int) -> None:
        self.env = {**env, "RUNBOOKS_GATEWAY_RUNNER_TOKEN": TOKEN}
        self.port, self.store_path = free_port(), store_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.pid = spawn_gateway(self.env, STATE, self.port, {
            "RUNBOOKS_GATEWAY_STORE": str(store_path), "RUNBOOKS_GATEWAY_MAX_QUEUED_RUNS": "100000",
            "RUNBOOKS_GATEWAY_INSECURE_SOURCES": ",".join(ALL_SOURCES)}, name="bench-gateway")
        self.runners: list[int] = []
        self.resize(runners)

    def resize(self, n: int) -> None:
        for pid in self.runners:
            stop_pid(pid, timeout_s=60)
        self.runners = [_spawn(f"bench-runner-{i}", [sys.executable, "-m", "gateway", "runner", "--gateway", self.url],
                               self.env, STATE) for i in range(1, n + 1)]
        deadline = time.time() + 120
        while len(httpx.get(f"{self.url}/healthz", timeout=10).json()["runner"]["runners"]) < n:
            if time.time() > deadline:
                raise RuntimeError(f"{n} runners did not report to the gateway; see {STATE / 'logs'}")
            time.sleep(0.5)

    def stop(self) -> None:
        for pid in [*self.runners, self.pid]:
            stop_pid(pid, timeout_s=60)


def sustained_with_cpu(gw: RunnerGateway, rate: float, seconds: float, server_pids: list[int],
                       prefix: str | None = None) -> dict:
    before = cpu_s(server_pids)
    result = sustained_remediations(gw.url, gw.store_path, rate, seconds, prefix)
    runs = sum(result["outcomes"].values())
    result["runners"] = len(gw.runners)
    result["server_cpu_s_per_run"] = round((cpu_s(server_pids) - before) / max(1, runs), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="postgres",
                        help="the Prefect server's database (RUNBOOKS_PREFECT_DATABASE)")
    parser.add_argument("--latency-alerts", type=int, default=50)
    parser.add_argument("--automation-alerts", type=int, default=10)
    parser.add_argument("--storm-distinct", type=int, default=1000)
    parser.add_argument("--storm-dups", type=int, default=10)
    parser.add_argument("--storm-concurrency", type=int, default=64)
    parser.add_argument("--latency-spacing-s", type=float, default=2.0,
                        help="between latency alerts: above one run's cost, so that latency is "
                             "measured, not queueing (the sustained part measures that)")
    parser.add_argument("--runners", type=int, default=2, help="runner processes (latency, sustained)")
    parser.add_argument("--sustained-rates", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--runner-counts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runners-rate", type=float, default=8, help="alerts/s of the runners part")
    parser.add_argument("--intake-rates", type=float, nargs="+", default=[20, 50, 100, 200])
    parser.add_argument("--sustained-s", type=float, default=10)
    parser.add_argument("--parts", nargs="+", default=DEFAULT_PARTS, choices=sorted(PARTS))
    args = parser.parse_args()
    parts = set(args.parts)

    from deployments.prefect_db import remove_postgres
    from lab import Lab

    server, api = start_prefect_server(STATE / "prefect", PORT, STATE, ui=False, database=args.database)
    server_pids = [server] + ([int((STATE / "pids" / "prefect-postgres.pid").read_text())]
                              if args.database == "postgres" else [])
    lab = Lab(STATE / "lab")
    worker, gw, ok = None, None, False
    result: dict = {"benchmark": "alert intake", "machine": f"{os.cpu_count()} cores",
                    "prefect_database": args.database}
    try:
        lab.up()
        bench_inventory(names_used(args))
        env = prefect_env(STATE / "prefect", api)
        deploy_all({**env, "RUNBOOKS_GATEWAY_DISPATCH": "automation"})  # its automation part needs the triggers live
        if "automation" in parts:
            worker = start_worker(env, STATE)
        if {"latency", "sustained", "runners"} & parts:
            gw = RunnerGateway(env, STATE / "runner.db", args.runners)
            measure_latency(gw.url, 3, "warm", 1.0, 60, gw.store_path)  # imports, first round trips
            if "latency" in parts:
                result["latency_runner"] = measure_latency(
                    gw.url, args.latency_alerts, "lat", args.latency_spacing_s, 300, gw.store_path)
                result["latency_runner"]["runners"] = args.runners
                progress(result)
            if "sustained" in parts:
                result["sustained_remediations"] = []
                for rate in args.sustained_rates:
                    result["sustained_remediations"].append(
                        sustained_with_cpu(gw, rate, args.sustained_s, server_pids))
                    progress(result)
            if "runners" in parts:
                result["runner_processes"] = []
                for n in args.runner_counts:
                    gw.resize(n)
                    one = sustained_with_cpu(gw, args.runners_rate, args.sustained_s, server_pids,
                                             prefix=f"n{n}r{args.runners_rate:g}")
                    one.pop("sent", None)
                    result["runner_processes"].append(one)
                    progress(result)
        if "automation" in parts:
            from gateway.__main__ import serving
            from gateway.settings import GatewaySettings

            auto = GatewaySettings(port=free_port(), store=STATE / "auto.db", dispatch="automation",
                                   insecure_sources=ALL_SOURCES)
            with serving(auto) as url:
                result["latency_prefect_default_path"] = measure_latency(
                    url, args.automation_alerts, "auto", 2.0, 600, auto.store_path)
                progress(result)
        if {"intake", "storm"} & parts:
            # its own process, as deployed: the load generator must not share its GIL
            port, store_path = free_port(), STATE / "shadow.db"
            shadow = spawn_gateway(env, STATE, port, {"RUNBOOKS_GATEWAY_DISPATCH": "shadow",
                                                      "RUNBOOKS_GATEWAY_STORE": str(store_path),
                                                      "RUNBOOKS_GATEWAY_INSECURE_SOURCES": ",".join(ALL_SOURCES)},
                                   name="shadow-gateway")
            url = f"http://127.0.0.1:{port}"
            try:
                if "intake" in parts:
                    result["sustained_intake_only"] = [
                        {k: v for k, v in asyncio.run(steady(url, rate, 10, f"s{rate:g}")).items()
                         if k != "sent"} for rate in args.intake_rates]
                    progress(result)
                if "storm" in parts:
                    result["storm"] = storm(url, store_path, args.storm_distinct, args.storm_dups,
                                            args.storm_concurrency)
            finally:
                stop_pid(shadow)
        print(json.dumps(result, indent=2))
        ok = True
    finally:
        if gw:
            gw.stop()
        if worker:
            stop_pid(worker)
        lab.down()
        stop_pid(server)
        remove_postgres(STATE)
        if ok:
            shutil.rmtree(STATE, ignore_errors=True)
        else:
            print(f"kept {STATE} (logs/) for a look", file=sys.stderr)


if __name__ == "__main__":
    main()
