"""``python -m lab.port_holder PORT``: listen on 127.0.0.1:PORT, accept each connection and
close it at once, never speaking HTTP: another program holding the web service's port (the
``web-port-held`` fault). Runs until stopped by its PID (the fault's reset, ``lab down``, or a
runbook after a person approved it).
"""

from __future__ import annotations

import signal
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m lab.port_holder PORT", file=sys.stderr)
        return 2
    port = int(args[0])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # bind past the TIME_WAIT sockets the web service left; a listening socket still
    # keeps any other program (SO_REUSEADDR or not) from binding the port
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    print(f"port_holder: listening on 127.0.0.1:{port}", flush=True)
    while True:
        conn, _ = s.accept()
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
