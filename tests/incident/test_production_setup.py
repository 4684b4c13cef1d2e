"""The README's "Production setup" holds: the settings it names exist in the installed Prefect,
and a Prefect server configured that way (basic authentication, CSRF protection) keeps
strangers out while a run still goes through an approval against it."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

import httpx
import prefect.settings
import pytest
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from deployments.stack import free_port, start_prefect_server, stop_pid
from incident.settings import REPO_ROOT
from tests.helpers import new_incident_id, run_id_of, wait_paused

AUTH = "runbooks:not-the-production-secret"


def _section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "\n## Production setup\n" in readme, "the README lacks its Production setup section"
    return readme.split("\n## Production setup\n", 1)[1].split("\n## ", 1)[0]


def test_production_setup_names_settings_the_installed_prefect_reads():
    section = _section()
    names = set(re.findall(r"\bPREFECT_[A-Z0-9_]+\b", section))
    assert {"PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING",
            "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED", "PREFECT_SERVER_API_HOST"} <= names
    unknown = sorted(n for n in names if getattr(prefect.settings, n, None) is None)
    assert not unknown, f"not settings of the installed Prefect {prefect.__version__}: {unknown}"
    assert "self-declared" in section and "single sign-on" in section


@pytest.fixture
def secured_prefect(tmp_path, monkeypatch):
    """A second Prefect server set up as the README says: basic auth and CSRF protection on."""
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", AUTH)
    monkeypatch.setenv("PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED", "true")
    pid, api_url = start_prefect_server(tmp_path / "prefect", free_port(), tmp_path, ui=False)
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING")
    monkeypatch.delenv("PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED")
    try:
        yield api_url
    finally:
        stop_pid(pid)


def test_secured_server_refuses_strangers_and_still_takes_approvals(secured_prefect, tmp_path):
    api = secured_prefect
    assert httpx.get(f"{api}/health", timeout=10).status_code == 200, "health must stay open"
    assert httpx.get(f"{api}/admin/version", timeout=10).status_code == 401
    assert httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).status_code in (401, 403)
    user, password = AUTH.split(":", 1)
    no_csrf = httpx.post(f"{api}/flow_runs/filter", json={}, auth=(user, password), timeout=10)
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text

    # a run with the client settings of the README (PREFECT_API_AUTH_STRING), in its own process
    incident_id, marker = new_incident_id(), tmp_path / "marker"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": AUTH,
           "PREFECT_HOME": str(tmp_path / "client-home")}
    run = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from tests.incident.test_approval_form import approval_probe; "
         "state = approval_probe(incident_id=sys.argv[1], marker=sys.argv[2], return_state=True); "
         "sys.exit(0 if state.is_completed() else 1)", incident_id, str(marker)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: AUTH}):
            run_id = run_id_of(incident_id, timeout_s=120)
            wait_paused(run_id)
            resume_flow_run(run_id, run_input={"decision": "approve", "reason": "behind auth",
                                               "approver": "Ada Lovelace"})  # a POST: CSRF token fetched
        output, _ = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-3000:]
    assert marker.exists(), "the approved step did not run"
    token = base64.b64encode(AUTH.encode()).decode()
    latest = httpx.get(f"{api}/artifacts/incident-{incident_id.lower()}/latest", timeout=10,
                       headers={"Authorization": f"Basic {token}"})
    assert latest.status_code == 200
    assert "| write_marker | approved | Ada Lovelace | behind auth |" in latest.json()["data"]
