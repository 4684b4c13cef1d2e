"""Connection checks of a service's dependencies: PostgreSQL and Redis.

Runbooks: "check database connectivity", "check Redis" (`pg_isready`, `redis-cli ping`).
A failed check is an observation (``ok=False`` with the reason), not an exception.
"""

from __future__ import annotations

import psycopg
import redis
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from incident.inventory import Target


class DependencyCheck(BaseModel):
    name: str
    address: str
    ok: bool
    detail: str


@task(cache_policy=NO_CACHE)
def check_postgres(target: Target) -> DependencyCheck | None:
    """Connect and run ``SELECT 1`` with the service's credentials (None if it has no database)."""
    db = target.database
    if db is None:
        return None
    address = f"{db.host}:{db.port}/{db.dbname}"
    password = db.password.resolve().get_secret_value() if db.password else None
    try:
        with psycopg.connect(
            host=db.host, port=db.port, dbname=db.dbname, user=db.user, password=password,
            connect_timeout=db.connect_timeout_s, application_name="incident-runbooks",
        ) as conn:
            conn.execute("SELECT 1").fetchone()
    except psycopg.OperationalError as exc:
        # psycopg messages name host/port/user, never the password
        return DependencyCheck(name="postgres", address=address, ok=False,
                               detail=str(exc).strip().splitlines()[0])
    return DependencyCheck(name="postgres", address=address, ok=True, detail="SELECT 1 answered")


@task(cache_policy=NO_CACHE)
def check_redis(target: Target) -> DependencyCheck | None:
    """Send PING (None if the service has no Redis)."""
    r = target.redis
    if r is None:
        return None
    address = f"{r.host}:{r.port}"
    client = redis.Redis(
        host=r.host, port=r.port,
        password=r.password.resolve().get_secret_value() if r.password else None,
        socket_timeout=r.timeout_s, socket_connect_timeout=r.timeout_s,
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        return DependencyCheck(name="redis", address=address, ok=False, detail=str(exc))
    finally:
        client.close()
    return DependencyCheck(name="redis", address=address, ok=True, detail="PONG")
