"""The lab against the real system: dockerd + web container, PostgreSQL, Redis, sshd.

Uses the session's one lab (tests/conftest.py); the down test brings it back up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from incident.inventory import load_inventory
import shutil
import tempfile

import psycopg

from lab import Lab, http_get, pid_alive

pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def _healthy_start(healthy_web):
    """Every test starts from a healthy web container (earlier tests break it on purpose)."""


def wait_for(pred, timeout=20.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def test_status_all_up(lab):
    st = lab.status()
    parts = ("dockerd", "postgres", "redis", "sshd", "web", "upstream", "worker", "traffic")
    assert {k: st.get(k) for k in parts} == dict.fromkeys(parts, "up")
    assert all(v == "up" for v in st.values()), st  # and any part added since


def test_health_ok(lab):
    code, body = http_get(lab.info.health_url)
    assert code == 200, body
    data = json.loads(body)
    assert data == {"status": "ok", "version": "1.1", "checks": {"postgres": "ok", "redis": "ok"}}
    code, body = http_get(lab.info.root_url)
    assert code == 200 and "1.1" in body
    assert http_get(lab.info.root_url + "nope")[0] == 404


def test_inventory_valid(lab):
    inv = load_inventory(lab.inventory_path)
    t = inv.target("web")
    assert t.service.health_url == lab.info.health_url
    assert t.docker.base_url == f"unix://{lab.info.docker_socket}"
    assert t.database.password.resolve().get_secret_value() == lab.info.pg_password_file.read_text().strip()
    assert t.redis.port == lab.info.redis_port and t.ssh.port == lab.info.ssh_port
    app = t.service.app
    assert app.admin_token.resolve().get_secret_value() == lab.info.admin_token_file.read_text().strip()
    assert app.prometheus_url == lab.info.prometheus_url and app.metrics_url == lab.info.metrics_url
    assert http_get(app.metrics_url)[0] == 200 and http_get(app.upstream.health_url)[0] == 200
    assert app.upstream.name == "prices" and app.upstream.probe_url == f"{lab.info.upstream_url}/price"
    assert (app.log.path, app.log.max_bytes, app.log.keep) == (str(lab.lab_dir / "app/logs/app.log"), 4 << 20, 3)
    assert (app.queue.redis, app.queue.key, app.queue.consumer_container) == ("lab", "jobs", "lab-worker")
    assert (app.queue.max_backlog, app.queue.min_drain_per_s) == (50, 1.0)
    assert (app.cpu_alert_cores, app.error_rate_window_s, app.upstream_deadline_s) == (0.3, 5, 30)
    assert app.required_settings == ["LABWEB_UPSTREAM", "LABWEB_PG", "LABWEB_REDIS"]
    assert app.start_dependencies == ["redis"]
    assert t.app_redis == t.redis


def test_container_labels(lab):
    c = lab.docker_client().containers.get(lab.info.container_name)
    assert c.attrs["Config"]["Image"] == "lab-web:1.1"
    assert c.labels["runbooks.previous-image"] == "lab-web:1.0"
    assert c.labels["runbooks.service"] == "web"
    assert c.attrs["HostConfig"]["NetworkMode"] == "host"


def test_app_containers_limits_mounts_and_secrets(lab):
    client = lab.docker_client()
    web = client.containers.get(lab.info.container_name)
    host = web.attrs["HostConfig"]
    assert (host["Memory"], host["MemorySwap"], host["NanoCpus"]) == (64 << 20, 64 << 20, 500_000_000)
    mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in web.attrs["Mounts"]}
    app_dir = lab.lab_dir / "app"
    assert mounts == {"/run/labweb": (str(app_dir / "secrets"), False), "/status": (str(app_dir / "status"), True),
                      "/var/log/labweb": (str(app_dir / "logs"), True)}
    env = dict(e.split("=", 1) for e in web.attrs["Config"]["Env"])
    assert env["LABWEB_UPSTREAM"] == f"127.0.0.1:{lab.info.upstream_port}"
    assert "LABWEB_REQUIRE" not in env, "the baseline starts without Redis (web-dependency-down adds the check)"
    assert env["LABWEB_MEMORY_LIMIT_BYTES"] == str(64 << 20) and env["LABWEB_ROLE"] == "web"
    for name, role in (("lab-upstream", "upstream"), ("lab-worker", "worker")):
        c = client.containers.get(name)
        assert c.attrs["Config"]["Image"] == lab.info.web_image and c.labels["runbooks.service"] == role
        assert c.attrs["HostConfig"]["NetworkMode"] == "host"
        assert f"LABWEB_ROLE={role}" in c.attrs["Config"]["Env"]
    assert (app_dir / "secrets").stat().st_mode & 0o777 == 0o700
    for token in (lab.info.admin_token_file, lab.info.chaos_token_file):
        assert token.stat().st_mode & 0o777 == 0o600 and token.read_text().strip()
    assert lab.info.admin_token_file.read_text() != lab.info.chaos_token_file.read_text()
    assert "labweb_start_failed{reason=\"none\"} 0" in (app_dir / "status" / "web.prom").read_text()
    assert wait_for(lambda: lab.info.app_log_file.exists() and lab.info.app_log_file.stat().st_size > 0, 5)


def test_an_older_lab_json_gets_the_app_ports(tmp_path):
    from lab.context import LabContext

    ctx = LabContext(tmp_path / "lab")
    ctx.lab_dir.mkdir()
    old = json.loads(ctx.info.model_dump_json())
    for key in ("upstream_port", "worker_port", "upstream_url", "worker_url"):
        del old[key]
    ctx.info_path.write_text(json.dumps(old))
    again = LabContext(tmp_path / "lab")
    ports = [getattr(again.info, k) for k in ("web_port", "pg_port", "redis_port", "ssh_port", "prometheus_port",
                                               "upstream_port", "worker_port")]
    assert again.info.web_port == old["web_port"] and len(set(ports)) == len(ports)
    assert again.info.upstream_url == f"http://127.0.0.1:{again.info.upstream_port}"
    again.save_info()
    assert LabContext(tmp_path / "lab").info.worker_port == again.info.worker_port


def test_kill_web_then_docker_restart(lab):
    lab.kill_web()
    code, _ = http_get(lab.info.health_url, timeout=2)
    assert code == 0  # nothing listens
    client = lab.docker_client()
    c = client.containers.get(lab.info.container_name)
    assert c.status == "exited"
    c.restart(timeout=5)
    assert wait_for(lambda: http_get(lab.info.health_url, 2)[0] == 200)


def test_broken_release_crashes_then_reset(lab):
    lab.deploy_broken_web()
    c = lab.docker_client().containers.get(lab.info.container_name)
    assert c.status == "exited"
    assert c.attrs["State"]["ExitCode"] == 1
    assert c.labels["runbooks.previous-image"] == "lab-web:1.1"
    assert b"FATAL: required setting LABWEB_CONFIG is missing" in c.logs()
    assert http_get(lab.info.health_url, 2)[0] == 0
    lab.reset_web()
    assert http_get(lab.info.health_url)[0] == 200
    c = lab.docker_client().containers.get(lab.info.container_name)
    assert c.attrs["Config"]["Image"] == "lab-web:1.1"
    assert c.labels["runbooks.previous-image"] == "lab-web:1.0"


def test_redis_down_makes_health_503_and_up_restores(lab):
    pid = lab.read_pid("redis")
    lab.stop_component("redis")
    assert not pid_alive(pid)
    code, body = http_get(lab.info.health_url)
    assert code == 503, body
    data = json.loads(body)
    assert data["status"] == "fail"
    assert data["checks"]["postgres"] == "ok"
    assert data["checks"]["redis"] == "connection refused"
    assert lab.status()["redis"] == "down"
    lab.up()
    assert http_get(lab.info.health_url)[0] == 200
    assert lab.read_pid("redis") != pid
    assert any(line.startswith("redis: was down") for line in lab.repaired), "a repair by up is said"


def test_up_leaves_a_dead_target_to_the_runbook(healthy_lab):
    """`make up` must not hide a fault: a killed web container stays down, and up says so."""
    lab = healthy_lab
    lab.kill_web()
    lab.up()
    assert lab.status()["web"] != "up"
    assert lab.left_down and "left for the service-down runbook" in lab.left_down[0]
    lab.reset_web()
    lab.up()
    assert lab.left_down == [] and lab.status()["web"] == "up"


def test_ssh_with_pinned_host_key(lab):
    import paramiko

    c = paramiko.SSHClient()
    c.load_host_keys(str(lab.info.known_hosts))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect("127.0.0.1", port=lab.info.ssh_port, username="root", key_filename=str(lab.info.ssh_key),
              look_for_keys=False, allow_agent=False, timeout=5)
    try:
        _, out, _ = c.exec_command("echo ok", timeout=5)
        assert out.read().decode().strip() == "ok"
        assert out.channel.recv_exit_status() == 0
    finally:
        c.close()


def test_ssh_unknown_host_key_refused(lab, tmp_path):
    import paramiko

    empty = tmp_path / "known_hosts"
    empty.write_text("")
    c = paramiko.SSHClient()
    c.load_host_keys(str(empty))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException):
        c.connect("127.0.0.1", port=lab.info.ssh_port, username="root", key_filename=str(lab.info.ssh_key),
                  look_for_keys=False, allow_agent=False, timeout=5)
    c.close()


def test_postgres_as_app(lab):
    import psycopg

    pw = lab.info.pg_password_file.read_text().strip()
    assert (lab.info.pg_password_file.stat().st_mode & 0o777) == 0o600
    with psycopg.connect(host="127.0.0.1", port=lab.info.pg_port, dbname="app", user="app", password=pw,
                         connect_timeout=5) as conn:
        assert conn.execute("select current_user, current_database()").fetchone() == ("app", "app")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=lab.info.pg_port, dbname="app", user="app", password="wrong",
                        connect_timeout=5).close()


def test_up_is_idempotent_and_reuses(lab):
    before = lab.pids()
    lab.up()
    assert lab.pids() == before
    assert http_get(lab.info.health_url)[0] == 200
    assert json.loads(Path(lab.lab_dir / "lab.json").read_text())["web_port"] == lab.info.web_port


def test_down_leaves_nothing_alive(lab):
    pids = lab.pids()
    assert {"dockerd", "containerd", "postgres", "redis", "sshd"} <= set(pids)
    assert "traffic" in pids
    client = lab.docker_client()
    containers = {n: client.containers.get(n).attrs["State"]["Pid"]
                  for n in (lab.info.container_name, "lab-upstream", "lab-worker")}
    assert all(pid and pid_alive(pid) for pid in containers.values())
    try:
        lab.down()
        alive = {name: pid for name, pid in {**pids, **containers}.items() if pid_alive(pid)}
        assert alive == {}
        st = lab.status()
        assert all(v.startswith("down") for v in st.values()), st
    finally:
        lab.up()  # the rest of the run shares this lab, even if this test failed
    assert lab.status()["web"] == "up"


def test_lab_below_a_private_dir_still_runs_postgres():
    """A checkout under a 0700 dir (say /root): user postgres cannot traverse it, so the
    lab keeps PostgreSQL's data in the temp dir, linked from lab_dir/pg."""
    private = Path(tempfile.mkdtemp(prefix="rb-priv-"))  # 0700, short (unix socket paths)
    other = Lab(private / "lab")
    try:
        other.up()
        assert (other.lab_dir / "pg").is_symlink()
        pg_pid = other.read_pid("postgres")
        assert pid_alive(pg_pid)
        password = other.info.pg_password_file.read_text().strip()
        with psycopg.connect(host="127.0.0.1", port=other.info.pg_port, dbname="app", user="app",
                             password=password, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        other.down()
        shutil.rmtree((private / "lab" / "pg").resolve(), ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
    assert not pid_alive(pg_pid)
