"""The lab's disk: a small real filesystem (tmpfs, 64 MiB) mounted at ``<lab_dir>/disk``,
with ``logs/``, ``backups/`` and ``data/`` inside, and the faults that fill it.

The disk-full runbook (flows/disk_full.py) watches it over SSH as service ``web``'s disk.
Runbook 003's threshold (critical below 1 GB free) is scaled to this filesystem: 16 MiB
(a quarter of it) and a free fraction of 25 %.

Only this path is ever mounted or unmounted, and only if it lies under the lab dir and
/proc/self/mountinfo lists it as a mount point.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from lab.context import LabContext
from lab.faults import fault
from lab.proc import LabError

SIZE_MIB = 64
MiB = 1 << 20
#: Runbook 003 says "critical below 1 GB"; on the lab's 64 MiB tmpfs that is scaled to 16 MiB.
MIN_FREE_BYTES = 16 * MiB
MIN_FREE_FRACTION = 0.25
LOG_DAYS, BACKUP_DAYS = 30, 60  # runbook 002: logs older than 30 days, backups older than 60
SUBDIRS = ("logs", "backups", "data")
DAY = 86400


def mount_path(lab_dir: Path) -> Path:
    return Path(lab_dir).resolve() / "disk"


def outside_path(lab_dir: Path) -> Path:
    """Where the faults put files that symlinks inside logs/ point to: outside the mount."""
    return Path(lab_dir).resolve() / "disk-outside"


def disk_inventory(lab_dir: Path) -> dict:
    """Service ``web``'s ``disk`` entry of the lab's inventory (incident/inventory.py DiskSpec)."""
    mount = mount_path(lab_dir)
    return {
        "mount": str(mount),
        # runbook 003's 1 GB, scaled to the 64 MiB lab filesystem (see module docstring)
        "min_free_bytes": MIN_FREE_BYTES,
        "min_free_fraction": MIN_FREE_FRACTION,
        "cleanup": [
            {"path": str(mount / "logs"), "older_than_days": LOG_DAYS, "what": "logs"},
            {"path": str(mount / "backups"), "older_than_days": BACKUP_DAYS, "what": "backups"},
        ],
    }


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return {_unescape(line.split()[4]) for line in f if len(line.split()) > 4}


class Disk:
    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx
        self.path = mount_path(ctx.lab_dir)
        self.outside = outside_path(ctx.lab_dir)

    def _own(self) -> Path:
        if self.path.parent != self.ctx.lab_dir or self.path.is_symlink():
            raise LabError(f"disk: {self.path} is not the lab's own mount point under {self.ctx.lab_dir}")
        return self.path

    def mounted(self) -> bool:
        return str(self.path) in mount_points()

    def up(self) -> None:
        path = self._own()
        path.mkdir(parents=True, exist_ok=True)
        if not self.mounted():
            options = f"size={SIZE_MIB}m,mode=0755"
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise LabError(f"disk: mounting a {SIZE_MIB} MiB tmpfs on {path} failed: {r.stderr.strip()} "
                               "(the lab needs root for this)")
        for sub in SUBDIRS:
            (path / sub).mkdir(exist_ok=True)

    def down(self) -> None:
        path = self._own()
        if not self.mounted():
            return
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:  # busy (a shell sits in it): detach it, it goes when released
            subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True, timeout=30)
        shutil.rmtree(self.outside, ignore_errors=True)

    def status(self) -> str:
        return "up" if self.mounted() else "down (not mounted)"

    def free(self) -> tuple[int, int]:
        """(free bytes, size bytes) of the mounted filesystem, as df computes them."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def healthy(self) -> bool:
        if not self.mounted():
            return False
        free, size = self.free()
        return free >= MIN_FREE_BYTES and free / size >= MIN_FREE_FRACTION

    # ------------------------------------------------------------- what the faults write

    def write(self, rel: str, mib: float, age_days: float = 0.0, base: Path | None = None) -> Path:
        """A file of real bytes (tmpfs does not store holes) with its mtime ``age_days`` ago."""
        p = (base or self.path) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        chunk = b"\0" * MiB
        with open(p, "wb") as f:
            left = int(mib * MiB)
            while left > 0:
                f.write(chunk[:min(left, MiB)])
                left -= MiB
        if age_days:
            t = time.time() - age_days * DAY
            os.utime(p, (t, t))
        return p

    def symlink(self, rel: str, to: Path, age_days: float) -> None:
        link = self.path / rel
        link.symlink_to(to)
        t = time.time() - age_days * DAY
        os.utime(link, (t, t), follow_symlinks=False)

    def clear(self) -> None:
        """Delete what the faults wrote: everything in logs/, backups/, data/ of the mounted
        disk (never following symlinks), and the fault's files outside the mount."""
        self.up()  # mounted again if it was not: nothing below the mount point is touched otherwise
        for sub in SUBDIRS:
            d = self.path / sub
            for entry in list(d.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        shutil.rmtree(self.outside, ignore_errors=True)

    def fill_old_files(self) -> None:
        self.clear()
        for i in range(10):  # 40 MiB of logs older than 30 days
            self.write(f"logs/app-{i:02d}.log", 4, age_days=40 + i)
        self.write("backups/db-2024-01.tar.gz", 6, age_days=70)  # 12 MiB of backups older than 60
        self.write("backups/db-2024-02.tar.gz", 6, age_days=80)
        # traps: what must survive the cleanup
        self.write("logs/app-current.log", 1)  # fresh
        self.write("backups/db-latest.tar.gz", 1)  # fresh
        self.write("data/app.db", 2)  # fresh data
        self.write("data/archive-old.db", 1, age_days=100)  # old, but data/ is not cleaned
        precious = self.write("precious.log", 1, age_days=90, base=self.outside)  # outside the mount
        self.write("keep/old-report.log", 1, age_days=90, base=self.outside)
        self.symlink("logs/old-link.log", precious, age_days=90)  # an old symlink to a file outside
        self.symlink("logs/data-link.log", self.path / "data" / "archive-old.db", age_days=90)
        self.symlink("logs/linked-dir", self.outside / "keep", age_days=90)  # a directory outside
        self._check_filled()

    def fill_fresh_data(self) -> None:
        self.clear()
        for i in range(13):  # 52 MiB of fresh data: nothing a cleanup may touch
            self.write(f"data/fresh-{i:02d}.bin", 4)
        self.write("logs/app-old-1.log", 1, age_days=40)  # a little that can be cleaned
        self.write("logs/app-old-2.log", 1, age_days=45)
        self.write("logs/app-current.log", 1)
        self._check_filled()

    def _check_filled(self) -> None:
        if self.healthy():
            free, size = self.free()
            raise LabError(f"disk: filled, but still {free // MiB} MiB of {size // MiB} MiB free")


# --------------------------------------------------------------------------- faults


def _disk(lab) -> Disk:
    return Disk(lab.ctx)


@fault("disk-filled-old-files", scenario="disk-full", alert="DiskSpaceLow",
       description="fill the lab disk with logs older than 30 days and backups older than 60 "
                   "(plus traps: fresh files, old data, symlinks to files and a directory outside): "
                   "deleting the old logs and backups frees enough",
       reset=lambda lab: _disk(lab).clear(), healthy=lambda lab: _disk(lab).healthy())
def _inject_disk_filled_old_files(lab) -> None:
    _disk(lab).fill_old_files()


@fault("disk-filled-fresh-data", scenario="disk-full", alert="DiskSpaceLow",
       description="fill the lab disk with fresh files in data/ (not cleanable) and a few old logs: "
                   "the cleanup does not free enough, the runbook must escalate",
       reset=lambda lab: _disk(lab).clear(), healthy=lambda lab: _disk(lab).healthy(), heals=False)
def _inject_disk_filled_fresh_data(lab) -> None:
    _disk(lab).fill_fresh_data()
