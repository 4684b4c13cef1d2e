"""The secrets canary: no secret of the test run shows up in anything the runs, logs and stores kept.

``tests/conftest.py`` draws one marker per test session, ``canary-<16 hex>``, exports it as
``RUNBOOKS_SECRET_CANARY`` and puts it into every secret the session uses: the lab's generated
passwords (PostgreSQL roles ``app``, ``runbooks``, ``monitor``) and Alertmanager's bearer token
(``lab.context.new_secret``), and every secret setting of the ``gateway`` fixture. So a secret
that leaks anywhere carries the marker, and looking for the marker finds the leak without
knowing which secret it was.

``test_no_secret_leaked`` runs last in the session (conftest's ``pytest_collection_modifyitems``
moves this module to the end) and scans, for the marker (also base64-encoded, as in a basic-auth
header): on the test Prefect server every flow run (name, parameters, tags, state), every state
in each run's history, every flow run input, every task run, every log, every artifact (all
versions), every event, every deployment and variable; and on disk, every file under the state
dir but the secrets' own files and the servers' binary data (list below), i.e. the lab's and the
servers' logs, the gateway's alert stores, Prefect's result storage, the lab's generated configs.
It asserts it scanned a real amount of each, so it cannot pass on an empty server.

``test_the_scan_finds_a_planted_secret`` proves the scan can fail: a throwaway flow run, tagged
``canary-plant``, puts the marker into its parameters, a log line, an artifact, an event, a flow
run input and its final state message, and the scan must report each of them; so must it a log
file under the state dir holding it only base64-encoded (removed again). The final scan leaves
out exactly what belongs to runs with that tag (the run, its states, inputs, task runs, logs,
artifacts and the events about it), nothing else.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx

CANARY_ENV = "RUNBOOKS_SECRET_CANARY"
PLANT_TAG = "canary-plant"
PAGE = 200  # the API's largest page (PREFECT_API_DEFAULT_LIMIT)

#: Paths under the state dir that are not scanned, and why.
NOT_SCANNED = {
    "lab/secrets": "the secrets' own files (mode 0600): where they belong",
    "lab/app/secrets": "the web service's admin and chaos tokens (mode 0600): where they belong",
    "gateway/local.json": "the gateway's secrets as `make up` keeps them (mode 0600)",
    "prefect/prefect.db": "Prefect's database: scanned through its API, which also tells what a planted run owns",
    "prefect/postgres-password": "the password of Prefect's PostgreSQL role (mode 0600): where it belongs",
    "lab/pg/data": "PostgreSQL's data files (roles keep SCRAM hashes, not passwords); its log is scanned",
    "lab/docker": "dockerd's image layers and state; the container logs (*.log) under it are scanned",
    "lab/disk": "the disk-full drills' tmpfs (filler files)",
    "lab/build": "the lab web binary",
}

#: What the final scan must at least have looked at (non-planted), so it cannot pass vacuously.
#: Two scenario tests (a handful of runs) are enough; `make test` scans far more.
MINIMUM = {"flow run": 3, "flow run state": 9, "task run": 5, "log": 30, "artifact": 3, "event": 30,
           "file": 5}


def needles(canary: str) -> list[str]:
    """The marker as is and base64-encoded at each of the three byte alignments (an
    ``Authorization: Basic`` header, a base64 config value), standard and URL-safe alphabets."""
    found = {canary}
    raw = canary.encode()
    for pad in range(3):
        enc = base64.b64encode(b"\0" * pad + raw).decode()
        full = (pad + len(raw)) // 3 * 4  # chars that depend only on bytes we know
        core = enc[4 if pad else 0:full]  # the first group mixes in the unknown byte(s) before
        found |= {core, core.replace("+", "-").replace("/", "_")}
    return sorted(found, key=len, reverse=True)


@dataclass
class Finding:
    kind: str
    where: str
    flow_run_id: str | None
    excerpt: str
    planted: bool

    def __str__(self) -> str:
        return f"{self.kind} {self.where}: ...{self.excerpt}..."


@dataclass
class Scan:
    """One pass over everything; ``findings`` says where the marker was seen."""

    canary: str
    planted_runs: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)  # objects scanned, planted ones left out
    findings: list[Finding] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._needles = needles(self.canary)

    def look(self, kind: str, where: str, value: Any, flow_run_id: Any = None) -> None:
        run = str(flow_run_id) if flow_run_id else None
        planted = run in self.planted_runs
        if not planted:
            self.counts[kind] += 1
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        for needle in self._needles:
            at = text.find(needle)
            if at >= 0:
                excerpt = text[max(0, at - 80):at + len(needle) + 40].replace("\n", "\\n")
                self.findings.append(Finding(kind, where, run, excerpt, planted))
                return

    @property
    def leaks(self) -> list[Finding]:
        return [f for f in self.findings if not f.planted]


# ----------------------------------------------------------------------------- Prefect API


def _pages(api: httpx.Client, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    offset = 0
    while True:
        resp = api.post(path, json={**body, "offset": offset, "limit": PAGE})
        resp.raise_for_status()
        items = resp.json()
        yield from items
        if len(items) < PAGE:
            return
        offset += PAGE


def _events(api: httpx.Client) -> Iterator[dict[str, Any]]:
    since = (datetime.now(timezone.utc) - timedelta(days=2)).isoformat()
    resp = api.post("/events/filter", json={"filter": {"occurred": {"since": since}}, "limit": 50})
    while True:
        resp.raise_for_status()
        page = resp.json()
        yield from page["events"]
        if not page.get("next_page"):
            return
        resp = api.get(page["next_page"])


def _run_of_event(event: dict[str, Any]) -> str | None:
    """The flow run an event is about or belongs to (its resource, else a related resource)."""
    for resource in [event.get("resource") or {}, *(event.get("related") or [])]:
        rid = resource.get("prefect.resource.id", "")
        if rid.startswith("prefect.flow-run."):
            return rid.removeprefix("prefect.flow-run.")
    return None


def scan_prefect(scan: Scan, api_url: str) -> None:
    """Everything the test Prefect server kept, paged to the end."""
    with httpx.Client(base_url=api_url, timeout=30) as api:
        runs = list(_pages(api, "/flow_runs/filter", {"sort": "ID_DESC"}))
        scan.planted_runs |= {r["id"] for r in runs if PLANT_TAG in (r.get("tags") or [])}
        for run in runs:
            rid = run["id"]
            scan.look("flow run", f"{run['name']} ({rid}): parameters, tags, state", run, rid)
            states = api.get("/flow_run_states/", params={"flow_run_id": rid})
            states.raise_for_status()
            for state in states.json():
                scan.look("flow run state", f"{run['name']} ({rid}): state {state['name']} {state['id']}",
                          state, rid)
            inputs = api.post(f"/flow_runs/{rid}/input/filter", json={"prefix": "", "limit": 10_000})
            inputs.raise_for_status()
            for item in inputs.json():
                scan.look("flow run input", f"{run['name']} ({rid}): input {item['key']}", item, rid)
        for task in _pages(api, "/task_runs/filter", {"sort": "ID_DESC"}):
            scan.look("task run", f"{task['name']} ({task['id']}) of flow run {task.get('flow_run_id')}",
                      task, task.get("flow_run_id"))
        for log in _pages(api, "/logs/filter", {"sort": "TIMESTAMP_ASC"}):
            scan.look("log", f"{log['name']} at {log['timestamp']} (flow run {log.get('flow_run_id')})",
                      log, log.get("flow_run_id"))
        for art in _pages(api, "/artifacts/filter", {"sort": "ID_DESC"}):
            scan.look("artifact", f"{art.get('key') or art['id']} (flow run {art.get('flow_run_id')})",
                      art, art.get("flow_run_id"))
        for event in _events(api):
            scan.look("event", f"{event['event']} {event['id']} about {event['resource'].get('prefect.resource.id')}",
                      event, _run_of_event(event))
        for dep in _pages(api, "/deployments/filter", {"sort": "NAME_ASC"}):
            scan.look("deployment", dep["name"], dep)
        for var in _pages(api, "/variables/filter", {"sort": "NAME_ASC"}):
            scan.look("variable", var["name"], var)


# ----------------------------------------------------------------------------- files


def _not_scanned(rel: Path) -> bool:
    text = rel.as_posix()
    for prefix in NOT_SCANNED:
        if text == prefix or text.startswith(prefix + "/") or text.startswith(prefix + "-"):
            return not (prefix == "lab/docker" and rel.suffix == ".log")
    return False


def scan_files(scan: Scan, state_dir: Path) -> None:
    """Every file under the state dir but ``NOT_SCANNED``, as bytes; SQLite stores also row by row."""
    for root, dirs, files in os.walk(state_dir):
        for name in files:
            path = Path(root) / name
            rel = path.relative_to(state_dir)
            if _not_scanned(rel) or not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:  # gone meanwhile (a pidfile, a socket's neighbour)
                continue
            scan.look("file", str(rel), data.decode("latin-1"))
            scan.counts["file bytes"] += len(data)
            if data.startswith(b"SQLite format 3\0"):
                _scan_sqlite(scan, path, rel)


def _scan_sqlite(scan: Scan, path: Path, rel: Path) -> None:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for i, row in enumerate(db.execute(f'SELECT * FROM "{table}"')):
                scan.look("store row", f"{rel} table {table} row {i}",
                          [v.decode("latin-1") if isinstance(v, bytes) else v for v in row])
    finally:
        db.close()


# ----------------------------------------------------------------------------- the scan


def flush_to_the_server() -> None:
    """Send what this process still holds: queued logs and events."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


def full_scan(canary: str, api_url: str, state_dir: Path) -> Scan:
    flush_to_the_server()
    scan = Scan(canary)
    scan_prefect(scan, api_url)
    scan_files(scan, state_dir)
    return scan


def _canary() -> str:
    canary = os.environ.get(CANARY_ENV, "")
    assert canary.startswith("canary-") and len(canary) >= 20, f"{CANARY_ENV} is not set by tests/conftest.py"
    return canary


def _wait_until_stored(api_url: str, flow_run_id: str, timeout_s: float = 90.0) -> None:
    """Until the planted run's log and event are stored (the server persists events in batches)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=api_url, timeout=30) as api:
        while True:
            logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                  "limit": 10, "offset": 0, "sort": "TIMESTAMP_ASC"})
            events = api.post("/events/filter", json={"filter": {
                "event": {"name": ["runbooks.test.canary-plant"]},
                "related": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 10})
            logs.raise_for_status()
            events.raise_for_status()
            if logs.json() and events.json()["events"]:
                return
            assert time.monotonic() < deadline, "the planted run's log or event never reached the server"
            time.sleep(1)


def test_the_scan_finds_a_planted_secret(prefect_api, state_dir):
    from prefect import flow, get_run_logger, tags
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event
    from prefect.input import create_flow_run_input
    from prefect.runtime import flow_run
    from prefect.states import Completed

    canary = _canary()
    secret = f"{canary}-planted-{uuid.uuid4().hex[:8]}"

    @flow(name="secrets-canary-plant")
    def leaky(password: str):
        get_run_logger().info("connecting with password=%s", password)
        create_markdown_artifact(markdown=f"token: `{password}`", key=f"canary-plant-{uuid.uuid4().hex[:8]}")
        emit_event(event="runbooks.test.canary-plant",
                   resource={"prefect.resource.id": f"runbooks.test.{flow_run.get_id()}"},
                   payload={"password": password})
        create_flow_run_input("leaked", {"password": password})
        return Completed(message=f"done with {password}")

    with tags(PLANT_TAG):
        state = leaky(password=secret, return_state=True)
    assert state.is_completed(), state
    planted = str(state.state_details.flow_run_id)

    flush_to_the_server()
    _wait_until_stored(prefect_api, planted)
    # and a log file under the state dir with the secret only base64-encoded, as a basic-auth header
    leaky_log = state_dir / "logs" / f"{PLANT_TAG}.log"
    leaky_log.parent.mkdir(parents=True, exist_ok=True)
    basic = base64.b64encode(f"alertmanager:{secret}".encode()).decode()
    leaky_log.write_text(f"POST /alerts/alertmanager Authorization: Basic {basic}\n")
    try:
        scan = full_scan(canary, prefect_api, state_dir)
    finally:
        leaky_log.unlink()

    assert [f for f in scan.leaks if f.kind == "file" and f.where == f"logs/{PLANT_TAG}.log"], \
        "the scan missed the base64-encoded secret in a log file"
    wanted = {"flow run", "flow run state", "flow run input", "log", "artifact", "event"}
    kinds = {f.kind for f in scan.findings if f.flow_run_id == planted}
    assert kinds >= wanted, f"the scan missed the planted secret in {sorted(wanted - kinds)}"
    assert planted in scan.planted_runs
    mine = [f for f in scan.findings if f.flow_run_id == planted]
    assert all(f.planted for f in mine), "what the planted run owns must be left out of the final verdict"
    assert not [f for f in scan.leaks if secret in f.excerpt and f.kind != "file"], \
        "the planted secret was found outside what the planted run owns:\n" + "\n".join(map(str, scan.leaks))


def test_no_secret_leaked(prefect_api, state_dir):
    """Runs last in the session (tests/conftest.py)."""
    canary = _canary()
    scan = full_scan(canary, prefect_api, state_dir)

    counts = {kind: scan.counts[kind] for kind in sorted(scan.counts)}
    print(f"secrets canary {canary}: scanned {counts}; planted runs left out: {len(scan.planted_runs)}")
    too_few = {kind: (scan.counts[kind], least) for kind, least in MINIMUM.items() if scan.counts[kind] < least}
    assert not too_few, (f"the scan looked at too little to mean anything (kind: (scanned, needed)) {too_few}: "
                         "run it after the scenario tests, as `make test` does")
    lab_logs = [p for p in (state_dir / "lab" / "logs").glob("*.log")]
    if lab_logs:
        assert len(lab_logs) >= 3 and scan.counts["file"] >= len(lab_logs)
    assert not scan.leaks, (f"{len(scan.leaks)} place(s) kept a secret of this run (marker {canary}):\n"
                            + "\n".join(map(str, scan.leaks)))
