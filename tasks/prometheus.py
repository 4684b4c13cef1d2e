"""Prometheus: windowed questions about a service, asked through Prometheus's HTTP API.

Runbook 003 "Service Degraded (High Error Rate)" (`curl .../metrics | grep error_rate`,
symptom: error rate > 5 %) and 000 "High Error Rate" / 001 "Verify fix" (monitor the error
rate after the rollback). A service's own /metrics holds counters since its process started;
the rate over a window, across restarts, is Prometheus's to compute:

- :func:`run_query` / :func:`query_prometheus` - ``GET /api/v1/query`` (an instant query) ->
  typed samples; every call has a timeout, and a Prometheus that does not answer is a
  ``TargetUnreachableError`` naming the URL and what to check;
- :class:`ErrorRatioQuery` / :func:`error_ratio_query` - the one place the error-ratio PromQL
  and its label selector are written (the share of the service's requests answered 5xx);
- :func:`error_ratio` and the task :func:`read_error_rate` - that ratio now, over a window;
- :func:`wait_until_error_rate_below` - query every interval until the ratio has stayed under
  a threshold for one whole window, or a deadline passes.
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timezone
from typing import Any

import httpx
from pydantic import BaseModel, Field, field_validator

from incident.errors import ConfigurationError, TargetUnreachableError
from incident.inventory import Target
from incident.settings import get_settings
from tasks.common import read_only_task

#: The counter of the service's requests, one series per status code (``code="200"`` ...).
REQUESTS_METRIC = "labweb_http_requests_total"
#: The label every series of a service carries in Prometheus (its scrape jobs set it to the
#: inventory's service name): what selects the service's series.
SERVICE_LABEL = "service"
#: Status codes that count as errors.
ERROR_CODES = "5.."

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def prometheus_url_of(target: Target) -> str:
    """The target's Prometheus (``services.<name>.app.prometheus_url``), or a ConfigurationError
    saying which field to add."""
    app = target.service.app
    if app is None or not app.prometheus_url:
        missing = "app" if app is None else "app.prometheus_url"
        raise ConfigurationError(
            target.name, f"no {missing} in the inventory",
            "the Prometheus that scrapes the service", f"add services.{target.name}.app.prometheus_url "
            "(e.g. http://prometheus:9090) to the inventory",
        )
    return app.prometheus_url.rstrip("/")


def shown(url: str) -> str:
    """A URL as messages show it: without any user:password part."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(userinfo=b"")) if parsed.userinfo else url


# --------------------------------------------------------------------------- instant queries


class Sample(BaseModel):
    """One element of an instant query's result: its labels and its value at one time.

    ``value`` may be NaN (0/0: nothing counted in the window)."""

    labels: dict[str, str] = {}
    at: datetime
    value: float


class QueryResult(BaseModel):
    prometheus: str = Field(description="The Prometheus asked (without credentials)")
    expr: str
    at: datetime = Field(description="When the query was answered (UTC)")
    samples: list[Sample]


def _sample(labels: dict[str, str], pair: Any) -> Sample:
    stamp, value = pair
    return Sample(labels=labels, at=datetime.fromtimestamp(float(stamp), timezone.utc), value=float(value))


def run_query(prometheus_url: str, expr: str, timeout_s: float | None = None) -> QueryResult:
    """One instant query (plain function, used by tasks): ``GET <prometheus>/api/v1/query``.

    Prometheus is also told to give up after the same timeout (its ``timeout`` parameter).
    Raises ``TargetUnreachableError`` when it does not answer (or is not a Prometheus), and
    ``ConfigurationError`` when it refuses the expression."""
    base = prometheus_url.rstrip("/")
    where = shown(base)
    timeout = timeout_s or get_settings().http_timeout_s
    check = (f"check that Prometheus runs and answers at {where} (`curl {where}/-/ready`) and that "
             "app.prometheus_url in the inventory points at it")
    try:
        response = httpx.get(f"{base}/api/v1/query", params={"query": expr, "timeout": f"{timeout:g}s"},
                             timeout=httpx.Timeout(timeout), follow_redirects=False)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise ConfigurationError(where, f"invalid Prometheus URL ({exc})", "an http(s) URL",
                                 "fix app.prometheus_url in the inventory") from None
    except httpx.TransportError as exc:
        raise TargetUnreachableError(where, f"Prometheus did not answer ({type(exc).__name__}: {exc})",
                                     "Prometheus answering its HTTP API", check) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "status" not in body:
        raise TargetUnreachableError(
            where, f"GET /api/v1/query answered HTTP {response.status_code} without a Prometheus API "
            f"answer ({response.text[:120]!r})", "a Prometheus HTTP API", check)
    if body["status"] != "success":
        error = f"{body.get('errorType', 'error')}: {body.get('error', '?')}"
        if response.status_code in (400, 422):  # bad_data / execution error: the expression
            raise ConfigurationError(where, f"Prometheus refused the query {expr!r} ({error})",
                                     "a valid PromQL expression",
                                     "check the label selector the inventory gives for this service")
        raise TargetUnreachableError(where, f"Prometheus could not run the query (HTTP "
                                     f"{response.status_code}, {error})", "a query result", check)
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "vector":
        samples = [_sample(item.get("metric") or {}, item["value"]) for item in result or []]
    elif kind == "scalar":
        samples = [_sample({}, result)]
    else:
        raise ConfigurationError(where, f"the query {expr!r} gave a {kind} result", "an instant vector or "
                                 "scalar", "ask for an instant vector (no range selector at the top level)")
    return QueryResult(prometheus=where, expr=expr, at=datetime.now(timezone.utc), samples=samples)


@read_only_task
def query_prometheus(target: Target, expr: str) -> QueryResult:
    """An instant query against the target's Prometheus (``app.prometheus_url``)."""
    return run_query(prometheus_url_of(target), expr)


# --------------------------------------------------------------------------- the error ratio


class ErrorRatioQuery(BaseModel):
    """The share of a service's requests answered with an error over a window: the one place
    its PromQL is written::

        (sum(rate(M{service="web",code=~"5.."}[5s])) or vector(0)) / sum(rate(M{service="web"}[5s]))
    """

    metric: str = REQUESTS_METRIC
    selector: dict[str, str] = Field(description="Label matchers that select the service's series")
    window_s: int = Field(gt=0)
    error_codes: str = Field(default=ERROR_CODES, description="Regular expression of the codes that count as errors")

    @field_validator("selector")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value if not _LABEL_NAME.match(name) or name == "code"]
        if bad:
            raise ValueError(f"not usable as label names here: {bad}")
        return value

    def _series(self, *extra: str) -> str:
        matchers = [f"{name}={json.dumps(value)}" for name, value in sorted(self.selector.items())]
        return f"{self.metric}{{{','.join([*matchers, *extra])}}}"

    @property
    def errors(self) -> str:
        return f"sum(rate({self._series(f'code=~{json.dumps(self.error_codes)}')}[{self.window_s}s]))"

    @property
    def total(self) -> str:
        return f"sum(rate({self._series()}[{self.window_s}s]))"

    @property
    def expr(self) -> str:
        """Errors over all requests. A service that never answered 5xx has no error series, and a
        sum over nothing is empty, not 0: ``or vector(0)`` makes that 0 % (an empty result then
        only means no request was counted at all)."""
        return f"({self.errors} or vector(0)) / {self.total}"


def error_ratio_query(target: Target, window_s: int | None = None) -> ErrorRatioQuery:
    """The error-ratio query of ``target``: its series by the ``service`` label (its inventory
    name), over ``window_s`` (default: ``app.error_rate_window_s``)."""
    app = target.service.app
    if app is None:
        raise ConfigurationError(target.name, "no app in the inventory", "the service's app section",
                                 f"add services.{target.name}.app (metrics_url, prometheus_url ...) "
                                 "to the inventory")
    return ErrorRatioQuery(selector={SERVICE_LABEL: target.name}, window_s=window_s or app.error_rate_window_s)


def percent(ratio: float) -> str:
    return f"{ratio * 100:.1f} %"


class ErrorRate(BaseModel):
    """The error ratio of one query: ``ratio`` None when no request was counted in the window
    (or, with ``error``, when Prometheus could not be asked)."""

    expr: str
    window_s: int
    at: datetime
    ratio: float | None
    error: str | None = None

    def above(self, threshold: float) -> bool:
        return self.ratio is not None and self.ratio > threshold

    def under(self, threshold: float) -> bool:
        """Known, and not above the threshold."""
        return self.ratio is not None and self.ratio <= threshold

    def value_text(self) -> str:
        if self.error:
            return "unknown (Prometheus not asked)"
        return "no requests" if self.ratio is None else percent(self.ratio)

    def describe(self) -> str:
        when = f"{self.at:%H:%M:%S} UTC"
        if self.error:
            return f"error rate unknown at {when}: {self.error}"
        if self.ratio is None:
            return (f"no request counted in the last {self.window_s} s at {when} (`{self.expr}` is empty): "
                    "the service gets no traffic, or Prometheus does not scrape it")
        return f"{percent(self.ratio)} of requests answered 5xx over the last {self.window_s} s at {when}"


def error_ratio(target: Target, window_s: int | None = None) -> ErrorRate:
    """The service's error ratio now, over ``window_s``, from its Prometheus (plain function)."""
    query = error_ratio_query(target, window_s)
    result = run_query(prometheus_url_of(target), query.expr)
    values = [s.value for s in result.samples if not math.isnan(s.value)]
    return ErrorRate(expr=query.expr, window_s=query.window_s, at=result.at, ratio=values[0] if values else None)


@read_only_task
def read_error_rate(target: Target, window_s: int | None = None) -> ErrorRate:
    """Runbook 003 "Monitor error rates": the share of requests answered 5xx over the window."""
    return error_ratio(target, window_s)


class ErrorRateWatch(BaseModel):
    """Result of watching the error rate until it stayed under a threshold for a whole window."""

    held: bool = Field(description="Under the threshold for one whole window before the deadline")
    threshold: float
    window_s: int
    deadline_s: float
    under_for_s: float = Field(description="How long the last streak of readings under the threshold lasted")
    readings: list[ErrorRate]

    @property
    def last(self) -> ErrorRate:
        return self.readings[-1]

    def describe(self) -> str:
        seen = ", ".join(r.value_text() for r in self.readings[-12:])
        more = f"{len(self.readings) - 12} earlier, then " if len(self.readings) > 12 else ""
        if self.held:
            return (f"the error rate stayed under {percent(self.threshold)} for a whole {self.window_s} s window "
                    f"({len(self.readings)} readings: {more}{seen})")
        return (f"the error rate did NOT stay under {percent(self.threshold)} for a whole {self.window_s} s "
                f"window within {self.deadline_s:g} s (under it for the last {self.under_for_s:.0f} s; "
                f"{len(self.readings)} readings: {more}{seen}); last: {self.last.describe()}")


@read_only_task
def wait_until_error_rate_below(target: Target, threshold: float, window_s: int, deadline_s: float,
                                interval_s: float) -> ErrorRateWatch:
    """Query the error rate every ``interval_s`` until every reading for one whole window
    (``window_s``, from the first reading under ``threshold``) was under it, or ``deadline_s``
    passes. A reading above the threshold, with no requests, or that Prometheus did not answer
    starts the window again. (Readings that come right after a fix may still count errors from
    before it: they are above, and the window starts later.)"""
    query = error_ratio_query(target, window_s)
    start = time.monotonic()
    deadline = start + deadline_s
    readings: list[ErrorRate] = []
    since: float | None = None
    while True:
        try:
            reading = error_ratio(target, window_s)
        except TargetUnreachableError as exc:
            reading = ErrorRate(expr=query.expr, window_s=window_s, at=datetime.now(timezone.utc), ratio=None,
                                error=exc.observed)
        readings.append(reading)
        now = time.monotonic()
        since = (since if since is not None else now) if reading.under(threshold) else None
        under_for = now - since if since is not None else 0.0
        if under_for >= window_s or now >= deadline:
            return ErrorRateWatch(held=under_for >= window_s, threshold=threshold, window_s=window_s,
                                  deadline_s=deadline_s, under_for_s=under_for, readings=readings)
        time.sleep(max(0.0, min(interval_s, deadline - now)))
