"""PostgreSQL: the one connect helper and the runbooks' database tasks.

Runbooks 002 / 004 / 000: "check database connectivity" (`pg_isready`), connections
(`pg_stat_activity`), locks (`pg_locks`, `pg_blocking_pids`). Every statement is
parameterised; every connection has a connect timeout and a statement timeout, and
names itself ``incident-runbooks`` in ``pg_stat_activity`` so that a runbook never
mistakes its own session for a culprit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from incident.errors import ConfigurationError, TargetUnreachableError
from incident.inventory import Database, Target
from tasks.common import DependencyCheck, read_only_task

APPLICATION_NAME = "incident-runbooks"


def require_database(target: Target) -> Database:
    if target.database is None:
        raise ConfigurationError(target.name, "no database in the inventory", "a database",
                                 "add database to the service in the inventory")
    return target.database


def address_of(db: Database) -> str:
    return f"{db.host}:{db.port}/{db.dbname}"


@contextmanager
def pg_connect(db: Database, admin: bool = False) -> Iterator[psycopg.Connection]:
    """The one PostgreSQL connection of the project (autocommit, timeouts, named).

    ``admin``: connect as the inventory's ``admin_user`` (the runbooks' role with
    pg_monitor and pg_signal_backend) instead of the application's role.
    Raises :class:`TargetUnreachableError` (transient) if the server cannot be reached.
    """
    user = (db.admin_user or db.user) if admin else db.user
    secret = (db.admin_password or db.password) if admin else db.password
    password = secret.resolve().get_secret_value() if secret else None
    try:
        conn = psycopg.connect(
            host=db.host, port=db.port, dbname=db.dbname, user=user, password=password,
            connect_timeout=db.connect_timeout_s, application_name=APPLICATION_NAME,
            autocommit=True, options=f"-c statement_timeout={db.statement_timeout_s * 1000}",
        )
    except psycopg.OperationalError as exc:
        # psycopg's messages name host, port and user, never the password
        raise TargetUnreachableError(
            f"{user}@{address_of(db)}", str(exc).strip().splitlines()[0], "a PostgreSQL session",
            "check that PostgreSQL runs and accepts connections (pg_isready), and the "
            "credentials in the inventory",
        ) from None
    try:
        yield conn
    finally:
        conn.close()


@read_only_task
def check_postgres(target: Target) -> DependencyCheck | None:
    """Connect and run ``SELECT 1`` with the service's credentials (None if it has no database).

    A failed connection is an observation (``ok=False`` with the reason), not an error."""
    db = target.database
    if db is None:
        return None
    try:
        with pg_connect(db) as conn:
            conn.execute("SELECT 1").fetchone()
    except TargetUnreachableError as exc:
        return DependencyCheck(name="postgres", address=address_of(db), ok=False, detail=exc.observed)
    return DependencyCheck(name="postgres", address=address_of(db), ok=True, detail="SELECT 1 answered")
