"""Shared fixtures: one real Prefect server and one real lab for the whole test run.

The environment is set here, before anything imports Prefect, so that every flow run
(also those started in threads by the tests) talks to the test server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import typing
from pathlib import Path

# Under the temp dir, not the checkout: the lab runs PostgreSQL as user postgres, which
# must be able to traverse every parent dir (a CI checkout may sit in a 0700 dir), and
# unix socket paths must stay short.
_STATE = Path(tempfile.mkdtemp(prefix="rb-test-"))
_STATE.chmod(0o755)
os.environ["RUNBOOKS_STATE_DIR"] = str(_STATE)
os.environ["RUNBOOKS_INVENTORY"] = str(_STATE / "lab" / "inventory.yaml")
os.environ["RUNBOOKS_APPROVAL_POLL_S"] = "1"

# Guardrails for the whole session: the reviewed rules, but with limits no ordinary test
# reaches (tests heal `web` dozens of times an hour, which the loop guard rightly stops) and
# a lock polled often. tests/incident/test_guardrails.py tightens them per test.
PERMISSIVE_GUARDRAILS = _STATE / "guardrails.yaml"
PERMISSIVE_GUARDRAILS.write_text(
    "defaults: {max_automatic_fixes: 10000, max_failed_fixes: 10000}\n"
    "scenarios: {}\n"
    "blast_radius: {max_restarts_per_service: 10000}\n"
    "lock: {wait_s: 600, lease_s: 60, poll_s: 0.5}\n")
os.environ["RUNBOOKS_GUARDRAILS"] = str(PERMISSIVE_GUARDRAILS)

# --- secrets canary (tests/test_secrets_canary.py) -------------------------------------------
# One marker per session inside every secret the run uses: the lab's generated passwords and
# tokens (lab.context.new_secret reads it) and the gateway fixture's secrets. The last test of
# the session scans everything the runs, logs and stores kept for it.
SECRET_CANARY = f"canary-{secrets.token_hex(8)}"
os.environ["RUNBOOKS_SECRET_CANARY"] = SECRET_CANARY
CANARY_MODULE = "test_secrets_canary.py"


def canary_secret(name: str) -> str:
    """A secret for setting ``name`` that carries the session's canary."""
    return f"{SECRET_CANARY}-{name.replace('_', '-')}-{secrets.token_hex(8)}"
# ---------------------------------------------------------------------------------------------

from deployments.stack import free_port, prefect_env, start_prefect_server, stop_pid  # noqa: E402

_PORT = free_port()
os.environ.update(prefect_env(_STATE / "prefect", f"http://127.0.0.1:{_PORT}/api"))

import httpx  # noqa: E402
import pytest  # noqa: E402

from lab.proc import pid_alive  # noqa: E402


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE


@pytest.fixture(scope="session")
def prefect_api(state_dir: Path):
    """A real Prefect server on loopback, shared by every test, on the database ``make up``
    uses (RUNBOOKS_PREFECT_DATABASE; PostgreSQL: a cluster of its own, removed at the end)."""
    from deployments import prefect_db

    pid, api_url = start_prefect_server(state_dir / "prefect", _PORT, state_dir, ui=False)
    yield api_url
    stop_pid(pid)
    prefect_db.remove_postgres(state_dir)  # nothing to do on SQLite


@pytest.fixture(scope="session")
def lab(state_dir: Path):
    """The real lab: dockerd, PostgreSQL, Redis, sshd and the web container."""
    from lab import Lab

    lab = Lab(state_dir / "lab")
    try:
        lab.up()
        yield lab
    finally:
        lab.down()  # also after a half-finished up(): stop what did start


@pytest.fixture
def healthy_lab(lab):
    """The lab with every registered fault's part healthy (lab/faults.py): what an
    earlier test broke on purpose is reset; a healthy lab costs only the checks."""
    lab.reset_all_faults()
    return lab


@pytest.fixture
def healthy_web(lab):
    """Each remediation test starts from a healthy target (same as healthy_lab)."""
    lab.reset_all_faults()
    return lab


def pytest_collection_modifyitems(session, config, items):
    """Tests of the whole alert pipeline (``alert_pipeline``) run together near the end, so its
    stack starts once and scrapes nothing during the other tests; the secrets canary's tests run
    last, in their own order: the scan sees the whole session."""
    canary = [item for item in items if item.path.name == CANARY_MODULE]
    rest = [item for item in items if item.path.name != CANARY_MODULE]
    piped = [item for item in rest if "alert_pipeline" in getattr(item, "fixturenames", ())]
    items[:] = [item for item in rest if item not in piped] + piped + canary


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and not os.environ.get("RUNBOOKS_KEEP_TEST_STATE"):
        shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture(scope="session")
def deployed(prefect_api, state_dir: Path):
    """The deployments of prefect.yaml registered on the test server (no worker)."""
    from deployments.stack import deploy_all

    deploy_all(prefect_env(state_dir / "prefect", prefect_api))
    return prefect_api


@pytest.fixture(scope="session")
def gateway(deployed, lab, state_dir: Path):
    from pydantic import SecretStr

    from gateway.settings import GatewaySettings

    # every secret setting of every source, each carrying the secrets canary
    secret_settings = {name: canary_secret(name) for name, f in GatewaySettings.model_fields.items()
                       if f.annotation is SecretStr or SecretStr in typing.get_args(f.annotation)}
    settings = GatewaySettings(port=free_port(), store=state_dir / "gateway" / "alerts.db", **secret_settings)
    from gateway.__main__ import serving

    with serving(settings) as url:
        yield settings, url


@pytest.fixture(scope="session")
def alert_pipeline(deployed, lab, state_dir: Path):
    """The real alert path, started once: the lab's alerting stack (exporters, Prometheus,
    Alertmanager) and an alert gateway (runner dispatch) that only Alertmanager may post to.
    Yields ``(lab, store)``: the gateway's alert store shows what arrived and which run it started.
    Tests that use it are ordered to run together at the end of the session."""
    from gateway.__main__ import serving
    from gateway.models import SOURCES
    from gateway.settings import GatewaySettings
    from gateway.store import AlertStore

    lab.up(alerting=True)
    token = lab.info.alertmanager_token_file.read_text().strip()
    settings = GatewaySettings(port=lab.info.gateway_port, store=state_dir / "gateway" / "pipeline.db",
                               alertmanager_bearer_token=token,  # only Alertmanager posts here
                               insecure_sources=[s for s in SOURCES if s != "alertmanager"])
    store = AlertStore(settings.store_path)
    try:
        with serving(settings):
            yield lab, store
    finally:
        store.close()
        lab.down_alerting()


@pytest.fixture
def quiet_pipeline(alert_pipeline, healthy_lab):
    """The alert pipeline with a healthy lab and no incident left open by an earlier test (its
    late alerts are its own)."""
    import time

    lab, store = alert_pipeline
    by = time.monotonic() + 60
    while open_ := store.open_incidents():
        assert time.monotonic() < by, f"incidents still open from an earlier test: {open_}"
        time.sleep(0.5)
    return lab, store


@pytest.fixture(scope="session")
def fake_providers():
    """PagerDuty, Opsgenie, Slack and Statuspage as a local server that checks every request
    against the provider's documented schema and answers as the provider would (lab/saas.py)."""
    from lab.saas import FakeProviders

    with FakeProviders() as fake:
        yield fake


@pytest.fixture
def fake(fake_providers):
    """The module's fake providers, with no request recorded, no failure pending, no state."""
    fake_providers.clear()
    return fake_providers


@pytest.fixture
def comms_env(monkeypatch):
    """Replace every notifier setting by the given ones (nothing leaks in from the machine)."""
    from comms.settings import CommsSettings, env_name

    def apply(values: dict[str, str]) -> None:
        for name in CommsSettings.model_fields:
            monkeypatch.delenv(env_name(name), raising=False)
        for name in [n for n in os.environ if n.startswith("FAKE_PROVIDERS_")]:
            monkeypatch.delenv(name)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return apply


class RestartablePrefectServer:
    """The session's Prefect server (started by the ``prefect_api`` fixture), stopped and
    started again on the same port with the same database (SQLite under ``<state>/prefect``, or
    its PostgreSQL, which stays up),
    so the rest of the session keeps using the same URL."""

    def __init__(self, state_dir: Path, api_url: str) -> None:
        self.state_dir = state_dir
        self.api_url = api_url
        self.port = httpx.URL(api_url).port
        self.restarted: int | None = None  # the PID of a server started here, stopped at the end

    def pid(self) -> int:
        return int((self.state_dir / "pids" / "prefect-server.pid").read_text())

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        pid = self.pid()
        stop_pid(pid)
        assert not pid_alive(pid), f"the Prefect server (pid {pid}) did not stop"
        assert not self.answers(), "the Prefect API still answers after its server stopped"

    def start(self) -> None:
        if self.restarted is not None:
            stop_pid(self.restarted)
        pid, url = start_prefect_server(self.state_dir / "prefect", self.port, self.state_dir, ui=False)
        self.restarted = pid
        assert url == self.api_url, f"the server came back on {url}, not {self.api_url}"

    def close(self) -> None:
        if self.restarted is not None:
            stop_pid(self.restarted)


@pytest.fixture(scope="session")
def restartable_prefect(prefect_api, state_dir: Path):
    server = RestartablePrefectServer(state_dir, prefect_api)
    yield server
    server.close()  # the fixture that started the first server stops that one (if still up)
