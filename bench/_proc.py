"""CPU seconds of a process tree, from /proc (the benchmarks' one way to count them)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int, reaped: bool = True) -> float:
    """utime+stime of ``root`` and its live descendants; with ``reaped``, also what their
    children that already exited used (cutime+cstime)."""
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    last = 15 if reaped else 13  # fields 14-17 of stat(5): utime stime cutime cstime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        f = stats.get(pid)
        if f is None:
            continue
        total += sum(int(x) for x in f[11:last])
        todo.extend(children.get(pid, []))
    return total / CLK_TCK
