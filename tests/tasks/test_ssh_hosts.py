from __future__ import annotations

import pytest

from incident.errors import HostKeyMismatchError
from incident.inventory import load_target
from tasks.ssh_hosts import read_host_resources, run_command

pytestmark = pytest.mark.lab


def test_arguments_are_quoted_for_the_remote_shell(lab):
    host = load_target("web", lab.inventory_path).ssh
    tricky = "it's; echo INJECTED $(id) `id` \"q\""
    result = run_command(host, ["printf", "%s", tricky])
    assert result.ok and result.stdout == tricky
    failing = run_command(host, ["sh", "-c", "echo oops >&2; exit 3"])
    assert failing.exit_code == 3 and failing.stderr.strip() == "oops"


def test_unpinned_host_key_is_refused(lab, tmp_path):
    host = load_target("web", lab.inventory_path).ssh
    other = tmp_path / "known_hosts"
    other.write_text("")
    with pytest.raises(HostKeyMismatchError, match="do not disable checks"):
        run_command(host.model_copy(update={"known_hosts": other}), ["true"])


def test_host_resources_are_read_over_ssh(prefect_api, lab):
    from prefect import flow

    @flow
    def _read():
        return read_host_resources(load_target("web", lab.inventory_path), paths=[str(lab.lab_dir)])

    res = _read()
    assert res.disks[0].path == str(lab.lab_dir) and res.disks[0].size_kb > 0
    assert 0 < res.mem_available_kb <= res.mem_total_kb
