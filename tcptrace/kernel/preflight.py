"""Checks made before loading the BPF program, each with its own message and fix.

Nothing here imports bcc: a missing bcc is one of the things it reports.

For tests and debugging, two environment variables point the checks elsewhere
(see README, "Environment"): TCPTRACE_TRACEFS (a tracefs root; never mounted)
and TCPTRACE_HEADERS (a kernel build tree).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

from tcptrace.errors import TcptraceError

TRACEPOINT = "sock/inet_sock_set_state"
TRACEFS_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# Capability bits (include/uapi/linux/capability.h).
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

SETUP_HINT = "run scripts/setup.sh from the tcptrace source tree"
ROOT_HINT = "run it as root (sudo tcptrace ...)"
# What root gives that tracing needs, said the same way in errors, the man page and the
# README (CAP_SYS_RESOURCE is not among them: no program load checks it since 5.11).
CAPABILITIES = "CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH"

# Shared with loader.py, which reports a bcc that is found but fails to import.
BCC_FIX = (
    "install the distribution's package (Debian/Ubuntu: apt-get install python3-bpfcc; "
    "Fedora: dnf install python3-bcc) and run tcptrace with /usr/bin/python3 or a venv "
    "made with --system-site-packages (the PyPI package named 'bcc' is unrelated)"
)


def effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


# Debian and Ubuntu kernels add a level 3 to kernel.perf_event_paranoid: then
# perf_event_open (how a tracepoint program is attached) needs CAP_SYS_ADMIN.
PERF_PARANOID = Path("/proc/sys/kernel/perf_event_paranoid")
PARANOID_ADMIN_ONLY = 3


def perf_paranoid() -> int:
    try:
        return int(PERF_PARANOID.read_text())
    except (OSError, ValueError):
        return 2  # the upstream default


def missing_caps(caps: int, paranoid: int = 2) -> list[str]:
    """The capabilities, among those loading and attaching need, that caps lacks."""
    if caps >> CAP_SYS_ADMIN & 1:
        return []  # CAP_SYS_ADMIN covers BPF and perf on every kernel
    missing = [
        name
        for bit, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON"))
        if not caps >> bit & 1
    ]
    if not missing and paranoid >= PARANOID_ADMIN_ONLY:
        return ["CAP_SYS_ADMIN"]
    return missing


def check_privileges() -> None:
    if os.geteuid() == 0:
        return
    paranoid = perf_paranoid()
    missing = missing_caps(effective_caps(), paranoid)
    if not missing:
        return
    if missing == ["CAP_SYS_ADMIN"]:
        raise TcptraceError(
            f"loading the eBPF program needs root; this process (uid {os.geteuid()}) lacks "
            f"CAP_SYS_ADMIN, which this kernel requires for perf events while "
            f"kernel.perf_event_paranoid={paranoid}: {ROOT_HINT}, grant it CAP_SYS_ADMIN, "
            "or set kernel.perf_event_paranoid=2"
        )
    raise TcptraceError(
        f"loading the eBPF program needs root; this process (uid {os.geteuid()}) lacks "
        f"{' and '.join(missing)}: {ROOT_HINT}, or grant it {CAPABILITIES}"
    )


def check_bcc() -> None:
    try:
        found = importlib.util.find_spec("bcc") is not None
    except (ImportError, ValueError):  # a broken or blocked entry in sys.modules
        found = False
    if not found:
        raise TcptraceError(f"bcc is not importable: {BCC_FIX}")


def headers_dir() -> Path:
    override = os.environ.get("TCPTRACE_HEADERS") or os.environ.get("BCC_KERNEL_SOURCE")
    if override:
        return Path(override)
    return Path("/lib/modules") / os.uname().release / "build"


def check_headers() -> None:
    path = headers_dir()
    if _is_dir(path / "include", path):
        return
    if "TCPTRACE_HEADERS" not in os.environ and Path("/sys/kernel/kheaders.tar.xz").exists():
        return  # bcc unpacks the kernel's own headers (CONFIG_IKHEADERS)
    raise TcptraceError(
        f"kernel headers not found at {path}: install linux-headers-$(uname -r), "
        f"or {SETUP_HINT} (it links Debian's nearest headers when none match)"
    )


def _is_dir(path: Path, root: Path) -> bool:
    """Path.is_dir, but a directory we may not search is an error that says so."""
    try:
        return path.is_dir()
    except PermissionError:
        raise TcptraceError(
            f"permission denied reading {root}: {ROOT_HINT}, or grant it CAP_DAC_READ_SEARCH"
        ) from None


def tracefs_root() -> Path:
    """Find tracefs, mounting it if needed (never when TCPTRACE_TRACEFS names it)."""
    override = os.environ.get("TCPTRACE_TRACEFS")
    candidates = (override,) if override else TRACEFS_MOUNTS
    for root in candidates:
        if _is_dir(Path(root, "events"), Path(root)):
            return Path(root)
    if not override and _mount_tracefs(TRACEFS_MOUNTS[0]):
        return Path(TRACEFS_MOUNTS[0])
    where = override or " or ".join(TRACEFS_MOUNTS)
    raise TcptraceError(
        f"tracefs is not mounted at {where} and could not be mounted: "
        "run 'mount -t tracefs nodev /sys/kernel/tracing' as root "
        "(the kernel needs CONFIG_TRACING)"
    )


def tracefs_at(root: str, bcc_version: str) -> None:
    """Make tracefs readable at root, where this bcc reads it (bcc.TRACEFS). bcc before
    0.2x (Debian 11's 0.18) reads tracepoint formats and ids under /sys/kernel/debug/tracing
    only: on a system that mounts tracefs at /sys/kernel/tracing alone (no debugfs),
    debugfs is mounted, as systemd does at boot, and the kernel mounts tracefs in it."""
    if os.environ.get("TCPTRACE_TRACEFS") or _is_dir(Path(root, "events"), Path(root)):
        return
    debugfs = str(Path(root).parent)
    if Path(root).name == "tracing" and _mount_tracefs(debugfs, "debugfs", root):
        return
    if _mount_tracefs(root):
        return
    raise TcptraceError(
        f"bcc {bcc_version} reads tracefs at {root} only, and it could not be mounted there: "
        f"run 'mount -t debugfs none {debugfs}' as root"
    )


def _mount_tracefs(target: str, fstype: str = "tracefs", check: str | None = None) -> bool:
    """Mount fstype on target; True when check (default: target) then has tracefs's events."""
    try:
        mount = subprocess.run(
            ["mount", "-t", fstype, "nodev", target],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # no mount(8) at all
        return False
    check = check or target
    return mount.returncode == 0 and _is_dir(Path(check, "events"), Path(check))


def check_tracepoint(root: Path) -> None:
    if not _is_dir(root / "events" / TRACEPOINT, root):
        raise TcptraceError(
            f"this kernel has no tracepoint {TRACEPOINT.replace('/', ':')} "
            f"(looked in {root}/events): tcptrace needs Linux 4.16 or newer "
            "built with CONFIG_INET and tracepoints"
        )


def run_all() -> None:
    """All checks, cheapest first."""
    check_privileges()
    check_bcc()
    root = tracefs_root()
    check_tracepoint(root)
    check_headers()
