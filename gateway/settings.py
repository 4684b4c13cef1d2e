"""Gateway settings from the environment, prefix ``RUNBOOKS_GATEWAY_``.

A secret left unset (None) turns verification off for that source: fine on
loopback in the lab, never on a network. ``/healthz`` shows which sources verify.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from incident.settings import REPO_ROOT

MIB = 1024 * 1024


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_GATEWAY_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Bind address.")
    port: int = Field(default=8787, ge=1, le=65535, description="Bind port.")
    max_body_bytes: int = Field(default=MIB, ge=1, description="Larger bodies get 413.")
    routes_file: Path = Field(default=REPO_ROOT / "routes.yaml", description="Alert routes.")
    store: Path | None = Field(
        default=None, description="Intake database (SQLite); default <state dir>/gateway/alerts.db.")
    dispatch: Literal["runner", "automation", "shadow"] = Field(
        default="runner", description="runner: start flow runs in the gateway's long-lived runner "
        "(fast); automation: emit an event for the prefect.yaml deployment trigger; shadow: "
        "record and decide (incidents, dedup) but start nothing.")
    max_parallel_runs: int = Field(default=16, ge=1, description="Remediations run at once (runner).")

    alertmanager_bearer_token: SecretStr | None = Field(
        default=None, description="Alertmanager http_config.authorization credentials.")
    alertmanager_basic_username: str = Field(
        default="alertmanager", description="Username expected with the basic-auth password.")
    alertmanager_basic_password: SecretStr | None = Field(
        default=None, description="Alertmanager http_config.basic_auth password.")
    grafana_secret: SecretStr | None = Field(
        default=None, description="Grafana webhook contact point HMAC secret.")
    sentry_client_secret: SecretStr | None = Field(
        default=None, description="Sentry integration client secret (Sentry-Hook-Signature).")
    pagerduty_secret: SecretStr | None = Field(
        default=None, description="PagerDuty V3 webhook subscription secret.")
    opsgenie_secret: SecretStr | None = Field(
        default=None, description="Value of the custom header set in the Opsgenie webhook.")
    opsgenie_secret_header: str = Field(
        default="X-Opsgenie-Secret", description="Name of that custom header.")
    cloudevents_bearer_token: SecretStr | None = Field(
        default=None, description="Bearer token CloudEvents senders must present.")

    @property
    def store_path(self) -> Path:
        from incident.settings import get_settings

        return self.store or get_settings().state_dir / "gateway" / "alerts.db"

    def verification_enabled(self) -> dict[str, bool]:
        """Per source: is the request authenticated? (Never the secrets themselves.)"""
        return {
            "alertmanager": bool(self.alertmanager_bearer_token or self.alertmanager_basic_password),
            "grafana": self.grafana_secret is not None,
            "sentry": self.sentry_client_secret is not None,
            "pagerduty": self.pagerduty_secret is not None,
            "opsgenie": self.opsgenie_secret is not None,
            "cloudevents": self.cloudevents_bearer_token is not None,
        }
