"""Mass-close bursts on loopback, as a script run in its own network namespace.

Each round opens COUNT connections to one listener, accepts them all, then closes
every client and every accepted socket at once; the next round's sockets reuse the
memory (and so the kernel addresses) the last round freed. The listener is opened
and closed each round too. Prints the number of connections made.

    python massclose.py PORT ROUNDS COUNT

Every connection makes TRANSITIONS_PER_CONNECTION transitions (the client closes
first, the server once it has read the EOF), every round LISTENER_TRANSITIONS more.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time

TRANSITIONS_PER_CONNECTION = 10
LISTENER_TRANSITIONS = 2


def burst_round(port: int, count: int) -> None:
    srv = socket.socket(socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(count)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    accepted = [srv.accept()[0] for _ in range(count)]
    for cli in clients:
        cli.close()
    for conn in accepted:
        conn.recv(1)  # the client's FIN: the server closes second
        conn.close()
    srv.close()


def run(port: int, rounds: int, count: int) -> int:
    # each connection holds two descriptors at once (client and accepted socket);
    # the VM's default limit of 1024 is below what a round needs
    needed = 2 * count + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(needed, hard)))
    for _ in range(rounds):
        burst_round(port, count)
    settle(port)
    return rounds * count


TIME_WAIT = "06"  # the st column of /proc/net/tcp


def settle(port: int, timeout: float = 30.0) -> None:
    """Wait until every connection of the bursts has closed or waits in TIME_WAIT.
    A namespace torn down sooner (run_in_netns) takes the closes still under way with
    it, and their last transitions never happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as table:
            rows = [line.split() for line in table.readlines()[1:]]
        ports = {f"{port:04X}"}
        if not any(
            row[3] != TIME_WAIT and {row[1].split(":")[1], row[2].split(":")[1]} & ports
            for row in rows
        ):
            return
        time.sleep(0.05)


def run_in_netns(port: int, rounds: int, count: int) -> subprocess.Popen:
    """Run the bursts in a fresh network namespace (unshare -n, loopback up)."""
    from .netutil import script_in_fresh_netns  # imported here: this file also runs as a script

    return script_in_fresh_netns(__file__, port, rounds, count)


if __name__ == "__main__":
    print(run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
