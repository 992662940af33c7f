"""Real sockets on loopback for the integration tests (never port 2024)."""

from __future__ import annotations

import contextlib
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Callable

RESERVED_PORT = 2024  # the workplace listens here: never touch it


def free_port(family: int = socket.AF_INET) -> int:
    """A free port below the ephemeral range, so churned client ports never collide."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    for port in range(20000 + (time.monotonic_ns() // 1000) % 10000, 32768):
        if port == RESERVED_PORT:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@contextlib.contextmanager
def listener(
    family: int = socket.AF_INET, port: int = 0, backlog: int = 16
) -> Iterator[socket.socket]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(backlog)
    try:
        yield srv
    finally:
        srv.close()


def set_reset_on_close(sock: socket.socket) -> None:
    """close() sends RST instead of FIN (SO_LINGER with zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def script_in_fresh_netns(
    script: str, *args: object, sysctls: dict[str, str] | None = None
) -> subprocess.Popen:
    """Run a Python script in a fresh network namespace (unshare -n, loopback up, these
    sysctls of the namespace set); its stdout is a pipe."""
    setup = "".join(
        f"sysctl -qw {shlex.quote(f'{key}={value}')} && " for key, value in (sysctls or {}).items()
    )
    return subprocess.Popen(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            f'ip link set lo up && {setup}exec "$0" "$@"',
            sys.executable,
            script,
            *map(str, args),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def close_at_fin(
    srv: socket.socket, count: int, accepted: Callable[[], object] = lambda: None
) -> threading.Thread:
    """A server thread that accepts count connections and closes each at the client's
    FIN (calling accepted() after each accept)."""

    def serve() -> None:
        for _ in range(count):
            conn, _ = srv.accept()
            accepted()
            conn.recv(1)  # the client's FIN
            conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    return server


def half_close_first(srv: socket.socket, port: int, count: int) -> None:
    """count clients shut down their sending side first and close once the server's
    FIN came: each enters TIME_WAIT as the kernel's event says, at once (no orphan
    waiting in FIN_WAIT2 for a poll to find it there)."""
    server = close_at_fin(srv, count)
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""  # the server's FIN: TIME_WAIT
    server.join(30)


# Connections a client may open before the server accepted them (below somaxconn, 4096).
ACCEPT_AHEAD = 1024


def clients_close_first(
    srv: socket.socket, port: int, count: int, rate: float | None = None, wait: float = 60.0
) -> None:
    """count loopback clients connect to srv and close first (their sockets go to
    TIME_WAIT); a server thread closes each at its FIN. rate: connections a second,
    else as fast as one process can, but never more than ACCEPT_AHEAD ahead of the
    server: a server thread starved on a loaded machine would let the accept queue
    overflow (somaxconn caps any backlog), and the handshakes it drops end otherwise."""
    ahead = threading.Semaphore(ACCEPT_AHEAD)
    server = close_at_fin(srv, count, ahead.release)
    started = time.monotonic()
    for i in range(count):
        if not ahead.acquire(timeout=wait):
            raise AssertionError(f"the server accepted {i - ACCEPT_AHEAD} of {count} in {wait} s")
        socket.create_connection(("127.0.0.1", port)).close()
        if rate is not None:
            time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
    server.join(wait)
