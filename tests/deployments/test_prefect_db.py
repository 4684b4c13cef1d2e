"""The Prefect server on PostgreSQL (deployments/prefect_db.py, RUNBOOKS_PREFECT_DATABASE=postgres).

A second Prefect server, on a PostgreSQL cluster of its own, in its own state dir under pytest's
tmp dir; the session's server (SQLite, tests/conftest.py) is only asked whether it saw the run.
The fixture that starts this server lives here for now (tests/conftest.py is not ours to edit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import httpx
import pytest

from deployments import prefect_db
from deployments.stack import StackError, free_port, prefect_env, start_prefect_server, stop_pid
from incident.settings import REPO_ROOT
from lab.proc import pid_alive

FLOW = """
from prefect import flow, get_run_logger, task

@task
def add(a, b):
    return a + b

@flow(name="prefect-db-probe")
def probe():
    get_run_logger().info("probing the PostgreSQL-backed server")
    return add(add(1, 2), 3)

state = probe(return_state=True)
assert state.is_completed() and state.result() == 6, state
print(state.state_details.flow_run_id)
"""


class PgServer:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.home = state / "prefect"
        self.pid: int | None = None
        self.api_url = ""

    def start(self) -> None:
        self.pid, self.api_url = start_prefect_server(self.home, free_port(), self.state, ui=False,
                                                      database="postgres")

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid)
            self.pid = None

    def password(self) -> str:
        return prefect_db.Paths(self.state).password_file.read_text().strip()

    def logs(self) -> dict[Path, str]:
        """Every log file of the state dir, the cluster's (behind its link) included."""
        found: dict[Path, str] = {}
        for root, _, files in os.walk(self.state, followlinks=True):
            for name in files:
                if name.endswith(".log"):
                    found[Path(root) / name] = (Path(root) / name).read_text(errors="replace")
        return found


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    """A Prefect server on its own PostgreSQL; stopped, and its cluster removed, at the end.
    (To move to tests/conftest.py.)"""
    server = PgServer(tmp_path_factory.mktemp("prefect-pg") / "state")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        prefect_db.remove_postgres(server.state)


def test_setting_names_the_choices(monkeypatch):
    monkeypatch.delenv(prefect_db.SETTING, raising=False)
    assert prefect_db.setting() == prefect_db.DEFAULT_DATABASE
    monkeypatch.setenv(prefect_db.SETTING, "Postgres")
    assert prefect_db.setting() == "postgres"
    assert prefect_db.setting("sqlite") == "sqlite"
    monkeypatch.setenv(prefect_db.SETTING, "mysql")
    with pytest.raises(StackError, match="sqlite or postgres"):
        prefect_db.setting()


def test_prefect_env_never_holds_a_database_url(monkeypatch):
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://u:leaked@h/db")
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://u:leaked@h/db")
    env = prefect_env(Path("/nonexistent"), "http://127.0.0.1:1/api")
    assert "leaked" not in "".join(env.values())


def test_flow_runs_are_stored_in_postgres(pg_server, prefect_api):
    paths = prefect_db.Paths(pg_server.state)
    pg_pid = paths.procs.read_pid(prefect_db.NAME)
    assert pg_pid and pid_alive(pg_pid)
    assert (paths.password_file.stat().st_mode & 0o777) == 0o600
    port = prefect_db._recorded_port(paths)
    # started once, reused by the next start
    assert prefect_db.start_postgres(pg_server.state) == port
    assert paths.procs.read_pid(prefect_db.NAME) == pg_pid
    assert prefect_db.status(pg_server.state) == ("up", pg_pid, port)

    proc = subprocess.run([sys.executable, "-c", FLOW], env=prefect_env(pg_server.home, pg_server.api_url),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]

    run = httpx.get(f"{pg_server.api_url}/flow_runs/{run_id}", timeout=10)
    assert run.status_code == 200 and run.json()["state_type"] == "COMPLETED", run.text
    logs = httpx.post(f"{pg_server.api_url}/logs/filter", timeout=10,
                      json={"logs": {"flow_run_id": {"any_": [run_id]}}}).json()
    assert any("probing the PostgreSQL-backed server" in log["message"] for log in logs)
    # stored in PostgreSQL: the row is in its flow_run table ...
    assert prefect_db._psql(paths, port, f"SELECT count(*) FROM flow_run WHERE id = '{run_id}'",
                            db=prefect_db.DBNAME) == "1"
    # ... not in any SQLite: none was made in this server's home, the session's never saw it
    assert not list(pg_server.home.glob("*.db"))
    assert httpx.get(f"{prefect_api}/flow_runs/{run_id}", timeout=10).status_code == 404

    password = pg_server.password()
    assert len(password) >= 20
    for path, text in pg_server.logs().items():
        assert password not in text, f"the database password is in {path}"
    assert password not in proc.stdout + proc.stderr


def test_password_in_no_exception_or_log_when_the_database_is_down(pg_server, monkeypatch):
    """The server cannot reach its database (stopped under it): the error and every log say so
    without the password the server was given."""
    password = pg_server.password()
    assert prefect_db.stop_postgres(pg_server.state)
    assert prefect_db.status(pg_server.state)[0] == "down"
    monkeypatch.setattr(prefect_db, "start_postgres", lambda state: None)  # leave it down
    with pytest.raises(StackError) as info:
        start_prefect_server(pg_server.home, free_port(), pg_server.state, ui=False, database="postgres")
    text = "".join(traceback.format_exception(info.value))
    assert "exited while starting" in text and password not in text
    server_log = pg_server.logs()[pg_server.state / "logs" / "prefect-server.log"]
    assert "Connect call failed" in server_log  # it did try, and failed
    for path, log in pg_server.logs().items():
        assert password not in log, f"the database password is in {path}"
    pid = int((pg_server.state / "pids" / "prefect-server.pid").read_text())
    stop_pid(pid)


def test_a_failed_start_says_what_to_do_and_where_the_log_is(tmp_path_factory):
    state = tmp_path_factory.mktemp("prefect-pg-broken") / "state"
    try:
        prefect_db.start_postgres(state)
        password = prefect_db.Paths(state).password_file.read_text().strip()
        assert prefect_db.stop_postgres(state)
        paths = prefect_db.Paths(state)
        with open(paths.data / "postgresql.conf", "a") as conf:
            conf.write("work_mem = 'plenty'\n")  # postgres refuses to start
        with pytest.raises(StackError) as info:
            prefect_db.start_postgres(state)
        text = str(info.value)
        assert "pg_ctl start failed" in text and f"log: {paths.log}" in text
        assert "work_mem" in text  # the log's last lines show the cause
        assert "make down" in text and "RUNBOOKS_PREFECT_DATABASE=sqlite" in text
        assert password not in text and password not in paths.log.read_text()
    finally:
        prefect_db.remove_postgres(state)
