"""Alertmanager-compatible label fingerprints.

Alertmanager identifies an alert by ``model.LabelSet.Fingerprint()`` from
prometheus/common: label names sorted, then FNV-1a 64-bit over
``name 0xff value 0xff`` for every pair, printed as 16 lower-case hex digits
(``%016x``). Checked against a real capture: zulip's alert.json alert 1 has
labels {alertname, host, severity} and fingerprint ``a1bc48475b20e73d``.
"""

from __future__ import annotations

from collections.abc import Mapping

_FNV64_OFFSET = 14695981039346656037
_FNV64_PRIME = 1099511628211
_MASK64 = (1 << 64) - 1
_SEPARATOR = 0xFF


def _fnv1a_add(h: int, data: bytes) -> int:
    for byte in data:
        h ^= byte
        h = (h * _FNV64_PRIME) & _MASK64
    return h


def labels_fingerprint(labels: Mapping[str, str]) -> str:
    """The fingerprint Alertmanager would compute for this label set."""
    h = _FNV64_OFFSET
    for name in sorted(labels):
        h = _fnv1a_add(h, name.encode("utf-8"))
        h = _fnv1a_add(h, bytes((_SEPARATOR,)))
        h = _fnv1a_add(h, labels[name].encode("utf-8"))
        h = _fnv1a_add(h, bytes((_SEPARATOR,)))
    return f"{h:016x}"
