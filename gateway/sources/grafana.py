"""Grafana unified alerting webhook contact point (Grafana 9.x .. 11+).

The body is Alertmanager's webhook format plus Grafana fields
(https://grafana.com/docs/grafana/latest/alerting/configure-notifications/manage-contact-points/integrations/webhook-notifier/):
top-level ``orgId``, ``state`` ("alerting" / "ok"), ``title``, ``message``; per alert
``silenceURL``, ``dashboardURL``, ``panelURL``, ``imageURL``, ``values``, ``valueString``.

Identity follows the Alertmanager rules (:mod:`gateway.sources.alertmanager`).
Grafana's own ``fingerprint`` is a hash over labels that include private ones it
strips before sending (rule UID etc.), so it never matches the visible labels; the
gateway therefore uses the label hash (``fingerprint_origin="computed"``) and keeps
Grafana's value in ``source_fingerprint``/``raw_id``. Two Grafana rules with the same
title in the same folder and identical labels would share a fingerprint.
``values`` (numbers) and ``valueString`` are kept in ``extra``.

The legacy (pre-9) Grafana alerting payload (``ruleName``/``evalMatches``, no
``alerts``) is rejected with a message saying so.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.errors import PayloadError
from gateway.models import Alert
from gateway.sources._common import load_json, obj
from gateway.sources.alertmanager import alerts_from_group


def parse(body: bytes, headers: Mapping[str, str]) -> list[Alert]:
    doc = obj(load_json(body), "body")
    if "alerts" not in doc and ("ruleName" in doc or "evalMatches" in doc):
        raise PayloadError(
            "this is a legacy Grafana alerting payload (ruleName/evalMatches, no alerts array); "
            "use a unified alerting webhook contact point"
        )
    return alerts_from_group(doc, "grafana", path="")
