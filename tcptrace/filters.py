"""What to trace: ports, address family and states, parsed from the command line.

The kernel applies these (see bpf/tcptrace.bpf.c); `Filters.matches` is the same
rule in Python, for sockets found with sock_diag and for tests.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from tcptrace.states import TcpState, parse_state, state_mask

MIN_PORT = 1
MAX_PORT = 65535

# Bits of the kernel's ports map and of its FILTER_PORTS define.
PORT_ANY = 1
PORT_LOCAL = 2
PORT_REMOTE = 4
# Bits of the kernel's FILTER_OWNER define.
OWNER_PID = 1
OWNER_COMM = 2
OWNER_CGROUP = 4
# Longest command name the kernel keeps (TASK_COMM_LEN less the NUL).
MAX_COMM = 15


def parse_port(text: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a port number")
    port = int(text)
    if not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(f"port {port} is out of range {MIN_PORT}-{MAX_PORT}")
    return port


def parse_ports(text: str) -> frozenset[int]:
    """Parse '80,443,8000-8100' into the set of ports it names."""
    ports: set[int] = set()
    for item in text.split(","):
        if not item.strip():
            raise ValueError(f"empty item in port list {text!r}")
        if "-" in item:
            lo_text, _, hi_text = item.partition("-")
            lo, hi = parse_port(lo_text), parse_port(hi_text)
            if lo > hi:
                raise ValueError(f"reversed port range {item.strip()!r}")
            ports.update(range(lo, hi + 1))
        else:
            ports.add(parse_port(item))
    return frozenset(ports)


def parse_states(text: str) -> frozenset[TcpState]:
    """Parse 'SYN_SENT,TIME-WAIT' into states."""
    states = frozenset(parse_state(item) for item in text.split(",") if item.strip())
    if not states:
        # an empty list must not silently mean "every state"
        raise ValueError(f"no TCP state named in {text!r}")
    return states


@dataclass(frozen=True)
class CgroupFilter:
    """--cgroup: a cgroup directory and everything below it."""

    path: str  # relative to the mount, starting with /
    id: int
    level: int  # components below the root: / is 0, /system.slice is 1


@dataclass(frozen=True)
class Filters:
    ports: frozenset[int] = frozenset()
    local_ports: frozenset[int] = frozenset()
    remote_ports: frozenset[int] = frozenset()
    family: int = 0  # 0 for both, else socket.AF_INET or socket.AF_INET6
    states: frozenset[TcpState] = field(default_factory=frozenset)
    # sockets of these network namespaces (inode numbers)
    netns: frozenset[int] = frozenset()
    # owners: these processes, these command names, these cgroups (and below)
    pids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()
    cgroups: tuple[CgroupFilter, ...] = ()

    @property
    def owner_checks(self) -> int:
        """FILTER_OWNER: which owner checks the kernel applies."""
        checks = 0
        if self.pids:
            checks |= OWNER_PID
        if self.comms:
            checks |= OWNER_COMM
        if self.cgroups:
            checks |= OWNER_CGROUP
        return checks

    @property
    def port_checks(self) -> int:
        """FILTER_PORTS: which port checks the kernel applies."""
        checks = 0
        if self.ports:
            checks |= PORT_ANY
        if self.local_ports:
            checks |= PORT_LOCAL
        if self.remote_ports:
            checks |= PORT_REMOTE
        return checks

    def port_flags(self) -> dict[int, int]:
        """Contents of the kernel's ports map: port -> PORT_* bits."""
        flags: dict[int, int] = {}
        for ports, bit in (
            (self.ports, PORT_ANY),
            (self.local_ports, PORT_LOCAL),
            (self.remote_ports, PORT_REMOTE),
        ):
            for port in ports:
                flags[port] = flags.get(port, 0) | bit
        return flags

    @property
    def show_mask(self) -> int:
        """SHOW_STATES: transitions into or out of these states are shown."""
        return state_mask(self.states) if self.states else state_mask(set(TcpState))

    def matches_socket(self, family: int, local_port: int, remote_port: int) -> bool:
        """The kernel's socket filter, in Python."""
        if self.family and family != self.family:
            return False
        if self.ports and local_port not in self.ports and remote_port not in self.ports:
            return False
        if self.local_ports and local_port not in self.local_ports:
            return False
        return not (self.remote_ports and remote_port not in self.remote_ports)

    def shows(self, oldstate: int, newstate: int) -> bool:
        return bool(((1 << oldstate) | (1 << newstate)) & self.show_mask)

    def describe(self) -> str:
        """Short human description for the start-up line."""
        parts = []
        for label, ports in (
            ("port", self.ports),
            ("local port", self.local_ports),
            ("remote port", self.remote_ports),
        ):
            if ports:
                parts.append(f"{label} {describe_ports(ports)}")
        if self.family == socket.AF_INET:
            parts.append("IPv4")
        elif self.family == socket.AF_INET6:
            parts.append("IPv6")
        if self.states:
            parts.append("states " + ",".join(s.name for s in sorted(self.states)))
        if self.netns:
            parts.append("netns " + ",".join(str(n) for n in sorted(self.netns)))
        if self.pids:
            parts.append("pid " + ",".join(str(p) for p in sorted(self.pids)))
        if self.comms:
            parts.append("comm " + ",".join(sorted(self.comms)))
        if self.cgroups:
            parts.append("cgroup " + ",".join(c.path for c in self.cgroups))
        return ", ".join(parts) if parts else "all TCP sockets"


def describe_ports(ports: frozenset[int]) -> str:
    """Compact '80,443,8000-8100' form of a port set."""
    ordered = sorted(ports)
    runs: list[str] = []
    start = prev = ordered[0]
    for port in [*ordered[1:], None]:
        if port is not None and port == prev + 1:
            prev = port
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if port is not None:
            start = prev = port
    return ",".join(runs)


def parse_pid(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or int(text) == 0:
        raise ValueError(f"{text!r} is not a process id (a positive number)")
    return int(text)


def parse_comm(text: str) -> str:
    """A command name as the kernel keeps it: at most MAX_COMM bytes."""
    if not text or len(text.encode()) > MAX_COMM:
        raise ValueError(
            f"{text!r} is not a command name (1 to {MAX_COMM} bytes, as in ps -o comm)"
        )
    return text
