"""The service's own process: its admin API, its metrics, and the upstream API it calls.

Runbook 000 "DEX Aggregator Outages" (check the circuit breaker status, verify the
aggregator API status, reset the circuit breakers), 004 "Exchange Connection Failures"
(rate limiting: back off; exchange maintenance: check its status) and "Circuit breaker
triggered" (`curl .../api/status`, reset only after confirming the issue resolved), 003 "API
Rate Limiting Issues" (429: back off, switch to cached data):

- :func:`read_app_status` - the admin API's ``/status`` (degraded mode, circuit breaker,
  consecutive failures, the last Retry-After, the age of the cached price), with the admin
  token from the inventory (a secret reference: the token never reaches a log or a message);
- :func:`read_app_metrics` - the Prometheus metrics (upstream calls and failures by reason,
  breaker, degraded mode, the process' memory and CPU), parsed with ``prometheus_client``;
- :func:`watch_app_traffic` - the metrics twice, a window apart: what the service did meanwhile;
- :func:`probe_upstream` - the upstream's own health endpoint and one request like the
  service's own (status, Retry-After);
- :func:`wait_for_upstream` - probe until the upstream answers again, with capped
  exponential backoff, never sooner than a Retry-After asked;
- :func:`set_degraded_mode`, :func:`leave_degraded_mode` (changing) - the admin calls,
  each re-checking the state first ("already ...").

An upstream that fails is an observation (the probe says how), not an error; an admin API that
refuses the token or does not answer is an error saying what to fix.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
from prefect import get_run_logger
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ValidationError

from incident.errors import ActionFailedError, ConfigurationError, RunbookError, TargetUnreachableError
from incident.inventory import AppSpec, SecretRef, Target, UpstreamSpec
from incident.settings import get_settings
from tasks.common import ActionResult, changing_task, read_only_task

#: How a failed upstream call is classified (the service's own metric labels use the same words).
UpstreamReason = Literal["ok", "rate_limited", "error", "timeout", "refused"]
UPSTREAM_REASONS: tuple[str, ...] = ("rate_limited", "error", "timeout", "refused")
BreakerState = Literal["closed", "open", "half_open"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- inventory


def require_app(target: Target) -> AppSpec:
    if target.service.app is None:
        raise ConfigurationError(
            target.name, "no app section in the inventory", "services.<name>.app with "
            "metrics_url, admin_url and admin_token",
            f"add app: {{metrics_url, admin_url, admin_token}} to services.{target.name} in the inventory")
    return target.service.app


def require_upstream(target: Target) -> UpstreamSpec:
    app = require_app(target)
    if app.upstream is None:
        raise ConfigurationError(
            target.name, "no app.upstream in the inventory", "the upstream API the service calls",
            f"add app.upstream: {{name, health_url, probe_url}} to services.{target.name} in the inventory")
    return app.upstream


def token_hint(ref: SecretRef) -> str:
    """Where a human finds the admin token, for a command line: never the value itself."""
    kind, _, name = ref.ref.partition(":")
    if kind == "file":
        return f"$(cat {name})"
    if kind == "env":
        return f"${name}"
    return f"<the value of the Prefect Secret block {name}>"


def admin_command(target: Target, path: str) -> str:
    """The exact admin call a human types (the token as a reference to where it lives)."""
    app = require_app(target)
    return (f"curl -fsS -X POST -H \"Authorization: Bearer {token_hint(app.admin_token)}\" "
            f"'{app.admin_url.rstrip('/')}{path}'")


# --------------------------------------------------------------------------- admin API


class AppStatus(BaseModel):
    """The admin API's ``GET /status``."""

    version: str | None = None
    degraded: bool
    breaker: BreakerState
    consecutive_failures: int = 0
    retry_after_s: float = 0
    cache_age_s: float | None = None

    def describe(self) -> str:
        cache = ("no cached price yet" if self.cache_age_s is None
                 else f"cached price {self.cache_age_s:.1f} s old")
        return (f"circuit breaker {self.breaker} ({self.consecutive_failures} consecutive upstream "
                f"failures), degraded mode {'on' if self.degraded else 'off'}, {cache}"
                + (f", last Retry-After {self.retry_after_s:g} s" if self.retry_after_s else "")
                + (f", version {self.version}" if self.version else ""))


def _admin_call(target: Target, method: str, path: str, params: dict[str, str] | None = None) -> AppStatus:
    """One call of the admin API with the inventory's token and a timeout; the JSON status."""
    app = require_app(target)
    url = app.admin_url.rstrip("/") + path
    where = f"{target.name} admin API"
    token = app.admin_token.resolve()  # SecretUnavailableError says which reference is missing
    try:
        response = httpx.request(
            method, url, params=params, follow_redirects=False,
            headers={"Authorization": f"Bearer {token.get_secret_value()}"},
            timeout=httpx.Timeout(get_settings().http_timeout_s))
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise ConfigurationError(where, f"invalid admin URL {url} ({exc})", "an http(s) URL",
                                 f"fix services.{target.name}.app.admin_url in the inventory") from None
    except httpx.TransportError as exc:
        raise TargetUnreachableError(
            where, f"{method} {url} did not answer ({type(exc).__name__})", "the admin API to answer",
            f"check that {target.name} runs (the service-down runbook) and that app.admin_url is right",
        ) from None
    if response.status_code == 401:
        raise ConfigurationError(where, f"{method} {url} refused the admin token (401)",
                                 "the service to accept the inventory's admin token",
                                 f"check that app.admin_token ({app.admin_token}) holds the token the "
                                 "service reads (its LABWEB_ADMIN_TOKEN_FILE)")
    if response.status_code == 403:
        raise ConfigurationError(where, f"{method} {url} answered 403: {response.text[:200]}",
                                 "the admin API enabled", "give the service an admin token file "
                                 "(LABWEB_ADMIN_TOKEN_FILE) and restart it")
    if response.status_code != 200:
        raise RunbookError(where, f"{method} {url} answered {response.status_code}: {response.text[:200]}",
                           "200 with the status JSON", f"read {target.name}'s log; the admin API is broken")
    try:
        return AppStatus.model_validate_json(response.text)
    except ValidationError as exc:
        raise RunbookError(where, f"{method} {url} answered something else than the status JSON "
                           f"({exc.error_count()} problems): {response.text[:200]}",
                           "the admin status JSON", "check the service's version: its admin API changed") from None


@read_only_task
def read_app_status(target: Target) -> AppStatus:
    """Runbook 004 "Circuit breaker triggered": `curl .../api/status` (here ``GET <admin>/status``)."""
    return _admin_call(target, "GET", "/status")


# --------------------------------------------------------------------------- metrics


class AppMetrics(BaseModel):
    """One scrape of the service's Prometheus metrics (None: the service does not export it)."""

    url: str
    at: datetime
    version: str | None = None
    price_requests: dict[str, float] = {}  # answers of the business endpoint, by HTTP code
    upstream_requests: float | None = None
    upstream_failures: dict[str, float] = {}  # by reason: rate_limited, error, timeout, refused
    upstream_retry_after_s: float | None = None
    circuit_breaker_open: bool | None = None
    degraded: bool | None = None
    queue_enqueued: float | None = None
    log_file_bytes: float | None = None
    memory_limit_bytes: float | None = None
    resident_memory_bytes: float | None = None
    cpu_seconds: float | None = None
    start_time_seconds: float | None = None

    @property
    def upstream_failures_total(self) -> float:
        return sum(self.upstream_failures.values())

    def describe_upstream(self) -> str:
        if self.upstream_requests is None:
            return f"{self.url} exports no upstream metrics"
        calls = self.upstream_requests
        failed = self.upstream_failures_total
        share = f" ({failed / calls:.0%})" if calls else ""
        by_reason = ", ".join(f"{r} {self.upstream_failures.get(r, 0):g}" for r in UPSTREAM_REASONS)
        return (f"since the process started: {calls:g} upstream calls, {failed:g} failed{share} - "
                f"by reason: {by_reason}"
                + (f"; last Retry-After {self.upstream_retry_after_s:g} s" if self.upstream_retry_after_s else "")
                + f"; breaker open: {_yes(self.circuit_breaker_open)}, degraded: {_yes(self.degraded)}")


def _yes(flag: bool | None) -> str:
    return "unknown" if flag is None else ("yes" if flag else "no")


def parse_app_metrics(url: str, text: str, at: datetime | None = None) -> AppMetrics:
    """Parse the service's Prometheus text format (plain function, used by the tasks)."""
    values: dict[str, float] = {}
    found: dict[str, Any] = {"price_requests": {}, "upstream_failures": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "labweb_info":
                found["version"] = sample.labels.get("version")
            elif sample.name == "labweb_http_requests_total":
                if sample.labels.get("handler", "price") == "price":
                    code = sample.labels.get("code", "?")
                    found["price_requests"][code] = found["price_requests"].get(code, 0.0) + sample.value
            elif sample.name == "labweb_upstream_failures_total":
                found["upstream_failures"][sample.labels.get("reason", "?")] = sample.value
            else:
                values[sample.name] = sample.value
    names = {
        "upstream_requests": "labweb_upstream_requests_total",
        "upstream_retry_after_s": "labweb_upstream_retry_after_seconds",
        "queue_enqueued": "labweb_queue_enqueued_total",
        "log_file_bytes": "labweb_log_file_bytes",
        "memory_limit_bytes": "labweb_memory_limit_bytes",
        "resident_memory_bytes": "process_resident_memory_bytes",
        "cpu_seconds": "process_cpu_seconds_total",
        "start_time_seconds": "process_start_time_seconds",
    }
    found.update({field: values[name] for field, name in names.items() if name in values})
    for field, name in (("circuit_breaker_open", "labweb_circuit_breaker_open"), ("degraded", "labweb_degraded")):
        if name in values:
            found[field] = values[name] >= 1
    return AppMetrics(url=url, at=at or _now(), **found)


def fetch_app_metrics(target: Target) -> AppMetrics:
    app = require_app(target)
    at = _now()
    try:
        response = httpx.get(app.metrics_url, timeout=httpx.Timeout(get_settings().http_timeout_s),
                             follow_redirects=False)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise ConfigurationError(target.name, f"invalid metrics URL {app.metrics_url} ({exc})", "an http(s) URL",
                                 f"fix services.{target.name}.app.metrics_url in the inventory") from None
    except httpx.TransportError as exc:
        raise TargetUnreachableError(
            f"{target.name} metrics", f"GET {app.metrics_url} did not answer ({type(exc).__name__})",
            "the metrics endpoint to answer",
            f"check that {target.name} runs (the service-down runbook) and that app.metrics_url is right",
        ) from None
    if response.status_code != 200:
        raise RunbookError(f"{target.name} metrics", f"GET {app.metrics_url} answered {response.status_code}",
                           "200 with Prometheus metrics", f"check {target.name}'s log")
    try:
        return parse_app_metrics(app.metrics_url, response.text, at)
    except ValueError as exc:
        raise RunbookError(f"{target.name} metrics", f"{app.metrics_url} is not in the Prometheus text "
                           f"format ({exc})", "Prometheus text format 0.0.4",
                           "check app.metrics_url points at the service's /metrics") from None


@read_only_task
def read_app_metrics(target: Target) -> AppMetrics:
    """The service's metrics: upstream calls and failures by reason, breaker, degraded mode."""
    return fetch_app_metrics(target)


class AppTraffic(BaseModel):
    """What the service did between two scrapes of its metrics."""

    window_s: float
    before: AppMetrics
    after: AppMetrics

    @staticmethod
    def _grew(before: float | None, after: float | None) -> float:
        if after is None:
            return 0.0
        if before is None or after < before:  # a counter reset (the process restarted)
            return after
        return after - before

    @property
    def upstream_calls(self) -> float:
        return self._grew(self.before.upstream_requests, self.after.upstream_requests)

    @property
    def upstream_failures(self) -> dict[str, float]:
        return {r: self._grew(self.before.upstream_failures.get(r), self.after.upstream_failures.get(r))
                for r in UPSTREAM_REASONS}

    @property
    def failed_calls(self) -> float:
        return sum(self.upstream_failures.values())

    @property
    def answers(self) -> dict[str, float]:
        codes = set(self.before.price_requests) | set(self.after.price_requests)
        grown = {c: self._grew(self.before.price_requests.get(c), self.after.price_requests.get(c))
                 for c in sorted(codes)}
        return {c: n for c, n in grown.items() if n}

    @property
    def requests(self) -> float:
        return sum(self.answers.values())

    def describe(self) -> str:
        answers = ", ".join(f"{n:g}x {c}" for c, n in self.answers.items()) or "none"
        failures = ", ".join(f"{r} {n:g}" for r, n in self.upstream_failures.items() if n) or "none"
        return (f"in {self.window_s:g} s: {self.requests:g} price requests answered ({answers}); "
                f"{self.upstream_calls:g} upstream calls, failures: {failures}")


@read_only_task
def watch_app_traffic(target: Target, window_s: float = 3.0) -> AppTraffic:
    """Scrape the metrics, wait ``window_s``, scrape again: the calls and failures meanwhile."""
    before = fetch_app_metrics(target)
    time.sleep(window_s)
    after = fetch_app_metrics(target)
    return AppTraffic(window_s=window_s, before=before, after=after)


# --------------------------------------------------------------------------- the upstream


class UpstreamProbe(BaseModel):
    """One look at the upstream: its own health endpoint and one request like the service's."""

    name: str
    at: datetime
    health_url: str
    probe_url: str
    health_status: int | None = None
    health_body: str = ""
    health_error: str | None = None
    status_code: int | None = None
    body: str = ""
    error: str | None = None
    retry_after_s: float | None = None  # what the upstream asked (Retry-After), seconds
    answered_at: datetime | None = None  # when the last answer arrived (Retry-After counts from it)
    # in a wait: seconds from the previous probe's answers to this probe's first request, and
    # what the previous probe's Retry-After asked
    since_previous_s: float | None = None
    asked_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.health_status == 200 and self.status_code == 200

    @property
    def reason(self) -> UpstreamReason:
        """How the request failed, in the service's own words (its metric labels)."""
        if self.status_code == 200:
            return "ok"
        if self.status_code == 429:
            return "rate_limited"
        if self.status_code is not None:
            return "error"
        return "timeout" if self.error and "Timeout" in self.error else "refused"

    @property
    def cause(self) -> str:
        """What the upstream does, in a few words: "is rate limiting (429, Retry-After 3 s)"."""
        if self.ok:
            return "answers"
        if self.reason == "rate_limited":
            return "is rate limiting (429" + (f", Retry-After {self.retry_after_s:g} s)" if self.retry_after_s
                                              else ")")
        if self.reason == "error":
            return f"fails (HTTP {self.status_code})"
        if self.reason == "ok":  # the request answers, the health endpoint does not
            return f"answers its requests but its health endpoint does not ({self.health_status or self.health_error})"
        return "does not answer in time" if self.reason == "timeout" else "refuses connections"

    def describe(self) -> str:
        health = (f"health {self.health_status}" if self.health_status is not None
                  else f"health did not answer ({self.health_error})")
        if self.health_body and self.health_status != 200:
            health += f" {self.health_body[:120]}"
        if self.status_code is None:
            probe = f"GET {self.probe_url} did not answer ({self.error})"
        else:
            probe = f"GET {self.probe_url} {self.status_code}"
            if self.retry_after_s is not None:
                probe += f" Retry-After {self.retry_after_s:g} s"
            if self.status_code != 200 and self.body:
                probe += f" {self.body[:120]}"
        return f"{self.name}: {health}; {probe}"

    def describe_in_wait(self, n: int) -> str:
        """The probe as the n-th of a wait: how long after the previous answers, and what they asked."""
        if self.since_previous_s is None:
            return f"upstream probe {n}: {self.describe()}"
        asked = (f"the upstream had asked for {self.asked_s:g} s" if self.asked_s
                 else "no Retry-After asked")
        return f"upstream probe {n} after waiting {self.since_previous_s:.1f} s ({asked}): {self.describe()}"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date (RFC 9110); None when absent or bad."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or _now())).total_seconds())


def check_upstream(upstream: UpstreamSpec) -> UpstreamProbe:
    """GET the upstream's health and one probe request, with its timeout (plain function)."""
    timeout = httpx.Timeout(upstream.timeout_s)
    probe = UpstreamProbe(name=upstream.name, at=_now(), health_url=upstream.health_url,
                          probe_url=upstream.probe_url)
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for url, kind in ((upstream.health_url, "health"), (upstream.probe_url, "probe")):
            try:
                response = client.get(url)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise ConfigurationError(
                    upstream.name, f"invalid {kind} URL {url} ({exc})", "an http(s) URL",
                    f"fix app.upstream.{kind}_url in the inventory") from None
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
                if kind == "health":
                    probe.health_error = error
                else:
                    probe.error = error
                continue
            asked = parse_retry_after(response.headers.get("retry-after"))
            if asked is not None:  # either answer may ask to wait: the longer wins
                probe.retry_after_s = max(asked, probe.retry_after_s or 0.0)
            if kind == "health":
                probe.health_status, probe.health_body = response.status_code, response.text[:500]
            else:
                probe.status_code, probe.body = response.status_code, response.text[:500]
    probe.answered_at = _now()
    return probe


@read_only_task
def probe_upstream(target: Target) -> UpstreamProbe:
    """Runbook 000 "verify aggregator API status", 004 "check exchange status": the upstream's
    health endpoint and one request like the service's own (status, Retry-After)."""
    return check_upstream(require_upstream(target))


class UpstreamWait(BaseModel):
    """Result of waiting for the upstream to answer again."""

    recovered: bool
    deadline_s: float
    elapsed_s: float
    probes: list[UpstreamProbe]
    gave_up: str | None = None  # why the wait ended before its deadline

    @property
    def last(self) -> UpstreamProbe:
        return self.probes[-1]

    def describe(self) -> str:
        verdict = "answers again" if self.recovered else "did NOT recover"
        text = (f"{self.last.name} {verdict} after {self.elapsed_s:.0f} s and {len(self.probes)} probes "
                f"(deadline {self.deadline_s:g} s); last: {self.last.describe()}")
        return text + (f"; stopped waiting: {self.gave_up}" if self.gave_up else "")


@read_only_task
def wait_for_upstream(target: Target, deadline_s: float, first_wait_s: float = 2.0,
                      max_wait_s: float = 60.0, previous: UpstreamProbe | None = None) -> UpstreamWait:
    """Runbooks 003/004 "rate limiting: back off": probe the upstream until its health and the
    probe request both answer 200, or the deadline passes.

    The pause between probes doubles from ``first_wait_s`` up to ``max_wait_s``, and is never
    shorter than the Retry-After the last answer asked for (``previous``: the diagnosis' probe,
    counted as the last one). Every probe is logged with the pause before it; the result keeps
    them all for the record. A Retry-After that reaches past the deadline ends the wait
    without probing again (the upstream said it would not answer sooner).
    """
    upstream = require_upstream(target)
    logger = get_run_logger()
    started = time.monotonic()
    ends = started + deadline_s
    pause = first_wait_s
    last = previous
    probes: list[UpstreamProbe] = []
    gave_up: str | None = None
    while True:
        if last is not None:
            if last.ok:
                break
            asked = last.retry_after_s or 0.0
            since_last = max(0.0, (_now() - (last.answered_at or last.at)).total_seconds())
            wait = max(pause, asked) - since_last
            left = ends - time.monotonic()
            if left <= 0:
                break
            if asked - since_last > left:
                gave_up = (f"{upstream.name} asked to wait {asked:g} s (Retry-After), past the deadline: "
                           "not probed sooner than it asked")
                break
            wait = min(wait, left)
            logger.info("%s not recovered (%s); next probe in %.1f s (backoff %.1f s, Retry-After %s)",
                        upstream.name, last.describe(), max(wait, 0.0), pause,
                        f"{asked:g} s" if asked else "none")
            if wait > 0:
                time.sleep(wait + 0.01)  # a hair longer: never sooner than asked
            pause = min(pause * 2, max_wait_s)
        probe = check_upstream(upstream)
        if last is not None:
            probe.since_previous_s = (probe.at - (last.answered_at or last.at)).total_seconds()
            probe.asked_s = last.retry_after_s
        probes.append(probe)
        logger.info("%s", probe.describe_in_wait(len(probes)))
        last = probe
    if not probes:  # the deadline had passed before the first probe: look once more
        probe = check_upstream(upstream)
        probes.append(probe)
        last = probe
    return UpstreamWait(recovered=probes[-1].ok, deadline_s=deadline_s,
                        elapsed_s=time.monotonic() - started, probes=probes, gave_up=gave_up)


# --------------------------------------------------------------------------- changing steps


@changing_task
def set_degraded_mode(target: Target, on: bool) -> ActionResult:
    """Runbook 003 "Switch to cached data temporarily", 000 "Enable fallback mechanisms":
    ``POST <admin>/degraded?on=1|0``. Re-checks first: a service already in the wanted mode is
    "already ..." (not called again). The answer must show the mode switched."""
    before = _admin_call(target, "GET", "/status")
    word = "on" if on else "off"
    if before.degraded == on:
        return ActionResult(action="set_degraded_mode", target=target.name, changed=False,
                            detail=f"already {word}: {before.describe()}")
    after = _admin_call(target, "POST", "/degraded", {"on": "1" if on else "0"})
    if after.degraded != on:
        raise ActionFailedError(f"{target.name} admin API", f"asked degraded mode {word}, it answered "
                                f"{after.describe()}", f"degraded mode {word}",
                                f"check {target.name}'s admin API and log; switch it by hand: "
                                f"{admin_command(target, f'/degraded?on={1 if on else 0}')}")
    return ActionResult(action="set_degraded_mode", target=target.name, changed=True,
                        detail=f"degraded mode {word} (was {'on' if before.degraded else 'off'}); "
                               f"now {after.describe()}")


@changing_task
def leave_degraded_mode(target: Target) -> ActionResult:
    """Back from cached prices once the upstream answers: runbook 000 "Manually reset circuit
    breakers if needed" and 004 "reset only after confirming the issue resolved" -
    ``POST <admin>/breaker?state=closed`` while degraded mode still holds the traffic - then
    ``POST <admin>/degraded?on=0``. One step, so one approval: closing the breaker resolves the
    alert, and a second step asked for after it would be stood down by that resolve, leaving the
    service degraded. Re-checks first: a closed breaker with no failures counted and degraded mode
    off is "already ..."; each call's answer must show it took."""
    before = _admin_call(target, "GET", "/status")
    breaker_closed = before.breaker == "closed" and before.consecutive_failures == 0
    if breaker_closed and not before.degraded:
        return ActionResult(action="leave_degraded_mode", target=target.name, changed=False,
                            detail=f"already out of degraded mode, breaker closed: {before.describe()}")
    done = []
    if not breaker_closed:
        after = _admin_call(target, "POST", "/breaker", {"state": "closed"})
        if after.breaker != "closed":
            raise ActionFailedError(f"{target.name} admin API", f"asked to close the breaker, it answered "
                                    f"{after.describe()}", "the circuit breaker closed",
                                    f"check {target.name}'s admin API and log; close it by hand: "
                                    f"{admin_command(target, '/breaker?state=closed')}; it is still in "
                                    "degraded mode (serving cached prices)")
        done.append(f"breaker closed (was {before.breaker}, {before.consecutive_failures} consecutive failures)")
    if before.degraded:
        after = _admin_call(target, "POST", "/degraded", {"on": "0"})
        if after.degraded:
            raise ActionFailedError(f"{target.name} admin API", f"asked degraded mode off, it answered "
                                    f"{after.describe()}", "degraded mode off",
                                    f"check {target.name}'s admin API and log; switch it by hand: "
                                    f"{admin_command(target, '/degraded?on=0')}"
                                    + ("; its breaker is already closed" if done else ""))
        done.append("degraded mode off")
    now = _admin_call(target, "GET", "/status")
    return ActionResult(action="leave_degraded_mode", target=target.name, changed=True,
                        detail=f"{'; '.join(done)}; now {now.describe()}")
