from __future__ import annotations

import pytest
from prefect import flow

from incident.errors import ContainerNotFoundError, DockerEngineUnreachableError
from incident.inventory import DockerHost, load_target
from tasks.containers import docker_client, inspect_container, read_container_logs, restart_container

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
