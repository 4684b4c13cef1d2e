"""CloudEvents 1.0 in JSON (https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/formats/json-format.md).

Accepted:

* structured mode: the body is one event (``application/cloudevents+json`` or JSON);
* batch mode: the body is a JSON array of events (``application/cloudevents-batch+json``);
* binary mode: attributes in ``ce-*`` headers (``ce-specversion`` present), the body is
  the event's ``data``.

Required attributes (spec §3): ``specversion`` == "1.0", non-empty ``id``, ``source``,
``type``. ``subject`` may be null or absent; ``time`` is RFC 3339.

``data``:

* an Alertmanager-format group (object with an ``alerts`` array) -> one Alert per
  alert, with the Alertmanager identity rules;
* an alert-like object (has a ``labels`` object; optional ``status``, ``annotations``,
  ``startsAt``, ``endsAt``, ``fingerprint``, ``generatorURL``) -> one Alert, same rules,
  status defaults to firing;
* anything else (including no data) -> one firing Alert describing the event:
  labels ``alertname=<type>``, ``ce_source``, ``ce_subject``; fingerprint = label hash of
  those labels (the same kind of event about the same subject is the same alert);
  episode key = ``cloudevents:<source>:<id>`` (the spec makes source+id unique per
  event, and a redelivery repeats them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway import severity as sev
from gateway.errors import NotAnAlert, PayloadError
from gateway.fingerprint import labels_fingerprint
from gateway.models import Alert
from gateway.sources._common import header, load_json, obj, parse_time, service_from_labels
from gateway.sources.alertmanager import alert_from_item, alerts_from_group

CORE_ATTRIBUTES = ("specversion", "id", "source", "type", "datacontenttype", "dataschema",
                   "subject", "time", "data", "data_base64")
_HEADER_ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time", "dataschema")


def parse(body: bytes, headers: Mapping[str, str]) -> list[Alert]:
    if header(headers, "ce-specversion") is not None:
        return _from_event(_binary_event(body, headers), "headers")
    doc = load_json(body)
    if isinstance(doc, list):
        if not doc:
            raise NotAnAlert("the CloudEvents batch is empty")
        return [a for i, ev in enumerate(doc) for a in _from_event(obj(ev, f"[{i}]"), f"[{i}]")]
    return _from_event(obj(doc, "body"), "")


def _binary_event(body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    event: dict[str, Any] = {}
    for name in _HEADER_ATTRIBUTES:
        value = header(headers, f"ce-{name}")
        if value is not None:
            event[name] = value
    if body.strip():
        event["data"] = load_json(body)
    return event


def _from_event(event: Mapping[str, Any], path: str) -> list[Alert]:
    _validate(event, path)
    data = event.get("data")
    ce_id, ce_source, ce_type = event["id"], event["source"], event["type"]
    attrs = {k: v for k, v in event.items() if k not in ("data", "data_base64")}
    data_path = f"{path}.data" if path else "data"
    if isinstance(data, dict) and isinstance(data.get("alerts"), list):
        alerts = alerts_from_group(data, "cloudevents", data_path)
    elif isinstance(data, dict) and isinstance(data.get("labels"), dict):
        alerts = [alert_from_item(data, "cloudevents", data_path, "firing", {}, None)]
    else:
        alerts = [_generic(event, path)]
    return [a.model_copy(update={"event_id": ce_id, "event_type": ce_type,
                                 "extra": {**a.extra, "cloudevent": attrs},
                                 "raw_id": a.raw_id or f"{ce_source}#{ce_id}"})
            for a in alerts]


def _validate(event: Mapping[str, Any], path: str) -> None:
    where = path or None
    version = event.get("specversion")
    if version is None:
        raise PayloadError("specversion is missing; this is not a CloudEvent", where)
    if version != "1.0":
        raise PayloadError(f"specversion {version!r} is not supported; send CloudEvents 1.0", where)
    for name in ("id", "source", "type"):
        value = event.get(name)
        if not isinstance(value, str) or not value:
            raise PayloadError(f"required attribute {name!r} is missing or not a non-empty string",
                               where)
    subject = event.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise PayloadError("attribute 'subject' must be a string or null", where)


def _generic(event: Mapping[str, Any], path: str) -> Alert:
    data = event.get("data")
    ce_source, ce_type = event["source"], event["type"]
    labels = {"alertname": ce_type, "ce_source": ce_source}
    if event.get("subject"):
        labels["ce_subject"] = event["subject"]
    severity_raw = event.get("severity") if isinstance(event.get("severity"), str) else None
    summary = ""
    if isinstance(data, dict):
        summary = next((data[k] for k in ("summary", "message", "title")
                        if isinstance(data.get(k), str)), "")
        if severity_raw is None and isinstance(data.get("severity"), str):
            severity_raw = data["severity"]
    extensions = {k: v for k, v in event.items() if k not in CORE_ATTRIBUTES}
    service = event.get("service") if isinstance(event.get("service"), str) else None
    fingerprint = labels_fingerprint(labels)
    return Alert(
        source="cloudevents",
        status="firing",
        fingerprint=fingerprint,
        fingerprint_origin="computed",
        episode_key=f"cloudevents:{ce_source}:{event['id']}",
        labels=labels,
        summary=summary or ce_type,
        service=service or service_from_labels(labels),
        severity=sev.from_word(severity_raw) or sev.DEFAULT_SEVERITY,
        severity_raw=severity_raw,
        starts_at=parse_time(event.get("time"), f"{path}.time" if path else "time"),
        extra={"extensions": extensions, **({"data": data} if data is not None else {})},
    )
