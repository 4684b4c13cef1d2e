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
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from incident.errors import ActionFailedError, ConfigurationError, TargetUnreachableError
from incident.inventory import Database, Target
from tasks.common import ActionResult, DependencyCheck, changing_task, count_consecutive, read_only_task

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


# --------------------------------------------------------------------------- sessions
#
# Runbook 002 "Database Connection Exhausted" / 004 "Database Performance Issues":
# pg_stat_activity against max_connections, idle sessions, the blocking tree.
#
# The never-touch rules, in SQL and applied by every task that ends or cancels a
# session (re-checked when the task runs, not only when the plan was made): only
# client backends; never the task's own session (pid <> pg_backend_pid()) nor any other
# runbook session (application_name incident-runbooks); never a superuser's session;
# never the inventory's protected_applications; only the service's database unless the
# inventory's ``other_databases`` says otherwise.

QUERY_CHARS = 200  # query texts are cut to this many characters in findings and plans
LIST_CAP = 10  # plans and findings list this many sessions, then "... and N more"

_TOUCHABLE = """
    a.backend_type = 'client backend'
    AND a.pid <> pg_backend_pid()
    AND coalesce(a.application_name, '') <> ALL(%(protected)s)
    AND NOT coalesce(r.rolsuper, true)
    AND (%(other_dbs)s OR a.datname = current_database())
"""

_IDLE = """
    a.state IN ('idle', 'idle in transaction', 'idle in transaction (aborted)')
    AND a.state_change < now() - make_interval(secs => %(max_idle_s)s)
"""

_SESSION_COLUMNS = """
    a.pid, coalesce(a.usename, '') AS usename, coalesce(a.application_name, '') AS application_name,
    coalesce(a.state, '') AS state, coalesce(a.datname, '') AS datname, a.backend_type,
    coalesce(extract(epoch FROM now() - a.state_change), 0)::float AS state_age_s,
    extract(epoch FROM now() - a.query_start)::float AS query_age_s,
    extract(epoch FROM now() - a.xact_start)::float AS xact_age_s,
    a.wait_event_type, a.wait_event, left(coalesce(a.query, ''), %(qchars)s) AS query,
    coalesce(r.rolsuper, true) AS superuser
"""


class PgSession(BaseModel):
    """One row of pg_stat_activity, as much as a runbook needs."""

    pid: int
    usename: str
    application_name: str
    state: str
    datname: str
    backend_type: str
    state_age_s: float = Field(description="seconds in the current state (idle for ...)")
    query_age_s: float | None = None
    xact_age_s: float | None = None
    wait_event_type: str | None = None
    wait_event: str | None = None
    query: str = ""
    superuser: bool = False

    def describe(self) -> str:
        app = self.application_name or "(no application_name)"
        wait = f", waiting on {self.wait_event_type}/{self.wait_event}" if self.wait_event_type else ""
        return (f"pid {self.pid} {app} ({self.usename}@{self.datname}) {self.state} "
                f"{self.state_age_s:.0f} s{wait}")


def _session(row: dict) -> PgSession:
    return PgSession(**{k: v for k, v in row.items() if k in PgSession.model_fields})


def _params(db: Database, **extra: object) -> dict:
    return {
        "protected": [APPLICATION_NAME, *db.protected_applications],
        "other_dbs": bool(db.other_databases),
        "max_idle_s": db.max_idle_s, "qchars": QUERY_CHARS, **extra,
    }


def capped(items: list[str], cap: int = LIST_CAP) -> str:
    """``a; b; c ... and 7 more``: lists in plans and findings stay readable."""
    shown = "; ".join(items[:cap])
    return shown + (f" ... and {len(items) - cap} more" if len(items) > cap else "")


class SessionGroup(BaseModel):
    """Client sessions with the same state, application and role."""

    state: str
    application_name: str
    usename: str
    count: int
    oldest_s: float

    def describe(self) -> str:
        return (f"{self.count} x {self.application_name or '(none)'} ({self.usename}) {self.state}, "
                f"oldest {self.oldest_s:.0f} s")


class ConnectionUsage(BaseModel):
    """Runbook 002 diagnosis: client connections against max_connections."""

    used: int = Field(description="client backends of the whole server")
    max_connections: int
    reserved: int = Field(description="superuser_reserved_connections")
    threshold: float
    max_idle_s: int
    groups: list[SessionGroup] = Field(description="by state, application and role, largest first")
    idle_candidates: list[PgSession] = Field(
        description="idle sessions older than max_idle_s that the never-touch rules allow ending")

    @property
    def ratio(self) -> float:
        return self.used / self.max_connections if self.max_connections else 1.0

    @property
    def exhausted(self) -> bool:
        return self.ratio > self.threshold

    def describe(self) -> str:
        return (f"{self.used}/{self.max_connections} connections in use ({self.ratio:.0%}, threshold "
                f"{self.threshold:.0%}); {len(self.idle_candidates)} idle > {self.max_idle_s} s may be ended")

    def suggested_max_connections(self) -> int:
        """What max_connections would keep today's peak under the threshold, rounded up to 10."""
        need = int(self.used / self.threshold) + self.reserved + 1
        return max(self.max_connections + 10, -(-need // 10) * 10)

    def proposal(self) -> str:
        """Raising max_connections needs a restart: the runbook proposes it, a human decides."""
        return (f"proposal (not done: it needs a database restart): raise max_connections from "
                f"{self.max_connections} to {self.suggested_max_connections()} (ALTER SYSTEM SET "
                f"max_connections = {self.suggested_max_connections()}; restart in a maintenance window; "
                "check memory: each connection costs work_mem), or put a pooler (PgBouncer) in front "
                "and find the connection leak in the application holding the most sessions")


def _usage(conn: psycopg.Connection, db: Database) -> ConnectionUsage:
    settings: dict[str, str] = dict(conn.execute(
        "SELECT name, setting FROM pg_settings WHERE name IN "
        "('max_connections', 'superuser_reserved_connections')").fetchall())
    with conn.cursor(row_factory=dict_row) as cur:
        groups = cur.execute(
            "SELECT coalesce(state, '') AS state, coalesce(application_name, '') AS application_name, "
            "coalesce(usename, '') AS usename, count(*)::int AS count, "
            "coalesce(max(extract(epoch FROM now() - state_change)), 0)::float AS oldest_s "
            "FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "GROUP BY 1, 2, 3 ORDER BY count(*) DESC, 5 DESC").fetchall()
        candidates = cur.execute(
            f"SELECT {_SESSION_COLUMNS} FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid "
            f"WHERE {_TOUCHABLE} AND {_IDLE} ORDER BY a.state_change",
            _params(db)).fetchall()
    return ConnectionUsage(
        used=sum(g["count"] for g in groups), max_connections=int(settings["max_connections"]),
        reserved=int(settings.get("superuser_reserved_connections", 0)),
        threshold=db.connections_threshold, max_idle_s=db.max_idle_s,
        groups=[SessionGroup(**g) for g in groups], idle_candidates=[_session(c) for c in candidates],
    )


@read_only_task
def read_connection_usage(target: Target) -> ConnectionUsage:
    """Runbook 002: ``SELECT count(*) FROM pg_stat_activity`` - grouped by state, application,
    role and age, against max_connections, with the idle sessions that may be ended."""
    db = require_database(target)
    with pg_connect(db, admin=True) as conn:
        return _usage(conn, db)


class UsageStreak(BaseModel):
    ok: bool
    consecutive: int
    required: int
    checks: int
    last: ConnectionUsage

    def describe(self) -> str:
        return (f"{self.consecutive}/{self.required} consecutive checks under the threshold "
                f"({self.checks} checks); last: {self.last.describe()}")


@read_only_task
def wait_until_connections_below(target: Target, consecutive: int = 3, deadline_s: float = 30.0,
                                 interval_s: float = 1.0) -> UsageStreak:
    """Check usage until ``consecutive`` checks in a row are under the threshold, or the deadline."""
    db = require_database(target)
    with pg_connect(db, admin=True) as conn:
        streak, checks, last = count_consecutive(lambda: _usage(conn, db), lambda u: not u.exhausted,
                                                 consecutive, deadline_s, interval_s)
    return UsageStreak(ok=streak >= consecutive, consecutive=streak, required=consecutive,
                       checks=checks, last=last)


class SessionsEnded(ActionResult):
    pids: list[int] = []


def _summarise(rows: list[PgSession]) -> str:
    by_app: dict[str, int] = {}
    for s in rows:
        key = f"{s.application_name or '(none)'} ({s.usename})"
        by_app[key] = by_app.get(key, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in sorted(by_app.items(), key=lambda kv: -kv[1]))


@changing_task
def terminate_idle_connections(target: Target, pids: list[int] | None = None) -> SessionsEnded:
    """Runbook 002 fix: ``pg_terminate_backend`` the idle (and idle-in-transaction) client
    sessions older than the inventory's ``max_idle_s``.

    The sessions are selected again when the task runs, with the same never-touch rules as
    the diagnosis: a session that became active meanwhile, or is younger, is spared. With
    ``pids`` (the plan's list), only those of them that still qualify are ended.
    ``changed=False`` when none qualifies (already fine).
    """
    db = require_database(target)
    where = f"{_TOUCHABLE} AND {_IDLE}" + (" AND a.pid = ANY(%(pids)s)" if pids is not None else "")
    with pg_connect(db, admin=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_SESSION_COLUMNS}, pg_terminate_backend(a.pid, 5000) AS ended "
            f"FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid WHERE {where}",
            _params(db, pids=list(pids or []))).fetchall()
    ended = [_session(r) for r in rows if r["ended"]]
    address = address_of(db)
    if not ended:
        return SessionsEnded(action="terminate_idle_connections", target=address, changed=False,
                             detail=f"already fine: no idle session older than {db.max_idle_s} s "
                                    "qualifies any more")
    return SessionsEnded(
        action="terminate_idle_connections", target=address, changed=True, pids=[s.pid for s in ended],
        detail=f"ended {len(ended)} idle sessions: {_summarise(ended)}; pids "
               + capped([str(s.pid) for s in ended], 20),
    )


# --------------------------------------------------------------------------- locks


class Blocker(BaseModel):
    """A session others wait for; ``root`` if it waits for nobody itself."""

    session: PgSession
    blocks: list[int] = Field(description="pids waiting for it, directly or through others")
    root: bool
    untouchable: str | None = Field(None, description="why a runbook must not end it, or None")

    def describe(self) -> str:
        return (f"{self.session.describe()}, xact {self.session.xact_age_s or 0:.0f} s, blocks "
                f"{len(self.blocks)} ({capped([str(p) for p in self.blocks], 5)}): "
                f"{self.session.query[:80]!r}")


class BlockedSession(BaseModel):
    session: PgSession
    blocked_by: list[int]

    def describe(self) -> str:
        return f"{self.session.describe()} blocked by {self.blocked_by}: {self.session.query[:80]!r}"


class LockState(BaseModel):
    """Runbook 004 diagnosis: the blocking tree and the long-running queries."""

    blocked: list[BlockedSession]
    roots: list[Blocker]
    long_running: list[PgSession] = Field(description="active queries older than slow_query_s")
    slow_query_s: float

    @property
    def contended(self) -> bool:
        return bool(self.blocked)

    def root_pids(self) -> list[int]:
        return [b.session.pid for b in self.roots]

    def describe(self) -> str:
        slow = (f"; {len(self.long_running)} queries run longer than {self.slow_query_s:g} s"
                if self.slow_query_s != float("inf") else "")
        if not self.blocked:
            return f"no session waits for a lock{slow}"
        return (f"{len(self.blocked)} sessions wait for locks held by {len(self.roots)} root blocker(s) "
                f"(pids {self.root_pids()}){slow}")


def _untouchable(s: PgSession, db: Database, own_db: str) -> str | None:
    if s.backend_type != "client backend":
        return f"a {s.backend_type}, not a client session"
    if s.superuser:
        return f"a superuser's session ({s.usename})"
    if s.application_name in (APPLICATION_NAME, *db.protected_applications):
        return f"protected application {s.application_name}"
    if s.datname != own_db and not db.other_databases:
        return f"another database ({s.datname})"
    return None


def _lock_state(conn: psycopg.Connection, db: Database, slow_query_s: float) -> LockState:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_SESSION_COLUMNS}, pg_blocking_pids(a.pid) AS blocked_by, "
            "current_database() AS own_db "
            "FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid "
            "WHERE a.pid <> pg_backend_pid()", _params(db)).fetchall()
    if not rows:
        return LockState(blocked=[], roots=[], long_running=[], slow_query_s=slow_query_s)
    own_db = rows[0]["own_db"]
    sessions = {r["pid"]: _session(r) for r in rows}
    waits = {r["pid"]: list(r["blocked_by"]) for r in rows if r["blocked_by"]}
    blocked = [BlockedSession(session=sessions[p], blocked_by=b) for p, b in waits.items()]
    blockers = {b for bs in waits.values() for b in bs}

    def waiting_on(pid: int) -> set[int]:  # everyone who waits for pid, directly or not
        seen: set[int] = set()
        todo = [pid]
        while todo:
            cur_pid = todo.pop()
            for waiter, by in waits.items():
                if cur_pid in by and waiter not in seen:
                    seen.add(waiter)
                    todo.append(waiter)
        return seen

    roots = [
        Blocker(session=sessions[p], blocks=sorted(waiting_on(p)), root=True,
                untouchable=_untouchable(sessions[p], db, own_db))
        for p in sorted(blockers) if p in sessions and p not in waits
    ]
    roots.sort(key=lambda b: -len(b.blocks))
    long_running = sorted(
        (s for s in sessions.values() if s.state == "active" and s.backend_type == "client backend"
         and (s.query_age_s or 0) > slow_query_s),
        key=lambda s: -(s.query_age_s or 0))
    return LockState(blocked=blocked, roots=roots, long_running=long_running, slow_query_s=slow_query_s)


@read_only_task
def read_lock_state(target: Target, slow_query_s: float = 5.0) -> LockState:
    """Runbook 004: who waits for whom (``pg_blocking_pids``) and the queries running
    longer than ``slow_query_s`` (state, age, query text cut short, wait event)."""
    db = require_database(target)
    with pg_connect(db, admin=True) as conn:
        return _lock_state(conn, db, slow_query_s)


class LockStreak(BaseModel):
    ok: bool
    consecutive: int
    required: int
    checks: int
    last: LockState

    def describe(self) -> str:
        return (f"{self.consecutive}/{self.required} consecutive checks with nothing blocked "
                f"({self.checks} checks); last: {self.last.describe()}")


@read_only_task
def wait_until_unblocked(target: Target, consecutive: int = 3, deadline_s: float = 30.0,
                         interval_s: float = 1.0, pids: list[int] | None = None) -> LockStreak:
    """Check until ``consecutive`` checks in a row see nothing blocked - or, with ``pids``,
    none of those pids blocking anyone - or the deadline passes."""
    db = require_database(target)

    def unblocked(state: LockState) -> bool:
        return not (set(state.root_pids()) & set(pids) if pids is not None else state.contended)

    with pg_connect(db, admin=True) as conn:
        streak, checks, last = count_consecutive(lambda: _lock_state(conn, db, slow_query_s=float("inf")),
                                                 unblocked, consecutive, deadline_s, interval_s)
    return LockStreak(ok=streak >= consecutive, consecutive=streak, required=consecutive,
                      checks=checks, last=last)


_SIGNALS = {  # constant statements: the pid is the only parameter
    "pg_cancel_backend": "SELECT pg_cancel_backend(%s)",
    "pg_terminate_backend": "SELECT pg_terminate_backend(%s, 5000)",  # waits up to 5 s for the exit
}


def _signal_blockers(target: Target, pids: list[int], action: str, function: str) -> SessionsEnded:
    """Re-check each pid (still a root blocker? touchable?) and send it ``function``."""
    db = require_database(target)
    address = address_of(db)
    done: list[tuple[int, str]] = []
    skipped: list[str] = []
    with pg_connect(db, admin=True) as conn:
        state = _lock_state(conn, db, slow_query_s=float("inf"))
        roots = {b.session.pid: b for b in state.roots}
        for pid in pids:
            b = roots.get(pid)
            if b is None:
                skipped.append(f"pid {pid} no longer blocks anyone")
                continue
            if b.untouchable:
                raise ActionFailedError(
                    f"{address} pid {pid}", f"the blocker is {b.untouchable}", "a session a runbook "
                    "may end", "a human decides about this session; nothing was sent to it")
            sent = conn.execute(_SIGNALS[function], (pid,)).fetchone()
            if sent and sent[0]:
                done.append((pid, f"pid {pid} {b.session.application_name or '(none)'} "
                                  f"({b.session.usename}, {b.session.state}, blocked {len(b.blocks)})"))
            else:
                skipped.append(f"pid {pid} was gone before the signal")
    if not done:
        return SessionsEnded(action=action, target=address, changed=False,
                             detail="already fine: " + "; ".join(skipped))
    return SessionsEnded(action=action, target=address, changed=True, pids=[p for p, _ in done],
                         detail=f"{function} sent to " + "; ".join(d for _, d in done)
                         + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))


@changing_task
def cancel_blocking_queries(target: Target, pids: list[int]) -> SessionsEnded:
    """Runbook 004: cancel the running query of each root blocker (``pg_cancel_backend``).

    The session stays; its transaction is rolled back, which releases its locks if it
    was running a query. An *idle* transaction holding locks is not affected (then
    terminate). Each pid is re-checked first: one that no longer blocks is left alone."""
    return _signal_blockers(target, pids, "cancel_blocking_queries", "pg_cancel_backend")


@changing_task
def terminate_blocking_sessions(target: Target, pids: list[int]) -> SessionsEnded:
    """End each root blocker's session (``pg_terminate_backend``): its transaction is rolled
    back and its client loses the connection. Destructive: always approved first. Each pid is
    re-checked first: one that no longer blocks is left alone."""
    return _signal_blockers(target, pids, "terminate_blocking_sessions", "pg_terminate_backend")
