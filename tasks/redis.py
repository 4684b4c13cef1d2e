"""Redis: the one client helper and the runbooks' Redis tasks.

Runbook 000 "Redis Connection Failures" (check Redis health, check its logs, restart
Redis if needed) and 004 "App will not start ... Redis connection failure"
(`redis-cli ping`, `docker-compose ps redis`):

- :func:`inspect_redis` - PING, then INFO (version, uptime, role, clients, memory) when it
  answers; a Redis that does not answer is an observation, classified (down, not
  answering, error reply, refused) because each calls for a different fix;
- :func:`read_redis_process` - the process on its host over SSH: the service manager's
  ``status`` (derived from the inventory's ``start_command``), which also shows log lines;
- :func:`wait_until_redis_answers` - N consecutive PINGs within a deadline;
- :func:`start_redis` (changing) - the inventory's ``start_command`` over SSH, only for a
  Redis that is down (never a restart of a running one); "already fine" when it answers.
"""

from __future__ import annotations

from typing import Literal

import redis
from pydantic import BaseModel
from redis.backoff import NoBackoff
from redis.retry import Retry

from incident.errors import ActionFailedError, ConfigurationError, TargetUnreachableError
from incident.inventory import RedisInstance, SshHost, Target
from tasks.common import ActionResult, DependencyCheck, changing_task, count_consecutive, read_only_task
from tasks.ssh_hosts import run_command

#: down: nothing listens (refused) - the case a start fixes; not answering: no reply in time
#: (hung, or the host is unreachable); error reply: it answers PING with an error (LOADING,
#: MISCONF, BUSY ...); refused: it rejects the runbook's credentials.
RedisStatus = Literal["answers", "down", "not answering", "error reply", "refused"]


def require_redis(target: Target) -> RedisInstance:
    if target.redis is None:
        raise ConfigurationError(target.name, "no redis in the inventory", "a Redis instance",
                                 "add redis to the service in the inventory")
    return target.redis


def address_of(instance: RedisInstance) -> str:
    return f"{instance.host}:{instance.port}"


def redis_label(target: Target) -> str:
    """How records name the service's Redis: ``redis <inventory name>``."""
    return f"redis {target.service.redis or address_of(require_redis(target))}"


def redis_client(instance: RedisInstance) -> redis.Redis:
    """The one Redis client of the project: timeouts on connect and on every command.

    No retries inside the client (redis-py 8 retries 3 times with backoff by default: ~5 s
    before a refused PING is reported): retrying is the task presets' decision."""
    return redis.Redis(
        host=instance.host, port=instance.port,
        password=instance.password.resolve().get_secret_value() if instance.password else None,
        socket_timeout=instance.timeout_s, socket_connect_timeout=instance.timeout_s,
        client_name="incident-runbooks", retry=Retry(NoBackoff(), 0),
    )


@read_only_task
def check_redis(target: Target) -> DependencyCheck | None:
    """Send PING (None if the service has no Redis). No answer is an observation, not an error."""
    r = target.redis
    if r is None:
        return None
    client = redis_client(r)
    try:
        client.ping()
    except redis.RedisError as exc:
        return DependencyCheck(name="redis", address=address_of(r), ok=False, detail=str(exc))
    finally:
        client.close()
    return DependencyCheck(name="redis", address=address_of(r), ok=True, detail="PONG")


# --------------------------------------------------------------------------- PING + INFO


class RedisState(BaseModel):
    """One look at Redis: PING, and what INFO says when it answers."""

    address: str
    status: RedisStatus
    detail: str
    version: str | None = None
    run_id: str | None = None
    process_id: int | None = None
    uptime_s: int | None = None
    role: str | None = None
    connected_clients: int | None = None
    used_memory: int | None = None
    used_memory_human: str | None = None

    @property
    def answers(self) -> bool:
        return self.status == "answers"

    def describe(self) -> str:
        if not self.answers:
            return f"{self.address} {self.status}: {self.detail}"
        return (f"{self.address} answers PING (Redis {self.version}, role {self.role}, pid "
                f"{self.process_id}, up {self.uptime_s} s, {self.connected_clients} clients, "
                f"{self.used_memory_human} used)")

    def restart_advice(self) -> str:
        """For a Redis that is not down but unhealthy: would a restart fix it?"""
        text = self.detail.upper()
        if self.status == "not answering":
            return ("it accepts connections or times out without replying: if its process runs it "
                    "is probably hung, and a restart would likely fix it - but a restart drops what "
                    "Redis holds in memory, so a human decides (this runbook only starts a stopped Redis)")
        if self.status == "refused":
            return ("it answers but refuses the runbook's credentials: a restart would not fix that; "
                    "check the password in the inventory and Redis' requirepass/ACL")
        if "LOADING" in text:
            return "it is loading its dataset: wait; a restart would only start the load again"
        if "MISCONF" in text:
            return ("it cannot persist its snapshot (MISCONF): fix the disk or dir it saves to; "
                    "a restart would not fix it and could lose data")
        if "BUSY" in text:
            return ("a script is running (BUSY): SCRIPT KILL or wait; a restart would lose what "
                    "Redis holds in memory")
        if "MASTERDOWN" in text:
            return "it is a replica whose master is down: fix the master; a restart would not fix it"
        return "a restart is not known to fix this error reply: a human must look"


def _classify(exc: redis.RedisError) -> RedisStatus:
    # order matters: BusyLoadingError and AuthenticationError are ConnectionErrors in redis-py
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return "refused"
    if isinstance(exc, (redis.BusyLoadingError, redis.ResponseError)):
        return "error reply"
    if isinstance(exc, redis.TimeoutError):
        return "not answering"
    if isinstance(exc, redis.ConnectionError):
        return "down"
    return "error reply"


def ping_redis(instance: RedisInstance) -> RedisState:
    """PING, then INFO if it answered (plain function used by the tasks)."""
    address = address_of(instance)
    client = redis_client(instance)
    try:
        try:
            client.ping()
        except redis.RedisError as exc:
            return RedisState(address=address, status=_classify(exc), detail=str(exc) or type(exc).__name__)
        try:
            info = client.info()
        except redis.RedisError as exc:  # INFO renamed or denied: PING is what counts
            return RedisState(address=address, status="answers", detail=f"PONG (INFO failed: {exc})")
    finally:
        client.close()

    def num(key: str) -> int | None:
        value = info.get(key)
        return int(value) if isinstance(value, (int, float)) else None

    return RedisState(
        address=address, status="answers", detail="PONG", version=str(info.get("redis_version")),
        run_id=info.get("run_id"), process_id=num("process_id"), uptime_s=num("uptime_in_seconds"),
        role=info.get("role"), connected_clients=num("connected_clients"),
        used_memory=num("used_memory"), used_memory_human=info.get("used_memory_human"),
    )


@read_only_task
def inspect_redis(target: Target) -> RedisState:
    """Runbook: `redis-cli ping`, then `redis-cli info` when it answers."""
    return ping_redis(require_redis(target))


# --------------------------------------------------------------------------- the process (SSH)


class RedisProcess(BaseModel):
    """What Redis' host says about the process (``<service manager> status``)."""

    host: str
    command: str
    exit_code: int | None = None
    output: str = ""
    error: str | None = None  # the host could not be asked

    @property
    def running(self) -> bool:
        return self.exit_code == 0

    def describe(self) -> str:
        if self.error:
            return f"`{self.command}` on {self.host} could not run: {self.error}"
        return f"`{self.command}` on {self.host} exited {self.exit_code}: {self.output or '(no output)'}"


def redis_host(target: Target) -> SshHost | None:
    return target.redis_host


def status_command(start_command: list[str] | None) -> list[str] | None:
    """The ``status`` twin of a start command: ``systemctl start redis-server`` ->
    ``systemctl status redis-server``, ``redisctl start`` -> ``redisctl status``."""
    if not start_command or "start" not in start_command:
        return None
    i = start_command.index("start")
    return [*start_command[:i], "status", *start_command[i + 1:]]


def process_command(instance: RedisInstance) -> list[str]:
    """How the runbook looks at the process: the status command, else ``ps`` by program name."""
    return status_command(instance.start_command) or ["ps", "-C", "redis-server", "-o", "pid=,etime=,args="]


def _last_lines(text: str, n: int = 12, width: int = 200) -> str:
    """The last ``n`` lines on one line (records are tables), each cut to ``width`` chars."""
    lines = [line.rstrip() for line in text.strip().splitlines()[-n:]]
    return " | ".join(line if len(line) <= width else line[:width] + "..." for line in lines)


def _where(host: SshHost) -> str:
    return f"{host.username}@{host.hostname}:{host.port}"


@read_only_task
def read_redis_process(target: Target) -> RedisProcess | None:
    """Runbook: "check Redis is running, check its logs" on its host over SSH
    (``systemctl status redis-server``). None when the inventory gives no host for Redis.

    A host that cannot be reached is an observation; a changed host key is an error."""
    instance = require_redis(target)
    host = redis_host(target)
    if host is None:
        return None
    argv = process_command(instance)
    try:
        result = run_command(host, argv, timeout_s=instance.timeout_s + 15)
    except TargetUnreachableError as exc:
        return RedisProcess(host=_where(host), command=" ".join(argv), error=exc.observed)
    return RedisProcess(host=_where(host), command=result.command, exit_code=result.exit_code,
                        output=_last_lines(result.stdout + "\n" + result.stderr))


# --------------------------------------------------------------------------- verify


class RedisStreak(BaseModel):
    """Result of waiting for N consecutive PING answers within a deadline."""

    answers: bool
    consecutive: int
    required: int
    checks: int
    last: RedisState

    def describe(self) -> str:
        verdict = "answers" if self.answers else "does NOT answer"
        return (f"Redis {verdict}: {self.consecutive}/{self.required} consecutive PINGs answered "
                f"after {self.checks} checks; last: {self.last.describe()}")


@read_only_task
def wait_until_redis_answers(target: Target, consecutive: int = 3, deadline_s: float = 30.0,
                             interval_s: float = 1.0) -> RedisStreak:
    """PING until ``consecutive`` answers in a row, or the deadline passes."""
    instance = require_redis(target)
    streak, checks, last = count_consecutive(lambda: ping_redis(instance), lambda s: s.answers,
                                             consecutive, deadline_s, interval_s)
    return RedisStreak(answers=streak >= consecutive, consecutive=streak, required=consecutive,
                       checks=checks, last=last)


# --------------------------------------------------------------------------- start (changing)


def start_command_of(target: Target) -> tuple[SshHost, list[str]] | None:
    """The host and argv that start the service's Redis, or None if the inventory lacks them."""
    instance = require_redis(target)
    host = redis_host(target)
    if host is None or not instance.start_command:
        return None
    return host, list(instance.start_command)


@changing_task
def start_redis(target: Target, timeout_s: float = 60.0) -> ActionResult:
    """Runbook: "restart Redis if needed" - run the inventory's ``start_command`` on Redis'
    host over SSH (quoted argv), for a Redis that is down.

    Re-checks first: a Redis that answers PING is "already fine" (not restarted); one that
    is not down but unhealthy (hung, error replies) is not this task's to touch. A start
    command that fails raises :class:`ActionFailedError` with its exit code and stderr."""
    instance = require_redis(target)
    label = redis_label(target)
    how = start_command_of(target)
    if how is None:
        raise ConfigurationError(label, "no ssh_host/start_command for this Redis in the inventory",
                                 "how to start it",
                                 "add ssh_host and start_command to the inventory's redis entry")
    host, argv = how
    before = ping_redis(instance)
    if before.answers:
        return ActionResult(action="start_redis", target=label, changed=False,
                            detail=f"already fine: {before.describe()}; not started")
    if before.status != "down":
        raise ActionFailedError(label, f"Redis is not down but {before.status}: {before.detail}",
                                "a stopped Redis (nothing listening) for start_redis",
                                f"a human decides: {before.restart_advice()}")
    result = run_command(host, argv, timeout_s=timeout_s)
    if not result.ok:
        raise ActionFailedError(
            label, f"`{result.command}` on {_where(host)} exited {result.exit_code}; "
                   f"stderr: {_last_lines(result.stderr) or '(empty)'}; "
                   f"stdout: {_last_lines(result.stdout) or '(empty)'}",
            f"the start command to succeed and {address_of(instance)} to answer PING",
            "read the Redis log on its host, fix the cause (config, port, disk, permissions) "
            "and start it by hand",
        )
    after = ping_redis(instance)
    return ActionResult(action="start_redis", target=label, changed=True,
                        detail=f"ran `{result.command}` on {_where(host)}: exit 0 "
                               f"({_last_lines(result.stdout, 2) or 'no output'}); now {after.describe()}")
