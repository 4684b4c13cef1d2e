"""One parser per alert source: ``parse(body: bytes, headers: Mapping[str, str]) -> list[Alert]``.

Parsers raise :class:`gateway.errors.PayloadError` (malformed, HTTP 422) or
:class:`gateway.errors.NotAnAlert` (well-formed but no alert state change, HTTP 202).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gateway.models import Alert
from gateway.sources import alertmanager, cloudevents, grafana, opsgenie, pagerduty, sentry

Parser = Callable[[bytes, Mapping[str, str]], list[Alert]]

PARSERS: dict[str, Parser] = {
    "alertmanager": alertmanager.parse,
    "grafana": grafana.parse,
    "sentry": sentry.parse,
    "pagerduty": pagerduty.parse,
    "opsgenie": opsgenie.parse,
    "cloudevents": cloudevents.parse,
}
