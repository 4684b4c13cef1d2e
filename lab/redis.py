"""Redis of the lab: one ``redis-server`` on 127.0.0.1, no persistence.

Run the way a production host runs it, so the redis-down runbook has the same shape
to work with (``systemctl start redis-server`` over SSH there, ``redisctl start`` here):

    redis/redis.conf   the config (written at every ``up``); ``daemonize yes`` with the
                       lab's pidfile (pids/redis.pid) and log (logs/redis.log)
    redis/redisctl     POSIX sh control script, like a service unit: ``start`` (idempotent:
                       a no-op when the pidfile's redis-server runs and answers PING),
                       ``status`` (exit 0 running and answering, 3 not running, with the
                       last log lines)

Redis writes its own pidfile, so ``Lab.down()`` and ``status`` find it by PID whoever
started it (the lab, or a runbook over SSH). Faults: ``redis-stopped``, ``redis-bad-config``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from lab.context import LabContext
from lab.faults import fault
from lab.proc import LabError, expect_cmdline, port_in_use, tcp_exchange, wait_until

expect_cmdline("redis", "redis-server")

#: Appended to redis.conf by the ``redis-bad-config`` fault: redis-server refuses to start.
BAD_DIRECTIVE = "lab-fault-not-a-directive yes"


def redis_answers(port: int) -> bool:
    return tcp_exchange(port, b"PING\r\n", 64).startswith(b"+PONG")


def redisctl_path(lab_dir: Path) -> Path:
    """Where the lab writes its Redis control script (the inventory's start_command)."""
    return Path(lab_dir) / "redis" / "redisctl"


def _conf_str(value: object) -> str:
    """A redis.conf argument, double-quoted (paths may hold spaces)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


REDISCTL = r"""#!/bin/sh
# redisctl: start / status of the lab's Redis, like a service unit (written by lab/redis.py).
# Exit codes as an init script: start 0 = running; status 0 = running and answering PING,
# 3 = not running, 4 = runs but does not answer.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
SERVER=@SERVER@
CLI=@CLI@
CONF=@CONF@
PIDFILE=@PIDFILE@
LOG=@LOG@
PORT=@PORT@

running() {  # the pidfile's process is alive and is a redis-server
    pid=$(head -n 1 "$PIDFILE" 2>/dev/null) || return 1
    case "$pid" in ''|*[!0-9]*) return 1 ;; esac
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q redis-server
}

answers() {
    [ "$(timeout 3 "$CLI" -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" = PONG ]
}

log_tail() {
    if [ -r "$LOG" ]; then
        echo "--- last lines of $LOG ---"
        tail -n "${1:-10}" "$LOG"
    fi
}

case "${1:-}" in
start)
    if running; then
        if answers; then
            echo "redis already running (pid $pid), answers PING on 127.0.0.1:$PORT"
            exit 0
        fi
        echo "redis runs (pid $pid) but does not answer PING on 127.0.0.1:$PORT; not starting another" >&2
        exit 1
    fi
    "$SERVER" "$CONF"
    code=$?
    if [ "$code" -ne 0 ]; then
        echo "redis-server $CONF exited $code" >&2
        log_tail 5 >&2
        exit 1
    fi
    i=0
    while [ "$i" -lt 100 ]; do
        if running && answers; then
            echo "redis started (pid $pid), answers PING on 127.0.0.1:$PORT"
            exit 0
        fi
        sleep 0.1
        i=$((i + 1))
    done
    echo "redis did not answer PING on 127.0.0.1:$PORT within 10 s of starting" >&2
    log_tail 10 >&2
    exit 1
    ;;
status)
    if running; then
        if answers; then
            echo "redis running (pid $pid), answers PING on 127.0.0.1:$PORT"
            exit 0
        fi
        echo "redis running (pid $pid) but does not answer PING on 127.0.0.1:$PORT"
        log_tail 10
        exit 4
    fi
    echo "redis not running (no live redis-server in $PIDFILE)"
    log_tail 10
    exit 3
    ;;
*)
    echo "usage: $0 start|status" >&2
    exit 2
    ;;
esac
"""


class Redis:
    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    @property
    def conf_path(self) -> Path:
        return self.ctx.redis_dir / "redis.conf"

    @property
    def ctl_path(self) -> Path:
        return redisctl_path(self.ctx.lab_dir)

    def answers(self) -> bool:
        try:
            return redis_answers(self.ctx.info.redis_port)
        except OSError:
            return False

    def config_text(self) -> str:
        ctx = self.ctx
        return (
            "# lab Redis (written by lab/redis.py at every `python -m lab up`; started by redisctl)\n"
            "bind 127.0.0.1\n"
            f"port {ctx.info.redis_port}\n"
            "protected-mode yes\n"
            f"dir {_conf_str(ctx.redis_dir)}\n"
            'save ""\n'
            "appendonly no\n"
            "daemonize yes\n"
            f"pidfile {_conf_str(ctx.pidfile('redis'))}\n"
            f"logfile {_conf_str(ctx.log('redis'))}\n"
        )

    def config_intact(self) -> bool:
        try:
            return self.conf_path.read_text() == self.config_text()
        except OSError:
            return False

    def write_files(self) -> None:
        """(Re)write redis.conf and redisctl: a config broken by a fault is put right."""
        ctx = self.ctx
        ctx.redis_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config_text())
        subs = {
            "@SERVER@": shutil.which("redis-server") or "/usr/bin/redis-server",
            "@CLI@": shutil.which("redis-cli") or "/usr/bin/redis-cli",
            "@CONF@": str(self.conf_path), "@PIDFILE@": str(ctx.pidfile("redis")),
            "@LOG@": str(ctx.log("redis")), "@PORT@": str(ctx.info.redis_port),
        }
        script = REDISCTL
        for key, value in subs.items():
            script = script.replace(key, shlex.quote(value))
        tmp = self.ctl_path.with_suffix(".tmp")
        tmp.write_text(script)
        tmp.chmod(0o755)
        tmp.replace(self.ctl_path)

    def ctl(self, action: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``redisctl <action>`` locally (the runbook runs it over SSH)."""
        return subprocess.run([str(self.ctl_path), action], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def up(self) -> None:
        ctx = self.ctx
        port = ctx.info.redis_port
        self.write_files()
        if ctx.procs.alive("redis"):
            if wait_until(lambda: redis_answers(port), 5):
                return
            raise ctx.fail("redis", f"runs (pid {ctx.read_pid('redis')}) but does not answer PING "
                                    f"on 127.0.0.1:{port}")
        if port_in_use(port):
            raise LabError(f"redis: port {port} on 127.0.0.1 is taken by another program; "
                           f"log: {ctx.log('redis')}")
        r = self.ctl("start")
        if r.returncode != 0 or not ctx.procs.alive("redis"):
            raise ctx.fail("redis", f"`{self.ctl_path} start` exited {r.returncode}: "
                                    f"{(r.stderr or r.stdout).strip()[-500:]}")

    def stop(self) -> None:
        self.ctx.procs.stop("redis")

    def break_config(self) -> None:
        """Append a directive redis-server rejects: ``redisctl start`` then fails."""
        with self.conf_path.open("a") as f:
            f.write(f"{BAD_DIRECTIVE}\n")

    def reset(self) -> None:
        """Put Redis right by hand: rewrite its config and start it (a no-op when it answers)."""
        self.up()

    def status(self) -> str:
        if not self.ctx.procs.alive("redis"):
            return "down"
        try:
            return "up" if redis_answers(self.ctx.info.redis_port) else "not answering"
        except OSError as exc:
            return f"not answering ({exc.strerror or type(exc).__name__})"


# --------------------------------------------------------------------------- faults


def _reset_redis(lab) -> None:
    lab.redis.reset()


def _redis_answers(lab) -> bool:
    return lab.redis.answers()


def _redis_answers_with_intact_config(lab) -> bool:
    return lab.redis.answers() and lab.redis.config_intact()


@fault("redis-stopped", scenario="redis-down", alert="RedisDown",
       description="stop the lab's redis-server by its PID: PING gets no answer, /health answers 503; "
                   "`redisctl start` (the inventory's start_command) heals it",
       reset=_reset_redis, healthy=_redis_answers)
def _inject_redis_stopped(lab) -> None:
    lab.stop_component("redis")


@fault("redis-bad-config", scenario="redis-down", alert="RedisDown",
       description="stop Redis and append an invalid directive to redis/redis.conf: `redisctl start` "
                   "fails (FATAL CONFIG FILE ERROR); the runbook must escalate",
       reset=_reset_redis, healthy=_redis_answers_with_intact_config, heals=False)
def _inject_redis_bad_config(lab) -> None:
    lab.stop_component("redis")
    lab.redis.break_config()
