"""A bursty request/response load like redis-benchmark -k 0 or ab: one single-threaded
server and a few client processes, each making short connections without keep-alive
(connect, request, answer, client closes first, so the clients' ends go to TIME_WAIT).

    python burst.py PORT CLIENTS CONNECTIONS_EACH

Runs on 127.0.0.1 in the caller's network namespace (the tracer's sock_diag sees it).
Prints the number of connections served. With BURST_COMM in the environment, its
processes take that command name (as prctl(PR_SET_NAME) would); with BURST_LINGER,
they stay that many seconds after their last connection, before they exit.
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import socket
import sys
import time

LINGER = float(os.environ.get("BURST_LINGER", "0"))

REQUEST = b"PING\r\n"
ANSWER = b"+PONG\r\n"


def serve(srv: socket.socket, expected: int) -> int:
    """Answer each request; close a connection when its client has closed (EOF)."""
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    closed = 0
    while closed < expected:
        for key, _ in sel.select(timeout=10):
            if key.fileobj is srv:
                conn, _ = srv.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            data = conn.recv(4096)
            if data:
                conn.sendall(ANSWER)
                continue
            sel.unregister(conn)
            conn.close()
            closed += 1
    return closed


def client(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as cli:
            cli.sendall(REQUEST)
            cli.recv(64)
    time.sleep(LINGER)


def burst(port: int, clients: int, each: int) -> int:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1024)
    procs = [multiprocessing.Process(target=client, args=(port, each)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    served = serve(srv, clients * each)
    for proc in procs:
        proc.join()
    srv.close()
    time.sleep(LINGER)
    return served


if __name__ == "__main__":
    if os.environ.get("BURST_COMM"):
        with open("/proc/self/comm", "w") as comm:
            comm.write(os.environ["BURST_COMM"])
    print(burst(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
