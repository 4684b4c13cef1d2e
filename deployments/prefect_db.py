"""The Prefect server's database: SQLite (Prefect's default) or a PostgreSQL 15 of its own.

``RUNBOOKS_PREFECT_DATABASE`` = ``sqlite`` | ``postgres`` (:func:`setting`; default
:data:`DEFAULT_DATABASE`). Why PostgreSQL: on SQLite a request whose transaction reads and
then writes (``create_flow_run_from_deployment``) fails at once with "database is locked" when
the event persister holds the write lock (SQLite never applies its busy timeout to a read->write
upgrade); the server answers 503 and Prefect's client retries after 2 s. PostgreSQL has no such
upgrade failure (bench/prefect_db.py measures both).

The PostgreSQL cluster is the Prefect server's own, not the lab's (faults break the lab's on
purpose): under ``<state>/prefect/postgres`` (``data/``, ``sock/``, ``postgres.log``), run as user
postgres with pg_ctl on 127.0.0.1 and a free port, scram-sha-256 password auth, a role
``prefect`` owning a database ``prefect``. It is started once and reused by the next start
(its port in ``<state>/prefect/postgres.json``, its PID in ``<state>/pids/prefect-postgres.pid``);
:func:`stop_postgres` stops it by PID. User postgres must traverse every parent of its data
dir; when it cannot (Prefect's home is 0700), ``<state>/prefect/postgres`` is a link to
``<tmp>/rb-prefect-pg-<hash of the state dir>``, as the lab does for its own cluster.

The role's password is generated once (:func:`lab.context.write_secret_file`) into
``<state>/prefect/postgres-password`` (0600, inside Prefect's 0700 home). It goes to the server
only, inside ``PREFECT_API_DATABASE_CONNECTION_URL`` (:func:`connection_url`): never into argv,
logs, stack.json, exception texts or printed output. PostgreSQL itself receives a SCRAM
verifier computed here, not the password, so not even a logged failed statement could show it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from deployments.stack import StackError, free_port
from lab.context import write_secret_file
from lab.postgres import PG_BIN, pg_answers
from lab.proc import Procs, cmdline, expect_cmdline, pid_alive, port_in_use, tail, wait_until

DATABASES = ("sqlite", "postgres")
#: the default of RUNBOOKS_PREFECT_DATABASE (the one place to change it)
DEFAULT_DATABASE = "postgres"
SETTING = "RUNBOOKS_PREFECT_DATABASE"
ROLE = DBNAME = "prefect"
NAME = "prefect-postgres"  # its pidfile: <state>/pids/prefect-postgres.pid
SOCK_MAX = 100  # unix socket paths are limited to ~108 bytes
# the server's pool (5 + 10 overflow by default) and its services, a CLI, psql: plenty of room
MAX_CONNECTIONS = 100

expect_cmdline(NAME, "postgres")


def setting(value: str | None = None) -> str:
    """The Prefect server's database: ``value`` if given, else ``$RUNBOOKS_PREFECT_DATABASE``,
    else :data:`DEFAULT_DATABASE`. A StackError names the choices for anything else."""
    chosen = (value if value is not None else os.environ.get(SETTING, "")).strip().lower() or DEFAULT_DATABASE
    if chosen not in DATABASES:
        raise StackError(f"{SETTING}={chosen!r} is not a Prefect database; set it to sqlite or postgres")
    return chosen


@dataclass(frozen=True)
class Paths:
    state: Path

    @property
    def link(self) -> Path:
        """``<state>/prefect/postgres``: the cluster's dir (or a link to it)."""
        return self.state / "prefect" / "postgres"

    @property
    def dir(self) -> Path:
        """The cluster's dir as user postgres sees it (the link's target, if a link)."""
        return self.link.resolve() if self.link.is_symlink() else self.link

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def sock(self) -> Path:
        return self.dir / "sock"

    @property
    def log(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.state / "prefect" / "postgres-password"

    @property
    def record(self) -> Path:
        return self.state / "prefect" / "postgres.json"

    @property
    def procs(self) -> Procs:
        return Procs(self.state / "logs", self.state / "pids", self.state)


def _recorded_port(paths: Paths) -> int | None:
    try:
        return int(json.loads(paths.record.read_text())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fail(paths: Paths, what: str, hint: str = "") -> StackError:
    """A StackError saying what failed, what to do, and the cluster's log (with its last lines).
    The password is never in the log: PostgreSQL only ever sees its SCRAM verifier."""
    msg = f"the Prefect server's PostgreSQL: {what}; log: {paths.log}"
    if hint:
        msg += f"\n{hint}"
    last = tail(paths.log)
    if last:
        msg += "\n--- last lines of the log ---\n" + last
    return StackError(msg)


def _hint(paths: Paths) -> str:
    where = (f"{paths.dir} and the link {paths.link}" if paths.link.is_symlink() else str(paths.link))
    return (f"Fix the cause shown in the log, or start afresh (losing the Prefect server's history): "
            f"`make down`, remove {where}, `make up`. To use SQLite instead, set {SETTING}=sqlite.")


def _pg(paths: Paths, *argv: str, sql: str | None = None, timeout: float = 60, check: bool = True,
        what: str | None = None) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program as user postgres; ``sql`` goes to its stdin (never into argv).
    On failure (``check``): a StackError naming the program and the log; the output goes to the
    log (argv and the output only: what is run here never carries the password)."""
    try:
        r = subprocess.run(["runuser", "-u", "postgres", "--", *argv], input=sql, capture_output=True,
                           text=True, timeout=timeout, cwd="/")
    except subprocess.TimeoutExpired:
        raise _fail(paths, f"{Path(argv[0]).name} did not finish within {timeout:.0f}s",
                    _hint(paths)) from None
    if check and r.returncode != 0:
        try:
            with open(paths.log, "a") as f:
                f.write(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}\n")
        except OSError:
            pass
        raise _fail(paths, f"{what or Path(argv[0]).name} failed (exit {r.returncode}): "
                           f"{' '.join(r.stderr.split())[-300:]}", _hint(paths))
    return r


def _psql(paths: Paths, port: int, sql: str, db: str = "postgres") -> str:
    """``sql`` (on stdin) as superuser postgres over the unix socket; the output, trimmed."""
    r = _pg(paths, str(PG_BIN / "psql"), "-h", str(paths.sock), "-p", str(port), "-U", "postgres",
            "-d", db, "-v", "ON_ERROR_STOP=1", "-X", "-q", "-tA", sql=sql, what="psql")
    return r.stdout.strip()


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of ``password`` (what ``ALTER ROLE .. PASSWORD`` stores;
    RFC 5802/7677), so the password itself never reaches the server, its log or its catalog."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _postmaster_pid(paths: Paths) -> int | None:
    try:
        return int((paths.data / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running(paths: Paths) -> int | None:
    """The PID of this cluster's postmaster if it runs (by its postmaster.pid, else the pidfile)."""
    for pid in (_postmaster_pid(paths), paths.procs.read_pid(NAME)):
        if pid and pid_alive(pid) and "postgres" in cmdline(pid) and str(paths.data) in cmdline(pid):
            return pid
    return None


def _place_dir(paths: Paths) -> None:
    """Make ``<state>/prefect/postgres`` a dir user postgres can reach: itself when postgres can
    traverse its parents, else a link to ``<tmp>/rb-prefect-pg-<hash>`` (as lab/postgres.py does)."""
    link = paths.link
    link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # Prefect's home: 0700, as Prefect makes it
    if link.is_symlink():
        target = link.resolve()
        if not target.exists():  # the temp dir was cleaned (a reboot): a new, empty cluster
            target.mkdir(parents=True)
            os.chmod(target, 0o755)
        return
    if link.exists():
        return
    if _pg(paths, "test", "-x", str(link.parent), check=False).returncode == 0:
        link.mkdir()
        return
    digest = hashlib.sha256(str(paths.state.resolve()).encode()).hexdigest()[:10]
    target = Path(tempfile.gettempdir()) / f"rb-prefect-pg-{digest}"
    target.mkdir(exist_ok=True)
    os.chmod(target, 0o755)
    link.symlink_to(target, target_is_directory=True)


def _configure(paths: Paths, port: int, pw: pwd.struct_passwd) -> None:
    conf = paths.data / "postgresql.auto.conf"  # rewritten every start: the port may be chosen anew
    conf.write_text(
        "# the Prefect server's database (written by deployments/prefect_db.py)\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {port}\n"
        f"unix_socket_directories = '{paths.sock}'\n"
        f"max_connections = {MAX_CONNECTIONS}\n"
        "password_encryption = 'scram-sha-256'\n"
        "shared_buffers = '64MB'\n"
        # like Prefect's SQLite (WAL, synchronous=NORMAL): a crash may lose the last commits,
        # never corrupt the database; it saves an fsync per Prefect API write
        "synchronous_commit = off\n"
        "log_min_error_statement = panic\n"  # no statement text in the log, ever
    )
    os.chown(conf, pw.pw_uid, pw.pw_gid)


def _initdb(paths: Paths, pw: pwd.struct_passwd) -> None:
    if paths.data.exists():
        shutil.rmtree(paths.data)  # a half-done initdb
    _pg(paths, str(PG_BIN / "initdb"), "-D", str(paths.data), "-U", "postgres", "-E", "UTF8", "--locale=C",
        "--auth-local=peer", "--auth-host=scram-sha-256", timeout=120)
    hba = paths.data / "pg_hba.conf"
    hba.write_text(
        "# the Prefect server's database: written by deployments/prefect_db.py\n"
        "local   all      postgres                 peer\n"
        f"host    {DBNAME}  {ROLE}     127.0.0.1/32  scram-sha-256\n"
    )
    os.chown(hba, pw.pw_uid, pw.pw_gid)


def _ensure_role(paths: Paths, port: int) -> None:
    """The role ``prefect`` with the password of the 0600 file (sent as a SCRAM verifier) and
    the database ``prefect`` it owns (Prefect's migrations create their extensions in it)."""
    password = write_secret_file(paths.password_file)  # [A-Za-z0-9_-]: safe in a SQL literal
    verb = "ALTER" if _psql(paths, port, f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'") == "1" else "CREATE"
    _psql(paths, port, f"{verb} ROLE {ROLE} WITH LOGIN NOSUPERUSER PASSWORD '{scram_verifier(password)}'")
    if _psql(paths, port, f"SELECT 1 FROM pg_database WHERE datname = '{DBNAME}'") != "1":
        _psql(paths, port, f"CREATE DATABASE {DBNAME} OWNER {ROLE}")


def start_postgres(state: Path) -> int:
    """Start the Prefect server's PostgreSQL under ``<state>/prefect/postgres`` (initdb the first
    time), or reuse the one that runs; make sure of its role and database. Returns its port."""
    paths = Paths(state)
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("the Prefect server's PostgreSQL: no 'postgres' user; install PostgreSQL 15 "
                         "(apt-get install postgresql-15) or set RUNBOOKS_PREFECT_DATABASE=sqlite") from None
    if not (PG_BIN / "pg_ctl").exists():
        raise StackError(f"the Prefect server's PostgreSQL: no {PG_BIN / 'pg_ctl'}; install PostgreSQL 15 "
                         "(apt-get install postgresql-15) or set RUNBOOKS_PREFECT_DATABASE=sqlite")
    port = _recorded_port(paths)
    pid = _running(paths) if paths.link.exists() else None
    if pid and port:
        recorded = port
        if wait_until(lambda: pg_answers(recorded), 10):
            paths.procs.write_pid(NAME, pid)
            _ensure_role(paths, port)
            return port
        stop_postgres(state)  # runs but does not answer on its port: start it afresh
    (state / "pids").mkdir(parents=True, exist_ok=True)
    _place_dir(paths)
    if len(str(paths.sock / ".s.PGSQL.65535")) > SOCK_MAX:
        raise StackError(f"the Prefect server's PostgreSQL: its socket dir {paths.sock} is too long a path "
                         "for a unix socket; use a shorter RUNBOOKS_STATE_DIR")
    if _pg(paths, "test", "-x", str(paths.dir), check=False).returncode != 0:
        raise StackError(f"the Prefect server's PostgreSQL: user postgres cannot reach {paths.dir}; make its "
                         "parent dirs traversable (chmod o+x) or set RUNBOOKS_STATE_DIR elsewhere")
    os.chown(paths.dir, pw.pw_uid, pw.pw_gid)
    paths.sock.mkdir(exist_ok=True)
    os.chown(paths.sock, pw.pw_uid, pw.pw_gid)
    paths.log.touch()
    os.chown(paths.log, pw.pw_uid, pw.pw_gid)
    stale = _postmaster_pid(paths)
    if stale and not pid_alive(stale):
        # died uncleanly: its lock file names a dead PID postgres would take for a running one
        (paths.data / "postmaster.pid").unlink(missing_ok=True)
        for f in paths.sock.glob(".s.PGSQL.*"):
            f.unlink(missing_ok=True)
    if not (paths.data / "PG_VERSION").exists():
        _initdb(paths, pw)
    if not port or port_in_use(port):
        port = free_port()
    _configure(paths, port, pw)
    _pg(paths, str(PG_BIN / "pg_ctl"), "-D", str(paths.data), "-w", "-t", "60", "-l", str(paths.log),
        "start", timeout=90, what="pg_ctl start")
    pid = _postmaster_pid(paths)
    if not pid:
        raise _fail(paths, "pg_ctl started it but it wrote no postmaster.pid", _hint(paths))
    paths.procs.write_pid(NAME, pid)
    paths.record.write_text(json.dumps({"port": port, "data": str(paths.data), "log": str(paths.log)}) + "\n")
    if not wait_until(lambda: pg_answers(port), 30):
        raise _fail(paths, f"does not answer on 127.0.0.1:{port} within 30s", _hint(paths))
    _ensure_role(paths, port)
    return port


def connection_url(state: Path) -> str:
    """``PREFECT_API_DATABASE_CONNECTION_URL`` of the cluster :func:`start_postgres` started: for
    the Prefect server's environment only (it holds the password: never log or print it)."""
    paths = Paths(state)
    port = _recorded_port(paths)
    if port is None or not paths.password_file.exists():
        raise StackError("the Prefect server's PostgreSQL was never started here (no "
                         f"{paths.record} or password file); start it first")
    password = paths.password_file.read_text().strip()
    return f"postgresql+asyncpg://{ROLE}:{quote(password, safe='')}@127.0.0.1:{port}/{DBNAME}"


def stop_postgres(state: Path) -> bool:
    """Stop the Prefect server's PostgreSQL: ``pg_ctl stop -m fast``, then its recorded PID
    (SIGINT = fast shutdown, then SIGKILL). True if one was running."""
    paths = Paths(state)
    pid = _running(paths) if paths.link.exists() else None
    if pid is None:
        paths.procs.pidfile(NAME).unlink(missing_ok=True)
        return False
    _pg(paths, str(PG_BIN / "pg_ctl"), "-D", str(paths.data), "-m", "fast", "-w", "-t", "30", "stop",
        timeout=45, check=False)
    paths.procs.stop_pid(NAME, pid, signal.SIGINT, timeout=10.0)
    paths.procs.pidfile(NAME).unlink(missing_ok=True)
    return True


def status(state: Path) -> tuple[str, int | None, int | None]:
    """(``up`` / ``not answering`` / ``down``, its PID, its port) of the Prefect server's PostgreSQL."""
    paths = Paths(state)
    pid = _running(paths) if paths.link.exists() else None
    port = _recorded_port(paths)
    if pid is None:
        return "down", None, port
    try:
        return ("up" if port and pg_answers(port) else "not answering"), pid, port
    except OSError:
        return "not answering", pid, port


def remove_postgres(state: Path) -> None:
    """Stop the cluster and delete it, data and password included (tests, benchmarks)."""
    paths = Paths(state)
    stop_postgres(state)
    if paths.link.is_symlink():
        shutil.rmtree(paths.link.resolve(), ignore_errors=True)
        paths.link.unlink()
    else:
        shutil.rmtree(paths.link, ignore_errors=True)
    for f in (paths.password_file, paths.record):
        f.unlink(missing_ok=True)
