"""What to trace: ports, address family and states, parsed from the command line.

The kernel applies these (see bpf/tcptrace.bpf.c); `Filters.matches` is the same
rule in Python, for sockets found with sock_diag and for tests.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
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
    if states and any(not item.strip() for item in text.split(",")):
        raise ValueError(f"empty item in state list {text!r}")
    if TcpState.NEW_SYN_RECV in states:
        raise ValueError(UNJUDGED_STATES[TcpState.NEW_SYN_RECV])
    if not states:
        # an empty list must not silently mean "every state"
        raise ValueError(f"no TCP state named in {text!r}")
    return states


# Units of a duration (--slower-than, --stuck), in nanoseconds; a bare number is seconds.
DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-z]*)\s*$")
# The longest duration any option takes: longer ones are typos (1e20s), and the kernel
# keeps durations in 64 bits of nanoseconds (584 years would wrap).
MAX_DURATION_NS = 366 * 24 * 3_600_000_000_000
MAX_DURATION = "366 days"
# The key of a duration that applies to every state not named (STATE=DUR overrides it).
ALL_STATES = 0


def parse_duration(text: str) -> int:
    """'100ms', '2s', '1.5m', '250us' or '3' (seconds) as whole nanoseconds (> 0)."""
    match = _DURATION.match(text.lower())
    if not match or match.group(2) not in ("", *DURATION_UNITS):
        units = ", ".join(DURATION_UNITS)
        raise ValueError(f"{text.strip()!r} is not a duration (a number and a unit: {units})")
    number, unit = match.groups()
    value = float(number) * DURATION_UNITS[unit or "s"]
    if not value < MAX_DURATION_NS + 1:  # inf (1e400s) included
        raise ValueError(f"{text.strip()!r} is longer than {MAX_DURATION}")
    ns = round(value)
    if ns <= 0:
        raise ValueError(f"{text.strip()!r} is not a positive duration")
    return ns


def parse_state_durations(text: str) -> dict[int, int]:
    """'100ms' (every state) or 'SYN_SENT=100ms,ESTABLISHED=5s', as {state: ns}.

    A duration without a state is keyed ALL_STATES: it applies to the states not named.
    """
    durations: dict[int, int] = {}
    for item in text.split(","):
        if not item.strip():
            raise ValueError(f"empty item in {text!r}")
        name, eq, value = item.rpartition("=")
        key = int(parse_state(name)) if eq else ALL_STATES
        if key in durations:
            which = name.strip() if eq else "a duration for every state"
            raise ValueError(f"{which} is given twice in {text!r}")
        durations[key] = parse_duration(value)
    return durations


def merge_state_durations(values: tuple[dict[int, int], ...]) -> dict[int, int]:
    """Repeated options: later items override earlier ones, state by state."""
    merged: dict[int, int] = {}
    for value in values:
        merged.update(value)
    return merged


# States whose time --slower-than cannot judge, and why (naming one is a usage error).
UNJUDGED_STATES = {
    TcpState.TIME_WAIT: "TIME_WAIT: the kernel never reports its end, so its time cannot be "
    "judged (entering it is judged by the time in FIN_WAIT2 or CLOSING)",
    TcpState.CLOSE: "CLOSE is never left: a transition from it starts a socket, "
    "after no time in a state",
    TcpState.NEW_SYN_RECV: "NEW_SYN_RECV: the kernel never reports it (a new connection "
    "shows as LISTEN -> SYN_RECV)",
}
# The states --slower-than judges (a bare duration applies to each not named).
JUDGED_STATES = tuple(s for s in TcpState if s not in UNJUDGED_STATES)


def parse_slower_than(text: str) -> dict[int, int]:
    """--slower-than: parse_state_durations, for the states whose time can be judged."""
    durations = parse_state_durations(text)
    for key in durations:
        if key in UNJUDGED_STATES:
            raise ValueError(UNJUDGED_STATES[TcpState(key)])
    return durations


def format_duration_exact(ns: int) -> str:
    """A duration as parse_duration reads it back, in the largest unit that divides it."""
    for unit, size in sorted(DURATION_UNITS.items(), key=lambda item: -item[1]):
        if ns % size == 0:
            return f"{ns // size}{unit}"
    return f"{ns}ns"  # not reached: ns divides everything


def describe_state_durations(durations: Iterable[tuple[int, int]]) -> str:
    """'2s,SYN_SENT=100ms': the duration for every state first, as the user writes it."""
    texts = []
    for key, ns in sorted(durations, key=lambda item: item[0] != ALL_STATES):
        text = format_duration_exact(ns)
        texts.append(text if key == ALL_STATES else f"{TcpState(key).name}={text}")
    return ",".join(texts)


def per_state(durations: dict[int, int], states: Iterable[int]) -> dict[int, int]:
    """{state: ns} for each of these states that a duration applies to."""
    default = durations.get(ALL_STATES)
    out = {}
    for state in states:
        ns = durations.get(int(state), default)
        if ns is not None:
            out[int(state)] = ns
    return out


@dataclass(frozen=True)
class CgroupFilter:
    """--cgroup: a cgroup directory and everything below it."""

    path: str  # relative to the mount, starting with /
    id: int
    level: int  # components below the root: / is 0, /system.slice is 1
    # its directory (the cgroup2 mount's path joined): where the kernel gives tracepoint
    # programs no ancestor helper, the cgroups below it are found by walking it
    directory: str = ""


@dataclass(frozen=True)
class Filters:
    ports: frozenset[int] = frozenset()
    local_ports: frozenset[int] = frozenset()
    remote_ports: frozenset[int] = frozenset()
    family: int = 0  # 0 for both, else socket.AF_INET or socket.AF_INET6
    states: frozenset[TcpState] = field(default_factory=frozenset)
    # sockets of these network namespaces (inode numbers)
    netns: frozenset[int] = frozenset()
    # -r only: of these ip netns names, as the capture recorded them (live, names are
    # resolved to inodes at start)
    netns_names: frozenset[str] = frozenset()
    # owners: these processes, these command names, these cgroups (and below)
    pids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()
    cgroups: tuple[CgroupFilter, ...] = ()
    # --slower-than: (state, ns) pairs, ALL_STATES for every state not named. Only
    # transitions that left a state after at least its duration are shown (the kernel
    # decides); a state without one is never slow.
    slower_than: tuple[tuple[int, int], ...] = ()

    def slow_ns(self) -> dict[int, int]:
        """The kernel's slow_ns map: each judged state's --slower-than threshold, in ns."""
        return per_state(dict(self.slower_than), JUDGED_STATES)

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
        if self.netns or self.netns_names:
            named = [*(str(n) for n in sorted(self.netns)), *sorted(self.netns_names)]
            parts.append("netns " + ",".join(named))
        if self.pids:
            parts.append("pid " + ",".join(str(p) for p in sorted(self.pids)))
        if self.comms:
            parts.append("comm " + ",".join(sorted(self.comms)))
        if self.cgroups:
            parts.append("cgroup " + ",".join(c.path for c in self.cgroups))
        text = ", ".join(parts) if parts else "all TCP sockets"
        if self.slower_than:
            text += f", slower than {describe_state_durations(self.slower_than)}"
        return text


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


# PID_MAX_LIMIT (include/linux/threads.h, 64-bit): no process id is larger.
PID_MAX_LIMIT = 4 * 1024 * 1024


def parse_pid(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or int(text) == 0:
        raise ValueError(f"{text!r} is not a process id (a positive number)")
    if int(text) > PID_MAX_LIMIT:
        raise ValueError(f"{text!r} is not a process id (at most {PID_MAX_LIMIT}, PID_MAX_LIMIT)")
    return int(text)


def parse_comm(text: str) -> str:
    """A command name as the kernel keeps it: at most MAX_COMM bytes."""
    if not text or len(text.encode()) > MAX_COMM:
        raise ValueError(
            f"{text!r} is not a command name (1 to {MAX_COMM} bytes, as in ps -o comm)"
        )
    return text
