"""What this kernel lets tcptrace do (tcptrace --check), as plain values.

check() runs the checks a trace runs at start, with the same code (preflight's
checks, then loader.Probe: the program loaded and attached, its self-checks,
the map scan opened), plus a loopback connection of its own traced end to end,
and returns one Finding per feature:

- ok: it works as designed;
- degraded: it works another way, or partly (the detail says how and why, the
  impact what the user loses);
- missing: it cannot work here;
- unknown: not checked, because something it needs is missing.

Tracing works when the tracepoint's finding is ok: exit_code() is 0 then, 1 if not.
No bcc here (loader.py imports it), no text formatting (outputs/findings.py).
"""

from __future__ import annotations

import contextlib
import gzip
import mmap
import os
import platform
import re
import resource
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tcptrace.errors import TcptraceError
from tcptrace.kernel import preflight
from tcptrace.kernel.btf import BTF_ENV, VMLINUX, NetnsOffsets
from tcptrace.kernel.events import Event
from tcptrace.states import TcpState

OK = "ok"
DEGRADED = "degraded"
MISSING = "missing"
UNKNOWN = "unknown"
STATUSES = (OK, DEGRADED, MISSING, UNKNOWN)

# The findings' names, in the order check() returns them.
PRIVILEGES = "privileges"
TRACEPOINT = "tracepoint"
BTF = "BTF offsets"
MAP_SCAN = "map scan"
NESTED = "nested program"
ACCEPT = "accept hook"
CGROUP = "cgroup helpers"
PERF_BUFFER = "perf buffer"
HEADERS = "kernel headers"
BCC = "bcc"
PYTHON = "python"
KERNEL = "kernel"
LOCKDOWN = "lockdown"
NAMES = (
    PRIVILEGES,
    TRACEPOINT,
    BTF,
    MAP_SCAN,
    NESTED,
    ACCEPT,
    CGROUP,
    PERF_BUFFER,
    HEADERS,
    BCC,
    PYTHON,
    KERNEL,
    LOCKDOWN,
)
# The findings that need the program loaded (unknown when it could not be).
LOADED = (TRACEPOINT, BTF, MAP_SCAN, NESTED, ACCEPT, CGROUP, PERF_BUFFER)

# Capability bits (include/uapi/linux/capability.h) beyond preflight's.
CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24
CAPABILITIES = (
    (preflight.CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    (preflight.CAP_BPF, "CAP_BPF"),
    (preflight.CAP_PERFMON, "CAP_PERFMON"),
    (preflight.CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
    (CAP_IPC_LOCK, "CAP_IPC_LOCK"),
    (CAP_SYS_RESOURCE, "CAP_SYS_RESOURCE"),
)

LOCKDOWN_FILE = Path("/sys/kernel/security/lockdown")
LOCKDOWN_LEVELS = ("none", "integrity", "confidentiality")
PERF_MLOCK_KB = Path("/proc/sys/kernel/perf_event_mlock_kb")
# How long the loopback connection's transitions may take to come out of the rings (the
# wait ends at its listener's close, the last; seconds under emulation).
TRACE_TIMEOUT_S = 10.0
MIB = 1 << 20


@dataclass(frozen=True)
class Finding:
    name: str  # one of NAMES
    status: str  # one of STATUSES
    detail: str  # what was found, and why when it is not ok
    impact: str = ""  # degraded or missing: what tcptrace does without it


def tracing_works(findings: Iterable[Finding]) -> bool:
    """Whether the tracepoint program loaded, attached and traced a connection here."""
    return any(f.name == TRACEPOINT and f.status == OK for f in findings)


def exit_code(findings: Iterable[Finding]) -> int:
    """tcptrace --check's exit status: 0 when tracing works (degraded features or not)."""
    return 0 if tracing_works(findings) else 1


def check(cgroup2: Path | None, own_cgroup: str | None) -> list[Finding]:
    """Every finding, in NAMES order. cgroup2: where the cgroup v2 hierarchy is mounted
    (None: nowhere); own_cgroup: this process's cgroup in it ('/user.slice/...')."""
    found: dict[str, Finding] = {}
    found[PRIVILEGES] = _privileges()
    found[BCC] = _bcc()
    found[HEADERS] = _headers()
    tracepoint = _tracepoint_present() if found[PRIVILEGES].status == OK else None
    blockers = [f for f in (found[PRIVILEGES], found[BCC], found[HEADERS]) if f.status == MISSING]
    if tracepoint is not None and tracepoint.status == MISSING:
        blockers.append(tracepoint)
    if blockers:
        for name in LOADED:
            found[name] = Finding(name, UNKNOWN, f"not checked: {blockers[0].name} missing")
        if tracepoint is not None:
            found[TRACEPOINT] = tracepoint
    else:
        found.update({f.name: f for f in _loaded(cgroup2, own_cgroup)})
    found[PYTHON] = Finding(PYTHON, OK, f"{platform.python_version()} ({sys.executable})")
    uname = os.uname()
    found[KERNEL] = Finding(KERNEL, OK, f"{uname.release} ({uname.machine})")
    found[LOCKDOWN] = _lockdown(traced=tracing_works(found.values()))
    return [found[name] for name in NAMES]


def _missing(name: str, exc: TcptraceError, impact: str = "tcptrace cannot trace") -> Finding:
    return Finding(name, MISSING, str(exc), impact)


def _privileges() -> Finding:
    caps = preflight.effective_caps()
    has = [name for bit, name in CAPABILITIES if caps >> bit & 1]
    lacks = [name for bit, name in CAPABILITIES if not caps >> bit & 1]
    detail = f"uid {os.geteuid()}; has {', '.join(has) or 'none of the capabilities it uses'}"
    if lacks:
        detail += f"; lacks {', '.join(lacks)}"
        if lacks[-1] == "CAP_SYS_RESOURCE":
            detail += " (needed before Linux 5.11 only, where maps count against ulimit -l)"
    try:
        preflight.check_privileges()
    except TcptraceError as exc:
        return _missing(PRIVILEGES, exc)
    return Finding(PRIVILEGES, OK, detail)


def _bcc() -> Finding:
    from tcptrace.kernel.loader import bcc_version

    try:
        preflight.check_bcc()
        version, where = bcc_version()
    except TcptraceError as exc:
        return _missing(BCC, exc)
    return Finding(BCC, OK, f"{version} ({where})")


def _headers() -> Finding:
    try:
        preflight.check_headers()
    except TcptraceError as exc:
        return _missing(HEADERS, exc, "the program cannot be compiled")
    path = preflight.headers_dir()
    running = os.uname().release
    if not (path / "include").is_dir():
        return Finding(
            HEADERS,
            OK,
            f"none at {path}: bcc unpacks the kernel's own (/sys/kernel/kheaders.tar.xz)",
        )
    where = str(path)
    with contextlib.suppress(OSError):
        target = path.resolve()
        if target != path:
            where = f"{path} -> {target}"
    version = headers_version(path)
    if version is None:
        return Finding(HEADERS, OK, f"{where} (version not found in include/generated)")
    if version == running:
        return Finding(HEADERS, OK, f"{where}, the running kernel's ({version})")
    return Finding(
        HEADERS,
        OK,
        f"{where}: {version}'s, not the running {running}'s (harmless: the program reads "
        "tracepoint fields, and struct offsets from the BTF)",
    )


def headers_version(build: Path) -> str | None:
    """The kernel release a build tree's headers are from (UTS_RELEASE), or None."""
    try:
        text = (build / "include" / "generated" / "utsrelease.h").read_text()
    except OSError:
        return None
    found = re.search(r'UTS_RELEASE\s+"([^"]+)"', text)
    return found.group(1) if found else None


def _tracepoint_present() -> Finding | None:
    """MISSING when tracefs or the tracepoint is not there, else None (the load decides)."""
    try:
        preflight.check_tracepoint(preflight.tracefs_root())
    except TcptraceError as exc:
        return _missing(TRACEPOINT, exc)
    return None


def _loaded(cgroup2: Path | None, own_cgroup: str | None) -> list[Finding]:
    """Load the program as a trace with --stuck or --interval would, and ask it."""
    from tcptrace.kernel.loader import Probe, ProbeConfig, ancestor_helper_problem

    config = ProbeConfig(shrink_buffer=True, scan=True, keep_ends=True)
    # the limit the rings were sized under: bcc before 0.2x raises it to unlimited
    # when a map creation meets EPERM (Linux before 5.11 charges maps to it)
    memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    try:
        probe = Probe(config)
    except TcptraceError as exc:
        return [_missing(TRACEPOINT, exc)] + [
            Finding(name, UNKNOWN, "not checked: the program did not load") for name in LOADED[1:]
        ]
    try:
        netns = probe.check_netns()
        nested = probe.check_nested()
        accept = probe.accept_problem
        scan = _map_scan(probe)
        events, problem = _trace_own_connection(probe)
        assert probe.reader is not None
        pages, cpus = probe.reader.pages, len(probe.reader.rings)
        offsets = probe.config.netns_offsets
    finally:
        probe.close()
    ancestor = ancestor_helper_problem()
    return [
        _traced(events, problem),
        _btf(netns, offsets),
        scan,
        _nested(nested),
        _accept(accept),
        _cgroup(events, cgroup2, own_cgroup, ancestor),
        _perf_buffer(pages, config.buffer_pages, cpus, memlock),
    ]


def _btf(problem: str | None, offsets: NetnsOffsets | None) -> Finding:
    if problem is not None or offsets is None:
        return Finding(
            BTF,
            DEGRADED,
            str(problem),
            "each socket's namespace is its owner's /proc/PID/ns/net; --netns is refused",
        )
    btf = os.environ.get(BTF_ENV) or str(VMLINUX)
    return Finding(
        BTF,
        OK,
        f"{btf}: a socket's namespace at sock+{offsets.sock_net}, its inode at "
        f"net+{offsets.net_inum}; read right on a socket of its own",
    )


def _accept(problem: str | None) -> Finding:
    if problem is not None:
        return Finding(
            ACCEPT,
            DEGRADED,
            problem,
            "an accepted connection keeps its listener's owner (a forked server's master, "
            "not the worker that accepted it)",
        )
    return Finding(
        ACCEPT,
        OK,
        "on accept() and accept4(): an accepted socket is its acceptor's; found its own "
        "accepted socket right",
    )


def _nested(problem: str | None) -> Finding:
    if problem is not None:
        return Finding(
            NESTED,
            DEGRADED,
            problem,
            "transitions the kernel skips while a BPF program runs on their CPU are only "
            "counted, not traced",
        )
    return Finding(
        NESTED,
        OK,
        "attached to the raw tracepoint after the tracepoint program; read a connection "
        "of its own right",
    )


def _map_scan(probe) -> Finding:
    problem = probe.open_scan()
    if problem is not None:
        return Finding(MAP_SCAN, MISSING, problem, "--stuck is refused; no OLDEST ages")
    try:
        result = probe.scan(time.monotonic_ns())
    except TcptraceError as exc:
        return Finding(MAP_SCAN, MISSING, str(exc), "--stuck is refused; no OLDEST ages")
    entries = sum(result.count.values())
    walked = f"walked the socket map ({entries} {'entry' if entries == 1 else 'entries'})"
    if probe.scan_fallback is None:
        return Finding(MAP_SCAN, OK, f"kernel iterator (BPF_ITER over the socket map); {walked}")
    return Finding(
        MAP_SCAN,
        DEGRADED,
        f"batch scan in user space (BPF_MAP_LOOKUP_BATCH), {walked}: {probe.scan_fallback}",
        "--stuck, OLDEST and the gauges walk the map in user space, at more CPU than the kernel",
    )


def _trace_own_connection(probe) -> tuple[list[Event], str | None]:
    """The transitions of a loopback connection of this process, as the rings gave them
    (up to its listener's close, the last), or why there was no connection."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
                client.connect(("127.0.0.1", port))
                server.accept()[0].close()
    except OSError as exc:
        return [], f"no loopback connection ({exc.strerror})"
    ours: list[Event] = []
    deadline = time.monotonic() + TRACE_TIMEOUT_S
    while time.monotonic() < deadline:
        ours += [e for e in probe.poll_events(50) if port in (e.sport, e.dport)]
        if any(e.oldstate == TcpState.LISTEN and e.newstate == TcpState.CLOSE for e in ours):
            break
    return ours, None


def _traced(events: list[Event], problem: str | None) -> Finding:
    if not events:
        why = problem or "a loopback connection of its own was not traced"
        return Finding(
            TRACEPOINT,
            MISSING,
            f"sock:inet_sock_set_state: loaded and attached, but {why}",
            "tcptrace cannot trace",
        )
    return Finding(
        TRACEPOINT,
        OK,
        f"sock:inet_sock_set_state: loaded and attached; "
        f"{len(events)} transitions of a loopback connection of its own read "
        "from the perf buffer",
    )


def _cgroup(
    events: list[Event], cgroup2: Path | None, own_cgroup: str | None, ancestor: str | None
) -> Finding:
    impact = "no CGROUP column; --cgroup is refused"
    ids = {e.cgroup_id for e in events if e.pid == os.getpid() and e.owner_known}
    if cgroup2 is None:
        return Finding(CGROUP, DEGRADED, "no cgroup2 mount in /proc/self/mountinfo", impact)
    if own_cgroup is None:
        return Finding(
            CGROUP,
            DEGRADED,
            f"cgroup2 at {cgroup2}, but this process is in no "
            "cgroup of it (/proc/self/cgroup has no 0:: line)",
            impact,
        )
    if not ids:
        return Finding(CGROUP, UNKNOWN, "not checked: no transition of its own was traced")
    path = cgroup2 / own_cgroup.lstrip("/")
    try:
        expected = path.stat().st_ino
    except OSError as exc:
        return Finding(CGROUP, DEGRADED, f"cannot read {path} ({exc.strerror})", impact)
    if ids != {expected}:
        read = ", ".join(str(i) for i in sorted(ids))
        return Finding(
            CGROUP,
            DEGRADED,
            f"bpf_get_current_cgroup_id read {read} for this "
            f"process, whose cgroup {path} is {expected}",
            "owners' cgroups are named wrong; --cgroup misses sockets",
        )
    from tcptrace.kernel.loader import ANCESTOR_HELPER, CGROUP_WALK_NS

    found = (
        f"bpf_get_current_cgroup_id read this process's cgroup "
        f"{own_cgroup} (id {expected}); cgroup2 at {cgroup2}"
    )
    if ancestor is not None:
        return Finding(
            CGROUP,
            DEGRADED,
            f"{found}; {ancestor}",
            f"--cgroup matches the cgroups below it by id, walked every "
            f"{CGROUP_WALK_NS // 10**9} s: a socket of a cgroup made in between may be missed",
        )
    return Finding(CGROUP, OK, f"{found}; {ANCESTOR_HELPER} loads (--cgroup)")


def _perf_buffer(pages: int, default: int, cpus: int, soft: int) -> Finding:
    per_cpu = pages * mmap.PAGESIZE
    size = f"{pages} pages ({_size(per_cpu)}) per CPU x {cpus} CPUs = {_size(per_cpu * cpus)}"
    limit = "unlimited" if soft == resource.RLIM_INFINITY else _size(soft)
    try:
        mlock_kb = f"{int(PERF_MLOCK_KB.read_text())} KiB"
    except (OSError, ValueError):
        mlock_kb = "unknown"
    limits = f"RLIMIT_MEMLOCK {limit}, perf_event_mlock_kb {mlock_kb} per CPU"
    if preflight.effective_caps() >> CAP_IPC_LOCK & 1:
        limits = f"CAP_IPC_LOCK: no locked-memory limit applies ({limits})"
    else:
        limits = f"without CAP_IPC_LOCK the rings must fit {limits}"
    if pages >= default:
        return Finding(PERF_BUFFER, OK, f"{size}, the default; {limits}")
    return Finding(
        PERF_BUFFER,
        DEGRADED,
        f"{size}, halved from the default {default} pages: {limits}",
        "a burst fills the rings sooner (events lost, counted); raise ulimit -l or LimitMEMLOCK=",
    )


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB and not n % MIB else f"{n // 1024} KiB"


def _lockdown(traced: bool) -> Finding:
    mode, source = lockdown_mode()
    if mode is None and traced:
        # confidentiality would have refused the program's reads of kernel memory
        return Finding(LOCKDOWN, OK, f"none or integrity ({source}): the program traced")
    if mode is None:
        return Finding(LOCKDOWN, UNKNOWN, source)
    if mode == "confidentiality":
        return Finding(
            LOCKDOWN,
            MISSING,
            f"confidentiality ({source}): it refuses "
            "bpf_probe_read_kernel, which the program needs",
            "tcptrace cannot trace",
        )
    what = {"none": "", "integrity": ": it refuses bpf_probe_write_user only, not used"}[mode]
    return Finding(LOCKDOWN, OK, f"{mode} ({source}){what}")


def lockdown_mode(
    securityfs: Path = LOCKDOWN_FILE,
    configs: Iterable[Path] | None = None,
    cmdline: Path = Path("/proc/cmdline"),
) -> tuple[str | None, str]:
    """The kernel's lockdown level (none, integrity or confidentiality; None: unknown) and
    where it was read: securityfs, else the level the kernel's config forces and the
    command line's lockdown= (a level raised since boot then does not show)."""
    try:
        found = re.search(r"\[(\w+)\]", securityfs.read_text())
    except OSError:
        found = None
    if found:
        return found.group(1), str(securityfs)
    release = os.uname().release
    for path in configs or (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        config = _read_config(path)
        if config is None:
            continue
        options = set(config.splitlines())
        if "CONFIG_SECURITY_LOCKDOWN_LSM=y" not in options:
            return "none", f"no lockdown LSM in {path}"
        level, source = 0, f"no CONFIG_LOCK_DOWN_KERNEL_FORCE_* in {path}"
        for index, name in enumerate(LOCKDOWN_LEVELS):
            option = f"CONFIG_LOCK_DOWN_KERNEL_FORCE_{name.upper()}"
            if f"{option}=y" in options:
                level, source = index, f"{option} in {path}"
        if not level and "CONFIG_LOCK_DOWN_IN_EFI_SECURE_BOOT=y" in options:
            # integrity when booted with Secure Boot: only securityfs can tell
            return (
                None,
                f"CONFIG_LOCK_DOWN_IN_EFI_SECURE_BOOT in {path}, {securityfs} cannot be read",
            )
        with contextlib.suppress(OSError):
            given = re.search(r"(?:^|\s)lockdown=(\w+)", cmdline.read_text())
            if given and given.group(1) in LOCKDOWN_LEVELS[level + 1 :]:
                level = LOCKDOWN_LEVELS.index(given.group(1))
                source = f"lockdown={given.group(1)} in {cmdline}"
        return LOCKDOWN_LEVELS[level], f"{source}; {securityfs} cannot be read"
    return None, f"not found: {securityfs} cannot be read and no kernel config was found"


def _read_config(path: Path) -> str | None:
    try:
        data = path.read_bytes()
        return (gzip.decompress(data) if path.suffix == ".gz" else data).decode(errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
