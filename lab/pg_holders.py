"""Long-lived PostgreSQL clients that break the lab's database, started by the PostgreSQL
faults of lab/postgres.py as lab processes (``start_holder``: pidfile + log, stopped by PID).

    python -m lab.pg_holders idle  PORT PASSWORD_FILE APP COUNT   # COUNT idle sessions
    python -m lab.pg_holders busy  PORT PASSWORD_FILE APP COUNT   # COUNT sessions in pg_sleep
    python -m lab.pg_holders lock  PORT PASSWORD_FILE APP KIND    # a blocker + 2 waiters on
                                                                  # accounts id=1; KIND: busy,
                                                                  # idle or respawn

Every session connects as the application's role ``app`` to database ``app`` over
127.0.0.1, named APP (waiters: ``lab-lock-waiter``). The password is read from the file,
never passed on the command line. Stopping the holder does not end a backend that is
running a query (PostgreSQL notices a lost client only when it next talks to it): the
faults' reset ends leftover sessions by application_name as well.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import psycopg

WAITER_APP = "lab-lock-waiter"
WAITERS = 2
LOCK_SQL = "UPDATE accounts SET balance = balance + 1 WHERE id = 1"


def _connect(port: int, password: str, app: str, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, dbname="app", user="app", password=password,
                           application_name=app, connect_timeout=5, autocommit=autocommit)


def _forever() -> None:
    while True:
        time.sleep(3600)


def hold_idle(port: int, password: str, app: str, count: int) -> None:
    conns = [_connect(port, password, app) for _ in range(count)]
    print(f"holding {len(conns)} idle sessions as {app}", flush=True)
    _forever()


def hold_busy(port: int, password: str, app: str, count: int) -> None:
    def sleep_in_db() -> None:
        try:
            with _connect(port, password, app) as conn:
                conn.execute("SELECT pg_sleep(3600)")
        except psycopg.Error as exc:  # ended by a runbook or the reset: stay ended
            print(f"busy session ended: {type(exc).__name__}", flush=True)

    for _ in range(count):
        threading.Thread(target=sleep_in_db, daemon=True).start()
    print(f"holding {count} busy sessions as {app}", flush=True)
    _forever()


def hold_lock(port: int, password: str, app: str, kind: str) -> None:
    """A blocker takes the row lock of accounts id=1 in a transaction; waiters queue behind it.

    busy: the blocker then runs pg_sleep (a cancel ends its transaction and frees the row);
    idle: the blocker sits idle in transaction (a cancel does nothing; a terminate frees it);
    respawn: the blocker takes the lock again right after being cancelled or terminated,
    and the waiters keep queueing, so the contention never clears.
    """
    held = threading.Event()

    def blocker() -> None:
        while True:
            try:
                with _connect(port, password, app, autocommit=False) as conn:
                    while True:
                        conn.execute(LOCK_SQL)
                        held.set()
                        print("blocker holds the row lock", flush=True)
                        if kind == "idle":
                            _forever()
                        try:
                            conn.execute("SELECT pg_sleep(3600)")
                        except psycopg.errors.QueryCanceled:
                            conn.rollback()
                            print("blocker cancelled", flush=True)
                            if kind != "respawn":
                                _forever()
            except psycopg.Error as exc:
                print(f"blocker session ended: {type(exc).__name__}", flush=True)
                if kind != "respawn":
                    return
                time.sleep(0.05)

    def waiter() -> None:
        held.wait()
        try:
            with _connect(port, password, WAITER_APP) as conn:
                while True:
                    conn.execute(LOCK_SQL)
                    if kind != "respawn":
                        print("waiter got the row", flush=True)
                        _forever()
                    time.sleep(0.05)
        except psycopg.Error as exc:
            print(f"waiter session ended: {type(exc).__name__}", flush=True)

    threading.Thread(target=blocker, daemon=True).start()
    held.wait(20)
    for _ in range(WAITERS):
        threading.Thread(target=waiter, daemon=True).start()
    _forever()


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] not in ("idle", "busy", "lock"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, port, pwfile, app, arg = argv
    password = Path(pwfile).read_text().strip()
    if mode == "idle":
        hold_idle(int(port), password, app, int(arg))
    elif mode == "busy":
        hold_busy(int(port), password, app, int(arg))
    else:
        if arg not in ("busy", "idle", "respawn"):
            print("lock KIND must be busy, idle or respawn", file=sys.stderr)
            return 2
        hold_lock(int(port), password, app, arg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
