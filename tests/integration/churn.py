"""Steady loopback connection churn at a fixed rate, as a script run in its own network
namespace (see run_in_netns) so that runs compare and the host's tables stay clean.

Each connection makes exactly TRANSITIONS_PER_CONNECTION transitions: the client
connects and closes first, the server reads the EOF and then closes (no simultaneous
close). The listener adds LISTENER_TRANSITIONS. Prints the number of connections.

    python churn.py PORT SECONDS RATE

It runs over IPv6 (::1), so that tracing with -6 leaves out the IPv4 loopback
churn other programs on the machine may make on the same port numbers.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

TRANSITIONS_PER_CONNECTION = 10  # client 5, accepted socket 5
LISTENER_TRANSITIONS = 2  # CLOSE -> LISTEN, LISTEN -> CLOSE


# Longest wait for the server to close its side of the last connections.
SERVER_DRAIN_S = 30.0


def serve(srv: socket.socket, served: list[int]) -> None:
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        while conn.recv(4096):
            pass  # until the client's FIN
        conn.close()
        served[0] += 1


def churn(port: int, seconds: float, rate: float) -> int:
    srv = socket.socket(socket.AF_INET6)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::1", port))
    srv.listen(1024)
    served = [0]
    server = threading.Thread(target=serve, args=(srv, served), daemon=True)
    server.start()
    done = 0
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) * rate) + 1
        while done < due:
            cli = socket.create_connection(("::1", port))
            cli.close()
            done += 1
        time.sleep(0.005)
    # Close the listener only once every connection was accepted and closed: one
    # still queued would be reset with it and make fewer transitions (a loaded
    # machine can keep the server thread seconds behind).
    deadline = time.monotonic() + SERVER_DRAIN_S
    while served[0] < done and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the last close's own transitions
    srv.shutdown(socket.SHUT_RDWR)
    srv.close()
    server.join(5)
    return done


def run_in_netns(
    port: int, seconds: float, rate: float, sysctls: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start the churn in a fresh network namespace (unshare -n, loopback up, these
    sysctls of the namespace set)."""
    from .netutil import script_in_fresh_netns  # imported here: this file also runs as a script

    return script_in_fresh_netns(__file__, port, seconds, rate, sysctls=sysctls)


if __name__ == "__main__":
    print(churn(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])))
