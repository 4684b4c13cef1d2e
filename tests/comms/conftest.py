"""Fixtures of the notifier tests: notifiers configured against the fake providers
(``fake``, tests/conftest.py) from RUNBOOKS_* settings, as in production."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from comms import Message, Notifiers
from lab.saas import FakeProviders

OPENED = datetime(2025, 3, 4, 14, 0, tzinfo=timezone.utc)
#: fast retries for tests: the 429 test still waits its Retry-After of 1 s
FAST = {"RUNBOOKS_NOTIFY_BACKOFF_S": "0.05", "RUNBOOKS_NOTIFY_BUDGET_S": "5", "RUNBOOKS_NOTIFY_TIMEOUT_S": "2"}


@pytest.fixture
def notifiers(fake: FakeProviders, comms_env: Callable[[dict[str, str]], None]) -> Notifiers:
    comms_env({**fake.env(), **FAST})
    return Notifiers.from_settings()


@pytest.fixture
def message() -> Callable[..., Message]:
    """A message of the given kind about one incident (P0 service-down on web)."""
    defaults: dict[str, Any] = {
        "incident_id": "INC-20250304-5f3a9c1e", "scenario": "service-down", "target": "web",
        "environment": "production", "severity": "P0", "summary": "web is down: container lab-web exited",
        "impact": "checkout unavailable", "opened_at": OPENED, "run_url": "http://127.0.0.1:4200/runs/flow-run/1"}
    statuses = {"declared": "investigating", "acknowledged": "investigating", "update": "identified",
                "escalated": "fixing", "resolved": "resolved"}

    def make(kind: str, minutes: int = 5, **changes: Any) -> Message:
        at = OPENED + timedelta(minutes=minutes)
        fields = {**defaults, "kind": kind, "status": statuses[kind], "at": at,
                  "next_update_at": None if kind == "resolved" else at + timedelta(minutes=15)}
        return Message(**{**fields, **changes})
    return make
