"""Shared fixtures: one real Prefect server and one real lab for the whole test run.

The environment is set here, before anything imports Prefect, so that every flow run
(also those started in threads by the tests) talks to the test server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Under the temp dir, not the checkout: the lab runs PostgreSQL as user postgres, which
# must be able to traverse every parent dir (a CI checkout may sit in a 0700 dir), and
# unix socket paths must stay short.
_STATE = Path(tempfile.mkdtemp(prefix="rb-test-"))
_STATE.chmod(0o755)
os.environ["RUNBOOKS_STATE_DIR"] = str(_STATE)
os.environ["RUNBOOKS_INVENTORY"] = str(_STATE / "lab" / "inventory.yaml")
os.environ["RUNBOOKS_APPROVAL_POLL_S"] = "1"

from deployments.stack import free_port, prefect_env, start_prefect_server, stop_pid  # noqa: E402

_PORT = free_port()
os.environ.update(prefect_env(_STATE / "prefect", f"http://127.0.0.1:{_PORT}/api"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE


@pytest.fixture(scope="session")
def prefect_api(state_dir: Path):
    """A real Prefect server (SQLite) on loopback, shared by every test."""
    pid, api_url = start_prefect_server(state_dir / "prefect", _PORT, state_dir, ui=False)
    yield api_url
    stop_pid(pid)


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
    from gateway.settings import GatewaySettings

    settings = GatewaySettings(port=free_port(), store=state_dir / "gateway" / "alerts.db",
                               alertmanager_bearer_token="test-am-token")
    from gateway.__main__ import serving

    with serving(settings) as url:
        yield settings, url
