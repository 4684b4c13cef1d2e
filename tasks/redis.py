"""Redis: the one client helper and the runbooks' Redis tasks.

Runbooks 000 / 004: "check Redis" (`redis-cli ping`, `INFO`), start or restart Redis.
"""

from __future__ import annotations

import redis

from incident.errors import ConfigurationError
from incident.inventory import RedisInstance, Target
from tasks.common import DependencyCheck, read_only_task


def require_redis(target: Target) -> RedisInstance:
    if target.redis is None:
        raise ConfigurationError(target.name, "no redis in the inventory", "a Redis instance",
                                 "add redis to the service in the inventory")
    return target.redis


def address_of(instance: RedisInstance) -> str:
    return f"{instance.host}:{instance.port}"


def redis_client(instance: RedisInstance) -> redis.Redis:
    """The one Redis client of the project: timeouts on connect and on every command."""
    return redis.Redis(
        host=instance.host, port=instance.port,
        password=instance.password.resolve().get_secret_value() if instance.password else None,
        socket_timeout=instance.timeout_s, socket_connect_timeout=instance.timeout_s,
        client_name="incident-runbooks",
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
