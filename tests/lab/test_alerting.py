"""The lab's optional alerting stack against the real system: blackbox exporter probes the
web container, Prometheus fires ServiceDown, Alertmanager posts its webhook (v4) with a
Bearer token to the gateway port, where this test listens with a tiny recorder.

Uses the session's one lab (tests/conftest.py); the stack is stopped again at the end so
the other lab tests see the lab as the fixture made it (lab.down() would stop it too).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lab import http_get, pid_alive

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


def test_down_stops_alerting(alerting):
    lab, _ = alerting
    pids = lab.alerting_pids()
    lab.down_alerting()
    assert not any(pid_alive(p) for p in pids.values())
    assert lab.alerting_pids() == {}
    assert "prometheus" not in lab.status()
