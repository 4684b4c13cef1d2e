"""`make up`'s gateway: a secret for every source, kept private, and `send-test` finds it.

The real code paths of deployments/stack.py start a real gateway process (shadow
dispatch: nothing is started in Prefect) next to a lab object whose processes are not
started: only its paths and ports are used (the gateway port, Alertmanager's token file).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from deployments.stack import gateway_secrets, start_gateway, stop_pid
from gateway.local import RUNNER_TOKEN_ENV, SECRET_ENV, load_local, local_state_path
from incident.settings import REPO_ROOT
from lab import Lab
from tests.gateway.conftest import PAYLOADS_DIR


def _env(state: Path, inventory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNBOOKS_GATEWAY_")}
    return {**env, "RUNBOOKS_STATE_DIR": str(state), "RUNBOOKS_INVENTORY": str(inventory),
            "RUNBOOKS_GATEWAY_DISPATCH": "shadow"}


def _send_test(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "send-test", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def lab_paths(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path / "lab")  # nothing started: its info gives the gateway port and token file
    lab.info.alertmanager_token_file.parent.mkdir(parents=True, exist_ok=True)
    lab.info.alertmanager_token_file.write_text("lab-alertmanager-token")
    return lab


def test_make_up_configures_every_source_and_send_test_finds_the_gateway(tmp_path, lab_paths, inventory_file):
    state = tmp_path / "state"
    env = _env(state, inventory_file)
    pid = start_gateway(env, state, lab_paths)
    try:
        path = local_state_path(state)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        local = load_local(path)
        assert local is not None and local.pid == pid and local.url == lab_paths.info.gateway_url
        assert set(local.env) == {*SECRET_ENV.values(), RUNNER_TOKEN_ENV}
        assert local.env["RUNBOOKS_GATEWAY_ALERTMANAGER_BEARER_TOKEN"] == "lab-alertmanager-token"
        assert all(len(v) >= 32 for k, v in local.env.items() if "ALERTMANAGER" not in k)
        assert len(set(local.env.values())) == len(local.env), "one secret per source"
        health = httpx.get(f"{local.url}/healthz", timeout=10).json()
        assert all(health["verification"].values()), health

        sent = _send_test(env, "alertmanager")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith("202") and '"disposition": "opened"' in sent.stdout
        for source, file in (("grafana", "grafana/bougou_grafana-alert.json"),
                             ("sentry", "sentry/zulip_issue_created_for_exception.json"),
                             ("pagerduty", "pagerduty/zulip_triggered_v3.json"),
                             ("opsgenie", "opsgenie/zulip_create.json"),
                             ("cloudevents", "cloudevents/ce-conformance_validMinimal.json")):
            sent = _send_test(env, source, str(PAYLOADS_DIR / file))
            assert sent.returncode == 0 and sent.stdout.startswith("202"), (source, sent.stdout, sent.stderr)
        unsigned = httpx.post(f"{local.url}/alerts/grafana", content=(PAYLOADS_DIR / file).read_bytes(),
                              headers={"Content-Type": "application/json"}, timeout=10)
        assert unsigned.status_code == 401

        again, changed = gateway_secrets(state, lab_paths)  # the next `make up`
        assert again == local.env and changed is False, "secrets are kept, so senders keep working"
    finally:
        stop_pid(pid)

    stopped = _send_test(env, "alertmanager")
    assert stopped.returncode != 0 and "Traceback" not in stopped.stderr
    assert "does not answer" in stopped.stderr and "make up" in stopped.stderr


def test_send_test_without_a_running_gateway_says_what_to_do(tmp_path, inventory_file):
    sent = _send_test(_env(tmp_path / "empty-state", inventory_file), "alertmanager")
    assert sent.returncode != 0
    assert "Traceback" not in sent.stderr and "ConnectError" not in sent.stderr
    assert "no running gateway found" in sent.stderr and "make up" in sent.stderr and "--url" in sent.stderr


def test_send_test_to_an_address_where_nothing_listens_says_so(tmp_path, inventory_file):
    from deployments.stack import free_port

    sent = _send_test(_env(tmp_path, inventory_file), "alertmanager", "--url", f"http://127.0.0.1:{free_port()}")
    assert sent.returncode != 0 and "Traceback" not in sent.stderr
    assert "could not reach the gateway" in sent.stderr


def test_a_changed_alertmanager_token_is_followed(tmp_path, lab_paths):
    state = tmp_path / "state"
    first, _ = gateway_secrets(state, lab_paths)
    lab_paths.info.alertmanager_token_file.write_text("rotated-token\n")
    second, changed = gateway_secrets(state, lab_paths)
    assert changed and second["RUNBOOKS_GATEWAY_ALERTMANAGER_BEARER_TOKEN"] == "rotated-token"
    assert {k: v for k, v in second.items() if "ALERTMANAGER" not in k} == \
        {k: v for k, v in first.items() if "ALERTMANAGER" not in k}
    assert json.loads(local_state_path(state).read_text())["env"] == second
