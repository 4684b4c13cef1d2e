"""The PostgreSQL session tasks against the lab's real PostgreSQL: what they end, and above
all what they must never end (the runbooks' own sessions, superusers, protected
applications, active sessions, other databases)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from incident.errors import ActionFailedError
from incident.inventory import load_target
from tasks.postgres import (
    cancel_blocking_queries, pg_connect, read_connection_usage, read_lock_state,
    terminate_blocking_sessions, terminate_idle_connections,
)

pytestmark = pytest.mark.lab


def _target(lab, **db_changes):
    target = load_target("web", lab.inventory_path)
    return target.model_copy(update={"database": target.database.model_copy(update=db_changes)})


def _app(lab, name: str, dbname: str = "app") -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=lab.info.pg_port, dbname=dbname, user="app",
                           password=lab.info.pg_password_file.read_text().strip(),
                           application_name=name, autocommit=True, connect_timeout=5)


def _superuser(lab, name: str, dbname: str = "app") -> psycopg.Connection:
    return psycopg.connect(host=str(lab.info.pg_socket_dir), port=lab.info.pg_port, dbname=dbname,
                           user="postgres", application_name=name, autocommit=True, connect_timeout=5)


def _pid(conn: psycopg.Connection) -> int:
    return conn.info.backend_pid


def _alive(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("SELECT 1").fetchone()
        return True
    except psycopg.OperationalError:
        return False


def _run_until_cancelled(conn: psycopg.Connection, sql: str) -> None:
    try:
        conn.execute(sql)
    except psycopg.errors.QueryCanceled:
        pass


def _wait_for(lab, sql: str, timeout_s: float = 20.0) -> None:
    """Poll (as superuser) until ``sql`` returns true."""
    deadline = time.monotonic() + timeout_s
    while lab.postgres.psql(sql) != "t":
        assert time.monotonic() < deadline, f"never true: {sql}"
        time.sleep(0.1)


def test_terminate_idle_ends_only_what_it_may(prefect_api, healthy_lab):
    lab = healthy_lab
    target = _target(lab, max_idle_s=0)  # every idle session is old enough
    leak = _app(lab, "lab-test-leak")
    runbook_session = pg_connect(target.database, admin=True)  # named incident-runbooks
    own = runbook_session.__enter__()
    superuser = _superuser(lab, "lab-test-leak")
    protected = _app(lab, "pg_dump")
    other_db = _app(lab, "lab-test-leak", dbname="postgres")
    idle_in_tx = _app(lab, "lab-test-leak-tx")
    idle_in_tx.execute("BEGIN")
    idle_in_tx.execute("SELECT 1")
    active = _app(lab, "lab-test-leak")
    sleeper = threading.Thread(target=_run_until_cancelled, args=(active, "SELECT pg_sleep(600)"))
    sleeper.start()
    try:
        _wait_for(lab, f"SELECT state = 'active' FROM pg_stat_activity WHERE pid = {_pid(active)}")
        result = terminate_idle_connections(target)

        assert result.changed
        assert sorted(result.pids) == sorted([_pid(leak), _pid(idle_in_tx)])
        assert "lab-test-leak" in result.detail
        assert not _alive(leak) and not _alive(idle_in_tx)
        for name, survivor in {"runbooks' own": own, "superuser": superuser, "pg_dump": protected,
                               "other database": other_db}.items():
            assert _alive(survivor), f"the {name} session was ended"
        assert lab.postgres.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {_pid(active)}") == "active"

        again = terminate_idle_connections(target)
        assert not again.changed and again.detail.startswith("already fine")
    finally:
        active.cancel()
        sleeper.join(10)
        runbook_session.__exit__(None, None, None)
        for c in (leak, superuser, protected, other_db, idle_in_tx, active):
            c.close()


def test_terminate_idle_with_the_plans_pids_ends_no_other(prefect_api, healthy_lab):
    lab = healthy_lab
    target = _target(lab, max_idle_s=0)
    planned, unplanned = _app(lab, "lab-test-leak"), _app(lab, "lab-test-leak")
    try:
        result = terminate_idle_connections(target, [_pid(planned)])
        assert result.changed and result.pids == [_pid(planned)]
        assert not _alive(planned) and _alive(unplanned)
    finally:
        planned.close()
        unplanned.close()


def test_young_idle_sessions_are_not_candidates(prefect_api, healthy_lab):
    lab = healthy_lab
    target = _target(lab, max_idle_s=3600)
    conns = [_app(lab, "lab-test-group") for _ in range(3)]
    try:
        usage = read_connection_usage(target)
        group = [g for g in usage.groups if g.application_name == "lab-test-group"]
        assert group and group[0].count == 3 and group[0].state == "idle" and group[0].usename == "app"
        assert usage.max_connections == 40 and usage.used >= 4 and not usage.exhausted
        assert not [s for s in usage.idle_candidates if s.application_name == "lab-test-group"]
        result = terminate_idle_connections(target)
        assert not result.changed
        assert all(_alive(c) for c in conns)
    finally:
        for c in conns:
            c.close()


def test_cancel_then_cancel_again_is_already_fine(prefect_api, healthy_lab):
    lab = healthy_lab
    target = _target(lab)
    lab.inject("pg-lock-blocker-busy")
    try:
        locks = read_lock_state(target, slow_query_s=3600)
        assert len(locks.roots) == 1 and len(locks.blocked) == 2
        root = locks.roots[0]
        assert root.session.application_name == "lab-lock-blocker" and root.untouchable is None
        assert sorted(root.blocks) == sorted(b.session.pid for b in locks.blocked)

        first = cancel_blocking_queries(target, locks.root_pids())
        assert first.changed and first.pids == locks.root_pids()
        _wait_for(lab, "SELECT count(*) = 0 FROM pg_stat_activity "
                       "WHERE cardinality(pg_blocking_pids(pid)) > 0")
        second = cancel_blocking_queries(target, locks.root_pids())
        assert not second.changed and "no longer blocks" in second.detail
    finally:
        lab.reset_fault("pg-lock-blocker-busy")


def test_a_superuser_blocker_is_never_signalled(prefect_api, healthy_lab):
    lab = healthy_lab
    target = _target(lab)
    boss = _superuser(lab, "lab-test-superuser-blocker")
    waiter = _app(lab, "lab-test-waiter")
    boss.execute("BEGIN")
    boss.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 2")
    blocked = threading.Thread(target=_run_until_cancelled, daemon=True,
                               args=(waiter, "UPDATE accounts SET balance = balance + 1 WHERE id = 2"))
    blocked.start()
    try:
        _wait_for(lab, f"SELECT cardinality(pg_blocking_pids({_pid(waiter)})) > 0")
        locks = read_lock_state(target)
        root = next(b for b in locks.roots if b.session.pid == _pid(boss))
        assert root.untouchable and "superuser" in root.untouchable
        for task in (cancel_blocking_queries, terminate_blocking_sessions):
            with pytest.raises(ActionFailedError, match="superuser"):
                task(target, [_pid(boss)])
        assert _alive(boss), "a superuser's session was ended"
    finally:
        boss.execute("ROLLBACK")
        blocked.join(10)
        boss.close()
        waiter.close()
