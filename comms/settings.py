"""Notifier settings, read from the environment (prefix ``RUNBOOKS_``).

A provider is configured when its credential setting is set; a provider with only some of
its settings is a configuration error (``Notifiers.from_settings`` says which one to set).
Credential settings hold *secret references*, never the secret itself: ``env:NAME``,
``file:/path`` or ``prefect-secret:block-name`` (a Prefect Secret block), resolved with
:class:`incident.inventory.SecretRef` when a message is first sent. Every setting is
documented in the README's "Settings" table, built from the descriptions below.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RUNBOOKS_"

#: per provider, its settings: the credential (a secret reference) first
PROVIDER_SETTINGS: dict[str, tuple[str, ...]] = {
    "pagerduty": ("pagerduty_routing_key",),
    "opsgenie": ("opsgenie_api_key",),
    "slack": ("slack_webhook_url",),
    "statuspage": ("statuspage_api_key", "statuspage_page_id", "statuspage_component_id"),
}

_REF = "a secret reference: env:NAME, file:/path or prefect-secret:block-name"


def env_name(field: str) -> str:
    """The environment variable of a setting: ``slack_webhook_url`` -> ``RUNBOOKS_SLACK_WEBHOOK_URL``."""
    return ENV_PREFIX + field.upper()


class CommsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    pagerduty_routing_key: str | None = Field(
        default=None, description="PagerDuty Events API v2 integration (routing) key, as "
        f"{_REF}. Set: incidents trigger, acknowledge and resolve a PagerDuty alert.")
    pagerduty_url: str = Field(
        default="https://events.pagerduty.com",
        description="PagerDuty Events API base URL (https://events.eu.pagerduty.com for EU accounts).")
    opsgenie_api_key: str | None = Field(
        default=None, description=f"Opsgenie API integration key, as {_REF}. Set: incidents "
        "create, annotate, acknowledge and close an Opsgenie alert (alias = incident id).")
    opsgenie_url: str = Field(
        default="https://api.opsgenie.com",
        description="Opsgenie API base URL (https://api.eu.opsgenie.com for EU accounts).")
    slack_webhook_url: str | None = Field(
        default=None, description=f"Slack incoming webhook URL, as {_REF} (the URL is a "
        "credential). Set: every incident message is posted to its channel.")
    statuspage_api_key: str | None = Field(
        default=None, description=f"Atlassian Statuspage API key, as {_REF}. Set together with "
        "the page and component ids: declared incidents open a public incident, never for drills.")
    statuspage_page_id: str | None = Field(
        default=None, description="Statuspage page id (Statuspage: API info).")
    statuspage_component_id: str | None = Field(
        default=None, description="Statuspage component whose status incidents set "
        "(P0 major_outage, P1 partial_outage, P2/P3 degraded_performance; operational when resolved).")
    statuspage_url: str = Field(
        default="https://api.statuspage.io", description="Statuspage API base URL (without /v1).")
    statuspage_deliver_notifications: bool = Field(
        default=True, description="Statuspage sends its subscribers the incident's updates.")
    notify_attempts: int = Field(
        default=3, ge=1, le=10, description="Attempts per provider and message; only transport "
        "errors, 429 (after its Retry-After) and 5xx answers are retried.")
    notify_budget_s: float = Field(
        default=15.0, gt=0, le=300, description="Time one message may take per provider, retries "
        "and waits included; a Retry-After beyond it ends the retries.")
    notify_backoff_s: float = Field(
        default=1.0, ge=0, le=60, description="Wait before the 2nd attempt after a transport error "
        "or 5xx, doubled for each further attempt (a 429's Retry-After takes precedence).")
    notify_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Timeout of every notifier HTTP request.")
