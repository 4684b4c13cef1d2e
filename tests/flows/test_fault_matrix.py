"""The fault matrix: every scenario flow, against the real lab, with what else can go wrong
while it runs - the SSH host refusing, the database down, the Docker engine stopped, the
Prefect server restarted, the gateway killed, a worker killed.

Each mode runs the five scenarios at once, each on its own real fault, with every changing
step asking a human (an empty policy file), so every run is paused at a known point - its
first changing step - when the failure hits. Then the runs are approved (or their process is
dead), and each must end in a clear state: its record closed (never "open"), saying what was
changed and what not, an escalation sent for every run that did not resolve, with the one
escalation schema, and no changing step started without a record of it.
"""

from __future__ import annotations

import logging
import os
import uuid
import signal
import sys
import time
from pathlib import Path
from uuid import UUID

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events import emit_event
from prefect.flow_runs import resume_flow_run

from deployments.stack import _spawn, free_port, prefect_env, spawn_gateway, start_worker, stop_pid
from flows.db_connections import db_connections
from flows.db_locks import db_locks
from flows.disk_full import disk_full
from flows.redis_down import redis_down
from flows.service_down import service_down
from incident.record import load_record
from incident.sweeper import sweep_abandoned_runs
from lab.faults import held_faults, stop_holder
from lab.proc import wait_until
from tests.helpers import escalations, report, run_id_of, run_tags, start_flow, wait_paused

pytestmark = pytest.mark.lab

# scenario -> (its fault, its flow, short deadlines for tests, the alert that names it)
SCENARIOS = {
    "service-down": ("web-killed", service_down, {"restart_deadline_s": 8, "verify_deadline_s": 10},
                     "ServiceDown"),
    "db-connections": ("pg-connections-idle", db_connections,
                       {"verify_checks": 2, "verify_deadline_s": 10, "check_interval_s": 0.5},
                       "PostgresConnectionsExhausted"),
    "db-locks": ("pg-lock-blocker-busy", db_locks, {"cancel_settle_s": 2, "verify_checks": 2,
                                                     "verify_deadline_s": 10, "check_interval_s": 0.5},
                 "PostgresLockContention"),
    "redis-down": ("redis-stopped", redis_down, {"verify_deadline_s": 10, "check_interval_s": 0.5},
                   "RedisDown"),
    "disk-full": ("disk-filled-old-files", disk_full, {}, "DiskSpaceLow"),
}
# The leaky client of pg-connections-idle takes 33 of the app role's 34 connections, and the
# lock fault needs 3 more: the matrix runs db-locks in a second wave, the others at once.
WAVES = [["service-down", "db-connections", "redis-down", "disk-full"], ["db-locks"]]
# Each scenario on its own name for the web service (same container, database, Redis, disk):
# the runs of a wave must all reach their first changing step at once, and the lock of one
# target would queue them one behind the other (tests/incident/test_guardrails.py tests it).
TARGETS = {scenario: f"web-{scenario}" for scenario in SCENARIOS}
APPROVE = {"decision": "approve", "reason": "fault matrix", "approver": "matrix@example.test"}
REJECT = {"decision": "reject", "reason": "fault matrix: one step is enough", "approver": "matrix@example.test"}


@pytest.fixture
def every_step_asks(tmp_path, monkeypatch):
    """No auto-approval policy: every run pauses at its first changing step."""
    path = tmp_path / "no-policies.yaml"
    path.write_text("policies: []\n")
    monkeypatch.setenv("RUNBOOKS_POLICIES", str(path))
    return path


@pytest.fixture
def matrix_inventory(tmp_path, monkeypatch) -> Path:
    """The lab's inventory plus the matrix's names for the web service (TARGETS)."""
    inventory = yaml.safe_load(Path(os.environ["RUNBOOKS_INVENTORY"]).read_text())
    inventory["services"].update({t: dict(inventory["services"]["web"]) for t in TARGETS.values()})
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory))
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(path))
    return path


@pytest.fixture
def broken_lab(healthy_lab, every_step_asks, matrix_inventory):
    """The lab, put right (every component up, every fault reset) after the test."""
    yield healthy_lab
    _restore(healthy_lab)


def _restore(lab) -> None:
    """Every component up (a mode stopped one) and every fault reset. The held faults go
    first (their sessions ended too: PostgreSQL does not notice a killed client in the middle
    of pg_sleep, and a held row lock would block the lab's own set-up statements); with
    PostgreSQL stopped their sessions are gone already and only the holders are stopped."""
    for name in held_faults(lab):
        if lab.ctx.procs.alive("postgres"):
            lab.reset_fault(name)
        else:
            stop_holder(lab, name)
    lab.up()
    lab.reset_all_faults()


def _break(lab, wave: list[str]) -> None:
    """Every part healthy and up, then the wave's faults injected."""
    _restore(lab)
    for scenario in wave:
        lab.inject(SCENARIOS[scenario][0])


def _start_all(wave: list[str]) -> dict[str, tuple]:
    """Start the wave's flows in threads (as a runner would); wait until each is paused."""
    runs = {}
    for scenario in wave:
        _, flow, knobs, _ = SCENARIOS[scenario]
        thread, incident_id = start_flow(flow, target=TARGETS[scenario], **knobs)
        runs[scenario] = (thread, incident_id)
    out = {}
    for scenario, (thread, incident_id) in runs.items():
        run_id = run_id_of(incident_id)
        wait_paused(run_id)
        out[scenario] = (thread, incident_id, run_id)
    return out


def _approve_all(runs: dict[str, tuple], timeout_s: float = 240.0) -> dict[str, object]:
    """Approve every pause of the runs (a run may ask again, e.g. restart then rollback) until
    each has ended; their final states."""
    deadline = time.monotonic() + timeout_s
    asked: dict[str, dict[str, dict]] = {}
    while any(thread.is_alive() for thread, _, _ in runs.values()):
        assert time.monotonic() < deadline, f"runs did not end: {[s for s, r in runs.items() if r[0].is_alive()]}"
        with get_client(sync_client=True) as client:
            for scenario, (_, _, run_id) in runs.items():
                state = client.read_flow_run(run_id).state
                if not (state and state.is_paused()):
                    continue
                answers = asked.setdefault(scenario, {})
                key = str(state.state_details.pause_key)
                # the first step is approved; a second one (say, a rollback after a restart that
                # did not help) is rejected: the record must then say what the first one changed
                answer = answers.get(key) or (REJECT if answers else APPROVE)
                try:
                    resume_flow_run(run_id, run_input=answer)
                    answers[key] = answer
                except RuntimeError:
                    pass  # its form is not saved yet: next round
        time.sleep(1.0)
    return {scenario: thread.state for scenario, (thread, _, _) in runs.items()}


def _closed_and_true(scenario: str, incident_id: str, run_id, api_url: str) -> str:
    """The record is closed; a run that did not resolve escalated with the one schema; no
    changing step is left without a record. Returns the closed outcome."""
    record = load_record(UUID(str(run_id)))
    assert record is not None, f"{scenario}: no saved record"
    assert record.outcome != "open", f"{scenario}: record left open: {record.timeline[-3:]}"
    text = report(incident_id)
    assert "**Status:** open" not in text, f"{scenario}: the report still says open"
    assert f"outcome:{record.outcome.replace(' ', '-')}" in run_tags(run_id)
    started = [e.event.removeprefix("starting ") for e in record.timeline if e.event.startswith("starting ")]
    for step in started:  # every changing step started has a result or is named as unknown
        action = step.split(" on ")[0]
        assert any(a.action == action for a in record.actions) or step in record.summary, \
            f"{scenario}: {step} started, but neither recorded nor named in the summary"
    if record.outcome not in ("resolved", "already fine", "resolved without action", "not approved"):
        found = escalations(api_url, incident_id)
        assert found, f"{scenario}: {record.outcome} without an escalation"
        payload = found[-1]["payload"]
        assert payload["scenario"] == scenario and payload["environment"] == "lab", payload
        assert payload["incident_id"] == incident_id and payload["target"] == TARGETS[scenario]
        assert "changed" in record.summary, f"{scenario}: the summary must say what changed: {record.summary}"
    return record.outcome


def _stop_while_paused(lab, component: str, expect_failed: set[str], prefect_api,
                       waves: list[list[str]] = WAVES) -> dict[str, tuple]:
    """Per wave: break, pause all, stop ``component``, approve all; every record closed and
    true. Returns scenario -> (outcome, incident id)."""
    outcomes = {}
    for wave in waves:
        _break(lab, wave)
        runs = _start_all(wave)
        lab.stop_component(component)
        _approve_all(runs)
        outcomes.update({s: (_closed_and_true(s, inc, rid, prefect_api), inc)
                         for s, (_, inc, rid) in runs.items()})
    for scenario in expect_failed:
        assert outcomes[scenario][0] == "failed", f"{scenario} with {component} down: {outcomes}"
    return outcomes


def test_ssh_host_refusing(prefect_api, broken_lab):
    """Redis is started and old files deleted over SSH: those two escalate; no run is left open.
    (db-locks, which needs neither SSH nor Docker, runs only in the database case: its wave of
    its own would cost a second stop and start of the component and prove nothing more.)"""
    _stop_while_paused(broken_lab, "sshd", {"redis-down", "disk-full"}, prefect_api, WAVES[:1])


def test_database_down(prefect_api, broken_lab):
    outcomes = _stop_while_paused(broken_lab, "postgres", {"db-connections", "db-locks"}, prefect_api)
    assert outcomes["disk-full"][0] == "resolved", "the disk does not need the database"


def test_docker_engine_stopped_mid_run(prefect_api, broken_lab):
    outcomes = _stop_while_paused(broken_lab, "dockerd", {"service-down"}, prefect_api, WAVES[:1])
    assert outcomes["disk-full"][0] == "resolved", "the disk does not need Docker"
    text = report(outcomes["service-down"][1])
    assert "restart_container" in text and "Docker engine" in text


#: How long the Prefect API stays away under the first wave: longer than Prefect's own pause
#: loop survives (its client gives up after ~60 s of connection errors). By hand, e.g. 11 min:
#: RUNBOOKS_TEST_API_OUTAGE_S=660 .venv/bin/python -m pytest tests/flows/test_fault_matrix.py -k outage
OUTAGE_S = float(os.environ.get("RUNBOOKS_TEST_API_OUTAGE_S", "65"))


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _event_reaches_the_server(api_url: str) -> bool:
    """Emit a fresh event from this process and find it on the server (the events client
    reconnects after the restart: escalations of later tests need it)."""
    marker = f"runbooks.test.{uuid.uuid4().hex[:12]}"
    emit_event("runbooks.test.after-restart", resource={"prefect.resource.id": marker})
    return wait_until(lambda: bool(httpx.post(f"{api_url}/events/filter", timeout=10, json={
        "filter": {"resource": {"id": [marker]}}, "limit": 1}).json().get("events")), 60, 1.0)


@pytest.mark.timeout(OUTAGE_S + 900)
def test_prefect_api_outage_while_paused(prefect_api, broken_lab, restartable_prefect):
    """Every paused run rides out the Prefect API going away - for OUTAGE_S under the first
    wave, longer than Prefect's own pause loop lasts; a quick restart under the second - and is
    approved afterwards, on the same URL and database. Each waiting run says the API is
    unreachable (a WARNING per failed check) and that it answers again."""
    warnings = _Warnings()
    rode_out: dict[str, tuple] = {}
    logging.getLogger("prefect.flow_runs").addHandler(warnings)
    try:
        for wave, outage_s in zip(WAVES, (OUTAGE_S, 0.0)):
            _break(broken_lab, wave)
            runs = _start_all(wave)
            if outage_s:
                rode_out = runs
            restartable_prefect.stop()
            try:
                time.sleep(outage_s)
                assert all(thread.is_alive() for thread, _, _ in runs.values()), \
                    "a waiting run died during the API outage"
            finally:
                restartable_prefect.start()
            states = _approve_all(runs)
            for scenario, (_, incident_id, run_id) in runs.items():
                assert _closed_and_true(scenario, incident_id, run_id, prefect_api) == "resolved", \
                    f"{scenario}: {states[scenario]}"
                assert broken_lab.fault_healthy(SCENARIOS[scenario][0]), f"{scenario}: not healed"
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(warnings)
    unreachable = [w for w in warnings.lines if "Prefect API is unreachable" in w]
    assert len(unreachable) >= 2 * len(WAVES[0]), f"a WARNING per failed check: {warnings.lines}"
    assert sum("answers again" in w for w in warnings.lines) >= len(WAVES[0]), warnings.lines
    first_run = next(iter(rode_out.values()))[2]

    def back_in_the_runs_logs() -> bool:  # shipped by Prefect's log worker, in its own time
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[first_run]),
                level=LogFilterLevel(ge_=logging.WARNING)))
        return any("answers again" in log.message for log in logs)

    assert wait_until(back_in_the_runs_logs, 30, 1.0), "the 'answers again' warning never reached the run's logs"
    assert restartable_prefect.answers() and _event_reaches_the_server(prefect_api), \
        "after the restart the session's server must answer on the same URL, events included"


# -- the processes that run flows, killed --------------------------------------------------
def _env(api_url: str, policies: Path) -> dict[str, str]:
    env = {**os.environ, **prefect_env(Path(os.environ["PREFECT_HOME"]), api_url)}
    env["RUNBOOKS_POLICIES"] = str(policies)
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = "30"
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
    return env


def _descendants(pid: int) -> list[int]:
    """The PIDs under ``pid`` (its children, theirs, ...), from /proc."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            kids = [int(p) for p in task.read_text().split()]
            out += kids
            todo += kids
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL a process we started and everything it started (no hook runs, like a lost host)."""
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alert(scenario: str) -> dict:
    alertname = SCENARIOS[scenario][3]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    labels = {"alertname": alertname, "service": TARGETS[scenario], "severity": "critical"}
    return {"version": "4", "groupKey": f'{{}}:{{alertname="{alertname}"}}', "truncatedAlerts": 0,
            "status": "firing", "receiver": "runbooks", "groupLabels": {"alertname": alertname},
            "commonLabels": labels, "commonAnnotations": {}, "externalURL": "http://127.0.0.1:9093",
            "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": alertname},
                        "startsAt": now, "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "http://127.0.0.1:9090/graph", "fingerprint": ""}]}


def _paused_since(since: float, n: int) -> list:
    """The flow runs created since ``since`` (epoch s), once ``n`` of them are paused."""
    got: list = []

    def found() -> bool:
        with get_client(sync_client=True) as client:
            runs = [r for r in client.read_flow_runs(limit=50, sort=FlowRunSort.START_TIME_DESC)
                    if r.created and r.created.timestamp() >= since and r.state and r.state.is_paused()]
        got[:] = runs
        return len(runs) >= n

    assert wait_until(found, 180, 1.0), f"fewer than {n} runs paused: {[r.name for r in got]}"
    return got


def _incident_of(run) -> str:
    return next(t for t in run.tags if t.startswith("incident:")).removeprefix("incident:")


def _assert_all_closed_failed(runs, api_url: str) -> None:
    for run in runs:
        scenario = next(t for t in run.tags if t.startswith("scenario:")).removeprefix("scenario:")
        incident_id = _incident_of(run)
        assert _closed_and_true(scenario, incident_id, run.id, api_url) == "failed"
        record = load_record(run.id)
        assert record is not None and "this run changed nothing" in record.summary, record and record.summary
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run.id).state.is_final(), "a dead run must not stay Paused"


def test_gateway_and_runner_killed_mid_run(deployed, broken_lab, state_dir, every_step_asks):
    """The runner executing the remediations and the gateway are both killed (SIGKILL, no hook
    runs) while the runs wait for approval, then started again: the new gateway keeps the dead
    runner's claims for one lease, then settles them - every record closed, escalated, nothing
    re-run. (The alerts are posted by hand: the real alert path is tests/flows/test_drill.py.)"""
    port = free_port()
    token = "matrix-am-token"
    settings = {"RUNBOOKS_GATEWAY_ALERTMANAGER_BEARER_TOKEN": token,
                "RUNBOOKS_GATEWAY_RUNNER_TOKEN": "matrix-runner-token-0123456789",
                "RUNBOOKS_GATEWAY_RUNNER_LEASE_S": "4",
                "RUNBOOKS_GATEWAY_STORE": str(state_dir / "gateway" / "matrix.db"),
                "RUNBOOKS_GATEWAY_INSECURE_SOURCES": "grafana,sentry,pagerduty,opsgenie,cloudevents"}
    env = _env(deployed, every_step_asks)
    url = f"http://127.0.0.1:{port}"
    runner_argv = [sys.executable, "-m", "gateway", "runner", "--gateway", url]
    pid = spawn_gateway(env, state_dir, port, settings, name="matrix-gateway")
    runner = _spawn("matrix-runner", runner_argv, {**env, **settings}, state_dir)
    try:
        for wave in WAVES:
            _break(broken_lab, wave)
            since = time.time()
            for scenario in wave:
                resp = httpx.post(f"{url}/alerts/alertmanager", json=_alert(scenario),
                                  headers={"Authorization": f"Bearer {token}"}, timeout=10)
                assert resp.status_code in (200, 202), resp.text
            mine = _paused_since(since, len(wave))
            _kill_tree(runner)
            _kill_tree(pid)
            pid = spawn_gateway(env, state_dir, port, settings, name="matrix-gateway")
            runner = _spawn("matrix-runner", runner_argv, {**env, **settings}, state_dir)
            assert wait_until(lambda: all(_tags_final(r.id) for r in mine), 60, 1.0), \
                "the lapsed claims left runs open"
            _assert_all_closed_failed(mine, deployed)
    finally:
        stop_pid(runner)
        stop_pid(pid)


def _tags_final(run_id) -> bool:
    return any(t.startswith("outcome:") for t in run_tags(run_id))


def test_worker_killed_mid_run(deployed, broken_lab, state_dir, every_step_asks):
    """A worker and its flow processes killed while the runs wait: heartbeats stop, and the
    sweep marks them Crashed and closes their records with an escalation."""
    env = _env(deployed, every_step_asks)
    runs = []
    for wave in WAVES[:1]:  # db-locks (the second wave) needs no worker of its own to prove this
        _break(broken_lab, wave)
        pid = start_worker(env, state_dir)
        try:
            since = time.time()
            with get_client(sync_client=True) as client:
                for scenario in wave:
                    dep = client.read_deployment_by_name(f"{scenario}/{scenario}")
                    client.create_flow_run_from_deployment(dep.id, parameters={"target": TARGETS[scenario]})
            runs += _paused_since(since, len(wave))
        finally:
            _kill_tree(pid)
    closed: list[str] = []
    assert wait_until(lambda: closed.extend(sweep_abandoned_runs(stale_after_s=35)) or
                      all(_tags_final(r.id) for r in runs), 150, 3.0), "the sweep left runs open"
    assert len(closed) >= len(runs)
    _assert_all_closed_failed(runs, deployed)
