"""PostgreSQL 15 of the lab: its own cluster (run as user postgres) on 127.0.0.1, with a
database ``app`` owned by role ``app`` whose password lives in ``secrets/pg_password``."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from lab.exporters import MONITOR_ROLE, monitor_password_file
from lab.context import LabContext, new_secret
from lab.faults import fault, start_holder
from lab.proc import (
    LabError,
    cmdline,
    expect_cmdline,
    pid_alive,
    port_in_use,
    tcp_exchange,
    wait_until,
)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
# Connection headroom, as in production: the application role cannot take the last slots,
# so the runbooks' role and an exporter still get in when the application is at its limit
# (40 - 3 superuser-reserved = 37 for ordinary roles; app <= 34 leaves 3).
MAX_CONNECTIONS = 40
APP_CONNECTION_LIMIT = 34
# the lab's thresholds for the database runbooks (the inventory's; real defaults: 300 s, 0.8)
LAB_MAX_IDLE_S = 3
LAB_CONNECTIONS_THRESHOLD = 0.8
RUNBOOKS_ROLE = "runbooks"

expect_cmdline("postgres", "postgres")


def pg_answers(port: int) -> bool:
    """The server answers an SSLRequest (any server, before authentication)."""
    return tcp_exchange(port, bytes([0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F]), 1) in (b"N", b"S")


class Postgres:
    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    def _pg(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                           timeout=timeout, cwd="/")
        if check and r.returncode != 0:
            with open(self.ctx.log("postgres"), "a") as f:
                f.write(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}\n")
            raise self.ctx.fail("postgres",
                                f"{Path(argv[0]).name} failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
        return r

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.ctx.pg_data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _place_pg_dir(self) -> None:
        """PostgreSQL runs as user postgres, which must traverse every parent of its data dir.
        A lab dir below a 0700 dir (say a checkout in /root) cannot hold it: then the data
        lives in <tmp>/rb-pg-<hash of the lab dir> and lab_dir/pg is a link to it."""
        lab_dir = self.ctx.lab_dir
        link = lab_dir / "pg"
        if link.exists() or link.is_symlink():
            return
        if self._pg("test", "-x", str(lab_dir), check=False).returncode == 0:
            return
        digest = hashlib.sha256(str(lab_dir.resolve()).encode()).hexdigest()[:10]
        target = Path(tempfile.gettempdir()) / f"rb-pg-{digest}"
        target.mkdir(exist_ok=True)
        os.chmod(target, 0o755)
        link.symlink_to(target, target_is_directory=True)
        self.ctx.set_pg_paths(link)

    def up(self) -> None:
        ctx = self.ctx
        port = ctx.info.pg_port
        pid = self.postmaster_pid()
        if pid and pid_alive(pid) and "postgres" in cmdline(pid):
            ctx.procs.write_pid("postgres", pid)
            if not wait_until(lambda: pg_answers(port), 10):
                raise ctx.fail("postgres", f"runs (pid {pid}) but does not answer on 127.0.0.1:{port}")
            if self.psql("SHOW max_connections") == str(MAX_CONNECTIONS):
                self._ensure_app()
                return
            self.stop()  # started with older settings: max_connections needs a restart
            pid = None
        if pid and not pid_alive(pid):
            # postgres died uncleanly: its lock file names a dead (maybe zombie) PID,
            # which postgres itself would take for a running postmaster
            (ctx.pg_data / "postmaster.pid").unlink(missing_ok=True)
            for f in ctx.pg_sock.glob(".s.PGSQL.*"):
                f.unlink(missing_ok=True)
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise LabError("postgres: no 'postgres' user (apt-get install postgresql-15)") from None
        self._place_pg_dir()
        ctx.pg_dir.mkdir(exist_ok=True)
        ctx.pg_sock.mkdir(exist_ok=True)
        os.chown(ctx.pg_dir, pw.pw_uid, pw.pw_gid)
        os.chown(ctx.pg_sock, pw.pw_uid, pw.pw_gid)
        log = ctx.log("postgres")
        if (ctx.lab_dir / "pg").is_symlink():  # postgres cannot reach the lab's logs dir either
            log = ctx.pg_dir / "postgres.log"
        log.touch()
        os.chown(log, pw.pw_uid, pw.pw_gid)
        if self._pg("test", "-x", str(ctx.pg_dir), check=False).returncode != 0:
            raise LabError(f"postgres: user postgres cannot reach {ctx.pg_dir}; "
                           "make its parent dirs traversable (chmod o+x)")
        if not (ctx.pg_data / "PG_VERSION").exists():
            if ctx.pg_data.exists():
                shutil.rmtree(ctx.pg_data)  # a half-done initdb
            self._pg(str(PG_BIN / "initdb"), "-D", str(ctx.pg_data), "-U", "postgres", "-E", "UTF8",
                     "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", timeout=120)
            (ctx.pg_data / "pg_hba.conf").write_text(
                "# lab: written by lab/postgres.py\n"
                "local   all   postgres                 trust\n"
                "host    all   all        127.0.0.1/32  scram-sha-256\n"
            )
            os.chown(ctx.pg_data / "pg_hba.conf", pw.pw_uid, pw.pw_gid)
        conf = ctx.pg_data / "postgresql.auto.conf"  # rewritten every up: port may be chosen anew
        conf.write_text(
            "# lab settings (written by lab/postgres.py)\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{ctx.pg_sock}'\n"
            f"max_connections = {MAX_CONNECTIONS}\n"
            "password_encryption = 'scram-sha-256'\n"
            "shared_buffers = '32MB'\n"
            "fsync = off\n"
        )
        os.chown(conf, pw.pw_uid, pw.pw_gid)
        if port_in_use(port):
            raise LabError(f"postgres: port {port} on 127.0.0.1 is taken by another program; log: {log}")
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(ctx.pg_data), "-w", "-t", "60", "-l", str(log), "start",
                 timeout=90)
        pid = self.postmaster_pid()
        if not pid:
            raise ctx.fail("postgres", "started but wrote no postmaster.pid")
        ctx.procs.write_pid("postgres", pid)
        if not wait_until(lambda: pg_answers(port), 30):
            raise ctx.fail("postgres", f"does not answer on 127.0.0.1:{port} within 30s")
        self._ensure_app()

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run ``sql`` as superuser postgres over the unix socket; the output, trimmed."""
        r = self._pg(str(PG_BIN / "psql"), "-h", str(self.ctx.pg_sock), "-p", str(self.ctx.info.pg_port),
                     "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-tAc", sql)
        return r.stdout.strip()

    def _ensure_app(self) -> None:
        pwfile = self.ctx.info.pg_password_file
        if pwfile.exists() and pwfile.read_text().strip():
            password = pwfile.read_text().strip()
        else:
            password = new_secret(24)  # [A-Za-z0-9_-]: safe inside a SQL literal
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        os.chmod(pwfile, 0o600)
        if self.psql("SELECT 1 FROM pg_roles WHERE rolname = 'app'") == "1":
            self.psql(f"ALTER ROLE app WITH LOGIN PASSWORD '{password}'")
        else:
            self.psql(f"CREATE ROLE app WITH LOGIN PASSWORD '{password}'")
        if self.psql("SELECT 1 FROM pg_database WHERE datname = 'app'") != "1":
            self.psql("CREATE DATABASE app OWNER app")
        self._ensure_runbooks_db_parts()

    def _ensure_runbooks_db_parts(self) -> None:
        """What the database runbooks need: the app role's connection limit (headroom), the
        ``runbooks`` role (pg_monitor + pg_signal_backend, not a superuser) and the table the
        lock faults contend on."""
        self.psql(f"ALTER ROLE app CONNECTION LIMIT {APP_CONNECTION_LIMIT}")
        password = _secret_file(runbooks_password_file(self.ctx.info))
        verb = "ALTER" if self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{RUNBOOKS_ROLE}'") == "1" \
            else "CREATE"
        self.psql(f"{verb} ROLE {RUNBOOKS_ROLE} WITH LOGIN NOSUPERUSER PASSWORD '{password}'")
        self.psql(f"GRANT pg_monitor, pg_signal_backend TO {RUNBOOKS_ROLE}")
        # the postgres exporter's role (lab/exporters.py): read-only monitoring, a few sessions
        monitor = _secret_file(monitor_password_file(self.ctx.info))
        verb = "ALTER" if self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{MONITOR_ROLE}'") == "1" \
            else "CREATE"
        self.psql(f"{verb} ROLE {MONITOR_ROLE} WITH LOGIN NOSUPERUSER CONNECTION LIMIT 3 PASSWORD '{monitor}'")
        self.psql(f"GRANT pg_monitor TO {MONITOR_ROLE}")
        self.psql("CREATE TABLE IF NOT EXISTS public.accounts "
                  "(id int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0); "
                  "ALTER TABLE public.accounts OWNER TO app; "
                  "INSERT INTO public.accounts (id) VALUES (1), (2) ON CONFLICT DO NOTHING", db="app")

    def stop(self) -> None:
        # SIGINT is "fast shutdown"; SIGTERM would wait for clients.
        self.ctx.procs.stop("postgres", signal.SIGINT)

    def status(self) -> str:
        if not self.ctx.procs.alive("postgres"):
            return "down"
        try:
            return "up" if pg_answers(self.ctx.info.pg_port) else "not answering"
        except OSError as exc:
            return f"not answering ({exc.strerror or type(exc).__name__})"


def runbooks_password_file(info) -> Path:
    """The ``runbooks`` role's password, next to pg_password in the lab's secrets dir."""
    return info.pg_password_file.with_name("pg_runbooks_password")


def _secret_file(path: Path) -> str:
    """The secret in ``path`` (mode 0600), created once: [A-Za-z0-9_-], safe in a SQL literal."""
    if path.exists() and path.read_text().strip():
        value = path.read_text().strip()
    else:
        value = new_secret(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
    os.chmod(path, 0o600)
    return value


# --------------------------------------------------------------------------- faults
# Long-lived clients (lab/pg_holders.py) started with the registry's holder helper; the
# resets end leftover sessions of the holder's application_name as the superuser (a
# backend running pg_sleep outlives its client). Healthy = the database runbooks' goal.

LEAKY_APP, BUSY_APP = "lab-leaky-app", "lab-busy-app"
LOCK_APPS = {"busy": "lab-lock-blocker", "idle": "lab-idle-blocker", "respawn": "lab-lock-respawner"}
HELD_SESSIONS = 33  # 33 + the runbook's own > 0.8 x 40, and under the app role's limit of 34


def _psql_or_none(lab, sql: str) -> str | None:
    try:
        return lab.postgres.psql(sql)
    except LabError:
        return None  # PostgreSQL itself is down: not these faults' part


def _connections_healthy(lab) -> bool:
    out = _psql_or_none(lab, "SELECT count(*) FILTER (WHERE backend_type = 'client backend') || ' ' || "
                             "current_setting('max_connections') FROM pg_stat_activity")
    if out is None:
        return True
    used, most = (int(x) for x in out.split())
    return used / most <= LAB_CONNECTIONS_THRESHOLD


def _locks_healthy(lab) -> bool:
    out = _psql_or_none(lab, "SELECT count(*) FROM pg_stat_activity "
                             "WHERE cardinality(pg_blocking_pids(pid)) > 0")
    return out is None or out == "0"


def _end_sessions(lab, *apps: str) -> None:
    names = ", ".join(f"'{a}'" for a in apps)  # constants of this module
    _psql_or_none(lab, f"SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                       f"WHERE application_name IN ({names})")


def _count(lab, where: str) -> int:
    return int(_psql_or_none(lab, f"SELECT count(*) FROM pg_stat_activity WHERE {where}") or 0)


def _holder_argv(lab, mode: str, app: str, arg: str) -> list[str]:
    return [sys.executable, "-m", "lab.pg_holders", mode, str(lab.info.pg_port),
            str(lab.info.pg_password_file), app, arg]


@fault("pg-connections-idle", scenario="db-connections", alert="PostgresConnectionsExhausted",
       description=f"a leaky client ({LEAKY_APP}, role app) holds {HELD_SESSIONS} idle connections of "
                   f"{MAX_CONNECTIONS}: usage over the threshold; ending idle sessions heals it",
       reset=lambda lab: _end_sessions(lab, LEAKY_APP), healthy=_connections_healthy)
def _inject_pg_connections_idle(lab) -> None:
    # ready once the sessions have been idle longer than the lab's max_idle_s: they qualify
    idle_for = f"{LAB_MAX_IDLE_S + 0.5} seconds"
    start_holder(lab, "pg-connections-idle", _holder_argv(lab, "idle", LEAKY_APP, str(HELD_SESSIONS)),
                 ready=lambda: _count(lab, f"application_name = '{LEAKY_APP}' AND state = 'idle' AND "
                                           f"state_change < now() - interval '{idle_for}'") >= HELD_SESSIONS)


@fault("pg-connections-busy", scenario="db-connections", alert="PostgresConnectionsExhausted",
       description=f"a client ({BUSY_APP}) holds {HELD_SESSIONS} connections each running pg_sleep(3600): "
                   "usage over the threshold and no idle session to end (the runbook escalates)",
       reset=lambda lab: _end_sessions(lab, BUSY_APP), healthy=_connections_healthy, heals=False)
def _inject_pg_connections_busy(lab) -> None:
    start_holder(lab, "pg-connections-busy", _holder_argv(lab, "busy", BUSY_APP, str(HELD_SESSIONS)),
                 ready=lambda: _count(lab, f"application_name = '{BUSY_APP}' AND state = 'active'")
                 >= HELD_SESSIONS)


def _inject_lock(lab, name: str, kind: str) -> None:
    from lab.pg_holders import WAITER_APP, WAITERS

    start_holder(lab, name, _holder_argv(lab, "lock", LOCK_APPS[kind], kind),
                 ready=lambda: _count(lab, f"application_name = '{WAITER_APP}' "
                                           "AND cardinality(pg_blocking_pids(pid)) > 0") >= WAITERS)


def _reset_lock(kind: str):
    from lab.pg_holders import WAITER_APP

    return lambda lab: _end_sessions(lab, LOCK_APPS[kind], WAITER_APP)


@fault("pg-lock-blocker-busy", scenario="db-locks", alert="PostgresLockContention",
       description="a session holds the row lock of app.public.accounts id=1 while running "
                   "pg_sleep(3600); two sessions wait on it: cancelling the blocker's query heals it",
       reset=_reset_lock("busy"), healthy=_locks_healthy)
def _inject_pg_lock_blocker_busy(lab) -> None:
    _inject_lock(lab, "pg-lock-blocker-busy", "busy")


@fault("pg-lock-blocker-idle", scenario="db-locks", alert="PostgresLockContention",
       description="a session holds the row lock of accounts id=1 idle in transaction; two wait: a "
                   "cancel does nothing, ending the session (after approval) heals it",
       reset=_reset_lock("idle"), healthy=_locks_healthy)
def _inject_pg_lock_blocker_idle(lab) -> None:
    _inject_lock(lab, "pg-lock-blocker-idle", "idle")


@fault("pg-lock-blocker-respawning", scenario="db-locks", alert="PostgresLockContention",
       description="like pg-lock-blocker-busy, but the client takes the lock again at once after a "
                   "cancel or a terminate and the waiters keep queueing: the runbook escalates",
       reset=_reset_lock("respawn"), healthy=_locks_healthy, heals=False)
def _inject_pg_lock_blocker_respawning(lab) -> None:
    _inject_lock(lab, "pg-lock-blocker-respawning", "respawn")
