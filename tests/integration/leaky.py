"""A server that leaks: it accepts connections and never closes them, so each one
sits in CLOSE_WAIT once its client has gone. Run as a separate process (its pid is
the owner tcptrace must name):

    python -m tests.integration.leaky PORT [NAME]

NAME, if given, becomes its command name (comm), as a daemon's would.

Prints "listening" once it listens and "accepted N" after each connection.
"""

from __future__ import annotations

import socket
import sys

PR_SET_NAME = 15  # prctl(2): this thread's command name


def main(port: int, name: str | None = None) -> None:
    if name:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print("listening", flush=True)
    held = []
    while True:
        conn, _ = srv.accept()
        held.append(conn)  # never closed: the leak
        print(f"accepted {len(held)}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
