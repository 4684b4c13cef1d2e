"""Redis tasks against the lab's real Redis (started and stopped by PID, over real SSH)."""

from __future__ import annotations

import shlex
import socket
import threading

import pytest
from prefect import flow

from incident.errors import ActionFailedError
from incident.inventory import load_target
from tasks.redis import inspect_redis, ping_redis, start_redis, status_command
from tasks.ssh_hosts import run_command

pytestmark = pytest.mark.lab


@flow
def _start(target):
    return start_redis(target)


@flow
def _inspect(target):
    return inspect_redis(target)


def _target(lab):
    return load_target("web", lab.inventory_path)


def test_status_command_is_the_start_commands_twin():
    assert status_command(["systemctl", "start", "redis-server"]) == ["systemctl", "status", "redis-server"]
    assert status_command(["/srv/redisctl", "start"]) == ["/srv/redisctl", "status"]
    assert status_command(["/etc/init.d/redis-server", "restart"]) is None
    assert status_command(None) is None


def test_inspect_reads_info_when_up_and_classifies_down(prefect_api, healthy_lab):
    lab = healthy_lab
    target = _target(lab)
    up = _inspect(target)
    assert up.answers and up.version and up.version[0].isdigit()
    assert up.role == "master" and up.run_id and up.uptime_s is not None and up.used_memory
    assert up.process_id == lab.read_pid("redis"), "Redis' pid is the one the lab's pidfile names"

    lab.inject("redis-stopped")
    down = _inspect(target)
    assert down.status == "down" and not down.answers and "refused" in down.detail.lower()
    lab.reset_fault("redis-stopped")


def test_start_twice_second_is_already_fine(prefect_api, healthy_lab):
    lab = healthy_lab
    target = _target(lab)
    lab.inject("redis-stopped")
    assert not lab.redis.answers()

    first = _start(target)
    assert first.changed, first.detail
    assert "exit 0" in first.detail and "answers PING" in first.detail
    assert lab.redis.answers()
    started = ping_redis(target.redis)
    assert lab.read_pid("redis") == started.process_id, "Lab.down() must find it by its pidfile"
    assert lab.status()["redis"] == "up"

    second = _start(target)
    assert not second.changed and second.detail.startswith("already fine"), second.detail
    again = ping_redis(target.redis)
    assert again.run_id == started.run_id, "a running Redis was restarted"


def test_start_command_is_idempotent_on_the_host(healthy_lab):
    """The lab's `redisctl start` (the inventory's start_command) is a no-op when Redis answers."""
    lab = healthy_lab
    target = _target(lab)
    before = ping_redis(target.redis)
    result = run_command(target.redis_host, list(target.redis.start_command))
    assert result.ok and "already running" in result.stdout, result
    assert ping_redis(target.redis).run_id == before.run_id


def test_the_ssh_command_is_sent_quoted(prefect_api, healthy_lab, tmp_path):
    lab = healthy_lab
    target = _target(lab)
    # a path the remote shell would split, and arguments it would run, were they not quoted
    odd_dir = tmp_path / "redis ctl; it's $(id)"
    odd_dir.mkdir()
    (odd_dir / "redisctl").symlink_to(lab.redis.ctl_path)
    marker = tmp_path / "INJECTED"
    argv = [str(odd_dir / "redisctl"), "start",
            f"$(touch {marker})", f"; touch {marker}", f"`touch {marker}`"]
    odd = target.model_copy(update={"redis": target.redis.model_copy(update={"start_command": argv})})

    lab.inject("redis-stopped")
    result = _start(odd)
    assert result.changed, result.detail
    assert shlex.join(argv) in result.detail, "the command sent is the shlex-quoted argv"
    assert lab.redis.answers()
    assert not marker.exists(), "the remote shell ran an argument: the command was not quoted"


def test_a_redis_that_runs_but_does_not_answer_is_not_started(prefect_api, healthy_lab, tmp_path):
    """Not down but hung (accepts, never replies): start_redis must not run anything."""
    lab = healthy_lab
    target = _target(lab)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accept and hold connections, never answer
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    marker = tmp_path / "started"
    hung = target.redis.model_copy(update={"port": listener.getsockname()[1], "timeout_s": 1.0,
                                           "start_command": ["touch", str(marker)]})
    try:
        with pytest.raises(ActionFailedError, match="not down but not answering") as err:
            _start(target.model_copy(update={"redis": hung}))
        assert "restart would likely fix it" in err.value.next_step
        assert not marker.exists(), "the start command ran against a Redis that was not down"
    finally:
        stop.set()
        thread.join(5)
        for s in [*held, listener]:
            s.close()
