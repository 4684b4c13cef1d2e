"""Disk tasks over the lab's real sshd, on a scratch tree: what they find, what they delete,
and above all what they never touch (fresh files, symlinks, directories outside)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from incident.inventory import CleanupRule, DiskSpec, Target, load_target
from tasks.disk import PlannedDeletion, delete_old_files, find_old_files, glob_escape, read_disk_free
from tasks.disk import read_largest_dirs

pytestmark = pytest.mark.lab

DAY = 86400
TRICKY = "a b;$(touch x).log"  # a name with shell metacharacters: must be deleted, never executed


def _old(path: Path, days: float = 40, size: int = 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = time.time() - days * DAY
    os.utime(path, (t, t))
    return path


def _link(link: Path, to: Path, days: float = 40) -> None:
    link.symlink_to(to)
    t = time.time() - days * DAY
    os.utime(link, (t, t), follow_symlinks=False)


@pytest.fixture
def area(lab, tmp_path: Path) -> tuple[Target, Path, Path]:
    """Service web's SSH host with a disk spec over a scratch tree: (target, logs dir, outside dir)."""
    root = tmp_path.resolve()
    logs, outside = root / "disk" / "logs", root / "outside"
    logs.mkdir(parents=True)
    outside.mkdir()
    spec = DiskSpec(mount=str(root / "disk"), min_free_bytes=1, min_free_fraction=0.0,
                    cleanup=[CleanupRule(path=str(logs), older_than_days=30, what="logs")])
    web = load_target("web", lab.inventory_path)
    return web.model_copy(update={"service": web.service.model_copy(update={"disk": spec})}), logs, outside


def _plan(target: Target) -> list[PlannedDeletion]:
    return [PlannedDeletion(rule=c.rule, paths=[f.path for f in c.files]) for c in find_old_files(target)]


def test_deletes_the_old_files_once_then_already_fine(prefect_api, area):
    target, logs, outside = area
    old = [_old(logs / "app-1.log"), _old(logs / TRICKY), _old(logs / "sub" / "old.log", days=90),
           _old(logs / "old[1]*?.log")]
    fresh = _old(logs / "app-current.log", days=0)
    precious = _old(outside / "precious.log", days=90)
    _link(logs / "old-link.log", precious)  # an old symlink to a file outside: not a regular file
    home_x = Path.home() / "x"
    assert not home_x.exists()

    plan = _plan(target)
    assert sorted(plan[0].paths) == sorted(str(p) for p in old)
    # appears after the plan, old, and matched by the unescaped glob of "old[1]*?.log": must stay
    unplanned = _old(logs / "old1xx.log")

    first = delete_old_files(target, plan)
    assert first.changed, first.detail
    assert not any(p.exists() for p in old)
    assert first.freed_bytes == 4 * 1000 and "deleted 4 files" in first.detail
    assert fresh.exists() and precious.exists() and unplanned.exists()
    assert (logs / "old-link.log").is_symlink()
    assert not home_x.exists() and not (logs / "x").exists(), "a file name was executed"

    second = delete_old_files(target, plan)
    assert not second.changed
    assert second.detail.startswith("already fine")
    assert unplanned.exists()


def test_a_symlinked_directory_pointing_outside_is_not_followed(prefect_api, area):
    target, logs, outside = area
    kept = _old(outside / "keep" / "report.log", days=90)
    _link(logs / "archive", outside / "keep")
    mine = _old(logs / "own.log")

    plan = _plan(target)
    assert plan[0].paths == [str(mine)], "find followed the symlinked directory"
    # even a plan naming the path through the link does not reach the file
    plan[0].paths.append(str(logs / "archive" / "report.log"))
    result = delete_old_files(target, plan)
    assert result.changed and not mine.exists()
    assert kept.exists()
    assert result.outcomes[0].skipped == [str(logs / "archive" / "report.log")]


def test_a_directory_swapped_for_a_symlink_after_the_plan_is_not_followed(prefect_api, area):
    target, logs, outside = area
    planned_file = _old(logs / "sub" / "old.log")
    plan = _plan(target)
    assert plan[0].paths == [str(planned_file)]

    # between approval and execution, logs/sub becomes a symlink to a directory outside
    (logs / "sub").rename(outside / "moved")
    victim = _old(outside / "elsewhere" / "old.log")
    _link(logs / "sub", outside / "elsewhere")

    result = delete_old_files(target, plan)
    assert not result.changed
    assert victim.exists() and (outside / "moved" / "old.log").exists()
    assert result.outcomes[0].skipped == [str(planned_file)]


def test_a_rule_directory_that_is_a_symlink_is_refused(prefect_api, area):
    target, logs, outside = area
    _old(outside / "old.log")
    logs.rmdir()
    logs.symlink_to(outside)
    (found,) = find_old_files(target)
    assert found.files == [] and "symlink" in (found.problem or "")
    result = delete_old_files(target, [PlannedDeletion(rule=found.rule, paths=[str(logs / "old.log")])])
    assert not result.changed and (outside / "old.log").exists()


def test_glob_characters_are_escaped():
    assert glob_escape("/l/a[1]*?\\.log") == "/l/a\\[1\\]\\*\\?\\\\.log"


def test_df_and_du_read_the_lab_disk(prefect_api, healthy_lab):
    web = load_target("web", healthy_lab.inventory_path)
    free = read_disk_free(web)
    assert free.mounted_on == free.mount == web.service.disk.mount
    assert free.size_bytes == 64 << 20 and free.meets(web.service.disk)
    dirs = read_largest_dirs(web)
    assert {d.path for d in dirs} >= {f"{free.mount}/logs", f"{free.mount}/backups", f"{free.mount}/data"}
