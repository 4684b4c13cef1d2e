"""The local stack: a Prefect server (on SQLite, or on a PostgreSQL of its own with
``RUNBOOKS_PREFECT_DATABASE=postgres``: deployments/prefect_db.py), the deployments of
prefect.yaml, a process worker, and the lab of real targets.

    python -m deployments.stack up|down|status

Everything lives under the state dir (``RUNBOOKS_STATE_DIR``, default ``.state``);
every process is stopped by the PID this module recorded when it started it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from incident.settings import REPO_ROOT, get_settings
from lab import pid_alive as _alive
from lab.proc import wait_until

WORK_POOL = "runbooks"
DEFAULT_PORT = 4200
_DB_NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Prefect's database settings: only the server gets one (start_prefect_server), with its password
_DB_URL_VARS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def prefect_env(home: Path, api_url: str) -> dict[str, str]:
    """Environment for every Prefect process of the stack (server, CLI, worker, tests).
    It never holds the server's database URL (the password): start_prefect_server adds it."""
    settings = get_settings()
    return {
        **{k: v for k, v in os.environ.items() if k not in _DB_URL_VARS},
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_CLI_PROMPT": "false",
        # the per-target locks' leases (incident/locks.py) survive a server restart
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        "RUNBOOKS_STATE_DIR": str(settings.state_dir),
        "RUNBOOKS_INVENTORY": str(settings.inventory_path),
        "RUNBOOKS_PROJECT_DIR": str(REPO_ROOT),
    }


def _spawn(name: str, argv: list[str], env: dict[str, str], state: Path) -> int:
    (state / "logs").mkdir(parents=True, exist_ok=True)
    (state / "pids").mkdir(parents=True, exist_ok=True)
    log = open(state / "logs" / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO_ROOT)
    (state / "pids" / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def stop_pid(pid: int, timeout_s: float = 15.0) -> None:
    """Stop a process this stack started (and its session), by PID: TERM, then KILL."""
    if not _alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if wait_until(lambda: not _alive(pid), timeout_s, 0.2):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _answers_200(url: str, pid: int | None, exited: str) -> bool:
    """One readiness probe: StackError(exited) at once if ``pid`` died meanwhile."""
    if pid is not None and not _alive(pid):
        raise StackError(exited)
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def wait_for_api(api_url: str, timeout_s: float = 120.0, pid: int | None = None) -> None:
    wait_until(lambda: _answers_200(f"{api_url}/health", pid, "the Prefect server exited while starting; see its log"),
               timeout_s, 0.5, what=f"the Prefect API at {api_url} did not answer", fail=StackError,
               propagate=(StackError,))


def start_prefect_server(home: Path, port: int, state: Path, ui: bool = True,
                         database: str | None = None) -> tuple[int, str]:
    """Start ``prefect server start`` on 127.0.0.1; wait until healthy.

    ``database``: ``sqlite`` (``home``/prefect.db) or ``postgres`` (the cluster of
    deployments/prefect_db.py under ``<state>/prefect/postgres``, started first or reused);
    None: ``RUNBOOKS_PREFECT_DATABASE``. Only this process gets the database URL.
    """
    from deployments import prefect_db

    database = prefect_db.setting(database)
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(home, api_url)
    env["PREFECT_UI_ENABLED"] = "true" if ui else "false"
    if database == "postgres":
        prefect_db.start_postgres(state)
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_db.connection_url(state)
    pid = _spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start",
                                    "--host", "127.0.0.1", "--port", str(port)], env, state)
    (state / "pids" / "prefect-server.database").write_text(database + "\n")
    wait_for_api(api_url, pid=pid)
    return pid, api_url


def server_database(state: Path) -> str | None:
    """The database the Prefect server of ``<state>/pids/prefect-server.pid`` was started on."""
    try:
        return (state / "pids" / "prefect-server.database").read_text().strip() or None
    except OSError:
        return None


def prefect_cli(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise StackError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def deploy_all(env: dict[str, str]) -> None:
    """Create the work pool and register every deployment of prefect.yaml.

    The deployment triggers (the automation dispatch path) are created enabled only when the
    gateway's dispatch mode, ``RUNBOOKS_GATEWAY_DISPATCH`` in ``env``, is ``automation``;
    otherwise disabled, so that emitting a Prefect event cannot start a remediation.
    """
    dispatch = env.get("RUNBOOKS_GATEWAY_DISPATCH") or "runner"
    if dispatch not in ("runner", "automation", "shadow"):
        raise StackError(f"RUNBOOKS_GATEWAY_DISPATCH={dispatch!r} is not a dispatch mode; "
                         "set it to runner, automation or shadow (README, 'Alerts start remediations')")
    env = {**env, "RUNBOOKS_DISPATCH_TRIGGERS_ENABLED": "true" if dispatch == "automation" else "false"}
    prefect_cli(["work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"], env)
    prefect_cli(["--no-prompt", "deploy", "--all"], env)
    create_kill_switch(env["PREFECT_API_URL"])


def create_kill_switch(api_url: str) -> None:
    """The kill switch variable, off, so that it shows in the UI (Variables) ready to flip.
    One that exists is left as it is: someone may have turned it on."""
    from incident.guardrails import KILL_SWITCH

    with httpx.Client(base_url=api_url, timeout=10.0) as http:
        if http.get(f"/variables/name/{KILL_SWITCH}").status_code == 200:
            return
        resp = http.post("/variables/", json={"name": KILL_SWITCH, "value": "off",
                                              "tags": ["runbooks", "guardrail"]})
        if resp.status_code not in (201, 409):  # 409: created meanwhile
            raise StackError(f"creating the kill switch variable {KILL_SWITCH} failed: "
                             f"{resp.status_code} {resp.text}")


def start_worker(env: dict[str, str], state: Path) -> int:
    return _spawn("prefect-worker", [sys.executable, "-m", "prefect", "worker", "start",
                                     "--pool", WORK_POOL, "--type", "process"], env, state)


def gateway_secrets(state: Path, lab) -> tuple[dict[str, str], bool]:
    """A secret for every source, kept in ``<state>/gateway/local.json`` (0600): the ones of
    the previous ``make up``, new ones where missing; Alertmanager's bearer token is the token
    the lab's Alertmanager presents. Returns them and whether they changed."""
    from gateway.local import LocalGateway, load_local, local_state_path, save_local, stack_secrets
    from lab.context import new_secret

    path = local_state_path(state)
    previous = load_local(path)
    token = lab.info.alertmanager_token_file.read_text().strip()
    secrets = stack_secrets(previous.env if previous else None, token, new=lambda: new_secret(32))
    changed = previous is None or previous.env != secrets
    save_local(path, LocalGateway(url=lab.info.gateway_url, pid=previous.pid if previous else None,
                                  env=secrets))
    return secrets, changed


def gateway_verifies_all(url: str) -> bool:
    """Does the gateway at ``url`` answer and verify every source (else it predates the secrets)?"""
    try:
        resp = httpx.get(f"{url}/healthz", timeout=3.0)
        return resp.status_code == 200 and all(resp.json().get("verification", {}).values())
    except (httpx.TransportError, ValueError):
        return False


def start_gateway(env: dict[str, str], state: Path, lab) -> int:
    """The alert gateway on the lab's gateway port, verifying every source with the secrets
    of ``<state>/gateway/local.json`` (where send-test finds it)."""
    from gateway.local import load_local, local_state_path, save_local

    secrets, _ = gateway_secrets(state, lab)
    pid = spawn_gateway(env, state, lab.info.gateway_port, secrets)
    path = local_state_path(state)
    recorded = load_local(path)
    if recorded is not None:
        save_local(path, recorded.model_copy(update={"pid": pid}))
    return pid


def spawn_gateway(env: dict[str, str], state: Path, port: int, settings: dict[str, str],
                  name: str = "alert-gateway") -> int:
    """``python -m gateway serve`` as its own process on 127.0.0.1:port; its PID once healthy.

    ``settings``: RUNBOOKS_GATEWAY_* variables on top of ``env``.
    """
    genv = {**env, **settings, "RUNBOOKS_GATEWAY_PORT": str(port)}
    pid = _spawn(name, [sys.executable, "-m", "gateway", "serve"], genv, state)
    log = state / "logs" / f"{name}.log"
    try:
        wait_until(lambda: _answers_200(f"http://127.0.0.1:{port}/healthz", pid,
                                        f"the alert gateway exited; see {log}"),
                   60, 0.3, what=f"the alert gateway (log: {log}) did not answer on port {port}", fail=StackError,
                   propagate=(StackError,))
    except StackError:
        stop_pid(pid)
        raise
    return pid


def runner_count() -> int:
    """How many runner processes ``make up`` starts (``RUNBOOKS_RUNNERS``, default 2)."""
    raw = os.environ.get("RUNBOOKS_RUNNERS", "2")
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise StackError(f"RUNBOOKS_RUNNERS={raw!r}: give the number of runner processes, 1 to 64")
    return int(raw)


def start_runners(env: dict[str, str], state: Path, gateway_url: str, count: int) -> list[int]:
    """``count`` runner processes (``python -m gateway runner``) taking runs from the gateway;
    the gateway's secrets (the runner token among them) come from ``<state>/gateway/local.json``."""
    from gateway.local import load_local, local_state_path

    local = load_local(local_state_path(state))
    if local is None:
        raise StackError("the gateway's secrets are missing (<state>/gateway/local.json): run `make up`")
    renv = {**env, **local.env}
    return [_spawn(f"runner-{i}", [sys.executable, "-m", "gateway", "runner", "--gateway", gateway_url],
                   renv, state) for i in range(1, count + 1)]


def _runner_names(state: Path) -> list[str]:
    return sorted(p.stem for p in (state / "pids").glob("runner-*.pid"))


# -- CLI ------------------------------------------------------------------------------
def _pid(state: Path, name: str) -> int | None:
    f = state / "pids" / f"{name}.pid"
    return int(f.read_text()) if f.exists() else None


def up() -> None:
    from lab import Lab

    from deployments import prefect_db

    settings = get_settings()
    state = settings.state_dir
    database = prefect_db.setting()  # a wrong RUNBOOKS_PREFECT_DATABASE fails before the lab starts
    runners = runner_count()
    state.mkdir(parents=True, exist_ok=True)
    print("lab: starting dockerd, PostgreSQL, Redis, sshd, the web container, the disk, the "
          "exporters, Prometheus and Alertmanager ...", flush=True)
    lab = Lab(settings.lab_dir, alerting=True)
    lab.up()
    for line in lab.repaired + lab.left_down:  # up never repairs a target silently
        print(f"lab: {line}", flush=True)
    home = state / "prefect"
    api_url = f"http://127.0.0.1:{DEFAULT_PORT}/api"
    server = _pid(state, "prefect-server")
    if server and _alive(server):
        running_on = server_database(state) or "sqlite"
        if running_on != database:
            print(f"prefect: the running server uses {_DB_NAMES[running_on]}, not the "
                  f"{prefect_db.SETTING}={database} asked for; `make down` and `make up` to switch",
                  flush=True)
        if running_on == "postgres":  # it may have stopped under the running server
            prefect_db.start_postgres(state)
        database = running_on
        wait_for_api(api_url, pid=server)
    else:
        where = home if database == "sqlite" else prefect_db.Paths(state).link
        print(f"prefect: starting the server on 127.0.0.1:{DEFAULT_PORT} ({_DB_NAMES[database]} in {where}) ...",
              flush=True)
        server, api_url = start_prefect_server(home, DEFAULT_PORT, state, database=database)
    print(f"prefect: its database is {_DB_NAMES[database]} ({prefect_db.SETTING}={database})", flush=True)
    env = prefect_env(home, api_url)
    print("prefect: registering the deployments of prefect.yaml ...", flush=True)
    deploy_all(env)
    worker = _pid(state, "prefect-worker")
    if not (worker and _alive(worker)):
        worker = start_worker(env, state)
    gateway = _pid(state, "alert-gateway")
    if gateway and _alive(gateway):
        _, changed = gateway_secrets(state, lab)
        if changed or not gateway_verifies_all(lab.info.gateway_url):
            print("alert gateway: restarting it with a secret for every source ...", flush=True)
            stop_pid(gateway)
            gateway = None
    if not (gateway and _alive(gateway)):
        gateway = start_gateway(env, state, lab)
        for name in _runner_names(state):  # their token may have changed with the gateway's secrets
            if pid := _pid(state, name):
                stop_pid(pid)
            (state / "pids" / f"{name}.pid").unlink(missing_ok=True)
    alive = [n for n in _runner_names(state) if (pid := _pid(state, n)) and _alive(pid)]
    if len(alive) != runners:
        for name in _runner_names(state):
            if pid := _pid(state, name):
                stop_pid(pid)
            (state / "pids" / f"{name}.pid").unlink(missing_ok=True)
        print(f"runners: starting {runners} (RUNBOOKS_RUNNERS) ...", flush=True)
        start_runners(env, state, lab.info.gateway_url, runners)
    info = {"ui": f"http://127.0.0.1:{DEFAULT_PORT}", "api": api_url, "prefect_database": database,
            "gateway": lab.info.gateway_url,
            "inventory": str(settings.inventory_path), "lab": lab.info.model_dump(mode="json")}
    (state / "stack.json").write_text(json.dumps(info, indent=2))
    print(f"""
Up.
  Prefect UI     {info['ui']}   (deployments: service-down, db-connections, db-locks, redis-down, disk-full;
                 monthly drills drill/drill-<scenario>, all at once: drill-all/drill-all;
                 the monthly report: incident-metrics/incident-metrics)
  Prefect API    {api_url}   (database: {_DB_NAMES[database]})
  inventory      {settings.inventory_path}
  alert gateway  {lab.info.gateway_url}/docs   ({runners} runner processes execute its runs;
                 Alertmanager posts to /alerts/alertmanager;
                 every source's secret in {state / 'gateway' / 'local.json'}; try
                 `.venv/bin/python -m gateway send-test alertmanager`)
  Prometheus     {lab.info.prometheus_url}   Alertmanager {lab.info.alertmanager_url}
  target health  {lab.info.health_url}
  logs           {state / 'logs'} and {settings.lab_dir / 'logs'}
Try: break the lab with a named fault (`.venv/bin/python -m lab faults` lists them), e.g.
`.venv/bin/python -m lab inject redis-stopped`: within seconds Alertmanager alerts the gateway,
which starts the matching runbook (redis-down); watch it in the UI. Or run a deployment by
hand from the UI (`inject web-broken-release` needs your approval to roll back).
Stop everything with `make down`.""")


def down() -> None:
    from lab import Lab

    settings = get_settings()
    state = settings.state_dir
    from deployments import prefect_db

    for name in (*_runner_names(state), "alert-gateway", "prefect-worker", "prefect-server"):
        pid = _pid(state, name)
        if pid:
            stop_pid(pid)
            (state / "pids" / f"{name}.pid").unlink(missing_ok=True)
    (state / "pids" / "prefect-server.database").unlink(missing_ok=True)
    pg = prefect_db.stop_postgres(state)  # after the server: it is the server's database
    Lab(settings.lab_dir).down()
    print("down: stopped the runners, the gateway, the worker, the Prefect server"
          + (", its PostgreSQL" if pg else "") + " and the lab")


def status() -> None:
    from lab import Lab

    settings = get_settings()
    lab = Lab(settings.lab_dir)
    where = {"prefect-server": f"http://127.0.0.1:{DEFAULT_PORT}",
             "alert-gateway": lab.info.gateway_url or ""}  # the lab's gateway port, chosen once
    from deployments import prefect_db

    state = settings.state_dir
    for name in ("prefect-server", "prefect-worker", "alert-gateway", *_runner_names(settings.state_dir)):
        pid = _pid(state, name)
        up = bool(pid and _alive(pid))
        print(f"{name:18} {f'up (pid {pid})' if up else 'down'}"
              + (f"  {where[name]}" if up and where.get(name) else "")
              + (f"  on {_DB_NAMES.get(server_database(state) or 'sqlite', '?')}"
                 if up and name == "prefect-server" else ""))
    pg, pg_pid, pg_port = prefect_db.status(state)
    print(f"{prefect_db.NAME:18} {f'{pg} (pid {pg_pid})' if pg_pid else pg}"
          + (f"  127.0.0.1:{pg_port}" if pg_pid and pg_port else ""))
    for name, st in lab.status().items():
        print(f"{name:18} {st}")


if __name__ == "__main__":
    commands = {"up": up, "down": down, "status": status}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m deployments.stack {{{'|'.join(commands)}}}")
    # run as __main__, this file's StackError is not deployments.stack's, which prefect_db raises
    from deployments import stack as _imported

    try:
        commands[sys.argv[1]]()
    except (StackError, _imported.StackError) as exc:
        sys.exit(f"error: {exc}")
