"""Queues: the backlog of a Redis list a service produces to, and how fast it moves.

Runbook 002 "Blockchain Indexer Lagging" (a consumer that falls behind: its lag metric, its
status, restart it, let it catch up) on the inventory's ``services.<name>.app.queue``: a Redis
list (``key``, on ``redis:<queue.redis>``, resolved as ``Target.app_redis``) that the service
pushes jobs to and a consumer container drains.

- :func:`read_queue_backlog` - one ``LLEN``;
- :func:`sample_backlog` - ``LLEN`` a few times, a few seconds apart: the backlog and its
  trend (jobs/s, growing or shrinking), which is what tells a stuck consumer (the backlog grows
  at the producers' rate) from a busy one catching up (it shrinks);
- :func:`wait_until_backlog_drains` - after the consumer was restarted: the backlog must get
  under ``max_backlog`` within a deadline, shrinking at ``min_drain_per_s`` or faster, and stay
  there, not growing, for a while. Every sample is kept for the record.

Every call has the Redis client's timeouts (``tasks.redis.redis_client``).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import redis
from pydantic import BaseModel

from incident.errors import ConfigurationError, TargetUnreachableError
from incident.inventory import QueueSpec, RedisInstance, Target
from tasks.common import read_only_task
from tasks.redis import address_of, redis_client


def queue_spec(target: Target) -> QueueSpec:
    """The service's queue (inventory ``app.queue``), or a ConfigurationError naming the field."""
    app = target.service.app
    if app is None or app.queue is None:
        raise ConfigurationError(
            target.name, "no app.queue in the inventory", "the queue the service produces to",
            "add app.queue {redis, key, consumer_container, max_backlog, min_drain_per_s} to the "
            "service in the inventory",
        )
    return app.queue


def queue_redis(target: Target) -> RedisInstance:
    spec = queue_spec(target)
    if target.app_redis is None:
        raise ConfigurationError(
            target.name, f"app.queue.redis names {spec.redis!r}, which is not resolved",
            "a Redis instance under redis:", f"define redis.{spec.redis} in the inventory",
        )
    return target.app_redis


def queue_label(target: Target) -> str:
    """How records name the queue: ``jobs@127.0.0.1:6379``."""
    return f"{queue_spec(target).key}@{address_of(queue_redis(target))}"


# --------------------------------------------------------------------------- models


def _now() -> datetime:
    return datetime.now(timezone.utc)


class BacklogSample(BaseModel):
    """One ``LLEN`` of the queue."""

    at: datetime
    length: int


def growth_per_s(samples: list[BacklogSample]) -> float | None:
    """The least-squares slope of the backlog over time, jobs/s (positive: growing); None with
    fewer than two samples or no time between them."""
    if len(samples) < 2:
        return None
    t0 = samples[0].at
    xs = [(s.at - t0).total_seconds() for s in samples]
    ys = [float(s.length) for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var <= 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def _seconds(a: BacklogSample, b: BacklogSample) -> float:
    return (b.at - a.at).total_seconds()


def describe_samples(samples: list[BacklogSample], limit: int = 12) -> str:
    """``120 @0.0s, 131 @1.0s, ...`` (times from the first sample)."""
    if not samples:
        return "(no samples)"
    t0 = samples[0].at
    shown = [f"{s.length} @{(s.at - t0).total_seconds():.1f}s" for s in samples]
    if len(shown) > limit:
        shown = shown[: limit // 2] + [f"... {len(shown) - limit} more ..."] + shown[-(limit // 2):]
    return ", ".join(shown)


def describe_rate(rate: float | None) -> str:
    if rate is None:
        return "trend unknown (too few samples)"
    if rate > 0:
        return f"growing {rate:.1f} jobs/s"
    if rate < 0:
        return f"shrinking {-rate:.1f} jobs/s"
    return "flat (0.0 jobs/s)"


class QueueBacklog(BaseModel):
    """``LLEN`` samples of the queue and the trend they show."""

    queue: str
    max_backlog: int
    samples: list[BacklogSample]

    @property
    def length(self) -> int:
        return self.samples[-1].length

    @property
    def growth_per_s(self) -> float | None:
        return growth_per_s(self.samples)

    @property
    def too_high(self) -> bool:
        """Above ``max_backlog``: what QueueBacklogHigh fires on."""
        return self.length > self.max_backlog

    def catching_up(self, min_drain_per_s: float) -> bool:
        """Too high but shrinking at ``min_drain_per_s`` or faster: the consumer keeps up again."""
        rate = self.growth_per_s
        return rate is not None and -rate >= min_drain_per_s

    def describe(self) -> str:
        first = self.samples[0]
        text = f"queue {self.queue}: {self.length} jobs (max {self.max_backlog})"
        if len(self.samples) > 1:
            text += (f", {first.length} -> {self.length} over {_seconds(first, self.samples[-1]):.1f} s: "
                     f"{describe_rate(self.growth_per_s)} (LLEN samples: {describe_samples(self.samples)})")
        return text


# --------------------------------------------------------------------------- reading


def _llen(client: redis.Redis, key: str, label: str) -> BacklogSample:
    try:
        length = client.llen(key)
    except redis.ResponseError as exc:
        raise ConfigurationError(
            label, f"LLEN failed: {exc}", f"{key!r} to be a Redis list",
            "check app.queue.key in the inventory: it must name the list the service pushes jobs to",
        ) from None
    except redis.RedisError as exc:
        raise TargetUnreachableError(
            label, f"LLEN did not answer ({type(exc).__name__}: {exc})", "the queue's Redis to answer",
            "check the queue's Redis (redis-down runbook) and rerun this runbook",
        ) from None
    return BacklogSample(at=_now(), length=int(length))


def _sample(target: Target, count: int, interval_s: float) -> list[BacklogSample]:
    spec, label = queue_spec(target), queue_label(target)
    client = redis_client(queue_redis(target))
    try:
        samples = [_llen(client, spec.key, label)]
        while len(samples) < count:
            time.sleep(interval_s)
            samples.append(_llen(client, spec.key, label))
    finally:
        client.close()
    return samples


@read_only_task
def read_queue_backlog(target: Target) -> QueueBacklog:
    """Runbook 002 "indexer lag": how many jobs wait in the queue now (one ``LLEN``)."""
    spec = queue_spec(target)
    return QueueBacklog(queue=queue_label(target), max_backlog=spec.max_backlog, samples=_sample(target, 1, 0))


@read_only_task
def sample_backlog(target: Target, samples: int = 4, interval_s: float = 1.0) -> QueueBacklog:
    """Runbook 002 "indexer lag": ``LLEN`` ``samples`` times, ``interval_s`` apart, and the trend:
    a stuck consumer shows as a backlog growing at the producers' rate."""
    spec = queue_spec(target)
    return QueueBacklog(queue=queue_label(target), max_backlog=spec.max_backlog,
                        samples=_sample(target, max(samples, 2), interval_s))


# --------------------------------------------------------------------------- verify


class DrainCheck(BaseModel):
    """After a fix: did the backlog drain fast enough and stay down? (samples kept)."""

    queue: str
    max_backlog: int
    min_drain_per_s: float
    max_growth_per_s: float
    baseline: BacklogSample  # the last reading before the fix
    since: datetime  # when the fix started: the drain is timed from here
    samples: list[BacklogSample] = []  # every reading after the fix
    drained_at: int | None = None  # index in samples of the first one under max_backlog
    drain_per_s: float | None = None  # (baseline - that sample) / seconds since the fix started
    hold_growth_per_s: float | None = None  # trend while it should stay down
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def trend_per_s(self) -> float | None:
        """The trend of every reading after the fix (positive: growing)."""
        return growth_per_s(self.samples)

    def summary(self) -> str:
        """One short line for a closing summary."""
        if not self.ok or self.drain_per_s is None:
            return f"queue {self.queue} NOT drained: {self.failure}"
        return (f"queue {self.queue} drained from {self.baseline.length} to {self.samples[-1].length} jobs at "
                f"least {self.drain_per_s:.1f} jobs/s, then {describe_rate(self.hold_growth_per_s)}")

    def describe(self) -> str:
        head = f"queue {self.queue}: " + ("drained" if self.ok else f"NOT drained ({self.failure})")
        parts = [head, f"before the fix {self.baseline.length} jobs"]
        if self.drained_at is not None:
            s = self.samples[self.drained_at]
            parts.append(f"under {self.max_backlog} ({s.length} jobs) "
                         f"{(s.at - self.since).total_seconds():.1f} s after the fix started")
        if self.drain_per_s is not None:
            parts.append(f"measured drain rate at least {self.drain_per_s:.1f} jobs/s "
                         f"(required {self.min_drain_per_s:g})")
        if self.hold_growth_per_s is not None:
            parts.append(f"then {describe_rate(self.hold_growth_per_s)} while it had to stay down "
                         f"(allowed growth {self.max_growth_per_s:g} jobs/s)")
        elif self.drained_at is None and self.samples:
            parts.append(f"after the fix {describe_rate(self.trend_per_s)}")
        parts.append(f"LLEN samples after the fix: {describe_samples(self.samples)}")
        return "; ".join(parts)


@read_only_task
def wait_until_backlog_drains(target: Target, baseline: BacklogSample, since: datetime, deadline_s: float = 60.0,
                              hold_s: float = 10.0, interval_s: float = 1.0,
                              max_growth_per_s: float = 1.0) -> DrainCheck:
    """Runbook 002 "if still lagging, may need to catch up" and 004 "monitor for stability".

    ``LLEN`` every ``interval_s``: within ``deadline_s`` the backlog must get under
    ``max_backlog``; the drain rate, (``baseline`` - that reading) / the seconds since ``since``
    (when the fix started), must be at least ``min_drain_per_s`` - a lower bound of the real
    rate, as the backlog only grew while the consumer was stuck and being restarted; then for
    ``hold_s`` it must stay under ``max_backlog`` and not grow faster than ``max_growth_per_s``
    (a consumer that keeps up holds it flat; one stuck again lets it grow at the producers' rate).
    """
    spec = queue_spec(target)
    label = queue_label(target)
    check = DrainCheck(queue=label, max_backlog=spec.max_backlog, min_drain_per_s=spec.min_drain_per_s,
                       max_growth_per_s=max_growth_per_s, baseline=baseline, since=since)
    client = redis_client(queue_redis(target))
    try:
        _drain(check, lambda: _llen(client, spec.key, label), deadline_s, hold_s, interval_s)
    finally:
        client.close()
    return check


def _drain(check: DrainCheck, read, deadline_s: float, hold_s: float, interval_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:  # 1. under max_backlog within the deadline
        sample = read()
        check.samples.append(sample)
        if sample.length < check.max_backlog:
            break
        if time.monotonic() >= deadline:
            check.failure = (f"still {sample.length} jobs after {deadline_s:g} s (max {check.max_backlog}), "
                             f"{describe_rate(check.trend_per_s)}")
            return
        time.sleep(interval_s)
    check.drained_at = len(check.samples) - 1
    elapsed = max((sample.at - check.since).total_seconds(), 1e-3)
    check.drain_per_s = (check.baseline.length - sample.length) / elapsed
    if check.drain_per_s < check.min_drain_per_s:
        check.failure = (f"the backlog shrank at {check.drain_per_s:.2f} jobs/s, slower than the required "
                         f"{check.min_drain_per_s:g} jobs/s")
        return
    hold = [sample]  # 2. stays down, not growing, for hold_s
    end = time.monotonic() + hold_s
    while time.monotonic() < end or len(hold) < 3:
        time.sleep(interval_s)
        sample = read()
        check.samples.append(sample)
        hold.append(sample)
        if sample.length >= check.max_backlog:
            check.hold_growth_per_s = growth_per_s(hold)
            check.failure = (f"it drained, then grew back to {sample.length} jobs within "
                             f"{_seconds(hold[0], sample):.1f} s: {describe_rate(check.hold_growth_per_s)}")
            return
    check.hold_growth_per_s = growth_per_s(hold)
    if check.hold_growth_per_s is not None and check.hold_growth_per_s > check.max_growth_per_s:
        check.failure = (f"it drained, then grew again: {describe_rate(check.hold_growth_per_s)} over "
                         f"{_seconds(hold[0], hold[-1]):.1f} s (allowed {check.max_growth_per_s:g} jobs/s)")
