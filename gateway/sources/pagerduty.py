"""PagerDuty V3 webhooks (https://developer.pagerduty.com/docs/webhooks-overview).

Body: ``{"event": {id, event_type, resource_type, occurred_at, agent, data}}`` where
``data`` is the incident for ``incident.*`` events.

State mapping (decision): PagerDuty has three incident states; the Alert keeps the
two-state ``status`` and adds ``acknowledged``:

* incident.triggered / reopened / unacknowledged -> firing
* incident.acknowledged -> firing with ``acknowledged=True`` (a human owns it; the
  problem is not fixed, so it is not resolved; the intake decides whether
  automation still runs)
* incident.resolved -> resolved
* other incident.* events whose data is the incident (escalated, priority_updated,
  reassigned, ...) -> by ``data.status``; ``pagey.ping``, non-incident resources and
  incident events without an incident (annotated, ...) are :class:`NotAnAlert`.

Identity: fingerprint = ``pagerduty:<incident_key>`` when the incident has a
dedup key (incidents created through the Events API), else
``pagerduty:incident:<id>``; episode key = ``pagerduty:incident:<id>`` (one incident
is one episode). ``event.id`` (unique per webhook event) is ``event_id``.

Severity: incident priority (P1..P5 -> P0..P3) when set, else urgency
(high -> P1, low -> P3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway import severity as sev
from gateway.errors import NotAnAlert, PayloadError
from gateway.models import Alert, Status
from gateway.sources._common import get_obj, get_str, links, load_json, obj, parse_time

_EVENTS: dict[str, tuple[Status, bool]] = {
    "incident.triggered": ("firing", False),
    "incident.reopened": ("firing", False),
    "incident.unacknowledged": ("firing", False),
    "incident.acknowledged": ("firing", True),
    "incident.resolved": ("resolved", False),
}
_STATES: dict[str, tuple[Status, bool]] = {
    "triggered": ("firing", False),
    "acknowledged": ("firing", True),
    "resolved": ("resolved", False),
}


def parse(body: bytes, headers: Mapping[str, str]) -> list[Alert]:
    doc = obj(load_json(body), "body")
    if "messages" in doc and "event" not in doc:
        raise PayloadError("this is a PagerDuty V2 webhook (messages array); use a V3 "
                           "webhook subscription")
    event = get_obj(doc, "event", "")
    event_type = get_str(event, "event_type", "event", required=True) or ""
    if get_str(event, "resource_type", "event") not in (None, "incident"):
        raise NotAnAlert(f"PagerDuty event {event_type!r} is not about an incident")
    data = event.get("data")
    incident = data if _is_incident(data) else None
    if event_type in _EVENTS:
        if incident is None:
            raise PayloadError("is not an incident object (needs type 'incident' and an id)",
                               "event.data")
        return [_incident(event, incident, event_type, *_EVENTS[event_type])]
    if incident is not None and incident.get("status") in _STATES:
        return [_incident(event, incident, event_type, *_STATES[incident["status"]])]
    raise NotAnAlert(f"PagerDuty event {event_type!r} is not an incident state change")


def _is_incident(data: Any) -> bool:
    return isinstance(data, dict) and data.get("type") in ("incident", None) and "id" in data


def _incident(event: Mapping[str, Any], data: Mapping[str, Any], event_type: str,
              status: Status, acknowledged: bool) -> Alert:
    incident_id = get_str(data, "id", "event.data", required=True)
    service = get_obj(data, "service", "event.data", required=False)
    policy = get_obj(data, "escalation_policy", "event.data", required=False)
    priority_obj = data.get("priority")
    priority = priority_obj.get("summary") if isinstance(priority_obj, dict) else None
    urgency = get_str(data, "urgency", "event.data")
    title = get_str(data, "title", "event.data") or f"PagerDuty incident {incident_id}"
    incident_key = get_str(data, "incident_key", "event.data")
    labels = {k: v for k, v in {
        "alertname": title,
        "service": get_str(service, "summary", "event.data.service"),
        "service_id": get_str(service, "id", "event.data.service"),
        "urgency": urgency,
        "priority": priority if isinstance(priority, str) else None,
        "escalation_policy": get_str(policy, "summary", "event.data.escalation_policy"),
    }.items() if v}
    occurred_at = parse_time(event.get("occurred_at"), "event.occurred_at")
    created_at = parse_time(data.get("created_at"), "event.data.created_at")
    severity = sev.from_p1_p5(priority) or sev.from_word(urgency) or sev.DEFAULT_SEVERITY
    return Alert(
        source="pagerduty",
        status=status,
        acknowledged=acknowledged,
        fingerprint=f"pagerduty:{incident_key}" if incident_key else f"pagerduty:incident:{incident_id}",
        fingerprint_origin="source",
        source_fingerprint=incident_key,
        episode_key=f"pagerduty:incident:{incident_id}",
        labels=labels,
        summary=title,
        service=labels.get("service"),
        severity=severity,
        severity_raw=priority if isinstance(priority, str) else urgency,
        starts_at=created_at or (occurred_at if event_type == "incident.triggered" else None),
        ends_at=occurred_at if status == "resolved" else None,
        links=links(incident=data.get("html_url"), service=service.get("html_url")),
        raw_id=incident_id,
        event_id=get_str(event, "id", "event"),
        event_type=event_type,
        extra={k: v for k, v in {"number": data.get("number"),
                                 "agent": (event.get("agent") or {}).get("summary")
                                 if isinstance(event.get("agent"), dict) else None,
                                 "occurred_at": event.get("occurred_at")}.items()
               if v is not None},
    )
