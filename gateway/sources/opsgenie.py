"""Opsgenie outgoing webhook integration (https://support.atlassian.com/opsgenie/docs/integrate-opsgenie-with-outgoing-webhooks/).

Body: ``{action, alert: {alertId, alias, message, tags, entity, source, priority,
createdAt (ms), updatedAt (ns), insertedAt (ns), details, ...}, source, integrationId,
integrationName, alertFlowContext?}``.

``updatedAt``/``insertedAt`` are integer nanoseconds above 2**53: they are parsed as
Python ints (``json.loads`` never goes through float for integers), kept exactly in
``extra`` and converted to datetimes with integer arithmetic.

Actions: Create, UnAcknowledge -> firing; Acknowledge -> firing + acknowledged
(same decision as PagerDuty); Close, Delete -> resolved; everything else (AddNote,
AddTags, Escalate, Snooze, ...) is :class:`NotAnAlert`.

Identity: fingerprint = ``opsgenie:<alias>`` (the alias is Opsgenie's own
de-duplication key), else ``opsgenie:<alertId>``; episode key =
``opsgenie:alert:<alertId>`` (a new alert with the same alias after Close gets a new
alertId, hence a new episode).

Severity: ``priority`` P1..P5 -> P0, P1, P2, P3, P3 (a bare integer 3 means P3).
Service: ``details.service``, else a ``service:<name>`` tag, else ``entity``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway import severity as sev
from gateway.errors import NotAnAlert, PayloadError
from gateway.models import Alert, Status
from gateway.sources._common import (
    from_epoch_ms,
    from_epoch_ns,
    get_obj,
    get_str,
    load_json,
    obj,
    str_map,
)

_ACTIONS: dict[str, tuple[Status, bool]] = {
    "Create": ("firing", False),
    "UnAcknowledge": ("firing", False),
    "Acknowledge": ("firing", True),
    "Close": ("resolved", False),
    "Delete": ("resolved", False),
}
_EXACT_INTS = ("createdAt", "updatedAt", "insertedAt")


def parse(body: bytes, headers: Mapping[str, str]) -> list[Alert]:
    doc = obj(load_json(body), "body")
    action = get_str(doc, "action", "", required=True) or ""
    alert = get_obj(doc, "alert", "")
    if action not in _ACTIONS:
        raise NotAnAlert(f"Opsgenie action {action!r} is not an alert state change "
                         f"(handled: {', '.join(_ACTIONS)})")
    status, acknowledged = _ACTIONS[action]
    return [_alert(doc, alert, action, status, acknowledged)]


def _alert(doc: Mapping[str, Any], alert: Mapping[str, Any], action: str, status: Status,
           acknowledged: bool) -> Alert:
    alert_id = get_str(alert, "alertId", "alert", required=True) or ""
    alias = get_str(alert, "alias", "alert")
    message = get_str(alert, "message", "alert") or f"Opsgenie alert {alert_id}"
    tags = alert.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise PayloadError("expected an array of strings", "alert.tags")
    details = str_map(alert.get("details"), "alert.details")
    priority = alert.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, (str, int))):
        raise PayloadError("expected P1..P5", "alert.priority")
    entity = get_str(alert, "entity", "alert")
    labels = dict(details)
    labels.update({k: v for k, v in {
        "alertname": message,
        "alias": alias,
        "entity": entity,
        "origin": get_str(alert, "source", "alert"),
        "priority": str(priority) if priority is not None else None,
        "tags": ",".join(tags),
    }.items() if v})
    updated_at = from_epoch_ns(alert.get("updatedAt"), "alert.updatedAt")
    flow = doc.get("alertFlowContext")
    request_id = flow.get("requestId") if isinstance(flow, dict) else None
    return Alert(
        source="opsgenie",
        status=status,
        acknowledged=acknowledged,
        fingerprint=f"opsgenie:{alias}" if alias else f"opsgenie:{alert_id}",
        fingerprint_origin="source",
        source_fingerprint=alias,
        episode_key=f"opsgenie:alert:{alert_id}",
        labels=labels,
        annotations={"description": d} if (d := get_str(alert, "description", "alert")) else {},
        summary=message,
        service=_service(details, tags, entity),
        severity=sev.from_p1_p5(priority) or sev.DEFAULT_SEVERITY,
        severity_raw=str(priority) if priority is not None else None,
        starts_at=from_epoch_ms(alert.get("createdAt"), "alert.createdAt"),
        ends_at=updated_at if status == "resolved" else None,
        raw_id=alert_id,
        event_id=request_id if isinstance(request_id, str) else None,
        event_type=action,
        extra={
            **{k: alert[k] for k in _EXACT_INTS if alert.get(k) is not None},
            **{k: doc[k] for k in ("integrationId", "integrationName") if doc.get(k)},
            **({"tinyId": alert["tinyId"]} if alert.get("tinyId") is not None else {}),
            **({"username": alert["username"]} if alert.get("username") else {}),
        },
    )


def _service(details: Mapping[str, str], tags: list[str], entity: str | None) -> str | None:
    if details.get("service"):
        return details["service"]
    for tag in tags:
        if tag.startswith("service:") and len(tag) > len("service:"):
            return tag.removeprefix("service:")
    return entity or None
