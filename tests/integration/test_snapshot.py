"""`tcptrace --snapshot` against `ss -tpen` for the same sockets."""

from __future__ import annotations

import re
import subprocess

from .cmd import Running
from .netutil import free_port
from .test_owners import Peer


def ss(*args: str) -> list[str]:
    out = subprocess.run(["ss", "-H", *args], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_snapshot_listening_matches_ss():
    port = free_port()
    server = Peer("server", port, "tt-server")
    try:
        code, out, err = Running("--snapshot", "-l", "-n", "-e", "--port", str(port)).wait()
        theirs = ss("-tlpen", f"sport = :{port}")
    finally:
        server.proc.kill()
        server.proc.wait()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["STATE", "LOCAL", "REMOTE", "PID", "COMM", "UID", "INODE"]
    assert len(lines) == 2 and len(theirs) == 1, (out, theirs)
    state, local, remote, pid, comm, uid, inode = lines[1].split()
    assert (state, local, remote) == ("LISTEN", f"127.0.0.1:{port}", "0.0.0.0:*")
    assert (pid, comm) == (str(server.pid), "tt-server")
    line = theirs[0]
    assert f'users:(("tt-server",pid={server.pid},' in line
    assert f"ino:{inode}" in line.split()
    assert f"uid:{uid}" in line.split() or uid == "0"
    assert re.search(rf"127\.0\.0\.1:{port}\s+0\.0\.0\.0:\*", line)


def test_snapshot_shows_both_ends_of_a_connection_with_their_owners():
    port = free_port()
    server = Peer("server", port, "tt-server")
    client = Peer("client", port, "tt-client", "--wait")
    try:
        code, out, err = Running("--snapshot", "-n", "--port", str(port)).wait()
    finally:
        client.go()
        client.wait()
        server.wait()
    assert code == 0, err
    rows = {tuple(line.split()[:3]): line.split()[3:] for line in out.splitlines()[1:]}
    client_end = f"127.0.0.1:{client.said[0]}"
    server_end = f"127.0.0.1:{port}"
    assert rows[("LISTEN", server_end, "0.0.0.0:*")] == [str(server.pid), "tt-server"]
    assert rows[("ESTABLISHED", server_end, client_end)] == [str(server.pid), "tt-server"]
    assert rows[("ESTABLISHED", client_end, server_end)] == [str(client.pid), "tt-client"]
