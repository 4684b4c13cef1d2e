"""Runbook: upstream outage (the exchange / price API the service calls is down or rate limiting;
the service's circuit breaker is open).

Automates these hand-written steps from ../shared/runbooks/:
- 000 "DEX Aggregator Outages": 1. check circuit breaker status, 2. verify the aggregator API
  status, 3. check fallback (here: the service's own cache, degraded mode), 4. manually reset
  circuit breakers if needed; "Step 3: Mitigate" - "Enable fallback mechanisms".
- 001 "API Failures": 1. check API status, 4. if rate limited (back off), 6. if the API is
  down: pause until the API recovers.
- 003 "API Rate Limiting Issues": 1. check current rate limits, 2. enable rate limit backoff,
  3. switch to cached data temporarily.
- 004 "Exchange Connection Failures" (rate limiting: back off; exchange maintenance: check the
  exchange status, notify stakeholders of expected downtime; "Exchange Support" contacts) and
  "Circuit breaker triggered" (check its status, reset it only after confirming the issue
  resolved).

Phases: diagnose (the upstream's own health endpoint and one probe request - status,
Retry-After; the service's upstream failures by reason, its breaker and degraded mode from its
metrics and admin API; its /health) -> contain (severity; degraded mode on - approval gate -
and proof that it now serves cached prices: no upstream call in a short window) -> fix (wait
for the upstream: probes with capped exponential backoff, never sooner than a Retry-After
asked, up to ``app.upstream_deadline_s``; then close the breaker and leave degraded mode -
approval gates) -> verify (over a short window the service's upstream calls grow and its
failures do not; the breaker closed, degraded mode off). An upstream that does not come back
by the deadline leaves the service degraded: the run escalates saying so, with what to do
(contact the provider, when to leave degraded mode, the exact admin calls), and fails. A
service whose own calls still fail after the upstream answered goes back to degraded mode and
escalates.
"""

from __future__ import annotations

from prefect.states import State

from incident.approval import ActionPlan
from incident.errors import VerificationFailedError
from incident.inventory import Severity, Target, UpstreamSpec
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, Trigger
from incident.waiting import waiting
from tasks.app import (
    AppMetrics, AppStatus, UpstreamProbe, UpstreamWait, admin_command, leave_degraded_mode,
    probe_upstream, read_app_metrics, read_app_status, require_app, require_upstream,
    set_degraded_mode, wait_for_upstream, watch_app_traffic,
)
from tasks.http_checks import HealthProbe, probe_health

SCENARIO = "upstream-outage"

#: Runbooks 000 ("major feature broken") and 004 ("one exchange connector down"): P1, unless
#: the inventory rates a degraded service higher.
RUNBOOK_SEVERITY = Severity.P1


class UpstreamDiagnosis(Diagnosis):
    upstream: UpstreamProbe
    status: AppStatus
    metrics: AppMetrics
    health: HealthProbe


@runbook_flow(SCENARIO)
def upstream_outage(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    upstream_deadline_s: int | None = None,
    first_wait_s: float = 2.0,
    max_wait_s: float = 60.0,
    containment_window_s: float = 2.0,
    verify_window_s: float = 5.0,
) -> State:
    """Serve cached prices while the upstream fails, wait for it, then go back to it.

    Args:
        target: service name in the inventory (its ``app.upstream`` is the API this run waits for).
        dry_run: diagnose and show the plan; change nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        upstream_deadline_s: how long to wait for the upstream before escalating (default: the
            inventory's ``app.upstream_deadline_s``).
        first_wait_s: the first pause between two probes of the upstream; it doubles after each.
        max_wait_s: the longest pause between two probes (a Retry-After may ask for longer).
        containment_window_s: how long to watch the service's metrics to prove it serves from
            its cache (no upstream call meanwhile).
        verify_window_s: how long to watch its metrics after going back to the upstream: the
            calls must grow, the failures not.
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)
    upstream = require_upstream(service)
    deadline_s = upstream_deadline_s or require_app(service).upstream_deadline_s

    # 1. Diagnose: the upstream, the service's calls to it, its breaker and degraded mode
    seen = diagnose(incident, service, upstream)
    if seen.healthy:
        return already_fine(incident, seen)

    # 2. Contain: serve cached prices meanwhile (runbook 003 step 3, 000 "fallback mechanisms")
    incident.enter("contain", seen.summary)
    incident.set_severity(_more_urgent(RUNBOOK_SEVERITY, service.service.severity_degraded),
                          f"{service.name}'s prices depend on {upstream.name}, which {seen.upstream.cause}")
    step = change(incident, service, plan_degraded(service, upstream), set_degraded_mode, service, True)
    if not step.taken:
        return step.closed
    if not serves_from_cache(incident, service, containment_window_s):
        return escalate_and_fail(
            incident, f"degraded mode did not take: {service.name} still calls {upstream.name} (see the "
            f"finding 'serving from cache'); users get errors while {upstream.name} fails. Check "
            f"{service.name}'s admin API and log",
            expected=f"{service.name} serving cached prices")

    # 3. Fix: wait for the upstream (runbooks 003/004 back off, 001 "pause until the API recovers")
    incident.enter("fix", f"waiting up to {deadline_s} s for {upstream.name} to answer again: probes "
                          f"{first_wait_s:g} s apart, doubling up to {max_wait_s:g} s, never sooner than "
                          "a Retry-After asked")
    with waiting(f"{upstream.name} to answer again"):
        wait = wait_for_upstream(service, deadline_s=deadline_s, first_wait_s=first_wait_s,
                                 max_wait_s=max_wait_s, previous=seen.upstream)
    record_wait(incident, wait)
    if not wait.recovered:
        return stay_degraded(incident, service, upstream, wait)

    # ... then go back to it: close the breaker (000 step 4, 004 "only after confirming the issue
    # resolved") while degraded mode still holds the traffic, then leave degraded mode - one step:
    # closing the breaker resolves the alert, which would stand down a second step asked after it
    step = change(incident, service, plan_leave_degraded(service, upstream), leave_degraded_mode, service)
    if not step.taken:
        return step.closed

    # 4. Verify: the service's own calls succeed, its breaker stays closed
    incident.enter("verify", f"{service.name}'s upstream calls over {verify_window_s:g} s: they must "
                             "grow and its failures not; the breaker closed, degraded mode off")
    traffic = watch_app_traffic(service, window_s=verify_window_s)
    status = read_app_status(service)
    calls_succeed = traffic.upstream_calls > 0 and traffic.failed_calls == 0
    back = calls_succeed and status.breaker == "closed" and not status.degraded
    incident.verified(f"{'verified' if back else 'NOT verified'}: {traffic.describe()}; {status.describe()}")
    if not back:
        return degrade_again(incident, service, upstream, traffic.describe(), status)
    return incident.close("resolved", f"{upstream.name} answers again after {wait.elapsed_s:.0f} s "
                                      f"({len(wait.probes)} probes); {service.name} calls it again "
                                      f"({traffic.describe()}), breaker closed, degraded mode off")


def diagnose(incident: Incident, service: Target, upstream: UpstreamSpec) -> UpstreamDiagnosis:
    """Runbook 000 steps 1-2, 003 step 1, 004 "check the exchange status": read-only, concurrently."""
    incident.enter("diagnose", f"checking {upstream.name} ({upstream.health_url}, {upstream.probe_url}) "
                               f"and {service.name}'s calls to it")
    probe = probe_upstream.submit(service)
    metrics = read_app_metrics.submit(service)
    status = read_app_status.submit(service)
    health = probe_health.submit(service)

    up = probe.result()
    incident.finding(f"upstream {upstream.name}", up.ok, up.describe())
    seen = metrics.result()
    incident.finding("upstream failures", not seen.circuit_breaker_open, seen.describe_upstream())
    st = status.result()
    incident.finding("circuit breaker", st.breaker == "closed", st.describe())
    probe_h = health.result()
    incident.finding("health", probe_h.healthy, probe_h.describe())

    healthy = up.ok and st.breaker == "closed" and not st.degraded
    if healthy:
        summary = (f"{upstream.name} answers ({up.describe()}); {service.name}'s breaker is closed "
                   "and degraded mode off")
    else:
        summary = f"{upstream.name} {up.cause} ({up.describe()}); {service.name}: {st.describe()}"
    if not probe_h.healthy:
        summary += f" ({service.name}'s own /health fails too: {probe_h.describe()})"
    return UpstreamDiagnosis(healthy=healthy, summary=summary, upstream=up, status=st, metrics=seen,
                             health=probe_h)


def serves_from_cache(incident: Incident, service: Target, window_s: float) -> bool:
    """Degraded mode holds: the admin API says so and no upstream call happens in a short window."""
    traffic = watch_app_traffic(service, window_s=window_s)
    status = read_app_status(service)
    served = status.degraded and traffic.upstream_calls == 0
    detail = f"{status.describe()}; {traffic.describe()}"
    if served and not traffic.requests:
        detail += "; no price request came in the window: degraded mode is confirmed by the admin API only"
    if status.cache_age_s is None:
        detail += "; NO cached price yet: degraded mode answers without a price"
    incident.finding("serving from cache", served and status.cache_age_s is not None, detail)
    return served


def record_wait(incident: Incident, wait: UpstreamWait) -> None:
    """Every probe of the wait on the timeline (when, how long after the previous, what was asked)."""
    for n, probe in enumerate(wait.probes, start=1):
        incident.note("fix", probe.describe_in_wait(n))
    incident.finding("upstream recovery", wait.recovered, wait.describe())


def stay_degraded(incident: Incident, service: Target, upstream: UpstreamSpec, wait: UpstreamWait) -> State:
    """The upstream did not come back by the deadline: leave the service degraded and hand over."""
    status = read_app_status(service)
    incident.finding("left degraded", status.degraded, status.describe())
    now = (f"{service.name} stays in degraded mode, serving cached prices ({status.describe()})"
           if status.degraded else
           f"{service.name} is NOT in degraded mode any more (someone switched it off: {status.describe()}): "
           f"it fails its price requests while {upstream.name} is down")
    return escalate_and_fail(
        incident,
        f"{upstream.name} did not answer again within {wait.deadline_s:g} s ({wait.describe()}). {now}. "
        f"What to do: contact the provider of {upstream.name} (its status page or support; its own "
        f"health endpoint {upstream.health_url} shows when it is back) and tell stakeholders prices "
        f"are served from cache; keep {service.name} in degraded mode until {upstream.health_url} and "
        f"GET {upstream.probe_url} both answer 200 (no 429, no 5xx); then close the breaker and leave "
        f"degraded mode, in this order: `{admin_command(service, '/breaker?state=closed')}` then "
        f"`{admin_command(service, '/degraded?on=0')}` - or run the {SCENARIO} runbook on "
        f"{service.name} again, which does both and verifies",
        expected=f"{upstream.name} answering again within {wait.deadline_s:g} s")


def degrade_again(incident: Incident, service: Target, upstream: UpstreamSpec, seen: str,
                  status: AppStatus) -> State:
    """The upstream answered the probes, but the service's own calls still fail: back to degraded
    mode (approval gate), then hand over."""
    step = change(incident, service, plan_degraded(service, upstream), set_degraded_mode, service, True)
    if not step.taken:
        return step.closed
    return escalate_and_fail(
        incident, f"{upstream.name} answered the probes, but {service.name}'s own calls to it do not "
        f"succeed ({seen}; {status.describe()}): {service.name} is back in degraded mode, serving cached "
        f"prices. Check how {service.name} reaches {upstream.name} (its upstream address and timeout, "
        f"its log); leave degraded mode once its calls work: `{admin_command(service, '/breaker?state=closed')}` "
        f"then `{admin_command(service, '/degraded?on=0')}`",
        expected=f"{service.name}'s upstream calls succeeding", error=VerificationFailedError)


def _more_urgent(a: Severity, b: Severity) -> Severity:
    return min(a, b, key=lambda s: s.value)  # "P0" < "P1" < ...


def plan_degraded(service: Target, upstream: UpstreamSpec) -> ActionPlan:
    return ActionPlan(
        action="set_degraded_mode",
        target=service.name,
        runs=admin_command(service, "/degraded?on=1"),
        expected_effect=f"{service.name} answers price requests from its cache (source: cache) and "
                        f"stops calling {upstream.name} while it fails",
        undo=f"leave degraded mode: {admin_command(service, '/degraded?on=0')} (this runbook does it "
             f"once {upstream.name} answers again)",
        destructive=False,
    )


def plan_leave_degraded(service: Target, upstream: UpstreamSpec) -> ActionPlan:
    return ActionPlan(
        action="leave_degraded_mode",
        target=service.name,
        runs=f"{admin_command(service, '/breaker?state=closed')}, then {admin_command(service, '/degraded?on=0')}",
        expected_effect=f"{service.name}'s circuit breaker closed and its failure count reset, then it calls "
                        f"{upstream.name} again for every price request ({upstream.name} answered its health "
                        "endpoint and a probe request with 200)",
        undo=f"back to cached prices: {admin_command(service, '/degraded?on=1')} ({service.name} opens "
             "its breaker again by itself after repeated failures)",
        destructive=False,
    )
