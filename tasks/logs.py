"""Logs: the service's log file on its host, over SSH - its size, and rotating it without losing
a line.

Runbook 004 "Logging Issues - Log file too large": ``ls -lh /var/log/...`` (check the size),
``logrotate`` (rotate it), "fix log level if too verbose". On the inventory's
``services.<name>.app.log`` (``path`` on the service's ``ssh_host``, ``max_bytes``, ``keep``):

- :func:`read_log_file` - ``stat`` of the file and of its rotated copies
  (``path.1.gz`` .. ``path.<keep>.gz``), and of an uncompressed ``path.1`` a rotation stopped
  half-way would have left;
- :func:`rotate_log_file` (changing) - logrotate's ``copytruncate``, made lossless: the copy to
  ``path.1`` and the truncation run in **one** command under the lock the application takes on
  its log for every write (``flock <path> sh -c '...'``; the application appends with
  ``O_APPEND`` holding ``flock(LOCK_EX)``, so no write falls between the copy and the
  truncation, and its next write lands at the start of the emptied file); then the older
  compressed copies shift up (``path.1.gz`` -> ``path.2.gz`` ..., the copy beyond ``keep`` is
  removed) and ``path.1`` is compressed to ``path.1.gz``;
- :func:`check_rotation` - the file is under ``max_bytes``, ``gzip -t`` accepts the compressed
  copy, and nothing was lost: the application writes ``seq=<n> ...`` lines, so the last seq of
  the rotated copy + 1 must be the first seq of the live file.

Every command is an argv list quoted with ``shlex`` before it reaches the remote shell; the
scripts given to ``sh -c`` are built from quoted parts only.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable
from datetime import datetime, timezone

from pydantic import BaseModel

from incident.errors import ActionFailedError, ConfigurationError
from incident.inventory import LogSpec, SshHost, Target
from tasks.common import ActionResult, changing_task, read_only_task
from tasks.disk import human
from tasks.ssh_hosts import CommandResult, require_ssh, ssh_session

#: flock's exit code when the lock was not had in time (``flock -E``)
LOCK_TIMEOUT_EXIT = 75
#: exit codes of the locked copy-and-truncate script
_LEFTOVER_EXIT, _COPY_FAILED_EXIT, _TRUNCATE_FAILED_EXIT = 3, 4, 5
_SEQ = re.compile(r"\bseq=(\d+)")

Run = Callable[..., CommandResult]


def log_spec(target: Target) -> LogSpec:
    """The service's log file (inventory ``app.log``), or a ConfigurationError naming the field."""
    app = target.service.app
    if app is None or app.log is None:
        raise ConfigurationError(
            target.name, "no app.log in the inventory", "the service's log file",
            "add app.log {path, max_bytes, keep} to the service in the inventory",
        )
    if not app.log.path.startswith("/"):
        raise ConfigurationError(target.name, f"app.log.path {app.log.path!r} is not absolute",
                                 "an absolute path on the service's ssh_host", "fix app.log.path")
    return app.log


def rotated_path(spec: LogSpec, n: int, compressed: bool = True) -> str:
    return f"{spec.path}.{n}" + (".gz" if compressed else "")


def _where(host: SshHost) -> str:
    return f"{host.username}@{host.hostname}:{host.port}"


def _last(text: str, width: int = 300) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])
    return text if len(text) <= width else text[:width] + "..."


# --------------------------------------------------------------------------- models


class LogCopy(BaseModel):
    path: str
    size_bytes: int


class LogFile(BaseModel):
    """``stat`` of the log file and of its rotated copies, on the service's host."""

    path: str
    host: str
    at: datetime
    exists: bool
    size_bytes: int
    max_bytes: int
    keep: int
    copies: list[LogCopy] = []  # path.1.gz .. path.<keep>.gz that exist, newest first
    leftover: LogCopy | None = None  # an uncompressed path.1: a rotation stopped half-way

    @property
    def too_large(self) -> bool:
        return self.size_bytes > self.max_bytes

    def growth_per_s(self, earlier: LogFile) -> float | None:
        """Bytes/s the file grew since ``earlier`` (None if it shrank: rotated meanwhile)."""
        seconds = (self.at - earlier.at).total_seconds()
        if seconds <= 0 or self.size_bytes < earlier.size_bytes:
            return None
        return (self.size_bytes - earlier.size_bytes) / seconds

    def describe(self) -> str:
        if not self.exists:
            return f"{self.path} on {self.host} does not exist"
        text = (f"{self.path} on {self.host}: {human(self.size_bytes)} "
                f"({'over' if self.too_large else 'within'} the {human(self.max_bytes)} limit)")
        copies = ", ".join(f"{c.path.rsplit('/', 1)[-1]} {human(c.size_bytes)}" for c in self.copies)
        text += f"; rotated copies (keep {self.keep}): {copies or 'none'}"
        if self.leftover:
            text += (f"; an uncompressed {self.leftover.path} ({human(self.leftover.size_bytes)}) is left "
                     "from a rotation that stopped half-way")
        return text


class RotationResult(ActionResult):
    """What ``rotate_log_file`` did (sizes in bytes)."""

    size_before: int = 0
    rotated_bytes: int = 0
    compressed_bytes: int = 0
    removed: LogCopy | None = None  # the oldest copy beyond keep, removed
    size_after: int = 0


class RotationCheck(BaseModel):
    """The verification of a rotation: size, the compressed copy, no line lost."""

    path: str
    size_bytes: int
    max_bytes: int
    compressed: str
    gzip_ok: bool
    gzip_detail: str
    last_rotated_seq: int | None = None
    first_live_seq: int | None = None

    @property
    def under_max(self) -> bool:
        return self.size_bytes < self.max_bytes

    @property
    def contiguous(self) -> bool | None:
        """last seq of the rotated copy + 1 == first seq of the live file (None: not checked)."""
        if self.last_rotated_seq is None or self.first_live_seq is None:
            return None
        return self.last_rotated_seq + 1 == self.first_live_seq

    @property
    def ok(self) -> bool:
        return self.under_max and self.gzip_ok and self.contiguous is not False

    def summary(self) -> str:
        """One short line for a closing summary."""
        text = f"{self.path} rotated, now {human(self.size_bytes)}"
        if self.contiguous:
            text += f", no line lost (seq {self.last_rotated_seq} then {self.first_live_seq})"
        return text if self.ok else f"{text}; NOT verified: {self.describe()}"

    def describe(self) -> str:
        parts = [f"{self.path} is {human(self.size_bytes)} "
                 f"({'under' if self.under_max else 'NOT under'} {human(self.max_bytes)})",
                 f"{self.compressed}: " + ("gzip -t ok" if self.gzip_ok else f"gzip -t FAILED ({self.gzip_detail})")]
        if self.contiguous is None:
            parts.append("no line lost: not checked (" + (
                "no seq in the rotated copy" if self.last_rotated_seq is None
                else "no line written to the live file since the rotation") + ")")
        else:
            parts.append(f"last seq in the rotated copy {self.last_rotated_seq}, first seq in the live file "
                         f"{self.first_live_seq}: " + ("no line lost" if self.contiguous else "NOT contiguous"))
        return "; ".join(parts)


# --------------------------------------------------------------------------- reading


def _stat(run: Run, host: SshHost, spec: LogSpec) -> LogFile:
    """``stat`` the log, ``path.1`` and ``path.1.gz`` .. ``path.<keep>.gz`` in one command."""
    names = [spec.path, rotated_path(spec, 1, compressed=False),
             *(rotated_path(spec, n) for n in range(1, spec.keep + 1))]
    at = datetime.now(timezone.utc)
    result = run(["stat", "--printf", r"%s\t%n\n", "--", *names], timeout_s=30.0)
    sizes: dict[str, int] = {}
    for line in result.stdout.splitlines():
        size, _, name = line.partition("\t")
        if name in names and size.isdigit():
            sizes[name] = int(size)
    problems = [line for line in result.stderr.splitlines() if line.strip()
                and "No such file or directory" not in line]
    if problems:
        raise ConfigurationError(
            f"{spec.path} on {_where(host)}", f"stat failed: {_last(chr(10).join(problems))}",
            "the log file and its directory readable by the runbook's SSH user",
            "check app.log.path in the inventory and the permissions of the log directory",
        )
    leftover = rotated_path(spec, 1, compressed=False)
    return LogFile(
        path=spec.path, host=_where(host), at=at, exists=spec.path in sizes,
        size_bytes=sizes.get(spec.path, 0), max_bytes=spec.max_bytes, keep=spec.keep,
        copies=[LogCopy(path=n, size_bytes=sizes[n]) for n in names[2:] if n in sizes],
        leftover=LogCopy(path=leftover, size_bytes=sizes[leftover]) if leftover in sizes else None,
    )


@read_only_task
def read_log_file(target: Target) -> LogFile:
    """Runbook 004 "check log file size" (``ls -lh /var/log/...``): the log and its rotated copies."""
    spec, host = log_spec(target), require_ssh(target)
    with ssh_session(host) as run:
        return _stat(run, host, spec)


# --------------------------------------------------------------------------- rotating (changing)


def copytruncate_command(spec: LogSpec, lock_timeout_s: int) -> list[str]:
    """``flock <path> sh -c '<copy to path.1, then truncate path>'``: one command under the lock
    the application takes for each write. Refuses to overwrite a ``path.1``; a copy that fails
    is removed (the live file untouched); prints the copy's size."""
    path, copy = spec.path, rotated_path(spec, 1, compressed=False)
    q = shlex.quote
    script = (
        f"test ! -e {q(copy)} || exit {_LEFTOVER_EXIT}; "
        f"{shlex.join(['cp', '-p', '--', path, copy])} || "
        f"{{ {shlex.join(['rm', '-f', '--', copy])}; exit {_COPY_FAILED_EXIT}; }}; "
        f"{shlex.join(['truncate', '-s', '0', '--', path])} || exit {_TRUNCATE_FAILED_EXIT}; "
        f"{shlex.join(['stat', '--printf', '%s', '--', copy])}"
    )
    return ["flock", "-x", "-w", str(lock_timeout_s), "-E", str(LOCK_TIMEOUT_EXIT), path, "sh", "-c", script]


def shift_command(spec: LogSpec) -> list[str]:
    """``sh -c``: remove ``path.<keep>.gz``, then move ``path.<n>.gz`` to ``path.<n+1>.gz`` for
    n = keep-1 .. 1 (those that exist), so ``path.1.gz`` is free."""
    q = shlex.quote
    steps = [shlex.join(["rm", "-f", "--", rotated_path(spec, spec.keep)])]
    for n in range(spec.keep - 1, 0, -1):
        src, dst = rotated_path(spec, n), rotated_path(spec, n + 1)
        steps.append(f"if test -e {q(src)}; then {shlex.join(['mv', '--', src, dst])}; fi")
    return ["sh", "-c", " && ".join(steps)]


def _free_bytes(run: Run, path: str) -> int | None:
    """Bytes available on the filesystem holding ``path``'s directory (None if df fails)."""
    directory = path.rsplit("/", 1)[0] or "/"
    result = run(["df", "-PB1", "--", directory], timeout_s=30.0)
    lines = result.stdout.strip().splitlines()
    if not result.ok or len(lines) < 2:
        return None
    fields = lines[-1].split()
    return int(fields[3]) if len(fields) >= 4 and fields[3].isdigit() else None


@changing_task
def rotate_log_file(target: Target, lock_timeout_s: int = 10, timeout_s: float = 300.0) -> RotationResult:
    """Runbook 004 "rotate logs if too large": copytruncate under the application's own lock,
    shift the compressed copies (removing only the one beyond ``keep``), compress the new copy.

    Re-checks first: a file within ``max_bytes`` (or gone) is "already fine", not rotated. Refuses
    (changing nothing) when a rotation stopped half-way left ``path.1``, or when the disk lacks
    room for the copy. A step that fails says what it left and how to finish by hand."""
    spec, host = log_spec(target), require_ssh(target)
    where = f"{spec.path} on {_where(host)}"
    copy = rotated_path(spec, 1, compressed=False)

    def failed(observed: str, next_step: str) -> ActionFailedError:
        return ActionFailedError(where, observed, "the log rotated, every line kept", next_step)

    with ssh_session(host) as run:
        before = _stat(run, host, spec)
        if not before.exists:
            return RotationResult(action="rotate_log_file", target=where, changed=False,
                                  detail=f"already fine: {spec.path} does not exist (moved or rotated by "
                                         "someone else); nothing rotated")
        if not before.too_large:
            return RotationResult(action="rotate_log_file", target=where, changed=False,
                                  size_before=before.size_bytes, size_after=before.size_bytes,
                                  detail=f"already fine: {before.describe()}; not rotated")
        if before.leftover is not None:
            raise failed(f"{copy} ({human(before.leftover.size_bytes)}) exists: a rotation stopped half-way; "
                         "nothing was changed",
                         f"compress it by hand (shift {spec.path}.N.gz up first, then `gzip -- {copy}`) "
                         "and rerun the runbook")
        free = _free_bytes(run, spec.path)
        needed = before.size_bytes + before.size_bytes // 4  # the copy, and room for its compression
        if free is not None and free < needed:
            raise failed(f"only {human(free)} free next to the log, the copy needs about {human(needed)}; "
                         "nothing was changed",
                         "free disk space first (disk-full runbook), or move the log to a larger disk")

        # 1. copy + truncate, one command under the application's lock
        done = run(copytruncate_command(spec, lock_timeout_s), timeout_s=timeout_s)
        if done.exit_code == LOCK_TIMEOUT_EXIT:
            raise failed(f"the lock on {spec.path} was not free within {lock_timeout_s} s; nothing was changed",
                         f"find who holds it (`fuser -v {spec.path}`) and rerun the runbook")
        if done.exit_code == _LEFTOVER_EXIT:
            raise failed(f"{copy} appeared meanwhile (another rotation?); nothing was changed",
                         f"check who rotates {spec.path} (logrotate?), then rerun the runbook")
        if done.exit_code == _COPY_FAILED_EXIT:
            raise failed(f"copying to {copy} failed ({_last(done.stderr)}); the partial copy was removed, "
                         f"{spec.path} is untouched", "fix the cause (disk, permissions) and rerun the runbook")
        if done.exit_code == _TRUNCATE_FAILED_EXIT:
            raise failed(f"copied to {copy} but truncating {spec.path} failed ({_last(done.stderr)}); "
                         f"{spec.path} still holds every line",
                         f"remove {copy} (a duplicate of the start of the live file), fix the cause, rerun")
        if not done.ok or not done.stdout.strip().isdigit():
            raise failed(f"`{done.command}` exited {done.exit_code}: {_last(done.stderr) or '(no stderr)'}",
                         f"check {spec.path} and {copy} by hand: if {copy} exists it holds the rotated lines")
        rotated = int(done.stdout.strip())

        # 2. shift the compressed copies, 3. compress the new one
        oldest = next((c for c in before.copies if c.path == rotated_path(spec, spec.keep)), None)
        shifted = run(shift_command(spec), timeout_s=60.0)
        if not shifted.ok:
            raise failed(f"rotated to {copy} (every line kept) but shifting the compressed copies failed: "
                         f"{_last(shifted.stderr) or f'exit {shifted.exit_code}'}",
                         f"finish by hand: move {spec.path}.N.gz to .N+1.gz (highest first), then "
                         f"`gzip -- {copy}`")
        zipped = run(["gzip", "--", copy], timeout_s=timeout_s)
        if not zipped.ok:
            raise failed(f"rotated to {copy} (every line kept) but `gzip` failed: "
                         f"{_last(zipped.stderr) or f'exit {zipped.exit_code}'}",
                         f"compress it by hand (`gzip -- {copy}`) once the cause is fixed")
        after = _stat(run, host, spec)

    compressed = next((c.size_bytes for c in after.copies if c.path == rotated_path(spec, 1)), 0)
    removed = f"; removed the oldest copy beyond keep={spec.keep}: {oldest.path} ({human(oldest.size_bytes)})" \
        if oldest else ""
    return RotationResult(
        action="rotate_log_file", target=where, changed=True, size_before=before.size_bytes,
        rotated_bytes=rotated, compressed_bytes=compressed, removed=oldest, size_after=after.size_bytes,
        detail=(f"copied {human(rotated)} to {copy} and truncated {spec.path} under its flock, compressed to "
                f"{rotated_path(spec, 1)} ({human(compressed)}){removed}; {spec.path} now "
                f"{human(after.size_bytes)}"),
    )


# --------------------------------------------------------------------------- verify


def _seq(line: str) -> int | None:
    match = _SEQ.search(line)
    return int(match.group(1)) if match else None


@read_only_task
def check_rotation(target: Target, wait_s: float = 10.0, interval_s: float = 0.5) -> RotationCheck:
    """Verify a rotation: the file under ``max_bytes``; ``gzip -t`` on ``path.1.gz``; its last
    ``seq=`` + 1 is the first ``seq=`` of the live file (waits up to ``wait_s`` for the
    application to write its first line after the rotation)."""
    spec, host = log_spec(target), require_ssh(target)
    gz = rotated_path(spec, 1)
    with ssh_session(host) as run:
        tested = run(["gzip", "-t", "--", gz], timeout_s=120.0)
        tail = run(["sh", "-c", f"gzip -dc -- {shlex.quote(gz)} | tail -n 1"], timeout_s=120.0)
        deadline = time.monotonic() + wait_s
        while True:
            head = run(["head", "-n", "1", "--", spec.path], timeout_s=30.0)
            first = _seq(head.stdout) if head.ok and head.stdout.endswith("\n") else None
            if first is not None or time.monotonic() >= deadline:
                break
            time.sleep(interval_s)
        live = _stat(run, host, spec)
    return RotationCheck(
        path=spec.path, size_bytes=live.size_bytes, max_bytes=spec.max_bytes, compressed=gz,
        gzip_ok=tested.ok, gzip_detail=_last(tested.stderr) or f"exit {tested.exit_code}",
        last_rotated_seq=_seq(tail.stdout) if tested.ok else None, first_live_seq=first,
    )
