"""Checks made before loading the BPF program, each with its own message and fix.

Nothing here imports bcc: a missing bcc is one of the things it reports.
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
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

SETUP_HINT = "run scripts/setup.sh from the tcptrace source tree"


def effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    if os.geteuid() == 0:
        return
    caps = effective_caps()
    has = lambda bit: bool(caps >> bit & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return
    raise TcptraceError(
        "tcptrace needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF program: "
        "run it with sudo"
    )


def check_bcc() -> None:
    if importlib.util.find_spec("bcc") is None:
        raise TcptraceError(
            "bcc is not importable: install the distribution's package "
            "(Debian/Ubuntu: apt-get install python3-bpfcc; Fedora: dnf install python3-bcc) "
            "and run tcptrace with /usr/bin/python3 or a venv made with --system-site-packages "
            "(the PyPI package named 'bcc' is unrelated)"
        )


def headers_dir() -> Path:
    override = os.environ.get("TCPTRACE_HEADERS") or os.environ.get("BCC_KERNEL_SOURCE")
    if override:
        return Path(override)
    return Path("/lib/modules") / os.uname().release / "build"


def check_headers() -> None:
    path = headers_dir()
    if (path / "include").is_dir():
        return
    if "TCPTRACE_HEADERS" not in os.environ and Path("/sys/kernel/kheaders.tar.xz").exists():
        return  # bcc unpacks the kernel's own headers (CONFIG_IKHEADERS)
    raise TcptraceError(
        f"kernel headers not found at {path}: install linux-headers-$(uname -r), "
        f"or {SETUP_HINT} (it links Debian's nearest headers when none match)"
    )


def tracefs_root() -> Path:
    """Find tracefs, mounting it if needed."""
    override = os.environ.get("TCPTRACE_TRACEFS")
    candidates = (override,) if override else TRACEFS_MOUNTS
    for root in candidates:
        if Path(root, "events").is_dir():
            return Path(root)
    if not override:
        mount = subprocess.run(
            ["mount", "-t", "tracefs", "nodev", TRACEFS_MOUNTS[0]],
            capture_output=True,
            text=True,
            check=False,
        )
        if mount.returncode == 0 and Path(TRACEFS_MOUNTS[0], "events").is_dir():
            return Path(TRACEFS_MOUNTS[0])
    where = override or " or ".join(TRACEFS_MOUNTS)
    raise TcptraceError(
        f"tracefs is not mounted at {where} and could not be mounted: "
        "run 'mount -t tracefs nodev /sys/kernel/tracing' (needs CONFIG_TRACING)"
    )


def check_tracepoint(root: Path) -> None:
    if not (root / "events" / TRACEPOINT).is_dir():
        raise TcptraceError(
            f"this kernel has no tracepoint {TRACEPOINT.replace('/', ':')} "
            f"(looked in {root}/events): tcptrace needs Linux 4.16 or newer"
        )


def run_all() -> None:
    """All checks, cheapest first."""
    check_privileges()
    check_bcc()
    root = tracefs_root()
    check_tracepoint(root)
    check_headers()
