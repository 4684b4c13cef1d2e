"""Docker: container state, logs, restart, roll back to the previous image.

The previous image of a container is kept in its label ``runbooks.previous-image``
(set by whoever deploys it, the lab included). A rollback resolves that reference to the
image the engine holds (its ID, or its registry digest), recreates the container from it
with the container's whole configuration (``Config``, ``HostConfig``, networks; only the
image and what came from the image change), and records the image it replaced in the same
label, so the rollback can be undone. It is atomic: the old container is renamed
``<name>-rollback-old-<UTC time>`` and stopped, and removed only once the new one is
healthy; otherwise the new one is removed and the old one put back as it was.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import docker
import docker.errors
import requests
from docker.models.containers import Container
from docker.models.images import Image
from prefect import get_run_logger
from pydantic import BaseModel

from incident.errors import (
    ActionFailedError,
    ConfigurationError,
    ContainerNotFoundError,
    DockerEngineUnreachableError,
    RunbookError,
)
from incident.inventory import DockerHost, Target
from tasks.common import ActionResult, changing_task, count_consecutive, read_only_task
from tasks.http_checks import HealthProbe, HealthStreak, check_health

PREVIOUS_IMAGE_LABEL = "runbooks.previous-image"
#: a rollback parks the old container as ``<name><PARKED_INFIX><UTC time>`` until the new one is healthy
PARKED_INFIX = "-rollback-old-"
#: what the Docker SDK raises when the engine refuses a call or does not answer in time
ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


class ContainerState(BaseModel):
    name: str
    id: str
    image: str
    status: str
    running: bool
    exit_code: int | None
    oom_killed: bool
    restart_count: int
    started_at: datetime | None
    created_at: datetime | None = None  # when the container was created (a deploy recreates it)
    finished_at: datetime | None
    error: str | None
    previous_image: str | None
    parked: list[str] = []  # old containers a rollback set aside and left (a run stopped half-way)

    def describe(self) -> str:
        parts = [f"container {self.name} ({self.image}) is {self.status}"]
        if not self.running:
            parts.append(f"exit code {self.exit_code}")
        if self.oom_killed:
            parts.append("OOM-killed")
        parts.append(f"restart count {self.restart_count}")
        if self.error:
            parts.append(f"error: {self.error}")
        if self.parked:
            parts.append(f"a rollback stopped half-way left the old container {', '.join(self.parked)}: "
                         "check it with `docker inspect`, then remove it (`docker rm`)")
        return ", ".join(parts)


def docker_client(host: DockerHost) -> docker.DockerClient:
    """The one Docker client of the project: explicit timeout, engine answered a ping."""
    try:
        client = docker.DockerClient(base_url=host.base_url, timeout=host.timeout_s)
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerEngineUnreachableError(
            host.base_url, f"Docker engine did not answer ({type(exc).__name__})",
            "a running Docker engine", "check that dockerd is running on that host "
            "(lab: `make status`) and that the socket path in the inventory is right",
        ) from None
    return client


def _require_docker(target: Target, container: str | None = None) -> tuple[DockerHost, str]:
    """The service's Docker host and ``container`` (default: the service's own container)."""
    name = container or target.service.container
    if target.docker is None or not name:
        raise ConfigurationError(
            target.name, "no container/docker_host in the inventory", "a containerised service",
            "add container and docker_host to the service in the inventory",
        )
    return target.docker, name


def _get_container(client: docker.DockerClient, name: str, host: DockerHost) -> Container:
    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        parked = parked_containers(client, name)
    if parked:
        raise ContainerNotFoundError(
            f"{name}@{host.base_url}", f"no such container, but a rollback left {', '.join(parked)}",
            "the service's container to exist",
            f"a rollback stopped half-way: check {parked[-1]} with `docker inspect`, then put it back "
            f"(`docker rename {parked[-1]} {name} && docker start {name}`) or remove it",
        )
    raise ContainerNotFoundError(
        f"{name}@{host.base_url}", "no such container", "the service's container to exist",
        "check the container name in the inventory; redeploy the service if it was removed",
    ) from None


def parked_containers(client: docker.DockerClient, name: str) -> list[str]:
    """Names of old containers a rollback of ``name`` renamed and left (oldest first)."""
    prefix = f"{name}{PARKED_INFIX}"
    found = client.containers.list(all=True, filters={"name": prefix})
    return sorted(c.name for c in found if c.name.startswith(prefix))


def _parse_time(value: str | None) -> datetime | None:
    """Docker's RFC 3339 times carry nanoseconds; Python keeps microseconds."""
    if not value or value.startswith("0001-01-01"):
        return None
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", value).replace("Z", "+00:00"))


def _state_of(container: Container) -> ContainerState:
    container.reload()
    state = container.attrs["State"]
    tags = container.image.tags if container.image else []
    return ContainerState(
        name=container.name,
        id=container.short_id,
        image=tags[0] if tags else container.attrs["Config"]["Image"],
        status=state["Status"],
        running=bool(state["Running"]),
        exit_code=None if state["Running"] else state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")),
        restart_count=int(container.attrs.get("RestartCount", 0)),
        started_at=_parse_time(state.get("StartedAt")),
        created_at=_parse_time(container.attrs.get("Created")),
        finished_at=_parse_time(state.get("FinishedAt")),
        error=state.get("Error") or None,
        previous_image=(container.labels or {}).get(PREVIOUS_IMAGE_LABEL),
        parked=parked_containers(container.client, container.name),
    )


@read_only_task
def inspect_container(target: Target, container: str | None = None) -> ContainerState:
    """Runbook: `docker-compose ps` / `systemctl status`: state, exit code, OOM, restarts.
    ``container``: another container on the service's docker_host (default: the service's)."""
    host, name = _require_docker(target, container)
    return _state_of(_get_container(docker_client(host), name, host))


@read_only_task
def read_container_logs(target: Target, lines: int = 50, container: str | None = None) -> list[str]:
    """Runbook: `docker-compose logs` / `journalctl -n`: the last log lines.
    ``container``: another container on the service's docker_host (default: the service's)."""
    host, name = _require_docker(target, container)
    found = _get_container(docker_client(host), name, host)
    raw = found.logs(tail=lines, stdout=True, stderr=True, timestamps=False)
    return raw.decode("utf-8", errors="replace").splitlines()[-lines:]


@read_only_task
def wait_until_started(target: Target, deadline_s: float = 30.0, interval_s: float = 1.0) -> HealthStreak:
    """After a restart: probe the health URL until it answers, the deadline passes, or the
    container has exited again - a release that crashes at start never becomes healthy, so the
    runbook's next step (roll back) comes at once instead of after the whole deadline. A
    container that Docker is restarting (a restart policy) is waited for."""
    host, name = _require_docker(target)
    client = docker_client(host)
    url = target.service.health_url
    deadline = time.monotonic() + deadline_s
    probes = 0
    while True:
        last = check_health(url)
        probes += 1
        if last.healthy:
            return HealthStreak(healthy=True, consecutive=1, required=1, probes=probes, last=last)
        state = _get_container(client, name, host)
        state.reload()
        docker_state = state.attrs["State"]
        if not docker_state["Running"] and not docker_state.get("Restarting"):
            return HealthStreak(healthy=False, consecutive=0, required=1, probes=probes, last=last,
                                gave_up=f"{name} exited again (exit code {docker_state.get('ExitCode')})")
        if time.monotonic() >= deadline:
            return HealthStreak(healthy=False, consecutive=0, required=1, probes=probes, last=last)
        time.sleep(interval_s)


@changing_task
def restart_container(target: Target, stop_timeout_s: int = 10, container: str | None = None,
                      expected_started_at: datetime | None = None) -> ActionResult:
    """Runbook: `docker-compose restart <service>`. Says "already fine" if running and healthy.

    ``container``: another container on the service's docker_host (e.g. its queue consumer;
    default: the service's own). The service's health URL says nothing about another
    container, so that one is restarted whatever it shows: its caller judged it by what it
    serves (e.g. the queue's backlog, re-read just before).

    ``expected_started_at``: the start time of the container the approved plan restarts, for a
    problem its health check does not show (a memory leak, a spinning thread): the container is
    restarted healthy or not, unless it started after that time (someone restarted it since the
    diagnosis: "already done")."""
    host, name = _require_docker(target, container)
    own = name == target.service.container
    found = _get_container(docker_client(host), name, host)
    before = _state_of(found)
    if expected_started_at is not None:
        if before.running and before.started_at is not None and before.started_at > expected_started_at:
            return ActionResult(action="restart_container", target=name, changed=False,
                                detail=f"already done: it started again at {before.started_at:%H:%M:%S} UTC, "
                                       f"after the diagnosis (which saw it started at "
                                       f"{expected_started_at:%H:%M:%S} UTC); {before.describe()}")
    elif own and before.running and check_health(target.service.health_url).healthy:
        return ActionResult(action="restart_container", target=name, changed=False,
                            detail=f"already fine: {before.describe()} and healthy")
    get_run_logger().info("Restarting %s (%s)", name, before.describe())
    try:
        found.restart(timeout=stop_timeout_s)
    except docker.errors.APIError as exc:
        raise ActionFailedError(
            name, f"docker restart failed: {exc.explanation or exc}", "the container to restart",
            "inspect the container with `docker inspect` and its logs",
        ) from None
    after = _state_of(found)
    return ActionResult(action="restart_container", target=name, changed=True,
                        detail=f"restarted; now {after.describe()}")


# --------------------------------------------------------------------------- rollback


class _StoppedForGood(Exception):
    """The container being checked exited and its restart policy will not start it again."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    if isinstance(exc, RunbookError):
        return exc.observed
    return f"{type(exc).__name__}: {exc}"


def _image_for_rollback(client: docker.DockerClient, reference: str, name: str) -> Image:
    """The image the label names, as this engine holds it: an error before anything is changed."""
    try:
        return client.images.get(reference)
    except docker.errors.ImageNotFound:
        raise ActionFailedError(
            name, f"{PREVIOUS_IMAGE_LABEL} names {reference}, which is not on the Docker host; nothing was changed",
            "the previous image to be present",
            f"load or pull {reference} on the host (or correct the label to an image it has), then rerun the runbook",
        ) from None
    except docker.errors.APIError as exc:  # e.g. an invalid reference format
        raise ActionFailedError(
            name, f"{PREVIOUS_IMAGE_LABEL} names {reference!r}, which the engine refuses ({_why(exc)}); "
            "nothing was changed", "an image reference such as repo:tag or repo@sha256:...",
            "correct the label of the container (redeploy it with the right previous image), then rerun",
        ) from None


def pinned_reference(image: Image, reference: str) -> str:
    """The exact image to create from: its registry digest in the label's repository if the engine
    knows one (``repo@sha256:...``), else its image ID (``sha256:...``). A tag may move; these do not."""
    repository = reference.split("@", 1)[0]
    if repository.rfind(":") > repository.rfind("/"):
        repository = repository[:repository.rfind(":")]
    for digest in image.attrs.get("RepoDigests") or []:
        if digest.split("@", 1)[0] == repository:
            return str(digest)
    return str(image.id)


def _link(link: str) -> str:
    """``docker inspect`` shows a link as ``/other:/name/alias``; creating a container takes ``other:alias``."""
    source, _, alias = link.partition(":")
    return f"{source.lstrip('/')}:{alias.rsplit('/', 1)[-1]}" if alias else source.lstrip("/")


def _keep_anonymous_volumes(attrs: dict[str, Any], host: dict[str, Any]) -> None:
    """Volumes nobody named (``-v /path``, ``--mount type=volume,dst=/path``, an image's VOLUME) are
    mounted by name in the new container, so their data stays with the service."""
    by_destination = {m["Destination"]: m for m in attrs.get("Mounts") or [] if m.get("Type") == "volume"}
    covered = {bind.split(":")[1] for bind in host.get("Binds") or [] if ":" in bind}
    covered |= set(host.get("Tmpfs") or {})
    for mount in host.get("Mounts") or []:
        covered.add(mount.get("Target"))
        if mount.get("Type") == "volume" and not mount.get("Source") and mount.get("Target") in by_destination:
            mount["Source"] = by_destination[mount["Target"]]["Name"]
    declared = attrs["Config"].get("Volumes") or {}  # the container's and its image's
    anonymous = [by_destination[d] for d in declared if d in by_destination and d not in covered]
    if anonymous:
        host["Binds"] = [*(host.get("Binds") or []),
                         *(f"{m['Name']}:{m['Destination']}" + ("" if m.get("RW", True) else ":ro") for m in anonymous)]


_ENDPOINT_SETTINGS = ("IPAMConfig", "Links", "Aliases", "DriverOpts", "MacAddress")


def recreate_spec(attrs: dict[str, Any], image_config: dict[str, Any], image: str,
                  labels: dict[str, str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """What recreates a container from ``image`` with its whole configuration: the body of
    ``POST /containers/create`` and the further networks to connect it to before it starts.

    ``attrs`` is the container's ``docker inspect``, ``image_config`` the ``Config`` of the image
    it runs. Everything the container sets is kept: ``HostConfig`` whole (ports, limits, mounts,
    capabilities, security options, restart policy...), user, command, entrypoint, working dir,
    exposed ports, env, labels, stop signal, health check, networks with their aliases and
    addresses. What it only inherited from the image it runs (that image's env, labels, command,
    user...) is left out, so the new image brings its own. ``labels`` are set on top.
    """
    config = copy.deepcopy(attrs["Config"])
    host = copy.deepcopy(attrs["HostConfig"])
    for key in ("User", "WorkingDir", "StopSignal", "Healthcheck", "Shell", "OnBuild", "ArgsEscaped"):
        if key in config and config[key] == image_config.get(key):
            del config[key]
    if config.get("Entrypoint") == image_config.get("Entrypoint"):
        config.pop("Entrypoint", None)
        if config.get("Cmd") == image_config.get("Cmd"):
            config.pop("Cmd", None)
    image_env = set(image_config.get("Env") or [])
    config["Env"] = [e for e in config.get("Env") or [] if e not in image_env]
    image_labels = image_config.get("Labels") or {}
    config["Labels"] = {k: v for k, v in (config.get("Labels") or {}).items()
                        if k not in image_labels or image_labels[k] != v} | labels
    for key in ("ExposedPorts", "Volumes"):
        inherited = image_config.get(key) or {}
        config[key] = {k: v for k, v in (config.get(key) or {}).items() if k not in inherited} or None
    mode = host.get("NetworkMode") or "default"
    if (config.get("Hostname") == attrs["Id"][:12] or mode == "host" or mode.startswith("container:")
            or host.get("UTSMode") == "host"):
        config.pop("Hostname", None)
    for key in ("Domainname", "MacAddress"):
        if not config.get(key):
            config.pop(key, None)
    config["Image"] = image
    if host.get("Links"):
        host["Links"] = [_link(link) for link in host["Links"]]
    _keep_anonymous_volumes(attrs, host)

    endpoints: dict[str, dict[str, Any]] = {}
    for network, settings in ((attrs.get("NetworkSettings") or {}).get("Networks") or {}).items():
        endpoint = {k: settings[k] for k in _ENDPOINT_SETTINGS if settings.get(k)}
        aliases = [a for a in endpoint.get("Aliases") or [] if a != attrs["Id"][:12]]
        endpoint.pop("Aliases", None)
        if aliases:
            endpoint["Aliases"] = aliases
        if endpoint.get("Links"):
            endpoint["Links"] = [_link(link) for link in endpoint["Links"]]
        endpoints[network] = endpoint
    primary = "bridge" if mode == "default" else mode
    body = {**config, "HostConfig": host}
    if primary in endpoints:  # creating takes one network on every API version; the others are connected
        body["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoints.pop(primary)}}
    return body, endpoints


def _connect(client: docker.DockerClient, container_id: str, network: str, endpoint: dict[str, Any]) -> None:
    ipam = endpoint.get("IPAMConfig") or {}
    client.api.connect_container_to_network(
        container_id, network, ipv4_address=ipam.get("IPv4Address") or None,
        ipv6_address=ipam.get("IPv6Address") or None, link_local_ips=ipam.get("LinkLocalIPs") or None,
        aliases=endpoint.get("Aliases"), links=endpoint.get("Links"), driver_opt=endpoint.get("DriverOpts"),
        mac_address=endpoint.get("MacAddress"),
    )


def _probe(container: Container, url: str) -> HealthProbe:
    container.reload()
    state = container.attrs["State"]
    policy = (container.attrs["HostConfig"].get("RestartPolicy") or {}).get("Name") or "no"
    if state["Status"] in ("exited", "dead") and policy == "no":
        raise _StoppedForGood(f"the container exited (exit code {state.get('ExitCode')})")
    return check_health(url)


def _wait_healthy(container: Container, url: str, consecutive: int, deadline_s: float,
                  interval_s: float) -> HealthStreak:
    """The flow's health check (``check_health`` in ``count_consecutive``) on one container;
    it gives up at once when that container has exited for good."""
    made: list[HealthProbe] = []

    def probe() -> HealthProbe:
        made.append(_probe(container, url))
        return made[-1]

    try:
        streak, probes, last = count_consecutive(probe, lambda p: p.healthy, consecutive, deadline_s, interval_s)
    except _StoppedForGood as stopped:
        last = HealthProbe(url=url, at=datetime.now(timezone.utc), healthy=False, error=str(stopped))
        return HealthStreak(healthy=False, consecutive=0, required=consecutive, probes=len(made) + 1, last=last)
    return HealthStreak(healthy=streak >= consecutive, consecutive=streak, required=consecutive,
                        probes=probes, last=last)


def _log_tail(container: Container, lines: int = 5) -> str:
    try:
        raw = container.logs(tail=lines, stdout=True, stderr=True, timestamps=False)
    except ENGINE_ERRORS as exc:
        return f"(its logs could not be read: {_why(exc)})"
    return " / ".join(raw.decode("utf-8", errors="replace").splitlines()[-lines:]) or "(no log lines)"


@dataclass
class _Swap:
    """A rollback under way: the old container parked under another name, the image going in."""

    client: docker.DockerClient
    target: Target
    name: str
    old: Container
    old_image: str
    parked: str
    image_id: str
    pin: str
    was_running: bool
    health_deadline_s: float
    probe_interval_s: float

    def undo(self, reason: str, new: Container | None, unhealthy: bool = False) -> ActionFailedError:
        """Put the old container back under its name, as it was; returns the error to raise,
        which says what failed, that the rollback was undone, and what to do next."""
        name, parked = self.name, self.parked
        manual = f"docker rm -f {name}; docker rename {parked} {name}" + (
            f"; docker start {name}" if self.was_running else "")
        try:
            if new is None:  # a create that failed to answer may still have made the container
                try:
                    squatter: Container | None = self.client.containers.get(name)
                except docker.errors.NotFound:
                    squatter = None
                if squatter is not None and squatter.id != self.old.id and squatter.attrs["Image"] == self.image_id:
                    new = squatter
            if new is not None:
                new.remove(force=True)
            self.old.rename(name)
            if self.was_running:
                self.old.start()
        except ENGINE_ERRORS as exc:
            return ActionFailedError(
                name, f"the rollback to {self.pin} failed ({reason}) and undoing it failed too ({_why(exc)}); "
                f"the old container ({self.old_image}) is {parked}"
                + ("" if new is None else f", the new one {new.short_id}"),
                f"{name} to run the previous image healthy, or the old container put back",
                f"put the old container back by hand: {manual}",
            )
        after = "stopped, as it was before"
        if self.was_running:
            back = _wait_healthy(self.old, self.target.service.health_url, 1, self.health_deadline_s,
                                 self.probe_interval_s)
            after = ("running again and healthy" if back.healthy
                     else f"running again but NOT healthy ({back.last.describe()})")
        return ActionFailedError(
            name, f"the rollback to {self.pin} failed ({reason}); the rollback was undone: {name} is the old "
            f"container ({self.old_image}) again, {after} (it was parked as {parked} meanwhile)",
            f"{name} to run the previous image healthy",
            f"the previous image is not a known good release here: read its log lines above, then roll "
            f"back by hand to an image known to work (and set {PREVIOUS_IMAGE_LABEL} to it), or fix forward"
            if unhealthy else "check the Docker engine and the error above (`docker ps -a`), then rerun the runbook",
        )


@changing_task
def rollback_container(target: Target, expected_from: str, healthy_probes: int = 3,
                       health_deadline_s: float = 30.0, probe_interval_s: float = 1.0,
                       stop_timeout_s: int = 10) -> ActionResult:
    """Runbook: "rollback to last known good version": recreate from the previous image.

    ``expected_from`` is the image the approved plan rolls away from: if the container
    already runs something else (someone rolled back already), nothing is done.

    The previous image is resolved and pinned (digest or ID) and the new container's
    configuration worked out before anything changes. Then: the old container is renamed
    ``<name>-rollback-old-<UTC time>`` and stopped; the new one is created under the name
    and started; once ``healthy_probes`` consecutive probes of the service's health URL
    pass (within ``health_deadline_s``) the old one is removed. Otherwise the new one is
    removed, the old one renamed back and started again if it ran, and the error says so.
    """
    host, name = _require_docker(target)
    client = docker_client(host)
    container = _get_container(client, name, host)
    state = _state_of(container)
    if state.image != expected_from:
        return ActionResult(action="rollback_container", target=name, changed=False,
                            detail=f"already done: container runs {state.image}, "
                                   f"not {expected_from} that the plan rolled back from")
    previous = state.previous_image
    if not previous:
        raise ActionFailedError(
            name, f"no {PREVIOUS_IMAGE_LABEL} label on the container; nothing was changed",
            "a recorded previous image",
            "roll back by hand to a known good image and set the label when deploying",
        )
    image = _image_for_rollback(client, previous, name)
    attrs = container.attrs
    if image.id == attrs["Image"]:
        raise ActionFailedError(
            name, f"{PREVIOUS_IMAGE_LABEL} names {previous} ({image.id}), the image the container runs "
            "already; nothing was changed", "an earlier image to roll back to",
            f"roll back by hand to an image known to work and set {PREVIOUS_IMAGE_LABEL} to it when deploying",
        )
    if attrs["HostConfig"].get("AutoRemove"):
        raise ActionFailedError(
            name, "the container runs with --rm (AutoRemove): once stopped it is deleted, so it cannot be "
            "kept to undo the rollback; nothing was changed", "a container that survives being stopped",
            f"roll back by hand (docker run ... {previous}), and deploy the service without --rm",
        )
    try:
        running_image = client.images.get(attrs["Image"]).attrs["Config"] or {}
    except docker.errors.ImageNotFound:
        raise ActionFailedError(
            name, f"the image it runs ({attrs['Image']}) is gone from the host, so what the container "
            "inherited from it cannot be told apart from its own configuration; nothing was changed",
            "the running image to be present", f"roll back by hand: recreate {name} from {previous}",
        ) from None
    pinned = pinned_reference(image, previous)
    body, more_networks = recreate_spec(attrs, running_image, pinned, {PREVIOUS_IMAGE_LABEL: state.image})
    parked = f"{name}{PARKED_INFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    pin = f"{previous} pinned as {pinned}" + ("" if pinned == image.id else f" (image ID {image.id})")
    logger = get_run_logger()
    logger.info("Rolling %s back from %s (%s) to %s; the old container is parked as %s until the new "
                "one is healthy", name, state.image, attrs["Image"], pin, parked)
    try:
        container.rename(parked)
    except ENGINE_ERRORS as exc:
        raise ActionFailedError(
            name, f"could not rename the container to {parked} ({_why(exc)}); nothing was changed",
            "the old container to be set aside", "check the engine (`docker ps -a`) and rerun the runbook",
        ) from None

    swap = _Swap(client, target, name, container, state.image, parked, image.id, pin, state.running,
                 health_deadline_s, probe_interval_s)
    new: Container | None = None
    try:
        container.stop(timeout=stop_timeout_s)
        new = client.containers.get(client.api.create_container_from_config(body, name=name)["Id"])
        for network, endpoint in more_networks.items():
            _connect(client, new.id, network, endpoint)
        new.start()
        health = _wait_healthy(new, target.service.health_url, healthy_probes, health_deadline_s, probe_interval_s)
    except Exception as exc:  # undone first, then raised with what happened
        raise swap.undo(_why(exc), new) from exc
    if not health.healthy:
        raise swap.undo(f"{name} from {pin} did not become healthy: {health.describe()}; "
                        f"its last log lines: {_log_tail(new)}", new, unhealthy=True)

    try:
        container.remove(force=True)  # its anonymous volumes stay: the new container mounts them
        old = f"the old container {parked} removed"
    except ENGINE_ERRORS as exc:
        logger.warning("Rolled back, but the old container %s could not be removed: %s", parked, _why(exc))
        old = f"the old container {parked} could NOT be removed ({_why(exc)}): remove it by hand"
    return ActionResult(action="rollback_container", target=name, changed=True,
                        detail=f"recreated with its whole configuration from {pin} (was {state.image}, "
                               f"{attrs['Image']}); {health.describe()}; {old}")
