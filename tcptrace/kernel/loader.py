"""Loading the BPF program with bcc and reading what it produces.

The only module that imports bcc. It hands the rest of tcptrace plain Python
values: raw event records (bytes) and the kernel's statistics as a Summary.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tcptrace.errors import TcptraceError
from tcptrace.filters import Filters, describe_state_durations
from tcptrace.kernel import perfbuf
from tcptrace.kernel.btf import (
    NO_TASK_OFFSETS,
    NO_TIMEWAIT_OFFSETS,
    AcceptOffsets,
    Btf,
    BtfError,
    NetnsOffsets,
    SockOffsets,
    TaskOffsets,
    TimewaitOffsets,
    accept_offsets,
    map_iter_problem,
    netns_offsets,
    sock_offsets,
    task_offsets,
    timewait_offsets,
)
from tcptrace.kernel.events import (
    C_DROPPED,
    C_RECOVERED,
    C_SHED,
    C_SIDE,
    C_SUBMITTED,
    COMM_LEN,
    EVENT_STRUCT,
    LIFE_STRUCT,
    Event,
    Life,
    event_time,
    life_of,
    make_event,
    raw_address,
)
from tcptrace.kernel.mapread import MapReader, MapReadError, per_cpu_totals
from tcptrace.kernel.mapscan import (
    AGE,
    AGE_OFFSETS,
    SCAN_EVERY,
    SCAN_NEW,
    SK_INFO_OFFSETS,
    SK_INFO_TS_STATE,
    ScanResult,
    UserScan,
)
from tcptrace.kernel.preflight import (
    BCC_FIX,
    ROOT_HINT,
    SETUP_HINT,
    TRACEFS_MOUNTS,
    headers_dir,
    tracefs_at,
)
from tcptrace.kernel.stats import Summary
from tcptrace.states import NSTATES, TcpState

TRACEPOINT = "sock:inet_sock_set_state"
PROGRAM = "tcptrace.bpf.c"
# the function bcc's TRACEPOINT_PROBE(sock, inet_sock_set_state) defines
PROBE_FN = b"tracepoint__sock__inet_sock_set_state"
# the raw tracepoint of the nested program (RAW_TRACEPOINT_PROBE), and its function
RAW_TRACEPOINT = b"inet_sock_set_state"
NESTED_FN = b"raw_tracepoint__inet_sock_set_state"
# Levels of the programs (bpf/tcptrace.bpf.c LEVEL_*): per-CPU state they keep apart.
LEVELS = 2
# RATE_WINDOW_NS in bpf/tcptrace.bpf.c: the window of the kernel's rate limit
RATE_WINDOW_NS = 10_000_000
# Load this C file instead of bpf/tcptrace.bpf.c: for tests that need a program
# the compiler or the verifier refuses, and for debugging (README, "Environment").
PROGRAM_ENV = "TCPTRACE_BPF_PROGRAM"


# How long after its time stamp a transition may still be written to its CPU's ring:
# the program stamps it, then submits it, with preemption off; an interrupt or, in a
# virtual machine, the host descheduling the vCPU may come between. Events stamped
# this close to a read wait for the next one, so that batches stay in time order.
# A host that deschedules a vCPU does so for a timeslice or more (QEMU TCG here: 2
# vCPUs on 2 busy host CPUs), over 10 ms: 50 ms delays no line a person would
# notice, and holds at most 50 ms of events in the rings. (It did not end the
# emulated guest's rare out-of-order line: that is the nested program's record,
# written before the older record of the program it interrupted; see BENCHMARKS.)
WRITE_SLACK_NS = 50_000_000


# Set to "user": walk the socket map in user space even where the kernel runs the
# iterator (tests run both walks on the same sockets).
SCAN_ENV = "TCPTRACE_MAP_SCAN"
SCAN_IN_USER_SPACE = "user"
# TCPTRACE_CGROUP_MATCH=walk: --cgroup by the walked map, as where the kernel refuses
# the ancestor helper (the tests run both ways on every kernel)
CGROUP_ENV = "TCPTRACE_CGROUP_MATCH"
CGROUP_BY_WALK = "walk"
# The map scan's BPF iterator (BPF_ITER(bpf_map_elem) in the program).
SCAN_FN = b"bpf_iter__bpf_map_elem"
# Bytes per read of the iterator: the kernel fills at most a page-sized buffer per call.
SCAN_READ_BYTES = 1 << 16
# bpf_update_elem's flag: insert only, leave an entry there (uapi/linux/bpf.h)
BPF_NOEXIST = 1


class _IterMapInfo(ctypes.Structure):
    """union bpf_iter_link_info's map member: the map a map-element iterator walks."""

    _fields_ = [("map_fd", ctypes.c_uint32)]


# The program's netns read is off (it reports 0, user space falls back on the owner's).
NO_OFFSETS = NetnsOffsets(sock_net=-1, net_inum=-1)
# The listeners map's mark of an entry made after the map overflowed (LISTENERS_UNSURE).
LISTENERS_UNSURE = 0x80000000
# Slots of the program's self_check map (bpf/tcptrace.bpf.c CHECK_*).
CHECK_ARMED = 0
CHECK_NETNS = 1
# The check connection of the nested program's offsets: client and server addresses
# in 127.84.84.0/24 (CHECK_NET in the program), which nothing else uses.
CHECK_SERVER = "127.84.84.1"
CHECK_CLIENT = "127.84.84.2"
CHECK_ENDS = struct.Struct("<16s16sHHHH")  # struct check_ends

# Capacity of the kernel's listeners map: the owners of this many listening
# addresses are known in the kernel; children of the others are looked up.
MAX_LISTENERS = 65536
# --cgroup without the ancestor helper: the cgroups the filtered subtrees may hold
MAX_CGROUP_MEMBERS = 65536
# the helper some kernels refuse tracepoint programs (Debian 11's 5.10 does)
ANCESTOR_HELPER = "bpf_get_current_ancestor_cgroup_id"
# how often the cgroup subtrees are walked again, for cgroups made since
CGROUP_WALK_NS = 1_000_000_000


# struct bpf_prog_info (include/uapi/linux/bpf.h): its size in Linux 6.1 and the
# offset of recursion_misses. A kernel without the field leaves it zero.
PROG_INFO_SIZE = 232
RECURSION_MISSES_OFFSET = 208


def bpf_dir() -> Path:
    """bpf/ beside the package in a source tree, or the copy installed with it."""
    package = Path(__file__).resolve().parent.parent  # tcptrace/
    for candidate in (package.parent / "bpf", package / "_bpf"):
        if (candidate / PROGRAM).is_file():
            return candidate
    raise TcptraceError(f"cannot find {PROGRAM} (looked beside {package})")


@dataclass(frozen=True)
class ProbeConfig:
    filters: Filters = field(default_factory=Filters)
    emit_events: bool = True
    max_sockets: int = 65536
    # listening addresses whose owner the kernel remembers (beyond: sock_diag)
    max_listeners: int = MAX_LISTENERS
    # perf buffer pages per CPU (power of two); default_buffer_pages() by default
    buffer_pages: int = field(default_factory=lambda: default_buffer_pages())
    # buffer_pages is the default, not the user's: halve it while the kernel refuses it
    shrink_buffer: bool = False
    # shed events (counted) once a CPU's ring holds this share of its capacity unread;
    # 0 lets the ring overflow instead (counted as dropped)
    shed_fraction: float = 0.75
    # where a socket's network namespace is, from the running kernel's BTF (None: unknown)
    netns_offsets: NetnsOffsets | None = None
    # where the tracepoint's fields are in a socket, from the running kernel's BTF: the
    # nested program (None: unknown, no nested program)
    sock_offsets: SockOffsets | None = None
    # what tells, at a socket's FIN_WAIT2/CLOSING -> CLOSE, whether a timewait socket
    # took its place and in which substate (None: unknown, user space asks sock_diag)
    timewait_offsets: TimewaitOffsets | None = None
    # where the process's name is (its group leader's comm; None: the thread's name)
    task_offsets: TaskOffsets | None = None
    # the per-socket map keeps each socket's ends, for the scan's stuck reports (--stuck)
    keep_ends: bool = False
    # load the map scan (Probe.scan): --stuck, the live table's OLDEST, the metrics' gauges
    scan: bool = False
    # --stuck thresholds: {state: ns}; the scan reports sockets past them
    stuck_ns: dict[int, int] = field(default_factory=dict)
    # --lifetime: the kernel sums each connection's states and sends one life record
    # (events.LIFE_STRUCT) at its end instead of its transitions
    kernel_lifetimes: bool = False
    # the way from accept()'s new descriptor to its socket, from the running kernel's
    # BTF (None: unknown; with no syscall tracepoints either, no accept hook)
    accept_offsets: AcceptOffsets | None = None
    # stream only the ends that may become TIME_WAIT (FIN_WAIT2/CLOSING -> CLOSE), for
    # summaries that follow TIME_WAIT without per-transition lines (--quiet, -i)
    closes_only: bool = False
    # --cgroup asks bpf_get_current_ancestor_cgroup_id; False where the kernel gives it
    # no tracepoint program: user space keeps the filtered cgroups' subtrees in a map
    cgroup_ancestor: bool = True

    @property
    def accept_hook(self) -> bool:
        """The accept hook is compiled: its offsets known, and the nested program's, with
        which its start-up check reads the socket it found."""
        return self.accept_offsets is not None and self.sock_offsets is not None

    @property
    def accept_records(self) -> bool:
        """ACCEPT_RECORDS: the accept hook sends an accept that gives a socket another
        owner than its lines named (sockets.acceptors names the acceptor on the
        handshake lines it holds, and under owner filters decides on those of the
        shared listeners' children). Only where handshake lines stream."""
        handshake = (1 << TcpState.LISTEN) | (1 << TcpState.SYN_RECV) | (1 << TcpState.ESTABLISHED)
        return (
            self.accept_hook
            and self.emit_events
            and not self.kernel_lifetimes
            and bool(self.show_mask & handshake)
        )

    @property
    def show_mask(self) -> int:
        """SHOW_STATES: with closes_only, TIME_WAIT's bit alone (the program then sends
        just the FIN_WAIT2/CLOSING -> CLOSE ends, which may be entries into TIME_WAIT)."""
        if self.closes_only:
            return self.filters.show_mask & (1 << TcpState.TIME_WAIT)
        return self.filters.show_mask

    @property
    def record(self) -> struct.Struct:
        """What the perf rings carry."""
        return LIFE_STRUCT if self.kernel_lifetimes else EVENT_STRUCT

    def shed_lag(self) -> int:
        """Unread events per CPU at which the kernel starts shedding (0: never)."""
        if not self.shed_fraction:
            return 0
        capacity = self.buffer_pages * mmap.PAGESIZE // perfbuf.record_size(self.record.size)
        return max(1, int(capacity * self.shed_fraction))

    def cflags(self) -> list[str]:
        return [
            f"-I{bpf_dir()}",
            f"-DMAX_SOCKETS={self.max_sockets}",
            f"-DMAX_LISTENERS={self.max_listeners}",
            f"-DFILTER_FAMILY={self.filters.family}",
            f"-DFILTER_PORTS={self.filters.port_checks}",
            f"-DSHOW_STATES={self.show_mask:#x}",
            f"-DEMIT_EVENTS={int(self.emit_events)}",
            f"-DMAX_CPUS={possible_cpus()}",
            f"-DSHED_LAG={self.shed_lag()}",
            f"-DSELF_PID={os.getpid()}",
            f"-DFILTER_NETNS={int(bool(self.filters.netns))}",
            f"-DFILTER_OWNER={self.filters.owner_checks}",
            f"-DKEEP_ENDS={int(self.keep_ends)}",
            f"-DSCAN_AGES={int(self.scan and self.keep_ends)}",
            f"-DSLOWER_THAN={int(bool(self.filters.slower_than))}",
            f"-DKERNEL_LIFETIMES={int(self.kernel_lifetimes)}",
            f"-DCGROUP_ANCESTOR={int(self.cgroup_ancestor)}",
            f"-DMAX_CGROUP_MEMBERS={MAX_CGROUP_MEMBERS}",
            *(self.netns_offsets or NO_OFFSETS).cflags(),
            f"-DNESTED={int(self.sock_offsets is not None)}",
            *(self.sock_offsets.cflags() if self.sock_offsets is not None else []),
            *(self.timewait_offsets or NO_TIMEWAIT_OFFSETS).cflags(),
            *(self.task_offsets or NO_TASK_OFFSETS).cflags(),
            f"-DACCEPT_HOOK={int(self.accept_hook)}",
            f"-DACCEPT_RECORDS={int(self.accept_records)}",
            *(self.accept_offsets.cflags() if self.accept_hook else []),
        ]


@contextlib.contextmanager
def _stop_signals_wait() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the compile is over (Python could not run their
    handlers before anyway). Twice in CI's emulated VM, one arriving while bcc compiled
    killed tcptrace as if it had no handler (exit -2, then -15); not reproduced in 70
    tries, /proc showing ours installed throughout. Suspect: a one-shot handler LLVM
    may install while it works."""
    stop = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class Probe:
    """The attached program: poll() returns raw records, summary() the kernel's counts."""

    def __init__(self, config: ProbeConfig) -> None:
        try:
            from bcc import BPF
            from bcc.libbcc import lib
        except Exception as exc:  # found but broken: ImportError, or OSError from libbcc
            raise TcptraceError(f"bcc is not importable ({exc}): {BCC_FIX}") from None
        import bcc

        # where this bcc reads tracepoint formats (an old one: under debugfs only)
        tracefs_at(getattr(bcc, "TRACEFS", TRACEFS_MOUNTS[0]), bcc_version()[0])
        # whole maps in batches (the statistics, the user-space scan's socket map)
        self._maps = MapReader(lib)
        self.reader: perfbuf.PerfReader | None = None
        self.detached = False
        self._scan_link: int | None = None  # the map iterator's link (open_scan)
        # the scan's input and output map, as bcc's table object: made once, since bcc
        # asks libbcc for the map's type, flags and size each time it makes one
        self._scan_table = None
        # the walk in user space, where the kernel refuses the iterator (and why it does)
        self._user_scan: UserScan | None = None
        self._ages = None  # the ages map the user-space scan reads (SCAN_AGES), if kept
        self.scan_fallback: str | None = None
        # records read from the perf buffer, to count those left unread at exit
        self.received = 0
        # --lifetime: the last batch's life records by (skaddr, ts_ns) of their closing
        # Event, which poll_events returns (sockets.lifetimes.Lifetimes reads them)
        self.lives: dict[tuple[int, int], Life] | None = {} if config.kernel_lifetimes else None
        path = program_path()
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise TcptraceError(f"cannot read the BPF program {path}: {exc.strerror}") from None
        # why the kernel cannot tell a socket's namespace (None: it can)
        self.netns_problem: str | None = None
        # why transitions the kernel skips are not handled (None: they are)
        self.nested_problem: str | None = None
        # why an accepted socket cannot be given its acceptor as owner (None: it can)
        self.accept_problem: str | None = None
        self._accepted_check: tuple[int, int] | None = None
        # why the map scan cannot run here (None: it can); open_scan reports it
        self._scan_problem: str | None = None
        # parsed once: every offset comes from the same BTF (seconds under emulation)
        btf: Btf | None = None
        try:
            btf = Btf.load()
        except BtfError as exc:
            self.netns_problem = self.nested_problem = f"no usable BTF ({exc})"
            self._scan_problem = self.accept_problem = self.netns_problem
        if btf is not None:
            if config.netns_offsets is None:
                try:
                    config = replace(config, netns_offsets=netns_offsets(btf))
                except BtfError as exc:
                    self.netns_problem = f"no usable BTF ({exc})"
            if config.sock_offsets is None:
                try:
                    config = replace(config, sock_offsets=sock_offsets(btf))
                except BtfError as exc:
                    self.nested_problem = f"no usable BTF ({exc})"
            if config.timewait_offsets is None:
                # (without: each closing socket's timewait socket is asked of sock_diag)
                with contextlib.suppress(BtfError):
                    config = replace(config, timewait_offsets=timewait_offsets(btf))
            if config.task_offsets is None:
                # (without: the thread's name, as bpf_get_current_comm gives it)
                with contextlib.suppress(BtfError):
                    config = replace(config, task_offsets=task_offsets(btf))
            if config.accept_offsets is None:
                # (without: an accepted socket keeps its listener's owner)
                self.accept_problem = accept_tracepoints_problem()
                if self.accept_problem is None:
                    try:
                        config = replace(config, accept_offsets=accept_offsets(btf))
                    except BtfError as exc:
                        self.accept_problem = f"no usable BTF ({exc})"
            if config.scan:
                self._scan_problem = map_iter_problem(btf)
            del btf  # ~10 MB parsed: not kept for the session
        if config.emit_events:
            # the rings first: their real size sets the kernel's shedding threshold
            self.reader = self._open_reader(config)
            config = replace(config, buffer_pages=self.reader.pages)
        self.config = config
        _no_huge_pages()  # before the compile makes the heap that is trimmed after it
        # why --cgroup matches cgroups by a map user space walks (None: it does not)
        self.cgroup_fallback: str | None = None
        self._cgroup_walk_at = 0
        self._cgroup_members: set[int] = set()  # what cgroup_members holds
        if config.filters.cgroups and os.environ.get(CGROUP_ENV) == CGROUP_BY_WALK:
            self._walk_cgroups_instead(f"{CGROUP_ENV}={CGROUP_BY_WALK}")
        try:
            with _stop_signals_wait():
                self.bpf = self._compile(BPF, source)
        except Exception as exc:  # bcc raises bare Exception for every failure
            if self.reader is not None:
                self.reader.close()
            raise load_error(exc, path) from None
        _return_freed_memory()
        try:
            self._fill_ports()
            self._fill_owner_filters()
            self._fill_stuck()
            self._fill_slow_ns()
            if config.emit_events:
                # bcc attached the programs while compiling them; until the rings are
                # in the perf event array every submission would fail (counted dropped)
                self._detach_nested()
                self._detach_tracepoint()
                self._open_buffer()
                self.bpf.attach_tracepoint(tp=TRACEPOINT.encode(), fn_name=PROBE_FN)
            self._attach_nested()
        except Exception as exc:
            self.bpf.cleanup()
            if self.reader is not None:
                self.reader.close()
            raise TcptraceError(
                f"could not connect the perf buffer to the BPF program ({exc})"
            ) from None

    def _compile(self, BPF, source: bytes):
        """bcc's compile and load; where the kernel refuses --cgroup's ancestor helper to
        tracepoint programs, again with the cgroups' subtrees in a map instead. The
        compiler's and the verifier's messages reach stderr only when it fails."""
        while True:
            with _quiet_stderr() as caught:
                try:
                    return BPF(text=source, cflags=self.config.cflags())
                except Exception as exc:
                    failure = exc
            refused = f"unknown func {ANCESTOR_HELPER}#".encode() in caught.text
            if not (self.config.filters.cgroups and self.config.cgroup_ancestor and refused):
                caught.replay()
                raise failure
            refusal = f"this kernel gives tracepoint programs no {ANCESTOR_HELPER}"
            self._walk_cgroups_instead(refusal)

    def _walk_cgroups_instead(self, why: str) -> None:
        self.config = replace(self.config, cgroup_ancestor=False)
        self.cgroup_fallback = (
            f"{why}: --cgroup matches the cgroups below it by id, walked again every "
            f"{CGROUP_WALK_NS // 10**9} s (a socket of a cgroup made in between may be missed)"
        )

    def _walk_cgroups(self) -> None:
        """--cgroup without the ancestor helper: every cgroup at or below the filtered
        ones into cgroup_members (their directories' inodes are their ids)."""
        self._cgroup_walk_at = time.monotonic_ns() + CGROUP_WALK_NS
        members = self.bpf[b"cgroup_members"]
        now: set[int] = set()
        for cgroup in self.config.filters.cgroups:
            now.update(_cgroup_ids(cgroup.directory, MAX_CGROUP_MEMBERS - len(now)))
        # the removed ones out first: the map never fills with cgroups long gone
        for ino in self._cgroup_members - now:
            del members[members.Key(ino)]
        one = members.Leaf(1)
        for ino in now - self._cgroup_members:
            members[members.Key(ino)] = one
        self._cgroup_members = now

    def _fill_stuck(self) -> None:
        table = self.bpf[b"stuck_ns"]
        for state, ns in self.config.stuck_ns.items():
            table[ctypes.c_int(state)] = ctypes.c_uint64(ns)

    def open_scan(self) -> str | None:
        """Load the map scan: a BPF iterator over the per-socket map, or, where the
        kernel refuses iterators, the same walk in user space (scan_fallback says why).
        Returns why neither can run here, or None once scan() is ready."""
        if self._scan_link is not None or self._user_scan is not None:
            return None
        if not self.config.scan:
            return "the probe was loaded without the map scan (ProbeConfig.scan)"
        forced = os.environ.get(SCAN_ENV) == SCAN_IN_USER_SPACE
        problem = (
            f"{SCAN_ENV}={SCAN_IN_USER_SPACE}"
            if forced
            else self._scan_problem or self._open_iterator()
        )
        if problem is None:
            return None
        layout = self._sk_info_problem()
        if layout is not None:
            return f"{problem}, and {layout}"
        self._user_scan = UserScan(self.config.stuck_ns)
        self._keep_ages()
        if not _has_batch_lookup():
            problem += " and this bcc has no batch lookup (one key at a time)"
        self.scan_fallback = problem
        return None

    def _open_iterator(self) -> str | None:
        from bcc import BPF
        from bcc.libbcc import lib

        try:
            # libbcc prints the verifier's log on failure: the reason is in the exception
            with _quiet_stderr():
                fn = self.bpf.load_func(SCAN_FN, BPF.TRACING)
        except Exception as exc:  # bcc's bare Exception: the verifier or an old kernel
            return f"the kernel refused the map iterator ({_bcc_reason(exc)})"
        info = _IterMapInfo(self.bpf[b"sockets"].map_fd)
        lib.bcc_iter_attach.restype = ctypes.c_int
        lib.bcc_iter_attach.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
        link = lib.bcc_iter_attach(fn.fd, ctypes.byref(info), ctypes.sizeof(info))
        if link < 0:
            return f"could not attach the map iterator ({os.strerror(-link)})"
        self._scan_link = link
        self._scan_table = self.bpf[b"scan"]
        return None

    def _sk_info_problem(self) -> str | None:
        """Why UserScan cannot decode the map's values as bcc laid them out (None: it can)."""
        leaf = self.bpf[b"sockets"].Leaf
        names = [name for name, _type in leaf._fields_]
        if not self.config.keep_ends or "ends" not in names:
            return "the program keeps no socket ends (ProbeConfig.keep_ends)"
        for name, offset in SK_INFO_OFFSETS.items():
            if getattr(leaf, name).offset != offset:
                return f"struct sk_info.{name} is not where the user-space scan reads it"
        return None

    def _keep_ages(self) -> None:
        """Have the kernel keep the ages map (SCAN_AGES), which the user-space scan then
        reads instead of the socket map, and give it the sockets the map holds already
        (tracing began before this). Without the map's layout as expected, the scan
        reads the socket map whole (twice the cost, the same result)."""
        from bcc.libbcc import lib

        try:
            ages, on = self.bpf[b"ages"], self.bpf[b"ages_on"]
        except KeyError:
            return  # compiled without SCAN_AGES
        leaf = ages.Leaf
        if ctypes.sizeof(leaf) != AGE.size or any(
            getattr(leaf, name).offset != offset for name, offset in AGE_OFFSETS.items()
        ):
            return
        on[ctypes.c_int(0)] = ctypes.c_uint32(1)
        # from now on the kernel writes every change: an entry it wrote is newer than
        # the socket map read here (BPF_NOEXIST leaves it), and a socket that closed
        # in between is taken out again below
        sockets = self.bpf[b"sockets"]
        addresses, raw, value_size = self._map_values()
        key, age = ctypes.c_uint64(), ctypes.create_string_buffer(AGE.size)
        info = ctypes.create_string_buffer(value_size)
        for i, sk in enumerate(addresses):
            AGE.pack_into(age, 0, *SK_INFO_TS_STATE.unpack_from(raw, i * value_size), 0)
            key.value = sk
            if lib.bpf_update_elem(ages.map_fd, ctypes.byref(key), age, BPF_NOEXIST) != 0:
                continue
            if lib.bpf_lookup_elem(sockets.map_fd, ctypes.byref(key), info) != 0:
                lib.bpf_delete_elem(ages.map_fd, ctypes.byref(key))
        self._ages = ages

    def _details(self, sk: int) -> bytes | None:
        """One socket's sk_info from the socket map (None: it went)."""
        from bcc.libbcc import lib

        sockets = self.bpf[b"sockets"]
        key = ctypes.c_uint64(sk)
        value = ctypes.create_string_buffer(ctypes.sizeof(sockets.Leaf))
        if lib.bpf_lookup_elem(sockets.map_fd, ctypes.byref(key), value) != 0:
            return None
        return value.raw

    def scan(self, now_ns: int, list_all: int = SCAN_NEW) -> ScanResult:
        """Walk the per-socket map: per state the oldest socket, how many there are and
        how many are past their --stuck threshold; records (F_STUCK events) of the
        sockets that crossed it since the last scan (SCAN_NEW), of every socket past it
        (SCAN_STUCK), or of every socket in the map (SCAN_EVERY)."""
        if self._user_scan is not None:
            if self._ages is not None and list_all != SCAN_EVERY:
                addresses, ages, _size = self._map_values(self._ages)
                # every value read was written before now: none is younger than the scan
                now_ns = max(now_ns, time.monotonic_ns())
                return self._user_scan.scan_ages(addresses, ages, now_ns, list_all, self._details)
            addresses, raw, value_size = self._map_values()
            now_ns = max(now_ns, time.monotonic_ns())
            return self._user_scan.scan_values(addresses, raw, value_size, now_ns, list_all)
        return self._kernel_scan(now_ns, list_all)

    def _map_values(self, table=None) -> tuple[Sequence[int], bytes, int]:
        """Every entry's socket address, their values end to end (sk_info, or those of
        `table`), and a value's size: read in batches."""
        if table is None:
            table = self.bpf[b"sockets"]
        key_size, value_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
        # (without a batch look-up, as in Debian 11's bcc 0.18, MapReader walks the keys)
        try:
            keys, raw = self._maps.read(table.map_fd, key_size, value_size, self.config.max_sockets)
        except MapReadError as exc:
            raise TcptraceError(f"could not read the socket map ({exc.strerror})") from None
        # the keys are u64 socket addresses: a view, read only for the sockets reported
        return memoryview(keys).cast("Q"), raw, value_size

    def _kernel_scan(self, now_ns: int, list_all: int) -> ScanResult:
        from bcc.libbcc import lib

        assert self._scan_link is not None, "open_scan() first"
        table = self._scan_table
        key = ctypes.c_int(0)
        leaf = table.Leaf()
        leaf.now, leaf.list_all = now_ns, list_all
        table[key] = leaf
        fd = lib.bcc_iter_create(self._scan_link)
        if fd < 0:
            raise TcptraceError(f"could not run the map scan ({os.strerror(-fd)})")
        chunks = []
        try:
            while chunk := os.read(fd, SCAN_READ_BYTES):
                chunks.append(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        records = [make_event(t) for t in EVENT_STRUCT.iter_unpack(data)]
        out = table[key]
        return ScanResult(
            now_ns=now_ns,
            oldest={st: out.oldest[st] for st in range(NSTATES) if out.oldest[st]},
            count={st: out.count[st] for st in range(NSTATES) if out.count[st]},
            stuck={st: out.stuck[st] for st in range(NSTATES) if out.stuck[st]},
            records=records,
        )

    def check_netns(self) -> str | None:
        """Check the namespace read on a socket of our own: a listener of tcptrace's must
        read as tcptrace's namespace. Returns why it cannot be trusted, or None."""
        if self.netns_problem is not None:
            return self.netns_problem
        import socket

        check = self.bpf[b"self_check"]
        check[ctypes.c_int(CHECK_NETNS)] = ctypes.c_uint32(0)
        check[ctypes.c_int(CHECK_ARMED)] = ctypes.c_uint32(1)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as own:
                own.bind(("127.0.0.1", 0))
                own.listen(1)
        finally:
            check[ctypes.c_int(CHECK_ARMED)] = ctypes.c_uint32(0)
        read = check[ctypes.c_int(CHECK_NETNS)].value
        expected = os.stat("/proc/thread-self/ns/net").st_ino  # our own namespace
        if read != expected:
            self.netns_problem = f"the BTF offsets read namespace {read} for a socket in {expected}"
        return self.netns_problem

    def _attach_nested(self) -> None:
        """Attach the nested program after the tracepoint program: the kernel runs a
        tracepoint's probes in the order they came, and the nested program must see
        each hit after the tracepoint program had its chance (check_nested checks)."""
        if self.nested_problem is not None:
            return
        self._detach_nested()
        try:
            self.bpf.attach_raw_tracepoint(tp=RAW_TRACEPOINT, fn_name=NESTED_FN)
        except Exception as exc:  # bcc raises bare Exception
            self.nested_problem = f"cannot attach to the raw tracepoint ({exc})"

    def check_nested(self) -> str | None:
        """Check the nested program's offsets on a connection of our own: both programs
        note what they read of its sockets entering ESTABLISHED, which must be their
        ends as the sockets say. If not, the nested program is detached. Returns why
        transitions that interrupt the program cannot be handled, or None."""
        if self.nested_problem is None:
            self.nested_problem = self._check_connection()
            if self.accept_problem is None and self.config.accept_hook:
                self.accept_problem = self._check_accept()
                if self.accept_problem is not None:
                    self._detach_accept()
            if self.nested_problem is not None:
                self._detach_nested()
        return self.nested_problem

    def _check_connection(self) -> str | None:
        import socket

        check = self.bpf[b"self_check"]
        ends = self.bpf[b"check_ends"]
        try:
            with contextlib.ExitStack() as stack:
                server = stack.enter_context(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
                server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                server.bind((f"::ffff:{CHECK_SERVER}", 0))
                server.listen(1)
                port = server.getsockname()[1]
                # armed with our server's port: the program notes our connection only,
                # not another tcptrace's checking at the same time
                check[ctypes.c_int(CHECK_ARMED)] = ctypes.c_uint32(port)
                client = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                client.bind((CHECK_CLIENT, 0))
                client.connect((CHECK_SERVER, port))
                child = stack.enter_context(server.accept()[0])
                # closed by a reset: nothing of it lingers to be traced once disarmed
                for sock in (client, child):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client_port = client.getsockname()[1]
                self._accepted_check = (port, client_port)  # the server end's ports
        except OSError as exc:
            return f"no check connection on {CHECK_SERVER} ({exc.strerror})"
        finally:
            check[ctypes.c_int(CHECK_ARMED)] = ctypes.c_uint32(0)
        mapped = socket.inet_pton(socket.AF_INET6, "::ffff:0.0.0.0")[:12]
        server_ip = socket.inet_aton(CHECK_SERVER)
        client_ip = socket.inet_aton(CHECK_CLIENT)
        expected = {
            socket.AF_INET: (client_ip, server_ip, client_port, port),
            socket.AF_INET6: (mapped + server_ip, mapped + client_ip, port, client_port),
        }
        for slot, family in enumerate((socket.AF_INET, socket.AF_INET6)):
            saddr, daddr, sport, dport = expected[family]
            want = CHECK_ENDS.pack(saddr, daddr, sport, dport, family, socket.IPPROTO_TCP)
            got = [bytes(ends[ctypes.c_int(level * 2 + slot)]) for level in range(LEVELS)]
            if got[0] != want:
                return "the check connection was not traced"
            if not any(got[1]):
                return "the nested program did not run after the tracepoint program"
            if got[1] != want:
                read = CHECK_ENDS.unpack(got[1])
                return (
                    f"the BTF offsets read {read[2:]} (sport, dport, family, protocol) "
                    f"for a socket with {(sport, dport, int(family), socket.IPPROTO_TCP)}"
                )
        return None

    def _check_accept(self) -> str | None:
        """Did the accept hook find the check connection's server end through its
        offsets? (Checked on the connection _check_connection accepted.)"""
        if self._accepted_check is None:
            return "no check connection was accepted"
        try:
            table = self.bpf[b"accept_check"]
            got = (table[ctypes.c_int(0)].value, table[ctypes.c_int(1)].value)
        except KeyError:
            return "the accept hook was not compiled"
        if got == (0, 0):
            return "the accept hook did not run for tcptrace's own accept()"
        if got != self._accepted_check:
            return (
                f"the BTF offsets led to a socket with ports {got} for one with "
                f"{self._accepted_check}"
            )
        return None

    def _detach_accept(self) -> None:
        for tracepoint in ACCEPT_TRACEPOINTS:
            if tracepoint.encode() in self.bpf.tracepoint_fds:
                self.bpf.detach_tracepoint(tracepoint.encode())

    def mark_shared(self, netns: int, port: int, shared: bool = True) -> None:
        """A listening port several processes share (sockets.acceptors): under owner
        filters, its children's handshake lines come undecided, for their accept
        record to decide in user space. shared False: its listener closed."""
        if not (self.config.accept_records and self.config.filters.owner_checks):
            return
        table = self.bpf[b"shared_ports"]
        key = table.Key()
        key.netns, key.port, key.pad = netns, port, 0
        # full (1,024 ports): their lines stay out; gone already: nothing to undo
        with contextlib.suppress(Exception):
            if shared:
                table[key] = ctypes.c_ubyte(1)
            else:
                del table[key]

    def seed_listeners(self, listening: list[tuple[int, int, str, int, list]]) -> int:
        """Tell the kernel about listeners older than tracing, so that it names their
        children as it does those of listeners it saw open: (netns, family, address,
        port, owners) each. An address several sockets listen on (SO_REUSEPORT), or
        whose owner is unknown, names nobody, and user space looks its children up.
        What the kernel counted since it attached is kept. Returns the addresses seeded.
        """
        table = self.bpf[b"listeners"]
        seeded = 0
        for netns, family, addr, port, owners in listening:
            key = table.Key()
            key.addr = (ctypes.c_ubyte * 16)(*raw_address(family, addr))
            key.netns, key.family, key.port = netns, family, port
            known = [o for o in owners if o is not None]
            try:
                leaf = table[key]
            except KeyError:
                leaf = table.Leaf()
                leaf.count = 0
            # a listener opened between attaching and the snapshot is in both
            count = max(leaf.count & ~LISTENERS_UNSURE, len(owners))
            unsure = leaf.count & LISTENERS_UNSURE
            if len(owners) == 1 and len(known) == 1 and not leaf.pid:
                leaf.pid = known[0].pid
                leaf.comm = known[0].comm.encode()[: COMM_LEN - 1]
            elif len(known) < len(owners):
                count = max(count, 2)  # whose it is cannot be known here: name nobody
            leaf.count = count | unsure
            try:
                table[key] = leaf
            except Exception:  # the map is full: the kernel marks what it cannot hold
                continue
            seeded += 1
        return seeded

    def _fill_owner_filters(self) -> None:
        filters = self.config.filters
        for name, keys in (
            (b"netns_filter", [ctypes.c_uint32(n) for n in filters.netns]),
            (b"pid_filter", [ctypes.c_uint32(p) for p in filters.pids]),
        ):
            table = self.bpf[name]
            for key in keys:
                table[key] = table.Leaf(1)
        comms = self.bpf[b"comm_filter"]
        for comm in filters.comms:
            key = comms.Key()
            key.comm = comm.encode()
            comms[key] = comms.Leaf(1)
        if not self.config.cgroup_ancestor:
            self._walk_cgroups()
        cgroups = self.bpf[b"cgroup_filters"]
        for index, cgroup in enumerate(filters.cgroups):
            leaf = cgroups.Leaf()
            leaf.id, leaf.level, leaf.used = cgroup.id, cgroup.level, 1
            cgroups[ctypes.c_int(index)] = leaf

    def _fill_slow_ns(self) -> None:
        """--slower-than: each state's threshold (the program reads them with SLOWER_THAN)."""
        table = self.bpf[b"slow_ns"]
        for state, ns in self.config.filters.slow_ns().items():
            table[ctypes.c_int(state)] = ctypes.c_uint64(ns)

    def _fill_ports(self) -> None:
        table = self.bpf[b"ports"]
        for port, bits in self.config.filters.port_flags().items():
            table[table.Key(port)] = table.Leaf(bits)

    @staticmethod
    def _open_reader(config: ProbeConfig) -> perfbuf.PerfReader:
        """The per-CPU rings; the default size halves while the memory-lock limit refuses it."""
        pages = config.buffer_pages
        while True:
            try:
                return perfbuf.PerfReader(config.record, pages)
            except OSError as exc:
                if config.shrink_buffer and exc.errno in (errno.EPERM, errno.ENOMEM) and pages > 1:
                    pages //= 2
                    continue
                raise TcptraceError(
                    f"could not set up the perf buffer of {pages} pages per CPU ({exc}): without "
                    "CAP_IPC_LOCK it must fit the locked-memory limit (ulimit -l, "
                    "LimitMEMLOCK= in systemd); try a smaller --buffer-pages"
                ) from None

    def _open_buffer(self) -> None:
        """Register our rings (perfbuf) in the program's perf event array."""
        assert self.reader is not None
        events = self.bpf[b"events"]
        for cpu, fd in self.reader.fds().items():
            events[ctypes.c_int(cpu)] = ctypes.c_int(fd)
        self._consumed = self.bpf[b"consumed"]
        self._published = {ring.cpu: 0 for ring in self.reader.rings}

    def _publish_progress(self) -> None:
        """Tell the kernel how far each ring has been read (its shedding rule)."""
        reader = self.reader
        assert reader is not None
        for ring in reader.rings:
            if ring.samples != self._published[ring.cpu]:
                self._consumed[ctypes.c_int(ring.cpu)] = ctypes.c_uint64(ring.samples)
                self._published[ring.cpu] = ring.samples

    def _wait(self, timeout_ms: int) -> bool:
        """Sleep up to timeout_ms for events; False in summary-only mode."""
        if self.reader is None:
            if timeout_ms > 0:
                import time

                time.sleep(timeout_ms / 1000)
            return False
        self.reader.wait(timeout_ms)
        return True

    def _read_runs(self) -> list[bytes]:
        """The next bounded batch of sample runs, in time order after the last batch;
        empty only when the rings hold nothing that can go now."""
        assert self.reader is not None
        hold = None if self.detached else WRITE_SLACK_NS
        while True:
            runs = self.reader.read_runs(hold)
            if runs or not self.reader.more:  # a batch of lost records only: read on
                return runs

    def poll_events(self, timeout_ms: int) -> list[Event]:
        """Wait up to timeout_ms; return the events that arrived, decoded, in time order
        (each batch after the one before, across CPUs: perfbuf.PerfReader.read_runs)."""
        if self.cgroup_fallback is not None and time.monotonic_ns() >= self._cgroup_walk_at:
            self._walk_cgroups()
        if not self._wait(timeout_ms):
            return []
        assert self.reader is not None
        unpack = self.reader.record.iter_unpack
        events: list[Event] = []
        if self.lives is not None:
            self._read_lives(events)
        else:
            for run in self._read_runs():
                events.extend(map(make_event, unpack(run)))
        self.received += len(events)
        self._publish_progress()
        # each CPU's ring is in order; interleave the CPUs by time
        if len(self.reader.rings) > 1:
            events.sort(key=event_time)
        return events

    def _read_lives(self, events: list[Event]) -> None:
        """--lifetime: each life record's closing Event into events, the record into
        self.lives (which holds this batch's only)."""
        assert self.reader is not None and self.lives is not None
        lives = self.lives
        lives.clear()
        unpack = self.reader.record.iter_unpack
        for run in self._read_runs():
            for fields in unpack(run):
                life = life_of(fields)
                events.append(life.event)
                lives[(fields[2], fields[0])] = life  # (skaddr, ts_ns)

    def set_rate_limit(self, events_per_s: float | None) -> None:
        """Let the kernel submit at most this many events a second (None: no limit).

        Split evenly over the CPUs; the rest is shed in the kernel and counted.
        """
        if self.reader is None:
            return
        per_window = 0
        if events_per_s is not None:
            share = events_per_s / max(1, len(self.reader.rings))
            per_window = max(1, int(share * RATE_WINDOW_NS / 1e9))
        self.bpf[b"rate_limit"][ctypes.c_int(0)] = ctypes.c_uint64(per_window)

    def detach(self) -> None:
        """Stop tracing: no new events or counts after this; buffered events stay readable,
        all of them at once (nothing can precede them any more)."""
        self.detached = True
        self._detach_nested()  # first: alone, it would take every hit as skipped
        self._detach_tracepoint()
        # a program that was running when it went may still write its event (detaching
        # does not wait for it): the drain reads everything at once only after that
        time.sleep(WRITE_SLACK_NS / 1e9)

    def _detach_tracepoint(self) -> None:
        if TRACEPOINT.encode() in self.bpf.tracepoint_fds:
            self.bpf.detach_tracepoint(TRACEPOINT.encode())

    def _detach_nested(self) -> None:
        if RAW_TRACEPOINT in self.bpf.raw_tracepoint_fds:
            self.bpf.detach_raw_tracepoint(tp=RAW_TRACEPOINT)

    @property
    def lost(self) -> int:
        """Events the perf rings reported lost (the kernel also counts them as dropped)."""
        return self.reader.lost if self.reader is not None else 0

    def _sum_percpu(self, name: str, reduce=sum) -> list[int]:
        """A per-CPU array of u64 (or of rows of u64: hist) reduced over the CPUs, read
        in one batch where the kernel can (kernel/mapread.py)."""
        table = self.bpf[name.encode()]
        value_size = ctypes.sizeof(table.Leaf)  # every possible CPU's value
        cpus = table.total_cpu
        keys, values = self._maps.read(
            table.map_fd, ctypes.sizeof(table.Key), value_size, table.max_entries, array=True
        )
        width = value_size // cpus // 8
        return per_cpu_totals(keys, values, table.max_entries, cpus, reduce, width)

    def behind(self) -> bool:
        """Whether the reader has fallen behind: after its last read a ring is still over
        BEHIND_FILL full (what costs time beyond the events themselves then waits)."""
        return self.reader is not None and self.reader.backlog() > BEHIND_FILL

    def summary(self) -> Summary:
        """The kernel's exact statistics, summed over CPUs."""
        summary = Summary.from_maps(
            hist=self._sum_percpu("hist"),  # NSTATES rows of HIST_SLOTS
            dsum=self._sum_percpu("dsum"),
            dmax=fold_levels(self._sum_percpu("dmax", max)),
            trans=self._sum_percpu("trans"),
            counters=self._sum_percpu("counters"),
        )
        summary.lost = self.lost
        summary.slower_than = describe_state_durations(self.config.filters.slower_than)
        return summary

    def finish_accounting(self, summary: Summary) -> None:
        """Add what only the final summary needs: events never read (counted lost), the
        map's entries, from which evictions follow, and the hits the kernel skipped (a
        bpf() call per program). Too costly or too transient for the summaries live
        views take while tracing."""
        # (the records that are not transitions were read with them)
        handed = summary.counters[C_SUBMITTED] + summary.counters[C_SIDE]
        summary.unread = max(0, handed - self.received)
        summary.sockets_tracked = self.sockets_tracked()
        summary.missed = self.missed()

    def missed(self) -> int:
        """Tracepoint hits the kernel skipped without running the program.

        A tracing program does not run while another one is running on the same
        CPU (for example this one in process context, interrupted by the softirq
        that delivers the peer's packet): the kernel counts those hits in the
        program's recursion_misses (Linux 5.12+; 0 where not counted). They are
        hits of every TCP socket, so for filtered tracing this is an upper bound.
        The nested program handles the hits this program was skipped for (counted
        recovered); only the rest were never seen.
        """
        from bcc.libbcc import lib

        info = ctypes.create_string_buffer(PROG_INFO_SIZE)
        size = ctypes.c_uint32(PROG_INFO_SIZE)
        total = 0
        for func in self.bpf.funcs.values():
            if lib.bpf_obj_get_info_by_fd(func.fd, info, ctypes.byref(size)) == 0:
                total += int.from_bytes(
                    info.raw[RECURSION_MISSES_OFFSET : RECURSION_MISSES_OFFSET + 8], "little"
                )
        recovered = sum(self.bpf[b"counters"][ctypes.c_int(C_RECOVERED)])
        # before Linux 6.7 a tracepoint program's misses are not counted at all
        return max(0, total - recovered)

    def lost_so_far(self) -> int:
        """Events lost until now (cheap: two per-CPU counters), for live reports."""
        counters = self._sum_percpu("counters")  # one batch for both
        dropped, shed = counters[C_DROPPED], counters[C_SHED]
        return max(dropped, self.lost) + shed

    def sockets_tracked(self) -> int:
        """Entries in the per-socket map now (LRU evictions are inferred from it): one
        batch read at exit, not a bpf() call per key (65,536 of them: 0.4 s)."""
        addresses, _raw, _size = self._map_values()
        return len(addresses)

    def close(self) -> None:
        if self._scan_link is not None:
            os.close(self._scan_link)
            self._scan_link = None
        self._maps.forget()
        self.bpf.cleanup()
        if self.reader is not None:
            self.reader.close()
            self.reader = None


# prctl(2) option (include/uapi/linux/prctl.h): no transparent huge pages in this process.
PR_SET_THP_DISABLE = 41


def fold_levels(dmax: list[int]) -> list[int]:
    """The largest time per state over the programs' levels (dmax is kept per level)."""
    return [
        max(dmax[state + level * NSTATES] for level in range(LEVELS)) for state in range(NSTATES)
    ]


def _no_huge_pages() -> None:
    """Keep the heap that malloc_trim gives back from being refilled by the kernel.

    Where transparent huge pages are on for every process (THP "always", as in
    Debian's kernels), khugepaged collapses any 2 MB range of the heap that still
    holds one page into a huge page: the pages the trim returned come back, at
    some moment minutes into a trace (RssAnon +6 then +12 MB in the Debian 12 VM,
    [heap] 18 of its 22 MB in huge pages). tcptrace's few MB of small objects gain
    nothing from huge pages. Best effort: an old kernel (before 3.15) refuses it.
    """
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).prctl(
            ctypes.c_int(PR_SET_THP_DISABLE),
            ctypes.c_ulong(1),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )


def _return_freed_memory() -> None:
    """Give back the heap clang and LLVM freed after compiling (about 25 MB).

    glibc keeps freed memory for reuse; malloc_trim returns it to the system.
    Elsewhere (musl) there is no such call, and nothing to do.
    """
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


def bcc_version() -> tuple[str, str]:
    """bcc's version and where its package is (tcptrace --check)."""
    try:
        import bcc
    except Exception as exc:  # found but broken: ImportError, or OSError from libbcc
        raise TcptraceError(f"bcc is not importable ({exc}): {BCC_FIX}") from None
    where = Path(bcc.__file__ or "?").parent
    return str(getattr(bcc, "__version__", "of unknown version")), str(where)


def program_path() -> Path:
    override = os.environ.get(PROGRAM_ENV)
    return Path(override) if override else bpf_dir() / PROGRAM


class _Caught:
    """What libbcc wrote to file descriptor 2 inside _quiet_stderr."""

    text = b""

    def replay(self) -> None:
        """Write it where libbcc would have: the compiler's errors and the verifier's
        log are what a bug report needs."""
        caught = memoryview(self.text)
        while caught:
            caught = caught[os.write(2, caught) :]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[_Caught]:
    """Keep what libbcc writes to file descriptor 2 (a verifier log, the compiler's
    warnings) off the terminal: one line per problem. The caller may replay it once the
    block is over (a failed load), or drop it (the warnings of a compile that worked:
    Debian 11's bcc 0.18 redefines three macros of the 5.10 headers at every compile)."""
    import sys
    import tempfile

    sys.stderr.flush()
    caught = _Caught()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield caught
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            caught.text = sink.read()


def ancestor_helper_problem() -> str | None:
    """Why --cgroup cannot ask the kernel for the owner's ancestor cgroup (None: it can):
    a small tracepoint program that calls the helper, loaded (tcptrace --check)."""
    from bcc import BPF

    text = f"int probe(void *ctx) {{ return {ANCESTOR_HELPER}(1) != 0; }}"
    with _quiet_stderr() as caught:
        try:
            bpf = BPF(text=text.encode())
            try:
                bpf.load_func(b"probe", BPF.TRACEPOINT)
            finally:
                bpf.cleanup()
        except Exception as exc:  # bcc's bare Exception
            failure: Exception | None = exc
        else:
            failure = None
    if failure is None:
        return None
    if f"unknown func {ANCESTOR_HELPER}#".encode() in caught.text:
        return f"this kernel gives tracepoint programs no {ANCESTOR_HELPER}"
    return f"a program calling {ANCESTOR_HELPER} did not load ({_bcc_reason(failure)})"


def _cgroup_ids(directory: str, limit: int) -> Iterator[int]:
    """The ids of a cgroup2 directory and of the cgroups below it (their inodes), at
    most limit; a cgroup removed during the walk is passed over."""
    for count, (where, _dirs, _files) in enumerate(os.walk(directory)):
        if count >= limit:
            return
        try:
            yield os.stat(where).st_ino
        except OSError:
            continue


def _has_batch_lookup() -> bool:
    """Does libbcc have bpf_lookup_batch (BPF_MAP_LOOKUP_BATCH)? Debian 11's 0.18 has not."""
    from bcc.libbcc import lib

    return hasattr(lib, "bpf_lookup_batch")


def _bcc_reason(exc: Exception) -> str:
    """The errno behind bcc's message for a program the kernel refused to load."""
    text = str(exc)
    if text.startswith("Need super-user privileges"):  # bcc's words for any EPERM
        return os.strerror(errno.EPERM)
    return text.split(": ")[-1]


def load_error(exc: Exception, path: Path) -> TcptraceError:
    """bcc's bare Exception, by its message, as the step that failed and its fix."""
    text = str(exc)
    if text.startswith("Failed to compile"):
        return TcptraceError(
            f"could not compile {path} (the compiler's messages are above): check the kernel "
            f"headers at {headers_dir()}; {SETUP_HINT}"
        )
    if text.startswith("Failed to load BPF program"):
        return TcptraceError(
            f"the kernel's BPF verifier refused {path.name} ({text.split(': ')[-1]}; its log "
            f"is above): this kernel ({os.uname().release}) is not supported yet, please "
            "report it with that log"
        )
    if "tracepoint" in text:
        return TcptraceError(
            f"could not attach to the tracepoint {TRACEPOINT} ({text}): {ROOT_HINT}"
        )
    return TcptraceError(f"could not load the BPF program: {text}")


# Perf ring memory for all CPUs together, and the bounds per CPU, in pages.
BUFFER_TOTAL_BYTES = 64 << 20
MIN_BUFFER_PAGES = 256
MAX_BUFFER_PAGES = 4096


# The system calls whose return gives an accepted socket its acceptor (ACCEPT_HOOK).
ACCEPT_TRACEPOINTS = ("syscalls:sys_exit_accept4", "syscalls:sys_exit_accept")


def accept_tracepoints_problem() -> str | None:
    """Why the accept hook cannot attach here (None: it can): the kernel's syscall
    tracepoints (CONFIG_FTRACE_SYSCALLS), which bcc compiles against tracefs."""
    from tcptrace.kernel.preflight import tracefs_root

    try:
        events = tracefs_root() / "events"
    except TcptraceError as exc:
        return str(exc)
    for tracepoint in ACCEPT_TRACEPOINTS:
        category, name = tracepoint.split(":")
        if not (events / category / name / "format").exists():
            return f"the kernel has no tracepoint {tracepoint}"
    return None


# A ring this full after a read: the reader is behind, and the kernel sheds at
# shed_fraction, 0.75 (a quarter of a 16 MiB ring is ~0.4 s of events at full churn).
# Not much less: a burst of closes the reader soon catches up with must stay followed.
BEHIND_FILL = 0.5


def default_buffer_pages(cpus: int | None = None) -> int:
    """Pages per CPU: 64 MiB shared by the CPUs, 1 to 16 MiB each (power of two).

    A few busy CPUs need deep rings (the reader may get no CPU for a few hundred
    ms while the workload saturates them); many CPUs share the load.
    """
    cpus = cpus or possible_cpus()
    pages = BUFFER_TOTAL_BYTES // mmap.PAGESIZE // max(1, cpus)
    pages = 1 << max(0, pages.bit_length() - 1)  # round down to a power of two
    return max(MIN_BUFFER_PAGES, min(MAX_BUFFER_PAGES, pages))


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """Highest possible CPU number plus one (the size of per-CPU arrays)."""
    try:
        return max(perfbuf.online_cpus(path)) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1
