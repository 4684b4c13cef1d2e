from __future__ import annotations

import re
import uuid

import docker.errors
import pytest
from docker.types import Mount, Ulimit
from prefect import flow

from incident.errors import ActionFailedError, ContainerNotFoundError, DockerEngineUnreachableError
from incident.inventory import DockerHost, Target, load_target
from lab.proc import free_port, wait_until
from tasks.containers import (
    PARKED_INFIX,
    PREVIOUS_IMAGE_LABEL,
    docker_client,
    inspect_container,
    read_container_logs,
    restart_container,
    rollback_container,
)
from tasks.http_checks import check_health

pytestmark = pytest.mark.lab


@flow
def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def test_inspect_reports_a_killed_container(prefect_api, healthy_web):
    healthy_web.kill_web()
    state = _call(inspect_container, load_target("web", healthy_web.inventory_path))
    assert not state.running and state.status == "exited"
    assert state.exit_code == 137 and not state.oom_killed
    assert state.previous_image == "lab-web:1.0" and state.image == "lab-web:1.1"


def test_logs_show_the_crash_of_a_broken_release(prefect_api, healthy_web):
    healthy_web.deploy_broken_web()
    lines = _call(read_container_logs, load_target("web", healthy_web.inventory_path), lines=5)
    assert any("FATAL" in line for line in lines)


def test_restart_of_a_healthy_container_is_already_fine(prefect_api, healthy_web):
    result = _call(restart_container, load_target("web", healthy_web.inventory_path))
    assert result.changed is False and result.detail.startswith("already fine")


def test_missing_container_and_dead_engine_are_clear(prefect_api, healthy_web, tmp_path):
    client = docker_client(load_target("web", healthy_web.inventory_path).docker)
    assert client.ping()
    with pytest.raises(DockerEngineUnreachableError, match="dockerd"):
        docker_client(DockerHost(base_url=f"unix://{tmp_path}/none.sock", timeout_s=1))
    target = load_target("web", healthy_web.inventory_path)
    gone = target.model_copy(update={"service": target.service.model_copy(update={"container": "nope"})})
    with pytest.raises(ContainerNotFoundError, match="no such container"):
        _call(inspect_container, gone)


# --------------------------------------------------------------------------- rollback
# Each rollback test runs its own labweb container on the lab's engine (host network, its own
# port, the lab's PostgreSQL and Redis), so the lab's web container is left alone.

TEST_PREFIX = "rb-rollback-test-"


class Service:
    def __init__(self, target: Target, container, port: int) -> None:
        self.target, self.container, self.port = target, container, port
        self.name: str = container.name

    @property
    def client(self):
        return self.container.client

    def current(self):
        return self.client.containers.get(self.name)

    def parked(self) -> list[str]:
        return [c.name for c in self.client.containers.list(all=True, filters={"name": self.name + PARKED_INFIX})]

    def health(self) -> int | None:
        return check_health(self.target.service.health_url, timeout_s=2).status_code


@pytest.fixture
def service(healthy_web):
    """make(previous, image, full, auto_remove) -> a running, healthy labweb container whose
    previous-image label is ``previous``, with a Target for it; all removed afterwards."""
    lab = healthy_web
    client = lab.docker_client()

    def make(previous: str, image: str = "lab-web:1.1", full: bool = False, auto_remove: bool = False) -> Service:
        name = f"{TEST_PREFIX}{uuid.uuid4().hex[:8]}"
        port = free_port()
        env = {"LABWEB_PORT": str(port), "LABWEB_PG": f"127.0.0.1:{lab.info.pg_port}",
               "LABWEB_REDIS": f"127.0.0.1:{lab.info.redis_port}",
               "LABWEB_UPSTREAM": f"127.0.0.1:{lab.info.upstream_port}", "EXTRA_SETTING": "kept"}
        labels = {PREVIOUS_IMAGE_LABEL: previous, "team": "sre"}
        extra: dict = {}
        host_extra: dict = {}
        if full:  # everything the old rollback dropped, and then some
            extra = dict(user="65534:65534", entrypoint=["/bin/sh", "-c"], command=["exec /labweb"],
                         working_dir="/tmp", ports=[8080], volumes=["/data"], stop_signal="SIGINT")
            host_extra = dict(
                mem_limit="64m", nano_cpus=500_000_000, pids_limit=64, tmpfs={"/scratch": "size=1m"},
                mounts=[Mount("/cache", None, type="volume")], cap_drop=["ALL"],
                security_opt=["no-new-privileges"], read_only=True, init=True, oom_score_adj=100,
                shm_size="16m", extra_hosts={"db.internal": "127.0.0.1"},
                ulimits=[Ulimit(name="nofile", soft=1024, hard=2048)],
                restart_policy={"Name": "on-failure", "MaximumRetryCount": 2})
        host_config = client.api.create_host_config(network_mode="host", auto_remove=auto_remove, **host_extra)
        if full:  # kept (and unused) by the engine on the host network; the SDK refuses to send it
            host_config["PortBindings"] = {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(free_port())}]}
        client.api.create_container(image, name=name, environment=env, labels=labels, host_config=host_config,
                                    **extra)
        container = client.containers.get(name)
        container.start()
        web = load_target("web", lab.inventory_path)
        target = web.model_copy(update={"service": web.service.model_copy(
            update={"container": name, "health_url": f"http://127.0.0.1:{port}/health"})})
        made = Service(target, container, port)
        assert wait_until(lambda: made.health() == 200, 20, 0.2), f"{name} did not become healthy"
        return made

    yield make
    for c in client.containers.list(all=True, filters={"name": TEST_PREFIX}):
        c.remove(force=True, v=True)
    client.close()


def test_rollback_keeps_the_whole_configuration_and_pins_the_image(prefect_api, service):
    svc = service("lab-web:1.0", full=True)
    old = svc.container.attrs
    previous_id = svc.client.images.get("lab-web:1.0").id

    result = _call(rollback_container, svc.target, expected_from="lab-web:1.1")

    assert result.changed
    assert f"lab-web:1.0 pinned as {previous_id}" in result.detail, "the tag and its digest belong in the record"
    assert re.search(rf"the old container {svc.name}{PARKED_INFIX}\d{{8}}T\d{{6}}Z removed", result.detail)
    new = svc.current()
    assert new.id != svc.container.id and new.status == "running" and svc.health() == 200
    with pytest.raises(docker.errors.NotFound):
        svc.client.containers.get(svc.container.id)
    assert svc.parked() == []
    assert new.attrs["Image"] == previous_id and new.attrs["Config"]["Image"] == previous_id

    config, host = new.attrs["Config"], new.attrs["HostConfig"]
    assert config["User"] == "65534:65534" and config["WorkingDir"] == "/tmp" and config["StopSignal"] == "SIGINT"
    assert config["Entrypoint"] == ["/bin/sh", "-c"] and config["Cmd"] == ["exec /labweb"]
    assert config["ExposedPorts"] == {"8080/tcp": {}}
    assert host["PortBindings"] == old["HostConfig"]["PortBindings"]
    assert host["Memory"] == 64 * 2**20 and host["NanoCpus"] == 500_000_000 and host["PidsLimit"] == 64
    assert host["Tmpfs"] == {"/scratch": "size=1m"} and host["ReadonlyRootfs"] and host["Init"]
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
    # all of HostConfig, not only what is listed above; anonymous volumes are mounted by name
    unchanged = {k: v for k, v in old["HostConfig"].items() if k not in ("Binds", "Mounts")}
    assert {k: v for k, v in host.items() if k not in ("Binds", "Mounts")} == unchanged

    def volumes(attrs: dict) -> dict[str, str]:
        return {m["Destination"]: m["Name"] for m in attrs["Mounts"] if m["Type"] == "volume"}

    assert volumes(new.attrs) == volumes(old) and set(volumes(old)) == {"/cache", "/data"}, "a volume's data was left"

    # the container's own env and labels are kept; what came from the image it ran is not
    assert {f"LABWEB_PORT={svc.port}", "EXTRA_SETTING=kept", "LABWEB_VERSION=1.0"} <= set(config["Env"])
    assert "LABWEB_VERSION=1.1" not in config["Env"]
    assert config["Labels"] == {PREVIOUS_IMAGE_LABEL: "lab-web:1.1", "team": "sre"}


def test_a_rollback_to_an_image_that_does_not_become_healthy_is_undone(prefect_api, service):
    svc = service("lab-web:broken")
    old_id = svc.container.id

    with pytest.raises(ActionFailedError) as raised:
        _call(rollback_container, svc.target, expected_from="lab-web:1.1")

    message = str(raised.value)
    assert "lab-web:broken" in message and "did not become healthy" in message
    assert "FATAL" in message, "the failed release's log lines belong in the error"
    assert "the rollback was undone" in message and "running again and healthy" in message
    assert f"parked as {svc.name}{PARKED_INFIX}" in message
    assert "roll back by hand" in message  # the next step
    back = svc.current()
    assert back.id == old_id and back.status == "running" and svc.health() == 200
    assert back.labels[PREVIOUS_IMAGE_LABEL] == "lab-web:broken"
    assert svc.parked() == []
    broken = svc.client.images.get("lab-web:broken").id
    assert not svc.client.containers.list(all=True, filters={"ancestor": broken, "name": TEST_PREFIX})


@pytest.mark.parametrize("previous, auto_remove, says", [
    ("lab-web:no-such-tag", False, "which is not on the Docker host"),
    ("Not A Valid Reference", False, "which the engine refuses"),
    ("lab-web:1.1", False, "the image the container runs already"),
    ("lab-web:1.0", True, "AutoRemove"),
])
def test_a_rollback_that_cannot_be_done_safely_changes_nothing(prefect_api, service, previous, auto_remove, says):
    svc = service(previous, auto_remove=auto_remove)
    with pytest.raises(ActionFailedError, match=says) as raised:
        _call(rollback_container, svc.target, expected_from="lab-web:1.1")
    assert "nothing was changed" in str(raised.value)
    current = svc.current()
    assert current.id == svc.container.id and current.status == "running" and svc.health() == 200
    assert svc.parked() == []


def test_a_rollback_already_done_is_not_done_twice(prefect_api, service):
    svc = service("lab-web:1.0")
    result = _call(rollback_container, svc.target, expected_from="lab-web:broken")
    assert result.changed is False and result.detail.startswith("already done")
    assert svc.current().id == svc.container.id


def test_what_a_rollback_stopped_half_way_leaves_is_named(prefect_api, service):
    svc = service("lab-web:1.0")
    parked = f"{svc.name}{PARKED_INFIX}20260101T000000Z"
    # a run killed once the new container ran: the old one is left, parked
    svc.client.containers.create("lab-web:1.1", name=parked, network_mode="none")
    state = _call(inspect_container, svc.target)
    assert state.parked == [parked] and f"left the old container {parked}" in state.describe()
    # a run killed between "park the old one" and "create the new one": nothing has the name
    svc.client.containers.get(parked).remove()
    svc.container.rename(parked)
    assert svc.parked() == [parked]
    with pytest.raises(ContainerNotFoundError, match=f"docker rename {parked} {svc.name}"):
        _call(inspect_container, svc.target)
