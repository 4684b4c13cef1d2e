"""Docker: container state, logs, restart, roll back to the previous image.

The previous image of a container is kept in its label ``runbooks.previous-image``
(set by whoever deploys it, the lab included); a rollback recreates the container
from that image and records the image it replaced, so the rollback can be undone.
"""

from __future__ import annotations

import re
from datetime import datetime

import docker
import docker.errors
from docker.models.containers import Container
from prefect import get_run_logger
from pydantic import BaseModel

from incident.errors import (
    ActionFailedError,
    ConfigurationError,
    ContainerNotFoundError,
    DockerEngineUnreachableError,
)
from incident.inventory import DockerHost, Target
from tasks.common import ActionResult, changing_task, read_only_task
from tasks.http_checks import check_health

PREVIOUS_IMAGE_LABEL = "runbooks.previous-image"


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
    finished_at: datetime | None
    error: str | None
    previous_image: str | None

    def describe(self) -> str:
        parts = [f"container {self.name} ({self.image}) is {self.status}"]
        if not self.running:
            parts.append(f"exit code {self.exit_code}")
        if self.oom_killed:
            parts.append("OOM-killed")
        parts.append(f"restart count {self.restart_count}")
        if self.error:
            parts.append(f"error: {self.error}")
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


def _require_docker(target: Target) -> tuple[DockerHost, str]:
    if target.docker is None or not target.service.container:
        raise ConfigurationError(
            target.name, "no container/docker_host in the inventory", "a containerised service",
            "add container and docker_host to the service in the inventory",
        )
    return target.docker, target.service.container


def _get_container(client: docker.DockerClient, name: str, host: DockerHost) -> Container:
    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        raise ContainerNotFoundError(
            f"{name}@{host.base_url}", "no such container", "the service's container to exist",
            "check the container name in the inventory; redeploy the service if it was removed",
        ) from None


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
        finished_at=_parse_time(state.get("FinishedAt")),
        error=state.get("Error") or None,
        previous_image=(container.labels or {}).get(PREVIOUS_IMAGE_LABEL),
    )


@read_only_task
def inspect_container(target: Target) -> ContainerState:
    """Runbook: `docker-compose ps` / `systemctl status`: state, exit code, OOM, restarts."""
    host, name = _require_docker(target)
    return _state_of(_get_container(docker_client(host), name, host))


@read_only_task
def read_container_logs(target: Target, lines: int = 50) -> list[str]:
    """Runbook: `docker-compose logs` / `journalctl -n`: the last log lines."""
    host, name = _require_docker(target)
    container = _get_container(docker_client(host), name, host)
    raw = container.logs(tail=lines, stdout=True, stderr=True, timestamps=False)
    return raw.decode("utf-8", errors="replace").splitlines()[-lines:]


@changing_task
def restart_container(target: Target, stop_timeout_s: int = 10) -> ActionResult:
    """Runbook: `docker-compose restart <service>`. Says "already fine" if running and healthy."""
    host, name = _require_docker(target)
    container = _get_container(docker_client(host), name, host)
    before = _state_of(container)
    if before.running and check_health(target.service.health_url).healthy:
        return ActionResult(action="restart_container", target=name, changed=False,
                            detail=f"already fine: {before.describe()} and healthy")
    get_run_logger().info("Restarting %s (%s)", name, before.describe())
    try:
        container.restart(timeout=stop_timeout_s)
    except docker.errors.APIError as exc:
        raise ActionFailedError(
            name, f"docker restart failed: {exc.explanation or exc}", "the container to restart",
            "inspect the container with `docker inspect` and its logs",
        ) from None
    after = _state_of(container)
    return ActionResult(action="restart_container", target=name, changed=True,
                        detail=f"restarted; now {after.describe()}")


@changing_task
def rollback_container(target: Target, expected_from: str) -> ActionResult:
    """Runbook: "rollback to last known good version": recreate from the previous image.

    ``expected_from`` is the image the approved plan rolls away from: if the container
    already runs something else (someone rolled back already), nothing is done.
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
            name, f"no {PREVIOUS_IMAGE_LABEL} label on the container", "a recorded previous image",
            "roll back by hand to a known good image and set the label when deploying",
        )
    try:
        client.images.get(previous)
    except docker.errors.ImageNotFound:
        raise ActionFailedError(
            name, f"previous image {previous} is not on the Docker host", "the image to be present",
            f"load or pull {previous} on the host, then rerun the runbook",
        ) from None
    attrs = container.attrs
    image_env = set(client.images.get(state.image).attrs["Config"].get("Env") or [])
    env = [e for e in (attrs["Config"].get("Env") or []) if e not in image_env]
    labels = dict(attrs["Config"].get("Labels") or {})
    labels[PREVIOUS_IMAGE_LABEL] = state.image
    host_config = attrs["HostConfig"]
    get_run_logger().info("Rolling %s back from %s to %s", name, state.image, previous)
    container.remove(force=True)
    try:
        new = client.containers.run(
            previous,
            name=name,
            detach=True,
            environment=env,
            labels=labels,
            network_mode=host_config.get("NetworkMode") or None,
            volumes=host_config.get("Binds") or None,
            restart_policy=host_config.get("RestartPolicy") or None,
        )
    except docker.errors.APIError as exc:
        raise ActionFailedError(
            name, f"could not start {previous}: {exc.explanation or exc}",
            "the previous image to start", f"start it by hand: docker run --name {name} {previous}",
        ) from None
    return ActionResult(action="rollback_container", target=name, changed=True,
                        detail=f"recreated from {previous} (was {state.image}); "
                               f"now {_state_of(new).describe()}")
