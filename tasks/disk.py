"""Disk tasks over SSH: how full a filesystem is, what fills it, and deleting old files safely.

The runbooks' commands, as tasks on the service's ``ssh_host`` (inventory ``Service.disk``):

- 002 "Out of Disk Space": ``df -h``; ``find /var/log -type f -name "*.log" -mtime +30 -delete``;
  ``find /var/backups/... -type f -mtime +60 -delete``.
- 003: disk critically low below 1 GB free; 004: "database disk full".

Reading: ``read_disk_free`` (``df -PB1``), ``read_largest_dirs`` (``du -x -B1 -d 2``),
``find_old_files`` (per cleanup rule ``find PATH -xdev -type f -mtime +N -printf ...``).

Deleting (``delete_old_files``, a changing task) removes only the files the approved plan
listed, and of those only the ones that still qualify on the host when it runs:

- the rule's directory must still be its own real path (``realpath -e``): a path that has
  become, or sits below, a symlink is skipped whole;
- the very ``find`` that listed them runs again (same path, ``-xdev``, ``-type f``, same age)
  restricted with ``-path`` to the planned names (glob characters escaped) and deletes them
  itself with ``-delete``. ``find`` never follows symlinks: a symlink is not ``-type f``, a
  symlinked directory (or one swapped for a symlink since the plan) is not descended, and
  ``-xdev`` keeps it on that filesystem; so nothing outside the rule's directory is touched;
- files that vanished or got younger meanwhile are skipped and reported.

Every command is an argv list quoted before it reaches the remote shell, so a file name like
``a b;$(touch x).log`` is a name, never a command.
"""

from __future__ import annotations

import posixpath
import re

from pydantic import BaseModel

from incident.errors import ConfigurationError, SshError
from incident.inventory import CleanupRule, DiskSpec, SshHost, Target
from tasks.common import ActionResult, changing_task, read_only_task
from tasks.ssh_hosts import CommandResult, require_ssh, run_command, ssh_session

MiB = 1 << 20
GiB = 1 << 30
#: One remote command line stays well below Linux's 128 KiB limit for one argument (sh -c).
MAX_COMMAND_CHARS = 60_000
_DF_LINE = re.compile(r"^(?P<fs>.*?)\s+(?P<size>\d+)\s+(?P<used>\d+)\s+(?P<avail>\d+)\s+\d+%\s+(?P<on>.*)$")


def human(n: int) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.0f} KiB" if abs(n) >= 1024 else f"{n} B"


# -- models -------------------------------------------------------------------------------
class DiskFree(BaseModel):
    """``df -PB1 MOUNT``: the filesystem holding the mount, in bytes."""

    mount: str
    mounted_on: str
    size_bytes: int
    used_bytes: int
    free_bytes: int

    @property
    def free_fraction(self) -> float:
        return self.free_bytes / self.size_bytes if self.size_bytes else 0.0

    def meets(self, spec: DiskSpec) -> bool:
        return self.free_bytes >= spec.min_free_bytes and self.free_fraction >= spec.min_free_fraction

    def describe(self, spec: DiskSpec | None = None) -> str:
        text = (f"{self.mount}: {human(self.free_bytes)} free of {human(self.size_bytes)} "
                f"({self.free_fraction:.0%} free, {human(self.used_bytes)} used)")
        if self.mounted_on != self.mount:
            text += f" [filesystem mounted on {self.mounted_on}]"
        if spec is not None:
            text += f"; needs >= {human(spec.min_free_bytes)} and >= {spec.min_free_fraction:.0%} free"
        return text


class DirUsage(BaseModel):
    path: str
    size_bytes: int


class OldFile(BaseModel):
    path: str
    size_bytes: int
    age_days: float


class RuleCandidates(BaseModel):
    """The regular files one cleanup rule would delete now (``problem``: why none were looked for)."""

    rule: CleanupRule
    files: list[OldFile] = []
    problem: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def describe(self, limit: int = 10) -> str:
        head = f"{len(self.files)} {self.rule.what} files older than {self.rule.older_than_days:g} d " \
               f"under {self.rule.path} ({human(self.total_bytes)})"
        if self.problem:
            return f"{self.rule.what} under {self.rule.path}: not searched ({self.problem})"
        return head + (": " + list_files(self.files, limit) if self.files else "")


class PlannedDeletion(BaseModel):
    """The files of one rule the approved plan deletes (the full list, not the capped display)."""

    rule: CleanupRule
    paths: list[str]


class RuleOutcome(BaseModel):
    rule: CleanupRule
    deleted: list[OldFile] = []
    skipped: list[str] = []  # vanished, younger, moved behind a symlink, or the rule path changed
    failed: list[str] = []  # still there after find -delete (see errors)
    errors: list[str] = []

    @property
    def freed_bytes(self) -> int:
        return sum(f.size_bytes for f in self.deleted)


class DeletionResult(ActionResult):
    outcomes: list[RuleOutcome] = []

    @property
    def freed_bytes(self) -> int:
        return sum(o.freed_bytes for o in self.outcomes)


def list_files(files: list[OldFile], limit: int = 10) -> str:
    shown = ", ".join(f"{posixpath.basename(f.path)} ({f.age_days:.0f} d, {human(f.size_bytes)})"
                      for f in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def describe_dirs(dirs: list[DirUsage]) -> str:
    return ", ".join(f"{d.path} {human(d.size_bytes)}" for d in dirs) or "(none)"


# -- helpers ------------------------------------------------------------------------------
def disk_spec(target: Target) -> DiskSpec:
    if target.service.disk is None:
        raise ConfigurationError(target.name, "no disk in the inventory", "a disk: {mount, cleanup}",
                                 "add disk (mount, thresholds, cleanup rules) to the service")
    return target.service.disk


def age_args(days: float) -> list[str]:
    """find's age test: ``-mtime +N`` as in the runbooks, ``-mmin`` for fractions of days."""
    return ["-mtime", f"+{int(days)}"] if float(days).is_integer() else ["-mmin", f"+{int(days * 1440)}"]


def find_args(rule: CleanupRule) -> list[str]:
    """The one predicate of a rule: regular files (never symlinks) on that filesystem, old enough."""
    return ["find", rule.path, "-xdev", "-type", "f", *age_args(rule.older_than_days)]


def glob_escape(path: str) -> str:
    """A literal ``find -path`` pattern: backslash before every glob character."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", path)


def _where(host: SshHost) -> str:
    return f"{host.hostname}:{host.port}"


def _rule_path_problem(rule: CleanupRule, realpath: CommandResult | None) -> str | None:
    """Why a rule's directory must not be searched, or None (absolute, normal, no symlinks)."""
    if not rule.path.startswith("/") or posixpath.normpath(rule.path) != rule.path:
        return "not an absolute normalised path"
    if realpath is None or not realpath.ok:
        return "does not exist" + (f" ({realpath.stderr.strip()})" if realpath and realpath.stderr else "")
    real = realpath.stdout.rstrip("\n")
    if real != rule.path:
        return f"resolves to {real} (a symlink in the path): refused"
    return None


def _parse_found(out: str, now: float) -> list[OldFile]:
    files = []
    for record in out.split("\0"):
        size, sep, rest = record.partition("\t")
        mtime, sep2, path = rest.partition("\t")
        if sep and sep2 and path and "\ufffd" not in path:  # a name that is not UTF-8 is left alone
            files.append(OldFile(path=path, size_bytes=int(size), age_days=(now - float(mtime)) / 86400))
    return files


def _candidates(run, rule: CleanupRule, now: float) -> RuleCandidates:
    """Look for a rule's old files on an open session (realpath check first)."""
    checked = run(["realpath", "-e", "--", rule.path])
    problem = _rule_path_problem(rule, checked)
    if problem:
        return RuleCandidates(rule=rule, problem=problem)
    found = run([*find_args(rule), "-printf", r"%s\t%T@\t%p\0"], timeout_s=120.0)
    files = _parse_found(found.stdout, now)
    if not found.ok and not files:
        return RuleCandidates(rule=rule, problem=f"find failed: {found.stderr.strip()[:300]}")
    files.sort(key=lambda f: (-f.size_bytes, f.path))
    return RuleCandidates(rule=rule, files=files)


def _remote_now(run, host: SshHost) -> float:
    res = run(["date", "+%s"])
    try:
        return float(res.stdout.strip())
    except ValueError:
        raise SshError(_where(host), f"`date +%s` answered {res.stdout!r}", "the host's clock",
                       "check the host by hand") from None


def _batches(paths: list[str], limit: int = MAX_COMMAND_CHARS) -> list[list[str]]:
    batches: list[list[str]] = [[]]
    size = 0
    for p in paths:
        cost = 2 * len(p) + 16  # escaped and quoted, plus "-o -path"
        if batches[-1] and size + cost > limit:
            batches.append([])
            size = 0
        batches[-1].append(p)
        size += cost
    return [b for b in batches if b]


def _path_alternatives(paths: list[str]) -> list[str]:
    expr: list[str] = ["("]
    for i, p in enumerate(paths):
        expr += (["-o"] if i else []) + ["-path", glob_escape(p)]
    return expr + [")"]


# -- read-only tasks ----------------------------------------------------------------------
@read_only_task
def read_disk_free(target: Target) -> DiskFree:
    """Runbook 002/003: ``df`` of the service's disk mount, in bytes."""
    host, spec = require_ssh(target), disk_spec(target)
    res = run_command(host, ["df", "-PB1", "--", spec.mount])
    lines = res.stdout.splitlines()
    match = _DF_LINE.match(lines[1]) if res.ok and len(lines) > 1 else None
    if match is None:
        raise SshError(_where(host), f"df {spec.mount} failed: {res.stderr.strip() or res.stdout!r}",
                       f"df to report {spec.mount}", "check that the mount exists on the host")
    return DiskFree(mount=spec.mount, mounted_on=match["on"], size_bytes=int(match["size"]),
                    used_bytes=int(match["used"]), free_bytes=int(match["avail"]))


@read_only_task
def read_largest_dirs(target: Target, depth: int = 2, top: int = 8) -> list[DirUsage]:
    """What fills the disk: ``du -x -B1 -d DEPTH MOUNT``, the largest directories below the mount."""
    host, spec = require_ssh(target), disk_spec(target)
    res = run_command(host, ["du", "-x", "-B1", "-d", str(depth), "--null", "--", spec.mount],
                      timeout_s=120.0)
    dirs = []
    for record in res.stdout.split("\0"):
        size, sep, path = record.partition("\t")
        if sep and path != spec.mount:
            dirs.append(DirUsage(path=path, size_bytes=int(size)))
    if not dirs and not res.ok:
        raise SshError(_where(host), f"du {spec.mount} failed: {res.stderr.strip()[:300]}",
                       "du to list the directories", "check the mount on the host")
    return sorted(dirs, key=lambda d: (-d.size_bytes, d.path))[:top]


@read_only_task
def find_old_files(target: Target) -> list[RuleCandidates]:
    """Per cleanup rule, the regular files older than its threshold (sizes and ages)."""
    host, spec = require_ssh(target), disk_spec(target)
    with ssh_session(host) as run:
        now = _remote_now(run, host)
        return [_candidates(run, rule, now) for rule in spec.cleanup]


# -- the changing task --------------------------------------------------------------------
def _delete_rule(run, planned: PlannedDeletion, now: float) -> RuleOutcome:
    rule = planned.rule
    current = _candidates(run, rule, now)
    if current.problem:
        return RuleOutcome(rule=rule, skipped=list(planned.paths), errors=[current.problem])
    qualifying = {f.path: f for f in current.files}
    chosen = [p for p in dict.fromkeys(planned.paths) if p in qualifying]
    outcome = RuleOutcome(rule=rule, skipped=[p for p in planned.paths if p not in qualifying])
    left: set[str] = set()
    for batch in _batches(chosen):
        res = run([*find_args(rule), *_path_alternatives(batch), "-delete"], timeout_s=120.0)
        if res.stderr.strip():
            outcome.errors.append(res.stderr.strip()[:300])
        # what of the batch is still there, whatever its age now (not deleted = not freed)
        still = run(["find", rule.path, "-xdev", *_path_alternatives(batch), "-printf", r"%p\0"])
        left.update(p for p in still.stdout.split("\0") if p)
    outcome.deleted = [qualifying[p] for p in chosen if p not in left]
    outcome.failed = [p for p in chosen if p in left]
    return outcome


def describe_outcomes(outcomes: list[RuleOutcome], limit: int = 10) -> str:
    parts = []
    for o in outcomes:
        text = f"{len(o.deleted)} {o.rule.what} files under {o.rule.path} ({human(o.freed_bytes)})"
        if o.deleted:
            text += ": " + list_files(o.deleted, limit)
        if o.skipped:
            text += f"; skipped {len(o.skipped)} no longer qualifying"
        if o.failed:
            text += f"; FAILED to delete {len(o.failed)}: {', '.join(o.failed[:limit])}"
        if o.errors:
            text += f"; errors: {' | '.join(o.errors)}"
        parts.append(text)
    return "; ".join(parts)


@changing_task
def delete_old_files(target: Target, planned: list[PlannedDeletion]) -> DeletionResult:
    """Runbook 002 "clean old logs / backups": delete exactly the planned files that still qualify.

    See the module docstring for the checks made on the host at execution time. Nothing
    qualifying any more (vanished, younger, already deleted by an earlier run) is "already fine".
    """
    host, spec = require_ssh(target), disk_spec(target)
    rules = {r.path: r for r in spec.cleanup}
    for p in planned:
        if rules.get(p.rule.path) != p.rule:
            raise ConfigurationError(target.name, f"planned rule {p.rule.path} is not in the inventory",
                                     "only the inventory's cleanup rules", "re-run the diagnosis")
    with ssh_session(host) as run:
        now = _remote_now(run, host)
        outcomes = [_delete_rule(run, p, now) for p in planned if p.paths]
    deleted = sum(len(o.deleted) for o in outcomes)
    where = f"{target.name}:{spec.mount}"
    if not deleted and not any(o.failed for o in outcomes):
        total = sum(len(p.paths) for p in planned)
        return DeletionResult(action="delete_old_files", target=where, changed=False, outcomes=outcomes,
                              detail=f"already fine: none of the {total} planned files qualifies any "
                                     f"more (deleted already, vanished or younger); nothing deleted")
    result = DeletionResult(action="delete_old_files", target=where, changed=deleted > 0,
                            outcomes=outcomes, detail="")
    result.detail = (f"deleted {deleted} files, {human(result.freed_bytes)} freed: "
                     f"{describe_outcomes(outcomes)}")
    return result
