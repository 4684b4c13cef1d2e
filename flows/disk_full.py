"""Runbook: disk full (a service's filesystem is low on free space).

Automates these hand-written steps from ../shared/runbooks/:
- 002 "Scenario: Out of Disk Space": diagnosis `df -h`; fix: clean old logs
  (`find /var/log -type f -name "*.log" -mtime +30 -delete`) and old backups
  (`find /var/backups/... -type f -mtime +60 -delete`); "if the partition is still full,
  the volume must be extended" (a human).
- 003 "System Completely Down" / "If restart fails": disk space critically low below 1 GB
  (`df --output=avail`), emergency cleanup.
- 004 "Database disk full": `df -h`, clear old data or increase storage.

Phases: diagnose (over SSH on the service's host, read-only: `df -PB1` of the disk's mount,
the largest directories with `du -x`, per cleanup rule of the inventory the regular files
older than its threshold, with sizes and ages) -> contain (record; severity P1 when below the
critical free bytes, else the service's degraded severity) -> fix (delete exactly the listed
old files - approval gate, destructive; every path re-checked on the host when it runs, see
tasks/disk.py) -> verify (a fresh `df`: free bytes and free fraction above the thresholds,
else escalate with df, the largest directories and what was deleted, and fail).

Not automated: runbook 002's `docker system prune -a -f` - it frees space on the Docker
engine's data root, not on the watched mount (unless they share a filesystem), and as written it
would remove a stopped container that *is* an inventory service (the lab's web container while
it is down) and the images kept for rollback (`-a`); and extending the volume. Both are left to
the human the run escalates to (the escalation lists the largest directories).
"""

from __future__ import annotations

from prefect.states import State

from incident.approval import ActionPlan
from incident.errors import VerificationFailedError
from incident.inventory import DiskSpec, Severity, Target
from incident.kit import Diagnosis, already_fine, begin, change, escalate_and_fail, runbook_flow
from incident.record import Incident, Trigger
from tasks.disk import DirUsage, DiskFree, PlannedDeletion, RuleCandidates, age_args, delete_old_files
from tasks.disk import describe_dirs, disk_spec, find_old_files, human, list_files, read_disk_free
from tasks.disk import read_largest_dirs

SCENARIO = "disk-full"


class DiskDiagnosis(Diagnosis):
    free: DiskFree
    largest: list[DirUsage]
    candidates: list[RuleCandidates]

    @property
    def cleanable_bytes(self) -> int:
        return sum(c.total_bytes for c in self.candidates)


@runbook_flow(SCENARIO)
def disk_full(
    target: str = "web",
    dry_run: bool = False,
    trigger: Trigger | None = None,
    incident_id: str | None = None,
    listed_files: int = 10,
    largest_dirs: int = 8,
) -> State:
    """Free space on a service's disk by deleting old logs and backups, and prove it is enough.

    Args:
        target: service name in the inventory (it needs ``disk`` and ``ssh_host``).
        dry_run: diagnose and show the plan; delete nothing.
        trigger: the alert or person that started the run (kept in the record).
        incident_id: set by the alert gateway; generated when empty.
        listed_files: how many files per cleanup rule the plan and the record name (all are counted).
        largest_dirs: how many of the largest directories the findings and an escalation list.
    """
    incident, service = begin(SCENARIO, target, trigger, incident_id, dry_run)
    spec = disk_spec(service)

    # 1. Diagnose
    seen = diagnose(incident, service, spec, listed_files, largest_dirs)
    if seen.healthy:
        return already_fine(incident, seen)

    # 2. Contain
    incident.enter("contain", f"{spec.mount} is low on free space")
    critical = seen.free.free_bytes < spec.min_free_bytes
    incident.set_severity(Severity.P1 if critical else service.service.severity_degraded,
                          f"{human(seen.free.free_bytes)} free on {spec.mount}"
                          + (f" (critical: below {human(spec.min_free_bytes)})" if critical else ""))

    # 3. Fix: delete the old logs and backups the diagnosis listed
    incident.enter("fix", "delete old logs and backups (runbook 002)")
    planned = [PlannedDeletion(rule=c.rule, paths=[f.path for f in c.files])
               for c in seen.candidates if c.files]
    if not planned:
        return escalate_and_fail(
            incident, f"nothing qualifies for cleanup and {seen.free.describe(spec)}; largest "
            f"directories: {describe_dirs(seen.largest)}; extend the volume or move data by hand",
            expected="old logs or backups to delete",
        )
    step = change(incident, service, plan_cleanup(service, spec, seen, listed_files),
                  delete_old_files, service, planned)
    if not step.taken:
        return step.closed
    deleted = step.result.detail

    # 4. Verify: a fresh df
    incident.enter("verify", f">= {human(spec.min_free_bytes)} and >= {spec.min_free_fraction:.0%} "
                             f"free on {spec.mount}")
    after = read_disk_free(service)
    incident.verified(after.describe(spec))
    if not after.meets(spec):
        largest = read_largest_dirs(service, top=largest_dirs)
        return escalate_and_fail(
            incident, f"still low on space after the cleanup: {after.describe(spec)}; largest "
            f"directories: {describe_dirs(largest)}; cleanup: {deleted}; extend the volume or "
            "move data by hand", expected=f">= {human(spec.min_free_bytes)} and "
            f">= {spec.min_free_fraction:.0%} free", error=VerificationFailedError,
        )
    return incident.close("resolved", f"{human(after.free_bytes)} free on {spec.mount} again "
                                      f"({after.free_fraction:.0%}); {deleted}")


def diagnose(incident: Incident, service: Target, spec: DiskSpec, listed_files: int,
             largest_dirs: int) -> DiskDiagnosis:
    """df, the largest directories and the cleanup candidates: read-only, concurrently."""
    incident.enter("diagnose", f"checking {spec.mount} on {service.name}'s host")
    free = read_disk_free.submit(service)
    largest = read_largest_dirs.submit(service, top=largest_dirs)
    candidates = find_old_files.submit(service)

    df = free.result()
    ok = df.meets(spec)
    incident.finding("disk free", ok, df.describe(spec))
    dirs = largest.result()
    incident.finding("largest directories", True, describe_dirs(dirs))
    found = candidates.result()
    for c in found:
        incident.finding(f"old {c.rule.what}", c.problem is None, c.describe(listed_files))
    return DiskDiagnosis(healthy=ok, summary=df.describe(spec), free=df, largest=dirs, candidates=found)


def plan_cleanup(service: Target, spec: DiskSpec, seen: DiskDiagnosis, listed_files: int) -> ActionPlan:
    rules = []
    for c in seen.candidates:
        if c.files:
            rules.append(f"find {c.rule.path} -xdev -type f {' '.join(age_args(c.rule.older_than_days))} "
                         f"-delete, only the {len(c.files)} listed {c.rule.what} files "
                         f"({human(c.total_bytes)}): {list_files(c.files, listed_files)}")
    total = seen.cleanable_bytes
    return ActionPlan(
        action="delete_old_files",
        target=f"{service.name}:{spec.mount}",
        runs="; ".join(rules),
        expected_effect=f"frees {human(total)}: free space on {spec.mount} from "
                        f"{human(seen.free.free_bytes)} to about {human(seen.free.free_bytes + total)} "
                        f"(needs >= {human(spec.min_free_bytes)} and >= {spec.min_free_fraction:.0%}); "
                        "each file is re-checked on the host first (still a regular file under the "
                        "rule's directory, still old); symlinks are never followed",
        undo="none: deleted files are gone (restore a needed one from backup); nothing else is touched",
        destructive=True,
    )
