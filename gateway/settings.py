"""Gateway settings from the environment, prefix ``RUNBOOKS_GATEWAY_``.

Fail closed: every source is verified (its secret set) unless it is listed in
``RUNBOOKS_GATEWAY_INSECURE_SOURCES``, and the gateway never starts on a non-loopback
address with an unverified source (:meth:`GatewaySettings.check_can_start`). A secret
set to an empty string is a configuration error, not "verified". ``/healthz`` shows
which sources verify.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.errors import GatewayConfigError
from gateway.models import SOURCES
from incident.settings import REPO_ROOT

MIB = 1024 * 1024
ENV_PREFIX = "RUNBOOKS_GATEWAY_"

#: per source, the settings that turn its verification on (any one of them is enough)
SECRET_SETTINGS: dict[str, tuple[str, ...]] = {
    "alertmanager": ("alertmanager_bearer_token", "alertmanager_basic_password"),
    "grafana": ("grafana_secret",),
    "sentry": ("sentry_client_secret",),
    "pagerduty": ("pagerduty_secret",),
    "opsgenie": ("opsgenie_secret",),
    "cloudevents": ("cloudevents_bearer_token",),
}


def env_name(field: str) -> str:
    """The environment variable of a setting: ``grafana_secret`` -> ``RUNBOOKS_GATEWAY_GRAFANA_SECRET``."""
    return ENV_PREFIX + field.upper()


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``; anything else (0.0.0.0, a name) counts as a network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = Field(default="127.0.0.1", description="Bind address.")
    port: int = Field(default=8787, ge=1, le=65535, description="Bind port.")
    max_body_bytes: int = Field(default=MIB, ge=1, description="Larger bodies get 413.")
    max_alerts_per_delivery: int = Field(
        default=500, ge=1, description="Deliveries carrying more alerts get 413.")
    signature_max_age_s: int = Field(
        default=300, ge=1, description="Signature timestamps (Grafana, Sentry) further than this "
        "from the gateway's clock, in the past or the future, are rejected (401).")
    retention_days: int = Field(
        default=30, ge=1, description="Deliveries and alerts older than this are pruned from the "
        "store; open incidents and the dedup keys still being redelivered are kept.")
    sweep_interval_s: float = Field(
        default=60, ge=0, description="How often the gateway looks for runs that died without "
        "closing their incident record (incident/sweeper.py) and closes them; 0: never.")
    routes_file: Path = Field(default=REPO_ROOT / "routes.yaml", description="Alert routes.")
    store: Path | None = Field(
        default=None, description="Intake database (SQLite); default <state dir>/gateway/alerts.db.")
    dispatch: Literal["runner", "automation", "shadow"] = Field(
        default="runner", description="runner: create each incident's flow run and queue it for the "
        "runner processes (`python -m gateway runner`, fast); automation: emit an event for the "
        "prefect.yaml deployment trigger; shadow: record and decide (incidents, dedup) but start "
        "nothing.")
    runner_token: SecretStr | None = Field(
        default=None, description="Bearer token runner processes present to take queued runs "
        "(runner dispatch needs it; `make up` generates one).")
    runner_lease_s: float = Field(
        default=30, gt=0, description="How long a runner's claim on a run holds without a heartbeat "
        "(runners renew every third of it). A runner silent that long is taken for dead: its runs "
        "not started go back to the queue, its running ones are closed as Crashed and escalated.")
    gateway_url: str | None = Field(
        default=None, description="Where a runner finds the gateway (default http://HOST:PORT of "
        "these settings).")
    max_parallel_runs: int = Field(
        default=16, ge=1, description="Runs each runner lets work at once. A run "
        "that waits (for an approval, for another run's lock on its target) gives its slot back "
        "meanwhile, so paused runs do not block new incidents.")
    max_waiting_runs: int = Field(
        default=64, ge=0, description="Runs that may wait (approval, target lock) beside the working "
        "ones in each runner: a runner has max_parallel_runs + max_waiting_runs threads, and a "
        "waiting run keeps its thread. A runner takes new runs only while it has a free slot.")
    max_queued_runs: int = Field(
        default=32, ge=1, description="Runs that may queue at the gateway for a runner (runner dispatch). "
        "When that many queue, deliveries carrying a firing alert are refused with 503 and "
        "Retry-After, before anything is recorded, so the sender delivers them again later; "
        "deliveries of resolved alerts only are still accepted.")
    insecure_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma list of sources allowed to run without "
        "verification (loopback only), e.g. 'grafana,sentry'. Every other source needs its secret.")

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
        default="X-Opsgenie-Secret", min_length=1, description="Name of that custom header.")
    cloudevents_bearer_token: SecretStr | None = Field(
        default=None, description="Bearer token CloudEvents senders must present.")

    @field_validator("insecure_sources", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("insecure_sources")
    @classmethod
    def _known_sources(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in SOURCES]
        if unknown:
            raise ValueError(f"unknown source(s) {', '.join(unknown)} in {env_name('insecure_sources')}; "
                             f"use a comma list of {', '.join(SOURCES)}")
        return value

    @field_validator("alertmanager_bearer_token", "alertmanager_basic_password", "grafana_secret",
                     "sentry_client_secret", "pagerduty_secret", "opsgenie_secret",
                     "cloudevents_bearer_token", "runner_token")
    @classmethod
    def _not_empty(cls, value: SecretStr | None, info) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            name = env_name(info.field_name)
            raise ValueError(f"{name} is set but empty: an empty secret verifies nothing. Set it to "
                             f"the sender's secret, or unset it (loopback only: then list the source "
                             f"in {env_name('insecure_sources')})")
        return value

    @property
    def store_path(self) -> Path:
        from incident.settings import get_settings

        return self.store or get_settings().state_dir / "gateway" / "alerts.db"

    def verification_enabled(self) -> dict[str, bool]:
        """Per source: is the request authenticated? (Never the secrets themselves.)"""
        return {source: any(getattr(self, f) is not None for f in fields)
                for source, fields in SECRET_SETTINGS.items()}

    def unverified_sources(self) -> list[str]:
        return [source for source, verified in self.verification_enabled().items() if not verified]

    def check_can_start(self) -> None:
        """Refuse to serve with an unverified source, unless it is explicitly allowed on loopback.

        Raises GatewayConfigError naming the sources and the variables to set.
        """
        unverified = self.unverified_sources()
        if not unverified:
            return
        secrets = ", ".join(env_name(SECRET_SETTINGS[s][0]) for s in unverified)
        if not is_loopback(self.host):
            raise GatewayConfigError(
                f"refusing to start: the gateway listens on {self.host} (not loopback) and these "
                f"sources have no secret, so anyone who reaches it could start remediations: "
                f"{', '.join(unverified)}. Set {secrets}; or bind {env_name('host')}=127.0.0.1 "
                f"and list them in {env_name('insecure_sources')}")
        not_allowed = [s for s in unverified if s not in self.insecure_sources]
        if not_allowed:
            raise GatewayConfigError(
                f"refusing to start: no secret is set for {', '.join(not_allowed)}, so their alerts "
                f"would not be verified. Set {', '.join(env_name(SECRET_SETTINGS[s][0]) for s in not_allowed)}; "
                f"or, on loopback only, accept them unverified with "
                f"{env_name('insecure_sources')}={','.join(self.insecure_sources + not_allowed)}")
