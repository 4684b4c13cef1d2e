"""The lab's optional alerting stack against the real system: blackbox exporter probes the
web container, Prometheus fires ServiceDown, Alertmanager posts its webhook (v4) with a
Bearer token to the gateway port, where this test listens with a tiny recorder.

Uses the session's one lab (tests/conftest.py); the stack is stopped again at the end so
the other lab tests see the lab as the fixture made it (lab.down() would stop it too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from lab import app, exporters, http_get, pid_alive
from lab.alerting import alertmanager_config, prometheus_rules
from lab.proc import wait_until

pytestmark = pytest.mark.lab


class Recorder:
    """Records every POST (path, headers, JSON body, arrival time) and answers 200."""

    def __init__(self, port: int) -> None:
        self.posts: list[dict] = []
        self.cond = threading.Condition()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    data = json.loads(body)
                except ValueError:
                    data = None
                with rec.cond:
                    rec.posts.append({"t": time.monotonic(), "path": self.path, "headers": dict(self.headers),
                                      "body": data})
                    rec.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, pred, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for p in self.posts:
                    if pred(p):
                        return p
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _alert(post: dict, status: str) -> dict | None:
    body = post["body"] or {}
    if body.get("version") != "4":
        return None
    for a in body.get("alerts", []):
        labels = a.get("labels", {})
        if a.get("status") == status and labels.get("alertname") == "ServiceDown" and labels.get("service") == "web":
            return a
    return None


@pytest.fixture(scope="module")
def alerting(lab):
    rec = Recorder(lab.info.gateway_port)  # stands in for the alert gateway
    try:
        t0 = time.monotonic()
        lab.up(alerting=True)
        lab.up_seconds_alerting = time.monotonic() - t0
        yield lab, rec
    finally:
        lab.down_alerting()
        rec.close()


def _listeners(pids: dict[str, int]) -> list[tuple[str, str, str, int]]:
    """(component, proto, local address hex, port) of every listening/bound socket of these PIDs."""
    inodes: dict[str, str] = {}
    for name, pid in pids.items():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().as_posix()
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = name
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if inode not in inodes:
                continue
            if proto.startswith("tcp") and state != "0A":  # only LISTEN
                continue
            addr, port = local.split(":")
            out.append((inodes[inode], proto, addr, int(port, 16)))
    return out


def test_alerting_stack_up_and_loopback_only(alerting):
    lab, _ = alerting
    i = lab.info
    pids = lab.alerting_pids()
    parts = {"blackbox", "prometheus", "alertmanager", "postgres-exporter", "redis-exporter", "node-exporter"}
    assert set(pids) == parts
    assert all(pid_alive(p) for p in pids.values())
    st = lab.status()
    assert {k: st[k] for k in parts} == {k: "up" for k in parts}
    assert http_get(f"{i.prometheus_url}/-/ready")[0] == 200
    assert http_get(f"{i.alertmanager_url}/-/ready")[0] == 200
    assert i.gateway_url == f"http://127.0.0.1:{i.gateway_port}"
    saved = json.loads((lab.lab_dir / "lab.json").read_text())
    exporter_ports = ("postgres_exporter_port", "redis_exporter_port", "node_exporter_port")
    for k in ("blackbox_port", "prometheus_port", "alertmanager_port", "gateway_port", *exporter_ports):
        assert saved[k] == getattr(i, k)
    assert (i.alertmanager_token_file.stat().st_mode & 0o777) == 0o600

    listeners = _listeners(pids)
    by_comp = {(c, port) for c, _, _, port in listeners}
    assert ("blackbox", i.blackbox_port) in by_comp
    assert ("prometheus", i.prometheus_port) in by_comp
    assert ("alertmanager", i.alertmanager_port) in by_comp
    for k in exporter_ports:
        assert (k.removesuffix("_port").replace("_", "-"), getattr(i, k)) in by_comp
    not_loopback = [x for x in listeners if x[1] != "tcp" or x[2] != "0100007F"]
    assert not_loopback == [], f"alerting sockets beyond 127.0.0.1: {not_loopback}"
    allowed = {i.blackbox_port, i.prometheus_port, i.alertmanager_port, *(getattr(i, k) for k in exporter_ports)}
    assert {port for *_, port in listeners} <= allowed

    # a second up keeps the same processes
    lab.up(alerting=True)
    assert lab.alerting_pids() == pids


def test_kill_web_fires_then_reset_resolves(alerting, healthy_web):
    lab, rec = alerting
    token = lab.info.alertmanager_token_file.read_text().strip()
    assert token
    start = time.monotonic()

    lab.kill_web()
    t_kill = time.monotonic()
    firing = rec.wait_for(lambda p: p["t"] >= start and _alert(p, "firing") is not None, 60)
    assert firing is not None, f"no firing ServiceDown webhook within 60s; got {rec.posts}"
    fire_s = firing["t"] - t_kill
    assert firing["path"] == "/alerts/alertmanager"
    assert firing["headers"].get("Authorization") == f"Bearer {token}"
    a = _alert(firing, "firing")
    assert a["labels"]["severity"] == "critical"
    assert a["labels"]["environment"] == "lab"
    assert a["labels"]["instance"] == lab.info.health_url
    assert a["annotations"]["summary"] and a["annotations"]["description"]
    assert firing["body"]["receiver"] == "runbooks"
    assert firing["body"]["groupLabels"] == {"alertname": "ServiceDown", "service": "web"}

    lab.reset_web()
    t_reset = time.monotonic()
    resolved = rec.wait_for(lambda p: p["t"] >= firing["t"] and _alert(p, "resolved") is not None, 60)
    assert resolved is not None, f"no resolved ServiceDown webhook within 60s; got {rec.posts[-3:]}"
    resolve_s = resolved["t"] - t_reset
    assert resolved["headers"].get("Authorization") == f"Bearer {token}"
    print(f"\nalerting: up {lab.up_seconds_alerting:.1f}s, kill->firing {fire_s:.1f}s, "
          f"reset->resolved {resolve_s:.1f}s")


APP_ALERTS = {"AppMemoryHigh", "AppCpuHigh", "UpstreamFailing", "HighErrorRate", "ServiceWontStart",
              "LogFileTooLarge", "QueueBacklogHigh"}


def _app_rules() -> dict:
    return exporters.app_tier_rules(
        memory_alert_fraction=app.MEMORY_ALERT_FRACTION, cpu_alert_cores=app.CPU_ALERT_CORES,
        error_rate_threshold=app.ERROR_RATE_THRESHOLD, error_rate_window_s=app.ERROR_RATE_WINDOW_S,
        log_max_bytes=app.LOG_MAX_BYTES, max_backlog=app.MAX_BACKLOG)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_app_tier_rules_pass_promtool_with_the_inventory_thresholds(tmp_path):
    rules = prometheus_rules([_app_rules()])
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    group = next(g for g in rules["groups"] if g["name"] == "lab-app-tier")
    by_name = {rule["alert"]: rule for rule in group["rules"]}
    assert set(by_name) == APP_ALERTS
    for rule in by_name.values():
        assert rule["labels"] == {"severity": "critical", "service": "{{ $labels.service }}"}
    # thresholds are the lab inventory's values (lab/app.py), as the runbooks read them
    assert by_name["LogFileTooLarge"]["expr"].endswith(f"> {app.LOG_MAX_BYTES}")
    assert by_name["QueueBacklogHigh"]["expr"] == 'max by (service) (redis_key_size{key="jobs"}) > 50'
    assert by_name["AppCpuHigh"]["expr"] == 'max by (service) (rate(process_cpu_seconds_total{job="web"}[5s])) > 0.3'
    # a broken release stays service-down's (a rollback), not app-wont-start's
    assert by_name["ServiceWontStart"]["expr"] == \
        'max by (service, reason) (labweb_start_failed{reason!="broken_release"}) > 0'
    down = next(r for g in rules["groups"] for r in g["rules"] if r["alert"] == "ServiceDown")
    assert down["expr"] == ('probe_success{job="blackbox"} == 0 unless on (service) '
                            '(labweb_start_failed{reason!="broken_release"} > 0)')


def test_app_tier_inhibitions_and_scrape_jobs(lab):
    inhibit = alertmanager_config(gateway_url="http://127.0.0.1:1", token_file=Path("/t"))["inhibit_rules"]
    pairs = {(r["source_matchers"][0], r["target_matchers"][0]) for r in inhibit}
    assert ('alertname="UpstreamFailing"', 'alertname="HighErrorRate"') in pairs
    assert ('alertname="ServiceWontStart"', 'alertname="ServiceDown"') in pairs
    assert all(r["equal"] == ["service"] for r in inhibit)
    i = lab.info
    jobs = {j["job_name"]: j["static_configs"][0] for j in exporters.exporter_scrape_configs(i)}
    for job, port in (("web", i.web_port), ("upstream", i.upstream_port), ("worker", i.worker_port)):
        assert jobs[job] == {"targets": [f"127.0.0.1:{port}"], "labels": {"service": "web", "environment": "lab"}}
    argv = {name: args for name, _, _, _, args, _ in exporters.exporter_specs(i, Path("/q"))}
    assert "-check-keys=jobs" in argv["redis-exporter"]
    assert f"--collector.textfile.directory={i.app_status_dir}" in argv["node-exporter"]


def _alerts(lab) -> list[dict]:
    code, body = http_get(f"{lab.info.prometheus_url}/api/v1/alerts", timeout=3)
    assert code == 200, body
    return json.loads(body)["data"]["alerts"]


def test_a_start_failure_fires_service_wont_start_not_service_down(alerting):
    """The status file the failed start writes reaches Prometheus through the node exporter's
    textfile collector: ServiceWontStart fires with the reason, and ServiceDown stays quiet."""
    lab, _ = alerting
    lab.reset_all_faults()
    lab.inject("web-missing-setting")
    try:
        def fired() -> dict | None:
            return next((a for a in _alerts(lab) if a["labels"]["alertname"] == "ServiceWontStart"
                         and a["state"] == "firing"), None)

        assert wait_until(lambda: fired() is not None, 30, 0.5), _alerts(lab)
        alert = fired()
        assert alert is not None
        assert alert["labels"]["reason"] == "missing_setting" and alert["labels"]["service"] == "web"
        assert not [a for a in _alerts(lab) if a["labels"]["alertname"] == "ServiceDown" and a["state"] == "firing"]
    finally:
        lab.reset_fault("web-missing-setting")


def test_down_stops_alerting(alerting):
    lab, _ = alerting
    pids = lab.alerting_pids()
    lab.down_alerting()
    assert not any(pid_alive(p) for p in pids.values())
    assert lab.alerting_pids() == {}
    assert "prometheus" not in lab.status()
