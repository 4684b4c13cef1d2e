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
