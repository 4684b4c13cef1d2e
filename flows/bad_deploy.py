"""Runbook: bad deploy (the error rate is high after a deploy: roll back).

Automates these hand-written steps from ../shared/runbooks/:
- 000 "High Error Rate": 1. check the error patterns, 2. review recent deployments,
  3. check for dependency issues, 4. rollback if recent deployment, 5. increase monitoring;
  and its "Step 3: Mitigate": rollback deployment if recent.
- 001 "Mitigation Phase": 1. implement fix (rollback deployment), 2. verify fix (check the
  service's health, monitor); "Service Outage" step 5: roll back to the last known good version.
- 003 "Service Degraded (High Error Rate)": symptom error rate > 5 %; investigation steps
  1. check service health, 2. monitor error rates (the metrics).

Phases: diagnose (the share of requests answered 5xx over a window, from Prometheus's HTTP API;
whether the container's image changed recently: its image, start time and the
``runbooks.previous-image`` label; the service's /health) -> contain (severity; no recent
deploy: escalate, it is not this runbook's fix) -> fix (roll back to the previous image:
a person approves, always) -> verify (the error rate stays under the threshold for one whole
window after the rollback, within a deadline; the service healthy), else escalate and fail
saying what was seen.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect.states import State
from pydantic import BaseModel

from incident.approval import ActionPlan
from incident.errors import (ActionFailedError, ConfigurationError, TargetUnreachableError,
                             VerificationFailedError)
from incident.escalation import escalate
from incident.inventory import AppSpec, Target
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, Trigger
from tasks.containers import PREVIOUS_IMAGE_LABEL, ContainerState, inspect_container, rollback_container
from tasks.http_checks import HealthProbe, probe_health, wait_until_healthy
from tasks.prometheus import (ErrorRate, percent, prometheus_url_of, read_error_rate, shown,
                              wait_until_error_rate_below)

SCENARIO = "bad-deploy"


class DeployChange(BaseModel):
    """Did the container's image change recently? The deploy recorded the image it replaced in
    the container's ``runbooks.previous-image`` label; the container started with the new one."""

    container: str
    image: str
    previous_image: str | None
    started_at: datetime | None
    age_s: float | None
    recent_s: int

    @classmethod
    def of(cls, state: ContainerState, recent_s: int) -> DeployChange:
        # created, not started: a restart after the deploy is not a new deploy
        deployed = state.created_at or state.started_at
        age = (datetime.now(timezone.utc) - deployed).total_seconds() if deployed else None
        return cls(container=state.name, image=state.image, previous_image=state.previous_image,
                   started_at=deployed, age_s=age, recent_s=recent_s)

    @property
    def recent(self) -> bool:
        return (bool(self.previous_image) and self.previous_image != self.image
                and self.age_s is not None and self.age_s <= self.recent_s)

    def describe(self) -> str:
        since = (f"since {self.started_at:%Y-%m-%d %H:%M:%S} UTC ({self.age_s:.0f} s ago)"
                 if self.started_at and self.age_s is not None else "(start time unknown)")
        said = f"{self.container} runs {self.image} {since}"
        if not self.previous_image:
            return f"{said}; no {PREVIOUS_IMAGE_LABEL} label: no deploy recorded the image it replaced"
        if self.previous_image == self.image:
            return f"{said}; {PREVIOUS_IMAGE_LABEL} names the same image: no image change"
        said += f", replacing {self.previous_image} ({PREVIOUS_IMAGE_LABEL})"
        if self.recent:
            return f"{said}: deployed within the last {self.recent_s} s"
        return f"{said}: deployed more than {self.recent_s} s ago, not a recent deploy"


class DeployDiagnosis(Diagnosis):
    rate: ErrorRate
    deploy: DeployChange
    container: ContainerState
    health: HealthProbe


@runbook_flow(SCENARIO)
def bad_deploy(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    window_s: int | None = None,
    threshold: float | None = None,
    recent_deploy_s: int = 3600,
    verify_deadline_s: float | None = None,
    check_interval_s: float | None = None,
    healthy_probes: int = 3,
    rollback_deadline_s: float = 30.0,
) -> State:
    """Roll a release whose error rate is too high back to the previous image, and prove it.

    Args:
        target: service name in the inventory (needs ``app.prometheus_url``, a container).
        dry_run: diagnose and show the plan; change nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        window_s: the error rate is the share of 5xx answers over this many seconds
            (default: the inventory's ``app.error_rate_window_s``).
        threshold: above this share the release is rolled back (default: the inventory's
            ``app.error_rate_threshold``; runbook 003: 5 %).
        recent_deploy_s: a container started from a new image less than this long ago counts
            as a recent deploy (runbook 000: "rollback if recent deployment").
        verify_deadline_s: how long the error rate may take to stay under the threshold for a
            whole window after the rollback (default: three windows plus 30 s).
        check_interval_s: seconds between Prometheus queries and health probes while verifying
            (default: a fifth of the window, between 1 and 30 s).
        healthy_probes: consecutive good health probes that count as healthy (the rollback's
            own check and the final one).
        rollback_deadline_s: how long the rolled-back container has to become healthy before
            the rollback undoes itself.
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)
    app = require_app(service)
    window = window_s or app.error_rate_window_s
    limit = threshold or app.error_rate_threshold
    interval = check_interval_s or max(1.0, min(30.0, window / 5))
    deadline = verify_deadline_s or 3 * window + 30

    # 1. Diagnose: the error rate over a window, the recent deploy, the health endpoint
    seen = diagnose(incident, service, window, limit, recent_deploy_s)
    if seen.healthy:
        return already_fine(incident, seen)

    # 2. Contain: how bad; a high error rate without a recent deploy is not this runbook's fix
    incident.enter("contain", seen.summary)
    if seen.rate.ratio is None:
        return hand_over(incident, f"{seen.rate.describe()}; the error rate cannot be judged, so this "
                         f"runbook changes nothing. Check that {service.name} gets traffic and that "
                         f"Prometheus scrapes it ({shown(prometheus_url_of(service))}/targets)")
    incident.set_severity(service.service.severity_degraded,
                          f"{percent(seen.rate.ratio)} of requests fail (runbook 003 \"Service Degraded "
                          f"(High Error Rate)\": over {percent(limit)})")
    if not seen.deploy.recent:
        return hand_over(incident, not_a_deploy(service, seen))

    # 3. Fix: roll back to the previous image (runbook 000 "rollback if recent deployment")
    incident.enter("fix", f"roll {seen.container.name} back from {seen.deploy.image} to "
                          f"{seen.deploy.previous_image} (runbooks 000, 001)")
    try:
        step = change(incident, service, plan_rollback(service, seen, limit), rollback_container, service,
                      expected_from=seen.container.image, healthy_probes=healthy_probes,
                      health_deadline_s=rollback_deadline_s, probe_interval_s=min(interval, 1.0))
    except (ActionFailedError, TargetUnreachableError) as exc:
        return escalate_and_fail(incident, f"the rollback of {seen.container.name} to "
                                 f"{seen.deploy.previous_image} failed: {exc.observed}; next: {exc.next_step}",
                                 expected=f"{seen.container.name} running {seen.deploy.previous_image}")
    if not step.taken:
        if incident.record.outcome == "not approved":
            escalate(incident, rejected(incident, service, seen))
        return step.closed

    # 4. Verify: the error rate under the threshold for a whole window, and healthy
    incident.enter("verify", f"the error rate under {percent(limit)} for a whole {window} s window "
                             f"(a Prometheus query every {interval:g} s, within {deadline:g} s), then "
                             f"{healthy_probes} healthy probes")
    watch = wait_until_error_rate_below(service, threshold=limit, window_s=window, deadline_s=deadline,
                                        interval_s=interval)
    incident.finding("error rate after rollback", watch.held, watch.describe())
    health = wait_until_healthy(service, consecutive=healthy_probes, deadline_s=healthy_probes * interval + 10,
                                interval_s=interval)
    incident.verified(f"{watch.describe()}; {service.name}: {health.describe()}")
    if not watch.held:
        return escalate_and_fail(
            incident, f"rolled back to {seen.deploy.previous_image}, but {watch.describe()}. The errors may "
            f"not come from {seen.deploy.image}: check the service's log for the failing requests and its "
            f"dependencies; the rollback can be undone ({plan_rollback(service, seen, limit).undo})",
            expected=f"the error rate under {percent(limit)}", error=VerificationFailedError)
    if not health.healthy:
        return escalate_and_fail(incident, f"rolled back, the error rate is under {percent(limit)}, but "
                                 f"{service.name} is not healthy: {health.describe()}",
                                 error=VerificationFailedError)
    return incident.close("resolved", f"rolled {seen.container.name} back from {seen.deploy.image} to "
                                      f"{seen.deploy.previous_image}: {watch.describe()}; {service.name} "
                                      "is healthy")


def require_app(service: Target) -> AppSpec:
    """The service's ``app`` section with a Prometheus, and a container to roll back; else a
    ConfigurationError naming the field to add."""
    prometheus_url_of(service)  # raises naming app / app.prometheus_url
    app = service.service.app
    if app is None or not service.service.container or service.docker is None:
        raise ConfigurationError(service.name, "no container/docker_host in the inventory",
                                 "a containerised service to roll back",
                                 f"add container and docker_host to services.{service.name} in the inventory")
    return app


def diagnose(incident: Incident, service: Target, window_s: int, threshold: float,
             recent_s: int) -> DeployDiagnosis:
    """Runbooks 000 "review recent deployments", 003 steps 1-2: the error rate over the window
    (Prometheus), the container's image and deploy time, /health. Read-only, concurrent."""
    incident.enter("diagnose", f"the error rate of {service.name} over {window_s} s "
                               f"({shown(prometheus_url_of(service))}), its image and its health")
    rate_f = read_error_rate.submit(service, window_s)
    container_f = inspect_container.submit(service)
    health_f = probe_health.submit(service)

    rate = rate_f.result()
    incident.finding("error rate", not rate.above(threshold),
                     f"{rate.describe()} (threshold {percent(threshold)}); query: {rate.expr}")
    container = container_f.result()
    deploy = DeployChange.of(container, recent_s)
    incident.finding("recent deploy", not deploy.recent, deploy.describe())
    incident.finding("container", container.running, container.describe())
    health = health_f.result()
    incident.finding("health", health.healthy, health.describe())
    healthy = rate.ratio is not None and not rate.above(threshold)
    summary = (f"error rate {rate.value_text()} over {window_s} s "
               f"({'under' if healthy else 'not under'} {percent(threshold)})")
    if not healthy and rate.ratio is not None:
        summary += " after a recent deploy" if deploy.recent else ", no recent deploy"
    return DeployDiagnosis(healthy=healthy, summary=summary, rate=rate, deploy=deploy, container=container,
                           health=health)


def hand_over(incident: Incident, why: str) -> State:
    """Not this runbook's fix: a dry run says so and closes; a real run escalates and fails."""
    if incident.record.dry_run:
        return incident.close("dry run", why)
    return escalate_and_fail(incident, why, expected="an error rate under the threshold")


def not_a_deploy(service: Target, seen: DeployDiagnosis) -> str:
    """What a human should look at when the errors do not follow a deploy (runbook 000 steps
    1 and 3, 003 "identify failing component")."""
    upstream = service.service.app.upstream if service.service.app else None
    return (f"{seen.rate.describe()}, but {seen.deploy.describe()}: not a bad deploy, so this runbook "
            f"does not roll back. Look at: the failing requests in the service's log (`docker logs "
            f"{seen.container.name} --tail 200`), its dependencies (health: {seen.health.describe()})"
            + (f", its upstream {upstream.name} ({upstream.health_url}; runbook upstream-outage)" if upstream else "")
            + ", and any configuration or traffic change; if a deploy did cause it, roll back by hand")


def rejected(incident: Incident, service: Target, seen: DeployDiagnosis) -> str:
    """The escalation of a rejected rollback: nothing changed, the errors go on."""
    answer = incident.record.approvals[-1] if incident.record.approvals else None
    by = f" by {answer.by}" + (f" ({answer.reason})" if answer.reason else "") if answer else ""
    return (f"the rollback of {seen.container.name} from {seen.deploy.image} to {seen.deploy.previous_image} "
            f"was rejected{by}; nothing was changed: the error rate was {seen.rate.value_text()} over "
            f"{seen.rate.window_s} s and the release stays. A human must decide: roll back by hand (or rerun "
            f"this runbook and approve) or fix forward; watch `{seen.rate.expr}` at "
            f"{shown(prometheus_url_of(service))}")


def plan_rollback(service: Target, seen: DeployDiagnosis, threshold: float) -> ActionPlan:
    container, previous = seen.container, seen.deploy.previous_image or "(none recorded)"
    return ActionPlan(
        action="rollback_container",
        target=container.name,
        runs=f"recreate {container.name} from {previous} (replacing {container.image}, deployed "
             f"{seen.deploy.age_s or 0:.0f} s ago)",
        expected_effect=f"{container.name} runs {previous}, the share of 5xx answers drops from "
                        f"{seen.rate.value_text()} to under {percent(threshold)} within a "
                        f"{seen.rate.window_s} s window, and {service.service.health_url} answers 200",
        undo=f"roll forward: recreate {container.name} from {container.image}",
        destructive=True,
    )
