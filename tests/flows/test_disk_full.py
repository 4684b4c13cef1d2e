"""The disk-full runbook against the lab's real (tmpfs) disk, over the lab's real sshd."""

from __future__ import annotations

import os
import time

import pytest

from flows.disk_full import disk_full
from lab.disk import MIN_FREE_BYTES, mount_path, outside_path
from tests.helpers import escalations, new_incident_id, report, run_tags

pytestmark = pytest.mark.lab


@pytest.fixture
def disk_lab(healthy_lab):
    """A healthy lab, and the disk put right again after the test (for whoever runs next)."""
    yield healthy_lab
    for name in ("disk-filled-old-files", "disk-filled-fresh-data"):
        if not healthy_lab.fault_healthy(name):
            healthy_lab.reset_fault(name)


def _files(lab) -> set[str]:
    root = mount_path(lab.lab_dir)
    return {os.path.relpath(os.path.join(d, f), root)
            for d, dirs, files in os.walk(root) for f in files + dirs}


def test_old_logs_and_backups_are_deleted_and_space_verified(prefect_api, disk_lab):
    lab = disk_lab
    lab.inject("disk-filled-old-files")
    assert not lab.fault_healthy("disk-filled-old-files")
    disk, outside = mount_path(lab.lab_dir), outside_path(lab.lab_dir)

    incident_id = new_incident_id()
    state = disk_full(target="web", incident_id=incident_id, return_state=True)

    assert state.is_completed() and state.name == "Completed", state.message
    assert lab.fault_healthy("disk-filled-old-files")
    left = _files(lab)
    assert not any(f.startswith("logs/app-0") for f in left), left
    assert "backups/db-2024-01.tar.gz" not in left and "backups/db-2024-02.tar.gz" not in left
    # the traps are all still there
    for trap in ("logs/app-current.log", "backups/db-latest.tar.gz", "data/archive-old.db", "data/app.db"):
        assert (disk / trap).is_file(), f"{trap} was deleted"
    assert (disk / "logs" / "old-link.log").is_symlink() and (outside / "precious.log").is_file()
    assert (disk / "logs" / "linked-dir").is_symlink() and (outside / "keep" / "old-report.log").is_file()

    text = report(incident_id)
    assert "**Status:** resolved" in text
    # the plan: files and bytes per rule
    assert "only the 10 listed logs files (40.0 MiB): app-00.log" in text
    assert "only the 2 listed backups files (12.0 MiB)" in text and "db-2024-01.tar.gz" in text
    assert "| delete_old_files | approved | policy:delete-old-logs-and-backups-in-lab |" in text
    assert f"| delete_old_files | web:{disk} | yes | deleted 12 files, 52.0 MiB freed" in text
    assert "## Verification" in text and f"needs >= {MIN_FREE_BYTES >> 20}.0 MiB and >= 25% free" in text
    for phase in ("| diagnose |", "| contain |", "| fix |", "| verify |", "| close |"):
        assert phase in text, f"timeline lacks {phase}"
    assert "| largest directories | ok |" in text and f"{disk}/logs" in text
    tags = run_tags(state.state_details.flow_run_id)
    assert {"scenario:disk-full", "outcome:resolved", "severity:P1"} <= set(tags)


def test_a_disk_with_enough_space_is_left_alone(prefect_api, disk_lab):
    lab = disk_lab
    old_log = mount_path(lab.lab_dir) / "logs" / "old-but-harmless.log"
    old_log.write_bytes(b"x" * 1024)
    t = time.time() - 90 * 86400
    os.utime(old_log, (t, t))
    try:
        state = disk_full(target="web", return_state=True)
        assert state.is_completed() and state.name == "Already Fine", state.message
        assert old_log.exists(), "a healthy disk was cleaned"
    finally:
        old_log.unlink(missing_ok=True)


def test_dry_run_deletes_nothing(prefect_api, disk_lab):
    lab = disk_lab
    lab.inject("disk-filled-old-files")
    before = _files(lab)
    incident_id = new_incident_id()
    state = disk_full(target="web", dry_run=True, incident_id=incident_id, return_state=True)
    assert state.name == "Dry Run", state.message
    assert _files(lab) == before
    assert not lab.fault_healthy("disk-filled-old-files")
    text = report(incident_id)
    assert "| delete_old_files | dry run | dry run |" in text
    assert "| - | none | - | - | - |" in text, "dry run recorded an action"


def test_fresh_data_is_not_cleanable_so_the_run_escalates(prefect_api, disk_lab):
    lab = disk_lab
    lab.inject("disk-filled-fresh-data")
    disk = mount_path(lab.lab_dir)
    incident_id = new_incident_id()
    state = disk_full(target="web", incident_id=incident_id, return_state=True)

    assert state.is_failed(), state
    assert "still low on space after the cleanup" in state.message
    assert all((disk / "data" / f"fresh-{i:02d}.bin").is_file() for i in range(13)), "data was touched"
    assert (disk / "logs" / "app-current.log").is_file()
    assert not (disk / "logs" / "app-old-1.log").exists(), "the old logs should have been cleaned"

    text = report(incident_id)
    assert "**Status:** failed" in text
    escalated = text.split("## Escalations", 1)[1].split("##", 1)[0]
    assert f"largest directories: {disk}/data 52.0 MiB" in escalated
    assert "deleted 2 files, 2.0 MiB freed" in escalated and "app-old-1.log" in escalated
    assert "free of 64.0 MiB" in escalated
    found = escalations(prefect_api, incident_id)
    assert found and found[0]["payload"]["target"] == "web"
