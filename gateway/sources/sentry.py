"""Sentry integration-platform webhooks (https://docs.sentry.io/integrations/integration-platform/webhooks/).

The resource is named by the ``Sentry-Hook-Resource`` header; when it is absent
(stored fixtures, proxies that drop headers) it is inferred from the body:
``data.metric_alert`` -> metric_alert, ``data.event`` -> event_alert, ``data.issue``
-> issue. A header that contradicts the body is a 422.

* ``issue`` (created / unresolved / resolved / assigned / ignored / archived):
  created, unresolved -> firing; resolved -> resolved; assigned -> firing and
  acknowledged; ignored, archived -> resolved (a human decided not to act, so
  automation must stop too). Unknown actions fall back to ``issue.status``.
  fingerprint = episode key = ``sentry:issue:<issue id>``. Sentry sends no marker of
  a regression, so a regressed issue re-uses the key: the intake must treat
  resolved -> firing as a new state change, not a duplicate.
* ``event_alert`` (issue alert rule fired; action "triggered"): always firing;
  keyed by the event's issue (``sentry:issue:<issue_id>``) so it joins the issue's
  episode; falls back to ``sentry:event:<event_id>``.
* ``metric_alert`` (critical / warning / resolved): fingerprint
  ``sentry:metric_alert:<rule id>``, episode ``...:<rule id>:<incident id>`` (Sentry
  opens one incident per breach).

Severity: the issue/event ``level`` (fatal P0, error P1, warning P2, info/debug P3),
or the metric alert action (critical P0, warning P2). Other resources
(installation, comment, error, ...) are :class:`NotAnAlert`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway import severity as sev
from gateway.errors import NotAnAlert, PayloadError
from gateway.models import Alert, Status
from gateway.sources._common import (
    get_obj,
    get_str,
    header,
    links,
    load_json,
    obj,
    parse_time,
    service_from_labels,
)

ALERT_RESOURCES = ("issue", "event_alert", "metric_alert")

_ISSUE_ACTIONS: dict[str, tuple[Status, bool]] = {
    "created": ("firing", False),
    "unresolved": ("firing", False),
    "assigned": ("firing", True),
    "resolved": ("resolved", False),
    "ignored": ("resolved", False),
    "archived": ("resolved", False),
}
_ISSUE_STATUSES: dict[str, Status] = {"unresolved": "firing", "resolved": "resolved",
                                      "ignored": "resolved"}
_METRIC_ACTIONS: dict[str, Status] = {"critical": "firing", "warning": "firing",
                                      "resolved": "resolved"}


def parse(body: bytes, headers: Mapping[str, str]) -> list[Alert]:
    doc = obj(load_json(body), "body")
    data = get_obj(doc, "data", "")
    inferred = infer_resource(data)
    declared = header(headers, "Sentry-Hook-Resource")
    resource = declared.strip() if declared else inferred
    if resource is None:
        raise PayloadError(
            "cannot tell the Sentry resource: no Sentry-Hook-Resource header and data has none "
            "of issue, event or metric_alert"
        )
    if resource not in ALERT_RESOURCES:
        raise NotAnAlert(f"Sentry resource {resource!r} is not an alert; subscribe to "
                         f"{', '.join(ALERT_RESOURCES)}")
    if inferred != resource:
        raise PayloadError(
            f"Sentry-Hook-Resource says {resource!r} but the body looks like {inferred!r}"
        )
    action = get_str(doc, "action", "", required=True) or ""
    if resource == "issue":
        return [_issue(doc, data, action)]
    if resource == "event_alert":
        return [_event_alert(doc, data, action)]
    return [_metric_alert(doc, data, action)]


def infer_resource(data: Mapping[str, Any]) -> str | None:
    if isinstance(data.get("metric_alert"), dict):
        return "metric_alert"
    if isinstance(data.get("event"), dict):
        return "event_alert"
    if isinstance(data.get("issue"), dict):
        return "issue"
    return None


def _issue(doc: Mapping[str, Any], data: Mapping[str, Any], action: str) -> Alert:
    issue = get_obj(data, "issue", "data")
    issue_id = get_str(issue, "id", "data.issue", required=True)
    if action in _ISSUE_ACTIONS:
        status, acknowledged = _ISSUE_ACTIONS[action]
    else:
        issue_status = get_str(issue, "status", "data.issue")
        if issue_status not in _ISSUE_STATUSES:
            raise NotAnAlert(f"Sentry issue action {action!r} with status {issue_status!r} "
                             "is not an alert state change")
        status, acknowledged = _ISSUE_STATUSES[issue_status], False
    project = get_obj(issue, "project", "data.issue", required=False)
    level = get_str(issue, "level", "data.issue")
    title = get_str(issue, "title", "data.issue") or f"Sentry issue {issue_id}"
    labels = _clean({
        "alertname": title,
        "project": get_str(project, "slug", "data.issue.project"),
        "level": level,
        "platform": get_str(issue, "platform", "data.issue"),
        "issue_type": get_str(issue, "type", "data.issue"),
        "short_id": get_str(issue, "shortId", "data.issue"),
    })
    key = f"sentry:issue:{issue_id}"
    return Alert(
        source="sentry",
        status=status,
        acknowledged=acknowledged,
        fingerprint=key,
        fingerprint_origin="source",
        episode_key=key,
        labels=labels,
        annotations=_clean({"culprit": get_str(issue, "culprit", "data.issue")}),
        summary=title,
        service=labels.get("project"),
        severity=sev.from_word(level) or sev.DEFAULT_SEVERITY,
        severity_raw=level,
        starts_at=parse_time(issue.get("firstSeen"), "data.issue.firstSeen"),
        links=links(issue=issue.get("web_url") or issue.get("permalink"), api=issue.get("url")),
        raw_id=issue_id,
        event_type=f"issue.{action}",
        extra=_clean({"actor": doc.get("actor"), "resolution_type": data.get("resolution_type"),
                      "last_seen": issue.get("lastSeen"), "count": issue.get("count")}),
    )


def _event_alert(doc: Mapping[str, Any], data: Mapping[str, Any], action: str) -> Alert:
    event = get_obj(data, "event", "data")
    event_id = get_str(event, "event_id", "data.event")
    issue_id = get_str(event, "issue_id", "data.event")
    if not (issue_id or event_id):
        raise PayloadError("has neither issue_id nor event_id", "data.event")
    rule = get_str(data, "triggered_rule", "data")
    level = get_str(event, "level", "data.event")
    title = get_str(event, "title", "data.event") or "Sentry event alert"
    labels: dict[str, str] = {}
    for pair in event.get("tags") or []:
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair):
            labels[pair[0]] = pair[1]
    labels.update(_clean({"alertname": title, "rule": rule, "level": level,
                          "project_id": get_str(event, "project", "data.event")}))
    key = f"sentry:issue:{issue_id}" if issue_id else f"sentry:event:{event_id}"
    return Alert(
        source="sentry",
        status="firing",
        fingerprint=key,
        fingerprint_origin="source",
        episode_key=key,
        labels=labels,
        annotations=_clean({"culprit": get_str(event, "culprit", "data.event")}),
        summary=title,
        service=service_from_labels(labels),
        severity=sev.from_word(level) or sev.DEFAULT_SEVERITY,
        severity_raw=level,
        starts_at=parse_time(event.get("datetime"), "data.event.datetime"),
        links=links(event=event.get("web_url"), issue=event.get("issue_url"), api=event.get("url")),
        raw_id=issue_id or event_id,
        event_id=event_id,
        event_type=f"event_alert.{action}",
    )


def _metric_alert(doc: Mapping[str, Any], data: Mapping[str, Any], action: str) -> Alert:
    incident = get_obj(data, "metric_alert", "data")
    rule = get_obj(incident, "alert_rule", "data.metric_alert")
    if action not in _METRIC_ACTIONS:
        raise PayloadError(f"action is {action!r}; expected critical, warning or resolved", "action")
    rule_id = get_str(rule, "id", "data.metric_alert.alert_rule", required=True)
    incident_id = get_str(incident, "id", "data.metric_alert", required=True)
    projects = rule.get("projects") or incident.get("projects") or []
    if not isinstance(projects, list):
        raise PayloadError(f"expected an array of project slugs, got {type(projects).__name__}",
                           "data.metric_alert.alert_rule.projects")
    project = projects[0] if len(projects) == 1 and isinstance(projects[0], str) else None
    name = get_str(rule, "name", "data.metric_alert.alert_rule") or f"metric alert {rule_id}"
    labels = _clean({"alertname": name, "project": project,
                     "environment": get_str(rule, "environment", "data.metric_alert.alert_rule"),
                     "aggregate": get_str(rule, "aggregate", "data.metric_alert.alert_rule"),
                     "query": get_str(rule, "query", "data.metric_alert.alert_rule")})
    fingerprint = f"sentry:metric_alert:{rule_id}"
    return Alert(
        source="sentry",
        status=_METRIC_ACTIONS[action],
        fingerprint=fingerprint,
        fingerprint_origin="source",
        episode_key=f"{fingerprint}:{incident_id}",
        labels=labels,
        annotations=_clean({"description": get_str(data, "description_text", "data")}),
        summary=get_str(data, "description_title", "data") or name,
        service=project,
        severity=sev.from_word(action) or sev.DEFAULT_SEVERITY,
        severity_raw=action if action != "resolved" else None,
        starts_at=parse_time(incident.get("date_started"), "data.metric_alert.date_started"),
        ends_at=parse_time(incident.get("date_closed"), "data.metric_alert.date_closed"),
        links=links(alert=data.get("web_url")),
        raw_id=incident_id,
        event_type=f"metric_alert.{action}",
        extra=_clean({"identifier": incident.get("identifier"), "projects": projects}),
    )


def _clean(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None and v != ""}
