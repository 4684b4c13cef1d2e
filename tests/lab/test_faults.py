"""The fault registry against the real lab: every registered fault really breaks its part
and its reset really heals it; the CLI drives the same registry.

Uses the session's one lab (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from incident.settings import REPO_ROOT
from lab import LabError, faults, http_get, pid_alive
from lab.proc import cmdline, wait_until

pytestmark = pytest.mark.lab

REGISTERED = list(faults.FAULTS)


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # RUNBOOKS_STATE_DIR (set by conftest) makes the CLI drive the session's lab
    return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=os.environ.copy())


def test_the_web_faults_are_registered_with_their_metadata():
    assert {"web-killed", "web-broken-release"} <= set(REGISTERED)
    for name in ("web-killed", "web-broken-release"):
        f = faults.FAULTS[name]
        assert (f.scenario, f.alert) == ("service-down", "ServiceDown")
        assert f.description


#: the application tier's faults (SPEC: name -> scenario, alert, heals)
APP_FAULTS = {
    "web-memory-leak": ("memory-cpu", "AppMemoryHigh", True),
    "web-cpu-spin": ("memory-cpu", "AppCpuHigh", True),
    "upstream-down": ("upstream-outage", "UpstreamFailing", True),
    "upstream-rate-limited": ("upstream-outage", "UpstreamFailing", True),
    "upstream-down-for-good": ("upstream-outage", "UpstreamFailing", False),
    "web-error-release": ("bad-deploy", "HighErrorRate", True),
    "web-port-held": ("app-wont-start", "ServiceWontStart", True),
    "web-missing-setting": ("app-wont-start", "ServiceWontStart", False),
    "web-dependency-down": ("app-wont-start", None, True),
    "app-log-flood": ("logs-backlog", "LogFileTooLarge", True),
    "queue-consumer-stuck": ("logs-backlog", "QueueBacklogHigh", True),
}


def test_the_app_tier_faults_are_registered_with_their_metadata():
    got = {n: (f.scenario, f.alert, f.heals) for n, f in faults.FAULTS.items() if n in APP_FAULTS}
    assert got == APP_FAULTS
    assert all(faults.FAULTS[n].description for n in APP_FAULTS)


@pytest.mark.parametrize("name", REGISTERED)
def test_inject_breaks_and_reset_heals(healthy_lab, name):
    lab = healthy_lab
    assert lab.fault_healthy(name), "the fixture should start from a healthy lab"
    lab.inject(name)
    try:
        assert not lab.fault_healthy(name)
        if faults.FAULTS[name].alert == "ServiceDown":  # what the blackbox probe would see
            assert http_get(lab.info.health_url, timeout=2)[0] != 200
        if faults.FAULTS[name].scenario == "app-wont-start":  # what the node exporter reports
            assert lab.web.start_failure() in ("port_in_use", "missing_setting", "dependency_down")
    finally:
        lab.reset_fault(name)
    assert lab.fault_healthy(name)
    assert faults.FAULTS[name].is_at_baseline(lab)
    assert http_get(lab.info.health_url)[0] == 200


def test_chaos_and_admin_endpoints_take_only_their_own_token(lab):
    """The faults break the service with the chaos token; the admin token (the runbooks')
    cannot, and the chaos token cannot drive the admin endpoints."""
    from lab.proc import http_request

    i = lab.info
    assert http_request("POST", f"{i.admin_url}/chaos?off=1", i.admin_token_file)[0] == 401
    assert http_request("POST", f"{i.admin_url}/chaos?off=1")[0] == 401
    assert http_request("GET", f"{i.admin_url}/status", i.chaos_token_file)[0] == 401
    assert http_request("POST", f"{i.upstream_url}/admin/mode?set=ok", i.admin_token_file)[0] == 401
    assert http_request("POST", f"{i.worker_url}/admin/chaos?stall=0", i.admin_token_file)[0] == 401
    assert http_request("POST", f"{i.admin_url}/chaos?off=1", i.chaos_token_file)[0] == 200
    code, body = http_request("GET", f"{i.admin_url}/status", i.admin_token_file)
    assert code == 200 and json.loads(body)["breaker"] == "closed"


def test_broken_release_is_not_healed_by_a_restart(healthy_lab):
    """What makes web-broken-release a different drill from web-killed."""
    lab = healthy_lab
    lab.inject("web-broken-release")
    c = lab.docker_client().containers.get(lab.info.container_name)
    c.restart(timeout=5)
    time.sleep(1)
    assert not lab.fault_healthy("web-broken-release")
    assert len(lab.reset_all_faults()) == 1  # one reset heals both web faults
    assert lab.fault_healthy("web-killed") and lab.fault_healthy("web-broken-release")


def test_a_rollback_heals_the_outage_but_is_not_the_baseline(healthy_lab):
    lab = healthy_lab
    client = lab.docker_client()
    client.containers.get(lab.info.container_name).remove(force=True)
    client.containers.run(lab.info.previous_image, name=lab.info.container_name, detach=True,
                          network_mode="host", labels={"runbooks.service": "web"},
                          environment=lab.web.env(), volumes=lab.web.volumes())
    assert wait_until(lambda: http_get(lab.info.health_url, 2)[0] == 200, 20, 0.2)
    assert lab.fault_healthy("web-killed"), "a rollback heals the outage"
    assert not faults.FAULTS["web-killed"].is_at_baseline(lab)  # runs lab-web:1.0, not the current release
    assert "web-killed" in lab.reset_all_faults()
    c = lab.docker_client().containers.get(lab.info.container_name)
    assert c.attrs["Config"]["Image"] == lab.info.web_image


def test_reset_all_on_a_healthy_lab_changes_nothing(healthy_lab):
    lab = healthy_lab
    before = lab.docker_client().containers.get(lab.info.container_name).id
    assert lab.reset_all_faults() == []
    assert lab.docker_client().containers.get(lab.info.container_name).id == before


def test_unknown_fault_names_the_known_ones(lab):
    for call in (lab.inject, lab.reset_fault, lab.fault_healthy):
        with pytest.raises(LabError) as exc:
            call("no-such-fault")
        assert "no-such-fault" in str(exc.value)
        for name in REGISTERED:
            assert name in str(exc.value)


# --------------------------------------------------------------------------- holders


def _sleeper_argv(tag: str) -> list[str]:
    return [sys.executable, "-c", f"import time  # {tag}\ntime.sleep(600)"]


@pytest.fixture
def held_fault(lab):
    """A throwaway fault whose inject starts a holder process; its part is healthy when
    no holder runs."""
    name = "test-holder"
    argv = _sleeper_argv("rb-test-holder")

    def inject(lab):
        faults.start_holder(lab, name, argv, ready=lambda: faults.holder_pid(lab, name) is not None)

    faults.register(faults.Fault(name=name, description="a sleeping holder", scenario="none", alert=None,
                                 inject=inject, reset=lambda lab: None,
                                 healthy=lambda lab: faults.holder_pid(lab, name) is None))
    try:
        yield name
    finally:
        faults.stop_holder(lab, name)
        faults.unregister(name)


def test_holder_runs_as_a_lab_process_and_reset_stops_it_by_pid(lab, held_fault):
    lab.inject(held_fault)
    pid = lab.read_pid(f"fault-{held_fault}")
    assert pid and pid_alive(pid)
    assert lab.log(f"fault-{held_fault}").exists()
    assert not lab.fault_healthy(held_fault)
    assert held_fault in lab.reset_all_faults()
    assert wait_until(lambda: not pid_alive(pid), 5)
    assert not lab.pidfile(f"fault-{held_fault}").exists()
    assert lab.fault_healthy(held_fault)


def test_down_path_stops_holders(lab, held_fault):
    lab.inject(held_fault)
    pid = lab.read_pid(f"fault-{held_fault}")
    faults.stop_all_holders(lab)  # what Lab.down() calls first thing after the alerting stack
    assert wait_until(lambda: not pid_alive(pid), 5)
    assert faults.held_faults(lab) == []


def test_a_stale_holder_pidfile_never_signals_another_program(lab, held_fault):
    other = subprocess.Popen(_sleeper_argv("someone-else"))
    try:
        # a pidfile naming a PID that now runs another program
        expect = json.dumps(" ".join(_sleeper_argv("rb-test-holder")))
        lab.pidfile(f"fault-{held_fault}").write_text(f"{other.pid}\n{expect}\n")
        assert faults.holder_pid(lab, held_fault) is None
        faults.stop_holder(lab, held_fault)
        time.sleep(0.3)
        assert other.poll() is None and "someone-else" in cmdline(other.pid)
    finally:
        other.kill()
        other.wait()


# --------------------------------------------------------------------------- wait_until


def test_wait_until_semantics():
    assert wait_until(lambda: True, 0) is True
    assert wait_until(lambda: False, 0.2, 0.05) is False
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("not yet")
        return True

    assert wait_until(flaky, 5, 0.01) and len(calls) == 3
    with pytest.raises(LabError, match=r"thing did not happen within 0s"):
        wait_until(lambda: False, 0.1, 0.05, what="thing did not happen")
    with pytest.raises(LabError, match="stop now"):
        wait_until(lambda: (_ for _ in ()).throw(LabError("stop now")), 5)


# --------------------------------------------------------------------------- CLI


def test_cli_faults_lists_the_registry():
    r = _cli("faults")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in REGISTERED:
        f = faults.FAULTS[name]
        row = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert row is not None, r.stdout
        assert f.scenario in row and (f.alert or "-") in row


def test_cli_usage_errors_exit_2():
    assert _cli().returncode == 2
    assert _cli("nope").returncode == 2
    assert _cli("inject").returncode == 2
    r = _cli("inject", "no-such-fault")
    assert r.returncode == 2 and "web-killed" in r.stderr


def test_cli_inject_and_reset_all(healthy_lab):
    lab = healthy_lab
    r = _cli("inject", "web-killed")
    assert r.returncode == 0, r.stderr
    assert http_get(lab.info.health_url, timeout=2)[0] == 0
    r = _cli("reset")
    assert r.returncode == 0, r.stderr
    assert "web-killed" in r.stdout
    assert http_get(lab.info.health_url)[0] == 200
    r = _cli("kill-web")  # the old name still works
    assert r.returncode == 0, r.stderr
    assert not lab.fault_healthy("web-killed")
    r = _cli("reset-web")
    assert r.returncode == 0, r.stderr
    assert lab.fault_healthy("web-killed")
