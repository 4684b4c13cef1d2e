"""An in-memory intake for tests and local runs: records deliveries, dedups, routes."""

from __future__ import annotations

from typing import Any

from gateway.models import Alert, Delivery
from gateway.routing import RouteDecision, Router


class RecordingIntake:
    """Keeps everything it is given.

    Dedup rule: an alert whose source and ``dedup_key`` (episode key + state) were already
    accepted is a duplicate (a redelivery); a state change of the same episode is new.
    """

    def __init__(self, router: Router | None = None) -> None:
        self.router = router
        self.deliveries: list[tuple[Delivery, list[Alert]]] = []
        self.accepted: list[Alert] = []
        self.duplicates: list[Alert] = []
        self.decisions: list[RouteDecision] = []
        self._seen: set[str] = set()

    async def accept(self, alerts: list[Alert], delivery: Delivery) -> dict[str, Any]:
        self.deliveries.append((delivery, list(alerts)))
        new: list[Alert] = []
        for alert in alerts:
            key = f"{alert.source}|{alert.dedup_key}"
            if key in self._seen:
                self.duplicates.append(alert)
            else:
                self._seen.add(key)
                new.append(alert)
        self.accepted.extend(new)
        result: dict[str, Any] = {"accepted": len(new), "duplicates": len(alerts) - len(new)}
        if self.router is not None:
            decisions = self.router.route_all(new)
            self.decisions.extend(decisions)
            result["routes"] = [d.model_dump(mode="json") for d in decisions]
        return result
