"""Fail closed at the door: the gateway does not start with a source nobody verifies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from gateway.app import create_app
from gateway.errors import GatewayConfigError
from gateway.intake_memory import RecordingIntake
from gateway.models import SOURCES
from gateway.settings import GatewaySettings, is_loopback
from incident.settings import REPO_ROOT

ALL_SECRETS = {"alertmanager_bearer_token": "t-am", "grafana_secret": "t-gf", "sentry_client_secret": "t-se",
               "pagerduty_secret": "t-pd", "opsgenie_secret": "t-og", "cloudevents_bearer_token": "t-ce"}


def test_refuses_to_start_with_an_unverified_source_that_is_not_allowed():
    settings = GatewaySettings(alertmanager_bearer_token="t-am", grafana_secret="t-gf")
    with pytest.raises(GatewayConfigError) as exc:
        create_app(settings, RecordingIntake())
    message = str(exc.value)
    for source, variable in (("sentry", "RUNBOOKS_GATEWAY_SENTRY_CLIENT_SECRET"),
                             ("pagerduty", "RUNBOOKS_GATEWAY_PAGERDUTY_SECRET"),
                             ("opsgenie", "RUNBOOKS_GATEWAY_OPSGENIE_SECRET"),
                             ("cloudevents", "RUNBOOKS_GATEWAY_CLOUDEVENTS_BEARER_TOKEN")):
        assert source in message and variable in message
    assert "grafana" not in message.split("no secret is set for")[1].split(",")[0]
    assert "RUNBOOKS_GATEWAY_INSECURE_SOURCES=sentry,pagerduty,opsgenie,cloudevents" in message


def test_listed_insecure_sources_start_on_loopback_and_show_unverified():
    settings = GatewaySettings(alertmanager_bearer_token="t-am", insecure_sources="grafana, sentry,pagerduty",
                               opsgenie_secret="t-og", cloudevents_bearer_token="t-ce")
    app = create_app(settings, RecordingIntake())
    assert app.state.settings.unverified_sources() == ["grafana", "sentry", "pagerduty"]
    with pytest.raises(GatewayConfigError, match="no secret is set for pagerduty"):
        create_app(settings.model_copy(update={"insecure_sources": ["grafana", "sentry"]}), RecordingIntake())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "gateway.example.org"])
def test_never_starts_on_a_network_address_with_an_unverified_source(host):
    settings = GatewaySettings(host=host, insecure_sources=list(SOURCES),
                               **{**ALL_SECRETS, "grafana_secret": None})
    with pytest.raises(GatewayConfigError) as exc:
        create_app(settings, RecordingIntake())
    assert f"listens on {host} (not loopback)" in str(exc.value)
    assert "grafana" in str(exc.value) and "RUNBOOKS_GATEWAY_GRAFANA_SECRET" in str(exc.value)
    create_app(GatewaySettings(host=host, **ALL_SECRETS), RecordingIntake())  # all verified: fine


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org", ""))


def test_unknown_insecure_source_is_a_configuration_error():
    with pytest.raises(ValidationError, match="unknown source.*nagios.*RUNBOOKS_GATEWAY_INSECURE_SOURCES"):
        GatewaySettings(insecure_sources="grafana,nagios")


@pytest.mark.parametrize("field, variable", [
    ("grafana_secret", "RUNBOOKS_GATEWAY_GRAFANA_SECRET"),
    ("alertmanager_bearer_token", "RUNBOOKS_GATEWAY_ALERTMANAGER_BEARER_TOKEN"),
    ("alertmanager_basic_password", "RUNBOOKS_GATEWAY_ALERTMANAGER_BASIC_PASSWORD"),
    ("sentry_client_secret", "RUNBOOKS_GATEWAY_SENTRY_CLIENT_SECRET"),
    ("pagerduty_secret", "RUNBOOKS_GATEWAY_PAGERDUTY_SECRET"),
    ("opsgenie_secret", "RUNBOOKS_GATEWAY_OPSGENIE_SECRET"),
    ("cloudevents_bearer_token", "RUNBOOKS_GATEWAY_CLOUDEVENTS_BEARER_TOKEN"),
])
def test_an_empty_secret_is_a_configuration_error(field, variable, monkeypatch):
    for value in ("", "   "):
        with pytest.raises(ValidationError, match=f"{variable} is set but empty"):
            GatewaySettings(**{field: value})
    monkeypatch.setenv(variable, "")
    with pytest.raises(ValidationError, match=f"{variable} is set but empty"):
        GatewaySettings()


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RUNBOOKS_GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", "serve"], env={**clean, **env}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_serve_refuses_with_a_message_and_no_traceback(tmp_path):
    proc = _serve({"RUNBOOKS_GATEWAY_ALERTMANAGER_BEARER_TOKEN": "t-am",
                   "RUNBOOKS_GATEWAY_STORE": str(tmp_path / "alerts.db")})
    assert proc.returncode != 0
    assert "refusing to start" in proc.stderr and "RUNBOOKS_GATEWAY_INSECURE_SOURCES" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "alerts.db").exists(), "nothing is created before the check"

    proc = _serve({"RUNBOOKS_GATEWAY_GRAFANA_SECRET": "", "RUNBOOKS_GATEWAY_STORE": str(tmp_path / "a.db")})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "RUNBOOKS_GATEWAY_GRAFANA_SECRET is set but empty" in proc.stderr
