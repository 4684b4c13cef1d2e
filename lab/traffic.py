"""Steady client traffic for the lab's web service: ``python -m lab.traffic URL RPS``.

Sends ``GET URL`` RPS times a second (one at a time, timeout 2 s; a slot missed while a
request hangs is skipped, not caught up), and prints a summary of the status codes every
10 s to its log (``logs/traffic.log``). Started by ``lab up`` as a lab process and stopped
by its PID at ``lab down``. Loopback only.
"""

from __future__ import annotations

import signal
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from urllib.parse import urlsplit

TIMEOUT_S = 2.0
SUMMARY_EVERY_S = 10.0


def _one(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            r.read()
            return str(r.status)
    except urllib.error.HTTPError as e:
        e.read()
        return str(e.code)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return type(reason).__name__ if isinstance(reason, BaseException) else "error"


def run(url: str, rps: float) -> None:
    if urlsplit(url).hostname != "127.0.0.1":
        raise SystemExit(f"traffic: {url} is not on 127.0.0.1")
    if rps <= 0:
        raise SystemExit("traffic: RPS must be > 0")
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"traffic: sending {rps:g} requests/s to {url}", flush=True)
    period = 1.0 / rps
    counts: Counter[str] = Counter()
    next_at = last_summary = time.monotonic()
    while not stop:
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
            continue
        counts[_one(url)] += 1
        next_at += period
        now = time.monotonic()
        if next_at < now:  # a slow answer: skip the missed slots
            next_at = now
        if now - last_summary >= SUMMARY_EVERY_S:
            print(f"traffic: {time.strftime('%H:%M:%S')} last {now - last_summary:.0f}s: "
                  + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())), flush=True)
            counts.clear()
            last_summary = now
    print("traffic: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lab.traffic URL RPS", file=sys.stderr)
        return 2
    run(args[0], float(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
