"""Which process holds a socket: the inode to process map that `ss -p` builds from /proc.

A full scan of /proc/*/fd costs milliseconds, so the map is cached and rebuilt
at most every `min_interval` seconds, and only when a look-up misses. Only
transitions the kernel could not attribute ever need it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import NamedTuple

PROC = "/proc"
# Rebuild the map at most this often (seconds): bounds the cost under churn.
MIN_RESCAN_INTERVAL = 0.25


class Owner(NamedTuple):
    pid: int
    comm: str


def read_comm(pid: int, proc: str = PROC) -> str | None:
    try:
        with open(f"{proc}/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


# Clock ticks a second of /proc/PID/stat's times.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NS_PER_S = 1_000_000_000
# /proc/PID/stat's start time, after the command's closing parenthesis: field 22
# of the line is the 20th after it.
_STARTTIME_AFTER_COMM = 19


def started_ns(pid: int, proc: str = PROC) -> int | None:
    """When the process started, on CLOCK_MONOTONIC (the clock of event times), to a
    clock tick; None when it is gone."""
    try:
        with open(f"{proc}/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    ticks = int(stat[stat.rindex(")") + 2 :].split()[_STARTTIME_AFTER_COMM])
    # the start time counts from boot, suspended time included (CLOCK_BOOTTIME)
    since_boot = ticks * NS_PER_S // CLOCK_TICKS
    return since_boot - (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns())


def scan_sockets(proc: str = PROC, shared: set[int] | None = None) -> dict[int, Owner]:
    """socket inode -> first process (lowest pid) holding it, from /proc/*/fd; into
    shared, the inodes several processes hold (a listener forked workers share)."""
    found: dict[int, Owner] = {}
    owners: dict[int, Owner | None] = {}  # one per process: a server may hold thousands
    try:
        pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            inode = int(target[8:-1])
            if inode in found:
                if shared is not None and found[inode].pid != pid:
                    shared.add(inode)
                continue
            if pid not in owners:
                comm = read_comm(pid, proc)
                owners[pid] = None if comm is None else Owner(pid, comm)
            owner = owners[pid]
            if owner is not None:
                found[inode] = owner
    return found


class ProcessIndex:
    """Cached inode -> Owner, rescanned lazily and at a bounded rate."""

    def __init__(self, min_interval: float = MIN_RESCAN_INTERVAL, proc: str = PROC) -> None:
        self.min_interval = min_interval
        self.proc = proc
        self.by_inode: dict[int, Owner] = {}
        self.shared: set[int] = set()  # inodes several processes held at the last scan
        self.scanned_at = float("-inf")
        self.scans = 0

    def refresh(self) -> None:
        self.shared = set()
        self.by_inode = scan_sockets(self.proc, self.shared)
        self.scanned_at = time.monotonic()
        self.scans += 1

    def started_ns(self, pid: int) -> int | None:
        return started_ns(pid, self.proc)

    def holder(self, inode: int, pids: Iterable[int]) -> Owner | None:
        """The first of these processes holding this socket inode: a look at their
        descriptors only, not a scan of /proc (which runs at a bounded rate)."""
        target = f"socket:[{inode}]"
        for pid in pids:
            fd_dir = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"{fd_dir}/{fd}") != target:
                        continue
                except OSError:
                    continue
                comm = read_comm(pid, self.proc)
                if comm is None:
                    break
                owner = self.by_inode[inode] = Owner(pid, comm)
                return owner
        return None

    def owner(self, inode: int, fresh: bool = False) -> Owner | None:
        """The process holding this socket inode, or None (gone, kernel-owned, unknown).

        fresh: scan now on a miss, whenever the last scan was (a listener opened a
        moment ago: few, and each found once)."""
        if inode == 0:
            return None
        found = self.by_inode.get(inode)
        exited = found is not None and not os.path.exists(f"{self.proc}/{found.pid}")
        if exited:
            # it held the socket at the last scan and has exited since (a server that
            # daemonised): a new scan says who holds it now, at once (once per exit)
            found = None
        due = time.monotonic() - self.scanned_at >= self.min_interval
        if found is None and (exited or fresh or due):
            self.refresh()
            found = self.by_inode.get(inode)
        return found
