"""Two real processes with their own names, for owner attribution tests and demos.

    python peers.py server PORT NAME   listen, accept one, wait for the peer to close, close
    python peers.py client PORT NAME   connect, wait HOLD seconds, close (the active close)

The name is set through /proc/self/comm, as prctl(PR_SET_NAME) would, so the
kernel's `current->comm` and /proc both show it.
"""

from __future__ import annotations

import socket
import sys
import time

HOLD = 0.2


def set_name(name: str) -> None:
    with open("/proc/self/comm", "w") as f:
        f.write(name)


def server(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    print("ready", flush=True)
    conn, _ = srv.accept()
    while conn.recv(4096):
        pass
    time.sleep(HOLD)
    conn.close()
    srv.close()


def client(port: int) -> None:
    cli = socket.create_connection(("127.0.0.1", port))
    cli.sendall(b"hello")
    time.sleep(HOLD)
    cli.close()


if __name__ == "__main__":
    role, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    set_name(name)
    {"server": server, "client": client}[role](port)
