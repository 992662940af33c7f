"""A named server process for owner tests: listens, accepts, reports whom it accepted.

    python servers.py HOST PORT NAME [--reuseport] [--daemon]

Prints "pid N" (the process that accepts) and "ready" once listening, then one
line per accepted connection: the client's port. Each connection is read until
the client closes, then closed HOLD_S later. Exits when stdin closes.

--reuseport sets SO_REUSEPORT, so that several processes may listen on the same
address. --daemon listens, then forks and exits, as a server that daemonises
(nginx) does: the child serves the socket its exited parent opened.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time

# After the client's FIN, hold the socket (CLOSE_WAIT) this long before closing it:
# the tracer may look up the accepted socket's owner meanwhile. One closed at once
# leaves no holder to find, when the kernel could not name it (SO_REUSEPORT).
HOLD_S = 0.3


def serve_one(conn: socket.socket) -> None:
    while conn.recv(4096):
        pass
    time.sleep(HOLD_S)
    conn.close()


def main(host: str, port: int, name: str, reuseport: bool, daemon: bool) -> None:
    with open("/proc/self/comm", "w") as f:
        f.write(name)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    srv.bind((host, port))
    srv.listen(64)
    if daemon:
        parent = os.getpid()
        if os.fork():
            os._exit(0)
        while os.getppid() == parent:  # until the parent has exited
            select.select([], [], [], 0.01)
    print(f"pid {os.getpid()}", flush=True)
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([srv, stdin], [], [])
        if stdin in readable and not os.read(stdin, 1):
            break
        if srv in readable:
            conn, peer = srv.accept()
            print(peer[1], flush=True)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main(
        sys.argv[1],
        int(sys.argv[2]),
        sys.argv[3],
        "--reuseport" in sys.argv,
        "--daemon" in sys.argv,
    )
