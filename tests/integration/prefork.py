"""A pre-forking server, as nginx, apache prefork, gunicorn or postgres are: the master
listens, then forks WORKERS processes that accept on its socket; it never accepts.

    python prefork.py PORT

Prints "master PID", "worker PID" for each worker, then "ready". Each worker tells a
client its pid (a line), reads until the client closes, then closes. Stops (with its
workers) when stdin closes. With PREFORK_WORKER_COMM in the environment, worker N
takes the command name PREFORK_WORKER_COMM followed by N (as nginx names its workers).
With PREFORK_GATED, each worker accepts only when sent SIGUSR1 (once per signal), so
that a test decides when a connection's accept comes.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

WORKERS = 2


def work(srv: socket.socket, gated: bool) -> None:
    while True:
        if gated:
            signal.sigwait({signal.SIGUSR1})
        conn, _ = srv.accept()
        with conn:
            conn.sendall(f"{os.getpid()}\n".encode())
            while conn.recv(4096):
                pass


def main(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print("master", os.getpid(), flush=True)
    workers = []
    gated = bool(os.environ.get("PREFORK_GATED"))
    if gated:  # blocked before fork: sigwait takes it, no handler runs
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    for _ in range(WORKERS):
        pid = os.fork()
        if pid == 0:
            name = os.environ.get("PREFORK_WORKER_COMM")
            if name:
                with open("/proc/self/comm", "w") as comm:
                    comm.write(f"{name}{len(workers)}")
            try:
                work(srv, gated)
            finally:
                os._exit(0)
        workers.append(pid)
        print("worker", pid, flush=True)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes stdin
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    srv.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
