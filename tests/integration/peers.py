"""Two real processes with their own names, for owner attribution tests and demos.

    python peers.py server PORT NAME   listen; accept one; when the peer closes, close
    python peers.py client PORT NAME   connect; close after a line on stdin (or HOLD s)

Each prints "ready" once its socket is set up. The name is set through
/proc/self/comm, as prctl(PR_SET_NAME) does, so both the kernel's
`current->comm` and /proc show it.
"""

from __future__ import annotations

import socket
import sys
import time

HOLD = 0.2


def set_name(name: str) -> None:
    with open("/proc/self/comm", "w") as f:
        f.write(name)


def ready() -> None:
    print("ready", flush=True)


def server(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    ready()
    conn, _ = srv.accept()
    while conn.recv(4096):
        pass
    time.sleep(HOLD)
    conn.close()
    srv.close()


def client(port: int, wait: bool) -> None:
    cli = socket.create_connection(("127.0.0.1", port))
    cli.sendall(b"hello")
    print(cli.getsockname()[1], flush=True)
    ready()
    if wait:
        sys.stdin.readline()
    else:
        time.sleep(HOLD)
    cli.close()


if __name__ == "__main__":
    role, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    set_name(name)
    if role == "server":
        server(port)
    else:
        client(port, wait="--wait" in sys.argv)
