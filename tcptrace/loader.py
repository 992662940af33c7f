"""Loading the BPF program with bcc and reading what it produces.

The only module that imports bcc. It hands the rest of tcptrace plain Python
values: raw event records (bytes) and the kernel's statistics as a Summary.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

from tcptrace.errors import TcptraceError
from tcptrace.events import C_DROPPED, C_SHED, C_SUBMITTED, HIST_SLOTS, NCOUNTERS
from tcptrace.filters import Filters
from tcptrace.preflight import BCC_FIX, ROOT_HINT, SETUP_HINT, headers_dir
from tcptrace.states import NSTATES
from tcptrace.stats import Summary

TRACEPOINT = "sock:inet_sock_set_state"
PROGRAM = "tcptrace.bpf.c"
# Load this C file instead of bpf/tcptrace.bpf.c: for tests that need a program
# the compiler or the verifier refuses, and for debugging (README, "Environment").
PROGRAM_ENV = "TCPTRACE_BPF_PROGRAM"


# struct bpf_prog_info (include/uapi/linux/bpf.h): its size in Linux 6.1 and the
# offset of recursion_misses. A kernel without the field leaves it zero.
PROG_INFO_SIZE = 232
RECURSION_MISSES_OFFSET = 208


def bpf_dir() -> Path:
    """bpf/ beside the package in a source tree, or the copy installed with it."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "bpf", here / "_bpf"):
        if (candidate / PROGRAM).is_file():
            return candidate
    raise TcptraceError(f"cannot find {PROGRAM} (looked beside {here})")


@dataclass(frozen=True)
class ProbeConfig:
    filters: Filters = field(default_factory=Filters)
    emit_events: bool = True
    max_sockets: int = 65536
    # perf buffer pages per CPU (power of two)
    buffer_pages: int = 1024

    def cflags(self) -> list[str]:
        return [
            f"-I{bpf_dir()}",
            f"-DMAX_SOCKETS={self.max_sockets}",
            f"-DFILTER_FAMILY={self.filters.family}",
            f"-DFILTER_PORTS={self.filters.port_checks}",
            f"-DSHOW_STATES={self.filters.show_mask:#x}",
            f"-DEMIT_EVENTS={int(self.emit_events)}",
        ]


class Probe:
    """The attached program: poll() returns raw records, summary() the kernel's counts."""

    def __init__(self, config: ProbeConfig) -> None:
        try:
            from bcc import BPF
        except Exception as exc:  # found but broken: ImportError, or OSError from libbcc
            raise TcptraceError(f"bcc is not importable ({exc}): {BCC_FIX}") from None
        self.config = config
        self.raw: list[bytes] = []
        self.lost = 0
        # records read from the perf buffer, to count those left unread at exit
        self.received = 0
        path = program_path()
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise TcptraceError(f"cannot read the BPF program {path}: {exc.strerror}") from None
        try:
            self.bpf = BPF(text=source, cflags=config.cflags())
        except Exception as exc:  # bcc raises bare Exception for every failure
            raise load_error(exc, path) from None
        try:
            self._fill_ports()
            if config.emit_events:
                self._open_buffer()
        except Exception as exc:
            self.bpf.cleanup()
            raise TcptraceError(
                f"could not set up the perf buffer of {config.buffer_pages} pages per CPU "
                f"({exc}): without CAP_IPC_LOCK it must fit the locked-memory limit "
                "(ulimit -l, LimitMEMLOCK= in systemd); try a smaller --buffer-pages"
            ) from None

    def _fill_ports(self) -> None:
        table = self.bpf[b"ports"]
        for port, bits in self.config.filters.port_flags().items():
            table[table.Key(port)] = table.Leaf(bits)

    def _open_buffer(self) -> None:
        raw = self.raw
        string_at = ctypes.string_at

        # Copy only; decoding happens in batches outside the callback.
        def on_event(_cpu: int, data: int, size: int) -> None:
            raw.append(string_at(data, size))

        def on_lost(count: int) -> None:
            self.lost += count

        self.bpf[b"events"].open_perf_buffer(
            on_event, page_cnt=self.config.buffer_pages, lost_cb=on_lost
        )

    def poll(self, timeout_ms: int) -> list[bytes]:
        """Wait up to timeout_ms for events; return (and forget) what arrived."""
        if self.config.emit_events:
            self.bpf.perf_buffer_poll(timeout_ms)
        elif timeout_ms > 0:
            import time

            time.sleep(timeout_ms / 1000)
        if not self.raw:
            return []
        out = self.raw[:]
        del self.raw[:]
        self.received += len(out)
        return out

    def _sum_percpu(self, name: str, size: int, reduce=sum) -> list[int]:
        table = self.bpf[name.encode()]
        values = [0] * size
        for key, leaf in table.items():
            values[key.value] = reduce(leaf)
        return values

    def summary(self) -> Summary:
        """The kernel's exact statistics, summed over CPUs."""
        summary = Summary.from_maps(
            hist=self._sum_percpu("hist", NSTATES * HIST_SLOTS),
            dsum=self._sum_percpu("dsum", NSTATES),
            dmax=self._sum_percpu("dmax", NSTATES, max),
            trans=self._sum_percpu("trans", NSTATES * NSTATES),
            counters=self._sum_percpu("counters", NCOUNTERS),
        )
        summary.lost = self.lost
        summary.missed = self.missed()
        return summary

    def finish_accounting(self, summary: Summary) -> None:
        """Add what only the final summary needs: events never read (counted lost) and
        the map's entries, from which evictions follow. Too costly or too transient for
        the summaries live views take while tracing."""
        summary.unread = max(0, summary.counters[C_SUBMITTED] - self.received)
        summary.sockets_tracked = self.sockets_tracked()

    def missed(self) -> int:
        """Tracepoint hits the kernel skipped without running the program.

        A tracing program does not run while another one is running on the same
        CPU (for example this one in process context, interrupted by the softirq
        that delivers the peer's packet): the kernel counts those hits in the
        program's recursion_misses (Linux 5.12+; 0 where not counted). They are
        hits of every TCP socket, so for filtered tracing this is an upper bound.
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
        return total

    def lost_so_far(self) -> int:
        """Events lost until now (cheap: two per-CPU counters), for live reports."""
        table = self.bpf[b"counters"]
        dropped, shed = (sum(table[table.Key(i)]) for i in (C_DROPPED, C_SHED))
        return max(dropped, self.lost) + shed

    def sockets_tracked(self) -> int:
        """Entries in the per-socket map now (LRU evictions are inferred from it)."""
        return sum(1 for _ in self.bpf[b"sockets"])

    def close(self) -> None:
        self.bpf.cleanup()


def program_path() -> Path:
    override = os.environ.get(PROGRAM_ENV)
    return Path(override) if override else bpf_dir() / PROGRAM


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


def possible_cpus() -> int:
    return os.cpu_count() or 1
