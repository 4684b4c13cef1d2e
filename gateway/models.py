"""The one normalised alert every source parser produces, and the delivery it came in.

Identity rules (see README of the gateway in the module docstrings of each parser):

* ``fingerprint`` identifies the *alert* (the same problem over time).
* ``episode_key`` identifies one *firing episode* of it: the firing notification and
  the later resolved notification of the same episode share it.
* ``dedup_key`` = episode_key + state: a redelivery of the same state of the same
  episode is a duplicate; a state change (firing -> acknowledged -> resolved) is not.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, computed_field, model_validator

from incident.inventory import Severity

Source = Literal["alertmanager", "grafana", "sentry", "pagerduty", "opsgenie", "cloudevents"]
SOURCES: tuple[str, ...] = ("alertmanager", "grafana", "sentry", "pagerduty", "opsgenie", "cloudevents")
Status = Literal["firing", "resolved"]
FingerprintOrigin = Literal["source", "computed"]

NO_LABELS = ("the alert has no labels (or only empty ones): it cannot be identified or routed; "
             "give the sender's alert rule labels, at least alertname")

__all__ = ["Alert", "Delivery", "FingerprintOrigin", "Severity", "Source", "SOURCES", "Status"]


class Alert(BaseModel):
    """One alert, whatever tool sent it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Source
    status: Status = Field(
        description="Per alert, never the group's: one Alertmanager POST can mix both."
    )
    acknowledged: bool = Field(
        default=False,
        description="A human took it (PagerDuty incident.acknowledged, Opsgenie Acknowledge, "
        "Sentry issue assigned). Status stays 'firing': the problem is not fixed.",
    )
    fingerprint: str = Field(min_length=1, description="Stable identity of the alert.")
    fingerprint_origin: FingerprintOrigin = Field(
        description="'source': the sender's own id was used; 'computed': the gateway computed it "
        "(Alertmanager-style label hash), e.g. because the sender's did not match the labels."
    )
    source_fingerprint: str | None = Field(
        default=None, description="The fingerprint the sender put in the payload, unchanged."
    )
    episode_key: str = Field(min_length=1, description="Identity of one firing episode.")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    summary: str = ""
    service: str | None = None
    severity: Severity = Severity.P2
    severity_raw: str | None = Field(
        default=None, description="The sender's severity/priority/level, before mapping."
    )
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None
    links: dict[str, str] = Field(
        default_factory=dict, description="name -> URL: generator, dashboard, panel, issue, ..."
    )
    raw_id: str | None = Field(
        default=None, description="The sender's id of the alert object (incident, issue, alertId)."
    )
    event_id: str | None = Field(
        default=None, description="The sender's id of this notification (PagerDuty event.id, CE id)."
    )
    event_type: str | None = Field(
        default=None, description="What happened, in the sender's words (incident.resolved, Close)."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Source-specific values kept exactly as parsed (integers stay integers, "
        "e.g. Opsgenie's nanosecond timestamps > 2**53).",
    )

    @model_validator(mode="after")
    def _has_labels(self) -> "Alert":
        if not any(self.labels.values()):
            raise ValueError(NO_LABELS)
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def dedup_key(self) -> str:
        state = "acknowledged" if self.acknowledged and self.status == "firing" else self.status
        return f"{self.episode_key}|{state}"


class Delivery(BaseModel):
    """One HTTP delivery to the gateway (one POST may carry many alerts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Source
    delivery_id: str | None = Field(
        default=None, description="X-Webhook-Id / Request-ID / X-Request-ID header if sent."
    )
    received_at: datetime
    remote_addr: str | None = None
