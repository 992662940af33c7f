"""Network namespaces on the host: their inode numbers, `ip netns` names, and a path
through which each can be entered (for sock_diag in the socket's own namespace).

A namespace is known by its inode number, as `lsns -t net` and
`stat -L -c %i /run/netns/NAME` show it. Names come from /run/netns (bind mounts
made by `ip netns add`); a namespace without a name is reached through
/proc/PID/ns/net of a process inside it. The index is rebuilt on a miss, at most
every RESCAN_S (a walk of /proc: a few ms), so namespaces created while tracing
are found by their first transition.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

NETNS_RUN_DIR = Path("/run/netns")
PROC = Path("/proc")
# ioctl(NS_GET_NSTYPE) on a namespace file (linux/nsfs.h, Linux 4.11) returns its
# CLONE_NEW* type; other files fail it.
NS_GET_NSTYPE = 0xB703
CLONE_NEWNET = 0x40000000
# A missing inode rebuilds the index, at most this often.
RESCAN_S = 0.05


def own_netns() -> int:
    """The inode of the namespace this thread runs in."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def process_netns(pid: int, proc: Path = PROC) -> int | None:
    try:
        return os.stat(proc / str(pid) / "ns" / "net").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class Netns:
    inode: int
    name: str | None  # its `ip netns` name, if it has one
    path: str  # a path that opens it: /run/netns/NAME or /proc/PID/ns/net


def scan(run_dir: Path = NETNS_RUN_DIR, proc: Path = PROC) -> dict[int, Netns]:
    """Every network namespace that has a name or a process in it."""
    found: dict[int, Netns] = {}
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        names = []
    for name in names:
        path = run_dir / name
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue  # a stale name (its namespace was deleted)
        found.setdefault(inode, Netns(inode, name, str(path)))
    try:
        pids = [entry for entry in os.listdir(proc) if entry.isdigit()]
    except OSError:
        pids = []
    # plain strings, not Path objects: this runs every second while namespaces are
    # followed, and pathlib's joins cost more than the stat calls (BENCHMARKS.md)
    stat, root = os.stat, str(proc)
    for pid in pids:
        path = f"{root}/{pid}/ns/net"
        try:
            inode = stat(path).st_ino
        except OSError:
            continue  # gone, or a kernel thread
        if inode not in found:
            found[inode] = Netns(inode, None, path)
    return found


class NetnsIndex:
    """inode -> Netns, rebuilt on a miss at most every RESCAN_S."""

    def __init__(self, run_dir: Path = NETNS_RUN_DIR, proc: Path = PROC) -> None:
        self.run_dir = run_dir
        self.proc = proc
        self.known: dict[int, Netns] = {}
        self.scanned = -RESCAN_S  # time.monotonic() of the last scan

    def rescan(self) -> dict[int, Netns]:
        self.known = scan(self.run_dir, self.proc)
        self.scanned = time.monotonic()
        return self.known

    def get(self, inode: int) -> Netns | None:
        found = self.known.get(inode)
        if found is None and time.monotonic() - self.scanned >= RESCAN_S:
            found = self.rescan().get(inode)
        return found

    def name(self, inode: int) -> str | None:
        found = self.get(inode) if inode else None
        return found.name if found is not None else None

    def label(self, inode: int) -> str:
        """What the text output shows: the name, else the inode ('-' when unknown)."""
        if not inode:
            return "-"
        return self.name(inode) or str(inode)


def namespace_type(fd: int) -> int | None:
    """What an open file is a handle of: CLONE_NEWNET for a network namespace, another
    CLONE_NEW* for another namespace, None for a file that is none."""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return None


def resolve(text: str, run_dir: Path = NETNS_RUN_DIR, proc: Path = PROC) -> int:
    """A --netns value: an `ip netns` name, a path (/proc/PID/ns/net), or an inode number."""
    if text.isdigit():
        inode = int(text)
        if inode not in scan(run_dir, proc):
            raise ValueError(f"no network namespace with inode {inode}")
        return inode
    path = Path(text) if "/" in text else run_dir / text
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if "/" in text:
            raise ValueError(f"no network namespace at {text}") from None
        raise ValueError(f"no network namespace named {text} (ip netns list)") from None
    except OSError as exc:
        raise ValueError(f"cannot open {path}: {exc.strerror}") from None
    try:
        kind = namespace_type(fd)
        inode = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise ValueError(f"{path} is not a network namespace (as /proc/PID/ns/net is)")
    return inode
