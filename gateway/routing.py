"""Routes as data (routes.yaml): alert -> scenario (Prefect deployment) + target service.

First matching rule wins. Every alert gets a :class:`RouteDecision`; an alert no rule
matches, or whose target cannot be filled in, has ``routed=False`` and a reason.
The file format is documented at the top of routes.yaml.

Targets are checked at the door, because they come from the alert (a label is whatever
the sender put there): the rendered target must be a plain service name, accepted by the
rule (its ``sources`` and ``targets``, when listed) and a service of the inventory
(``RUNBOOKS_INVENTORY``). Otherwise the alert is unrouted with the reason and no run starts.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import RoutesFileError
from gateway.models import Alert, Severity, Source
from incident.errors import ConfigurationError
from incident.inventory import Inventory, load_inventory

REGEX_PREFIX = "=~"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_FIELDS = ("service", "source", "fingerprint")
#: what a rendered target may look like: a service name, never shell, paths or spaces
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Strict):
    source: Source | list[Source] | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _regexes_compile(cls, labels: dict[str, str]) -> dict[str, str]:
        for name, pattern in labels.items():
            if pattern.startswith(REGEX_PREFIX):
                try:
                    re.compile(pattern[len(REGEX_PREFIX):])
                except re.error as exc:
                    raise ValueError(f"label {name}: invalid regex {pattern!r}: {exc}") from exc
        return labels


class Route(_Strict):
    name: str = Field(min_length=1)
    match: Match
    scenario: str = Field(pattern=r"^[^/\s]+/[^/\s]+$",
                          description="<flow name>/<deployment name>")
    target: str = Field(min_length=1)
    target_default: str | None = None
    severity: Severity | None = None
    sources: list[Source] | None = Field(
        default=None, description="Sources this rule accepts alerts from; another source that "
        "matches is unrouted (with the reason), not passed to a later rule. Omitted: any.")
    targets: list[str] | None = Field(
        default=None, description="Targets this rule may start its scenario on: names, or "
        "'=~<regex>' (whole name). Omitted: any service of the inventory.")

    @field_validator("target")
    @classmethod
    def _placeholders_known(cls, target: str) -> str:
        for ref in _PLACEHOLDER.findall(target):
            if ref not in _FIELDS and not re.fullmatch(r"(labels|annotations)\.[^.{}]+", ref):
                raise ValueError(f"unknown placeholder {{{ref}}}; use {{labels.NAME}}, "
                                 "{annotations.NAME}, {service}, {source} or {fingerprint}")
        return target

    @field_validator("target_default")
    @classmethod
    def _default_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and not TARGET_NAME.fullmatch(value):
            raise ValueError(f"target_default {value!r} is not a service name")
        return value

    @field_validator("targets")
    @classmethod
    def _targets_valid(cls, targets: list[str] | None) -> list[str] | None:
        for entry in targets or []:
            if entry.startswith(REGEX_PREFIX):
                try:
                    re.compile(entry[len(REGEX_PREFIX):])
                except re.error as exc:
                    raise ValueError(f"targets: invalid regex {entry!r}: {exc}") from exc
            elif not TARGET_NAME.fullmatch(entry):
                raise ValueError(f"targets: {entry!r} is not a service name")
        return targets


class RoutesFile(_Strict):
    routes: list[Route]


class RouteDecision(_Strict):
    """What to do with one alert. ``routed=False`` always comes with a reason."""

    routed: bool
    reason: str
    rule: str | None = None
    scenario: str | None = None
    target: str | None = None
    severity: Severity
    source: Source
    status: str
    fingerprint: str
    episode_key: str
    dedup_key: str


class InventoryTargets:
    """The services of the inventory file, re-read when the file changes.

    ``path=None``: the inventory of the settings (``RUNBOOKS_INVENTORY``), looked up at
    each check, so that a gateway started before the lab wrote its inventory finds it.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._cached: tuple[Path, int, int, Inventory] | None = None

    @property
    def path(self) -> Path:
        from incident.settings import get_settings

        return self._path or get_settings().inventory_path

    def inventory(self) -> Inventory:
        """Raises ConfigurationError (missing or invalid file) with what to do."""
        path = self.path
        try:
            st = os.stat(path)
        except OSError:
            return load_inventory(path)  # raises the inventory's own, explained error
        with self._lock:  # one reader parses a changed file; concurrent deliveries wait for it
            if self._cached and self._cached[:3] == (path, st.st_mtime_ns, st.st_size):
                return self._cached[3]
            inventory = load_inventory(path)
            self._cached = (path, st.st_mtime_ns, st.st_size, inventory)
        return inventory


class Router:
    def __init__(self, routes: Iterable[Route], inventory: Path | InventoryTargets | None = None) -> None:
        self.routes = list(routes)
        self.targets = inventory if isinstance(inventory, InventoryTargets) else InventoryTargets(inventory)

    @classmethod
    def from_yaml(cls, text: str, origin: str = "<routes>",
                  inventory: Path | InventoryTargets | None = None) -> Router:
        try:
            doc: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RoutesFileError(f"{origin} is not valid YAML: {exc}") from exc
        try:
            return cls(RoutesFile.model_validate(doc).routes, inventory)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise RoutesFileError(f"{origin} is invalid: {problems}") from exc

    @classmethod
    def from_file(cls, path: Path, inventory: Path | InventoryTargets | None = None) -> Router:
        """``inventory``: the inventory file targets are checked against (default: the
        settings' ``RUNBOOKS_INVENTORY``, read when alerts arrive)."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise RoutesFileError(
                f"cannot read routes file {path} ({exc.strerror}); set "
                "RUNBOOKS_GATEWAY_ROUTES_FILE or create it") from exc
        return cls.from_yaml(text, str(path), inventory)

    def route(self, alert: Alert) -> RouteDecision:
        for rule in self.routes:
            if not matches(rule.match, alert):
                continue
            target, missing = render_target(rule.target, alert)
            if missing and rule.target_default:
                target = rule.target_default
            elif missing:
                return _decision(alert, routed=False, rule=rule,
                                 reason=f"rule {rule.name!r} matched but the alert has no "
                                        f"{', '.join(missing)} for target {rule.target!r} and "
                                        "the rule has no target_default")
            refused = self.refusal(rule, alert, target)
            if refused:
                return _decision(alert, routed=False, rule=rule, reason=refused)
            return _decision(alert, routed=True, rule=rule, target=target,
                             reason=f"matched rule {rule.name!r}")
        return _decision(alert, routed=False, rule=None,
                         reason=f"no route matches (source={alert.source}, "
                                f"alertname={alert.labels.get('alertname', '')!r}); "
                                "add a rule to routes.yaml if it needs a runbook")

    def route_all(self, alerts: Iterable[Alert]) -> list[RouteDecision]:
        return [self.route(a) for a in alerts]

    def refusal(self, rule: Route, alert: Alert, target: str) -> str | None:
        """Why ``rule`` may not start its scenario on ``target`` for ``alert``; None if it may."""
        shown = target if len(target) <= 80 else target[:77] + "..."
        if rule.sources is not None and alert.source not in rule.sources:
            return (f"rule {rule.name!r} does not accept alerts from {alert.source} (its sources: "
                    f"{', '.join(rule.sources)}); no run started - add the source to the rule's "
                    "sources in routes.yaml if it may start this runbook")
        if not TARGET_NAME.fullmatch(target):
            return (f"rule {rule.name!r} rendered the target {shown!r}, which is not a service "
                    "name (letters, digits, '.', '_', '-'); no run started - check the alert's labels")
        if rule.targets is not None and not any(_accepts(entry, target) for entry in rule.targets):
            return (f"rule {rule.name!r} does not accept the target {shown!r} (its targets: "
                    f"{', '.join(rule.targets)}); no run started - add it to the rule's targets in "
                    "routes.yaml if this runbook may act on it")
        try:
            services = self.targets.inventory().services
        except ConfigurationError as exc:
            return (f"the inventory cannot be read, so the target {shown!r} cannot be checked: {exc}; "
                    "no run started - fix the inventory (RUNBOOKS_INVENTORY)")
        if target not in services:
            names = sorted(services)
            known = (", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
                     or "(none)")
            return (f"the target {shown!r} (rule {rule.name!r}) is not a service of the inventory "
                    f"{self.targets.path} (known: {known}); no run started - add the service to "
                    "the inventory, or fix the alert's labels")
        return None


def _accepts(entry: str, target: str) -> bool:
    if entry.startswith(REGEX_PREFIX):
        return re.fullmatch(entry[len(REGEX_PREFIX):], target) is not None
    return entry == target


def matches(match: Match, alert: Alert) -> bool:
    if match.source is not None:
        sources = match.source if isinstance(match.source, list) else [match.source]
        if alert.source not in sources:
            return False
    for name, expected in match.labels.items():
        value = alert.labels.get(name, "")
        if expected.startswith(REGEX_PREFIX):
            if re.fullmatch(expected[len(REGEX_PREFIX):], value) is None:
                return False
        elif value != expected:
            return False
    return True


def render_target(template: str, alert: Alert) -> tuple[str, list[str]]:
    """Fill placeholders; returns the text and the placeholders that had no value."""
    missing: list[str] = []

    def value(m: re.Match[str]) -> str:
        ref = m.group(1)
        kind, _, name = ref.partition(".")
        found: str | None
        if kind == "labels":
            found = alert.labels.get(name)
        elif kind == "annotations":
            found = alert.annotations.get(name)
        else:
            found = getattr(alert, ref)
        if not found:
            missing.append(ref)
            return ""
        return found

    return _PLACEHOLDER.sub(value, template), missing


def _decision(alert: Alert, *, routed: bool, rule: Route | None, reason: str,
              target: str | None = None) -> RouteDecision:
    return RouteDecision(
        routed=routed,
        reason=reason,
        rule=rule.name if rule else None,
        scenario=rule.scenario if (rule and routed) else None,
        target=target if routed else None,
        severity=(rule.severity if rule and rule.severity else alert.severity),
        source=alert.source,
        status=alert.status,
        fingerprint=alert.fingerprint,
        episode_key=alert.episode_key,
        dedup_key=alert.dedup_key,
    )
