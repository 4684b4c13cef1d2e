"""HTTP probes: is the service answering, and does it stay healthy?

A probe never raises because the service is down: "down" is an observation the
flow records and acts on. Only a probe that cannot be made at all (bad URL) raises.
"""

from __future__ import annotations

from datetime import datetime, timezone

import httpx
from pydantic import BaseModel

from incident.errors import ConfigurationError
from incident.inventory import Target
from incident.settings import get_settings
from tasks.common import count_consecutive, read_only_task


class HealthProbe(BaseModel):
    url: str
    at: datetime
    healthy: bool
    status_code: int | None = None
    body: str = ""
    error: str | None = None

    def describe(self) -> str:
        if self.error:
            return f"{self.url} did not answer ({self.error})"
        return f"{self.url} answered {self.status_code}: {self.body[:200]}"


class HealthStreak(BaseModel):
    """Result of waiting for N consecutive healthy probes within a deadline."""

    healthy: bool
    consecutive: int
    required: int
    probes: int
    last: HealthProbe
    gave_up: str | None = None  # why the wait ended before its deadline (the process exited)

    def describe(self) -> str:
        verdict = "healthy" if self.healthy else "NOT healthy"
        return (
            f"{verdict}: {self.consecutive}/{self.required} consecutive good probes "
            f"after {self.probes} probes; last: {self.last.describe()}"
            + (f"; stopped waiting: {self.gave_up}" if self.gave_up else "")
        )


def check_health(url: str, timeout_s: float | None = None) -> HealthProbe:
    """One GET of the health URL with an explicit timeout (plain function, used by tasks)."""
    timeout = httpx.Timeout(timeout_s or get_settings().http_timeout_s)
    now = datetime.now(timezone.utc)
    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=False)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise ConfigurationError(
            url, f"invalid health URL ({exc})", "an http(s) URL", "fix health_url in the inventory"
        ) from None
    except httpx.TransportError as exc:
        return HealthProbe(url=url, at=now, healthy=False, error=f"{type(exc).__name__}: {exc}")
    return HealthProbe(
        url=url,
        at=now,
        healthy=response.status_code == 200,
        status_code=response.status_code,
        body=response.text[:1000],
    )


@read_only_task
def probe_health(target: Target) -> HealthProbe:
    """Runbook: "check the health endpoint" (curl /health)."""
    return check_health(target.service.health_url)


@read_only_task
def wait_until_healthy(
    target: Target, consecutive: int = 3, deadline_s: float = 30.0, interval_s: float = 1.0,
    streak_so_far: int = 0,
) -> HealthStreak:
    """Probe until ``consecutive`` good answers in a row, or the deadline passes.

    ``streak_so_far``: good answers already seen in a row just before (the probe that
    showed a restart worked); the streak continues from there, one interval later.
    """
    url = target.service.health_url
    streak, probes, last = count_consecutive(lambda: check_health(url), lambda p: p.healthy, consecutive,
                                             deadline_s, interval_s, streak_so_far)
    return HealthStreak(
        healthy=streak >= consecutive, consecutive=streak, required=consecutive,
        probes=probes, last=last,
    )
