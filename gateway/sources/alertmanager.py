"""Alertmanager webhook receiver payloads (version 4, and the older unversioned format).

Format (https://prometheus.io/docs/alerting/latest/configuration/#webhook_config):
``{version, groupKey, truncatedAlerts, status, receiver, groupLabels, commonLabels,
commonAnnotations, externalURL, alerts: [{status, labels, annotations, startsAt,
endsAt, generatorURL, fingerprint}]}``. Old senders omit version/groupKey/
truncatedAlerts and send ``fingerprint: ""``.

Rules:

* One Alert per element of ``alerts``; the status is the alert's own, never the
  group's (a group notification with status "firing" can contain resolved alerts).
* Fingerprint: Alertmanager's fingerprint is ``LabelSet.Fingerprint()`` of the alert's
  labels, so the gateway always recomputes it from the labels
  (:func:`gateway.fingerprint.labels_fingerprint`). The sender's value is used
  (``fingerprint_origin="source"``) only when it is non-empty and equals the computed
  one; otherwise the computed one is used (``"computed"``) and the sender's value is
  kept in ``source_fingerprint``. Reason: real payloads carry empty fingerprints
  (legacy), hand-written ones shared by different alerts, and label-edited ones; a
  fingerprint that does not match its labels cannot be trusted to be unique.
* Episode key: ``<source>:<fingerprint>:<startsAt in UTC>``. Alertmanager keeps
  ``startsAt`` for the whole firing episode and repeats it in the resolved
  notification, so firing and resolved of one episode share the key, and a new
  episode of the same alert (new startsAt) gets a new one.
* ``endsAt`` of firing alerts is Go's zero time ``0001-01-01T00:00:00Z`` -> None.
* ``truncatedAlerts`` > 0 means Alertmanager left alerts out (``max_alerts``); the
  count is kept in ``extra["truncated_alerts"]`` of every alert of the POST.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway import severity as sev
from gateway.errors import NotAnAlert, PayloadError
from gateway.fingerprint import labels_fingerprint
from gateway.models import NO_LABELS, Alert, Source
from gateway.sources._common import (
    get_list,
    get_str,
    iso,
    links,
    load_json,
    obj,
    parse_time,
    service_from_labels,
    str_map,
)

_STATUSES = ("firing", "resolved")

#: Per-alert keys that are not copied to ``extra`` (they have fields of their own).
_KNOWN_ALERT_KEYS = {
    "status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint",
    "silenceURL", "dashboardURL", "panelURL", "imageURL",
}


def parse(body: bytes, headers: Mapping[str, str]) -> list[Alert]:
    doc = obj(load_json(body), "body")
    return alerts_from_group(doc, "alertmanager", path="")


def alerts_from_group(doc: Mapping[str, Any], source: Source, path: str) -> list[Alert]:
    """Alerts of one Alertmanager-format group notification (also used by Grafana, CE)."""
    items = get_list(doc, "alerts", path)
    if not items:
        raise NotAnAlert("the notification's alerts array is empty")
    group_status = get_str(doc, "status", path)
    truncated = doc.get("truncatedAlerts")
    group_extra: dict[str, Any] = {
        key: doc[key]
        for key in ("receiver", "groupKey", "version", "orgId", "title")
        if doc.get(key) is not None
    }
    if isinstance(truncated, int) and not isinstance(truncated, bool):
        group_extra["truncated_alerts"] = truncated
    external_url = get_str(doc, "externalURL", path)
    prefix = f"{path}.alerts" if path else "alerts"
    return [
        alert_from_item(obj(item, f"{prefix}[{i}]"), source, f"{prefix}[{i}]", group_status,
                        group_extra, external_url)
        for i, item in enumerate(items)
    ]


def alert_from_item(
    item: Mapping[str, Any],
    source: Source,
    path: str,
    group_status: str | None,
    group_extra: Mapping[str, Any],
    external_url: str | None,
) -> Alert:
    """One Alertmanager-format alert object -> Alert (rules in the module docstring)."""
    status = get_str(item, "status", path) or group_status
    if status not in _STATUSES:
        raise PayloadError(
            f"status is {status!r}; expected 'firing' or 'resolved' on the alert or its group", path
        )
    labels = str_map(item.get("labels"), f"{path}.labels")
    if not any(labels.values()):
        raise PayloadError(NO_LABELS, f"{path}.labels")
    annotations = str_map(item.get("annotations"), f"{path}.annotations")
    computed = labels_fingerprint(labels)
    given = get_str(item, "fingerprint", path) or None
    trusted = given is not None and given == computed
    starts_at = parse_time(item.get("startsAt"), f"{path}.startsAt")
    severity_raw = labels.get("severity") or labels.get("priority")
    extra = dict(group_extra)
    extra.update({k: v for k, v in item.items() if k not in _KNOWN_ALERT_KEYS})
    return Alert(
        source=source,
        status=status,  # type: ignore[arg-type]
        fingerprint=computed,
        fingerprint_origin="source" if trusted else "computed",
        source_fingerprint=given,
        episode_key=f"{source}:{computed}:{iso(starts_at)}",
        labels=labels,
        annotations=annotations,
        summary=_summary(labels, annotations),
        service=service_from_labels(labels),
        severity=sev.from_word(severity_raw) or sev.DEFAULT_SEVERITY,
        severity_raw=severity_raw,
        starts_at=starts_at,
        ends_at=parse_time(item.get("endsAt"), f"{path}.endsAt"),
        links=links(
            generator=item.get("generatorURL"),
            dashboard=item.get("dashboardURL"),
            panel=item.get("panelURL"),
            silence=item.get("silenceURL"),
            image=item.get("imageURL"),
            runbook=annotations.get("runbook_url"),
            external=external_url,
        ),
        raw_id=given,
        event_type=status,
        extra=extra,
    )


def _summary(labels: Mapping[str, str], annotations: Mapping[str, str]) -> str:
    for key in ("summary", "description", "message"):
        if annotations.get(key):
            return annotations[key]
    return labels.get("alertname", "")
