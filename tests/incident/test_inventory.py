from __future__ import annotations

import pickle

import pytest
import yaml

from incident.errors import ConfigurationError, SecretUnavailableError, UnknownTargetError
from incident.inventory import SecretRef, Severity, load_inventory

INVENTORY = {
    "docker_hosts": {"d1": {"base_url": "unix:///tmp/x.sock"}},
    "databases": {"db": {"host": "127.0.0.1", "port": 5432, "dbname": "app", "user": "app",
                         "password": "env:TEST_DB_PASSWORD"}},
    "services": {
        "web": {"environment": "production", "owner": "team-a", "health_url": "http://127.0.0.1:1/health",
                "container": "web", "docker_host": "d1", "database": "db"},
        "api": {"environment": "lab", "owner": "team-b", "health_url": "http://127.0.0.1:2/health"},
    },
}


def _write(tmp_path, data) -> object:
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_target_resolves_every_system(tmp_path):
    target = load_inventory(_write(tmp_path, INVENTORY)).target("web")
    assert target.docker.base_url == "unix:///tmp/x.sock"
    assert target.database.password.ref == "env:TEST_DB_PASSWORD"
    assert target.ssh is None
    assert target.service.severity_down is Severity.P0


def test_unknown_target_lists_known_services(tmp_path):
    with pytest.raises(UnknownTargetError) as err:
        load_inventory(_write(tmp_path, INVENTORY)).target("nope")
    assert "api, web" in str(err.value) and "inventory" in err.value.next_step


def test_dangling_reference_is_a_configuration_error(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(INVENTORY))
    bad["services"]["web"]["database"] = "missing-db"
    with pytest.raises(ConfigurationError, match="databases.missing-db"):
        load_inventory(_write(tmp_path, bad))


def test_inline_secret_values_are_refused(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(INVENTORY))
    bad["databases"]["db"]["password"] = "hunter2"
    with pytest.raises(ConfigurationError) as err:
        load_inventory(_write(tmp_path, bad))
    assert "hunter2" not in str(err.value)


def test_missing_inventory_says_how_to_get_one(tmp_path):
    with pytest.raises(ConfigurationError, match="make up"):
        load_inventory(tmp_path / "absent.yaml")


def test_secret_refs_resolve_without_showing_the_value(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cret-value\n")
    ref = SecretRef(ref=f"file:{secret}")
    assert ref.resolve().get_secret_value() == "s3cret-value"
    assert "s3cret" not in str(ref) and "s3cret" not in repr(ref.resolve())
    monkeypatch.setenv("RB_TEST_SECRET", "from-env")
    assert SecretRef(ref="env:RB_TEST_SECRET").resolve().get_secret_value() == "from-env"
    with pytest.raises(SecretUnavailableError, match="export RB_ABSENT"):
        SecretRef(ref="env:RB_ABSENT").resolve()


def test_errors_name_target_observation_expectation_and_next_step():
    err = UnknownTargetError("web", "observed thing", "expected thing", "do this")
    assert str(err) == "[web] observed: observed thing; expected: expected thing. Next step: do this"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is UnknownTargetError and str(again) == str(err)


# --------------------------------------------------------------------------- the app section

APP = {
    "metrics_url": "http://127.0.0.1:1/metrics",
    "admin_url": "http://127.0.0.1:1/admin",
    "admin_token": "env:TEST_ADMIN_TOKEN",
    "upstream": {"name": "prices", "health_url": "http://127.0.0.1:3/health", "probe_url": "http://127.0.0.1:3/price"},
    "log": {"path": "/var/log/app/app.log"},
    "queue": {"redis": "cache", "key": "jobs", "consumer_container": "worker"},
}


def _with_app(app: dict | None = None, **service) -> dict:
    data = yaml.safe_load(yaml.safe_dump(INVENTORY))
    data["redis"] = {"cache": {"host": "127.0.0.1", "port": 6380}, "sessions": {"host": "127.0.0.1", "port": 6381}}
    data["ssh_hosts"] = {"h": {"hostname": "127.0.0.1", "username": "root", "key_file": "/k", "known_hosts": "/kh"}}
    data["services"]["web"].update({"app": app or APP, "ssh_host": "h", "redis": "sessions", **service})
    return data


def test_app_section_resolves_with_defaults_and_the_queue_redis(tmp_path):
    target = load_inventory(_write(tmp_path, _with_app())).target("web")
    app = target.service.app
    assert app is not None and app.upstream is not None and app.log is not None and app.queue is not None
    assert isinstance(app.admin_token, SecretRef) and str(app.admin_token) == "env:TEST_ADMIN_TOKEN"
    assert app.upstream.timeout_s == 2.0
    assert (app.log.max_bytes, app.log.keep) == (100 * 1024**2, 5)
    assert (app.queue.max_backlog, app.queue.min_drain_per_s) == (1000, 1.0)
    assert (app.memory_alert_fraction, app.memory_baseline_fraction, app.cpu_alert_cores) == (0.8, 0.5, 0.8)
    assert (app.error_rate_threshold, app.error_rate_window_s, app.upstream_deadline_s) == (0.05, 300, 1800)
    assert app.prometheus_url is None and app.required_settings == [] and app.start_dependencies == []
    # the queue's Redis is resolved on its own: not the service's `redis`
    assert target.app_redis is not None and target.app_redis.port == 6380
    assert target.redis is not None and target.redis.port == 6381
    assert load_inventory(_write(tmp_path, INVENTORY)).target("web").app_redis is None


def test_app_queue_must_name_a_defined_redis(tmp_path):
    bad = _with_app({**APP, "queue": {**APP["queue"], "redis": "missing"}})
    with pytest.raises(ConfigurationError, match="redis.missing"):
        load_inventory(_write(tmp_path, bad))


def test_app_queue_and_log_need_the_hosts_that_reach_them(tmp_path):
    no_docker = _with_app()
    del no_docker["services"]["web"]["container"], no_docker["services"]["web"]["docker_host"]
    with pytest.raises(ConfigurationError, match="docker_host"):
        load_inventory(_write(tmp_path, no_docker))
    no_ssh = _with_app()
    del no_ssh["services"]["web"]["ssh_host"]
    with pytest.raises(ConfigurationError, match="ssh_host"):
        load_inventory(_write(tmp_path, no_ssh))


def test_app_admin_token_is_a_reference_never_a_value(tmp_path):
    with pytest.raises(ConfigurationError) as err:
        load_inventory(_write(tmp_path, _with_app({**APP, "admin_token": "hunter2-token"})))
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigurationError, match="nope"):
        load_inventory(_write(tmp_path, _with_app({**APP, "nope": 1})))


def test_the_inventory_is_parsed_once_and_read_again_when_it_changes(tmp_path):
    import os

    path = _write(tmp_path, INVENTORY)
    first = load_inventory(path)
    assert load_inventory(path) is first, "an unchanged inventory is not parsed again"
    changed = yaml.safe_load(yaml.safe_dump(INVENTORY))
    changed["services"]["api"]["owner"] = "team-c"  # same size as team-b
    stamp = os.stat(path)
    path.write_text(yaml.safe_dump(changed))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same mtime and size: bytes differ
    assert load_inventory(path).services["api"].owner == "team-c"
    path.write_text(yaml.safe_dump(INVENTORY) + "bad: [\n")
    with pytest.raises(ConfigurationError, match="invalid YAML"):
        load_inventory(path)
    path.unlink()
    with pytest.raises(ConfigurationError, match="make up"):
        load_inventory(path)
