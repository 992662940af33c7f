"""tcptrace --check through the real command: one line per feature, each consistent with
what this kernel does when asked directly (kernelprobe.py, /proc, /sys), exit 0 here.

Where the kernel loads a map-element iterator the map-scan line must say so; where it
refuses one (errno), it must say the batch scan in user space and that errno.
"""

from __future__ import annotations

import gzip
import mmap
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tcptrace.kernel import features
from tcptrace.kernel.loader import default_buffer_pages
from tcptrace.kernel.perfbuf import online_cpus
from tcptrace.kernel.preflight import headers_dir

from .kernelprobe import ancestor_helper_errno, map_iterator_errno

pytestmark = pytest.mark.usefixtures("bpf_ready")


def run_check(*prefix: str) -> tuple[int, dict[str, tuple[str, str]], list[str], str]:
    """(exit code, {name: (status, detail)}, the lines after the findings, stderr)."""
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "tcptrace", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    found = {}
    for name, line in zip(features.NAMES, lines):
        assert line.startswith(f"{name}  "), (name, line)
        status, detail = line[len(name) :].split(None, 1)
        found[name] = (status, detail)
    assert list(found) == list(features.NAMES), done.stdout
    return done.returncode, found, lines[len(features.NAMES) :], done.stderr


@pytest.fixture(scope="module")
def checked() -> tuple[int, dict[str, tuple[str, str]], list[str], str]:
    return run_check()


def test_tracing_works_here_exit_0(checked):
    code, found, tail, err = checked
    assert code == 0, (found, err)
    status, detail = found[features.TRACEPOINT]
    assert status == "ok"
    traced = re.search(r"loaded and attached; (\d+) transitions of a loopback connection", detail)
    assert traced and int(traced.group(1)) >= 4, detail  # connect, accept, closes
    assert tail[-1].startswith("result: tracing works"), tail
    assert err == ""


def test_map_scan_line_matches_what_the_kernel_allows(checked):
    _code, found, _tail, _err = checked
    status, detail = found[features.MAP_SCAN]
    refused = map_iterator_errno()
    if not refused:
        assert status == "ok", detail
        assert detail.startswith("kernel iterator"), detail
    else:
        assert status == "degraded", detail
        assert detail.startswith("batch scan in user space (BPF_MAP_LOOKUP_BATCH)"), detail
        assert f"the kernel refused the map iterator ({os.strerror(refused)})" in detail
    assert re.search(r"walked the socket map \(\d+ entr(y|ies)\)", detail), detail


def test_degraded_features_are_listed_at_the_end(checked):
    _code, found, tail, _err = checked
    degraded = [name for name, (status, _detail) in found.items() if status == "degraded"]
    assert [line.split(": ")[1] for line in tail if line.startswith("degraded: ")] == degraded
    assert not [line for line in tail if line.startswith("missing: ")]
    assert all(status in ("ok", "degraded") for status, _detail in found.values()), found
    count = len(degraded)
    expected = f"{count} feature{'s' if count > 1 else ''} degraded" if count else "every feature"
    assert tail[-1].endswith(expected), tail


def test_btf_and_nested_program_where_the_kernel_has_btf(checked):
    _code, found, _tail, _err = checked
    if not Path("/sys/kernel/btf/vmlinux").is_file():
        assert found[features.BTF][0] == "degraded"
        assert found[features.NESTED][0] == "degraded"
        return
    status, detail = found[features.BTF]
    assert status == "ok", detail
    assert re.search(r"namespace at sock\+\d+, its inode at net\+\d+", detail), detail
    status, detail = found[features.NESTED]
    assert status == "ok", detail
    assert detail.startswith("attached to the raw tracepoint after the tracepoint program")


def test_cgroup_line_names_this_process_cgroup(checked):
    _code, found, _tail, _err = checked
    status, detail = found[features.CGROUP]
    mount = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.startswith("cgroup2 "):
            mount = left.split()[4]
            break
    if mount is None:
        assert status == "degraded" and "no cgroup2 mount" in detail, detail
        return
    # the child ran in this test's cgroup: its directory's inode is the kernel's id
    own = next(
        line[3:]
        for line in Path("/proc/self/cgroup").read_text().splitlines()
        if line.startswith("0::")
    )
    inode = os.stat(os.path.join(mount, own.lstrip("/"))).st_ino
    assert f"cgroup {own} (id {inode}); cgroup2 at {mount}" in detail, detail
    # --cgroup's ancestor helper, as the kernel answers a program of our own
    if ancestor_helper_errno() == 0:
        assert status == "ok", detail
        assert detail.endswith("bpf_get_current_ancestor_cgroup_id loads (--cgroup)"), detail
    else:
        assert status == "degraded", detail
        assert detail.endswith(
            "this kernel gives tracepoint programs no bpf_get_current_ancestor_cgroup_id"
        ), detail


def test_perf_buffer_is_the_default_with_cap_ipc_lock(checked):
    _code, found, _tail, _err = checked
    status, detail = found[features.PERF_BUFFER]
    pages = default_buffer_pages()
    assert status == "ok", detail
    assert detail.startswith(f"{pages} pages ("), detail
    cpus = len(online_cpus())
    assert (
        f"per CPU x {cpus} CPUs = {pages * mmap.PAGESIZE * cpus >> 20} MiB, the default" in detail
    )
    assert "CAP_IPC_LOCK: no locked-memory limit applies" in detail


def test_perf_buffer_halved_under_a_locked_memory_limit():
    # root without CAP_IPC_LOCK and 1 MiB of locked memory: the default rings do not
    # fit, smaller ones do (1 MiB holds 64 pages a CPU on 2 CPUs whatever other
    # tracers use of the per-user perf allowance); tracing still works
    code, found, tail, err = run_check(
        "setpriv", "--bounding-set=-ipc_lock", "prlimit", "--memlock=1048576"
    )
    status, detail = found[features.PERF_BUFFER]
    assert code == 0, (found, err)
    assert status == "degraded", detail
    assert f"halved from the default {default_buffer_pages()} pages" in detail
    assert "without CAP_IPC_LOCK the rings must fit RLIMIT_MEMLOCK 1 MiB" in detail
    assert any(line.startswith("degraded: perf buffer: ") for line in tail), tail
    privileges = found[features.PRIVILEGES][1]
    assert "lacks" in privileges and "CAP_IPC_LOCK" in privileges.split("lacks", 1)[1]


def test_versions_headers_and_lockdown(checked):
    import bcc

    _code, found, _tail, _err = checked
    assert found[features.KERNEL] == ("ok", f"{os.uname().release} ({os.uname().machine})")
    assert found[features.PYTHON] == ("ok", f"{platform.python_version()} ({sys.executable})")
    assert found[features.BCC][1].startswith(f"{bcc.__version__} (")
    status, detail = found[features.HEADERS]
    assert status == "ok" and detail.startswith(str(headers_dir())), detail
    lockdown = Path("/sys/kernel/security/lockdown")
    status, detail = found[features.LOCKDOWN]
    mode = kernel_lockdown(lockdown)
    if mode is None:
        # Secure Boot may have raised it; the program's tracing rules out confidentiality
        assert status == "ok", detail
        assert detail.startswith("none or integrity ("), detail
        return
    assert detail.split()[0] == mode, detail
    if lockdown.exists():
        assert detail.startswith(f"{mode} ({lockdown})"), detail
    assert status == ("missing" if mode == "confidentiality" else "ok"), detail


def kernel_lockdown(securityfs: Path) -> str | None:
    """The lockdown level from securityfs, else the one the kernel's config forces (and
    the command line's lockdown=, which can only raise it)."""
    if securityfs.exists():
        return re.search(r"\[(\w+)\]", securityfs.read_text()).group(1)
    levels = ["none", "integrity", "confidentiality"]
    for config in (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")):
        if not config.exists():
            continue
        data = config.read_bytes()
        text = (gzip.decompress(data) if config.suffix == ".gz" else data).decode()
        if "CONFIG_SECURITY_LOCKDOWN_LSM=y" not in text.splitlines():
            return "none"
        forced = [lvl for lvl in levels if f"CONFIG_LOCK_DOWN_KERNEL_FORCE_{lvl.upper()}=y" in text]
        efi = "CONFIG_LOCK_DOWN_IN_EFI_SECURE_BOOT=y" in text.splitlines()
        if forced in ([], ["none"]) and efi:
            return None  # Secure Boot may have raised it
        given = re.findall(r"(?:^|\s)lockdown=(\w+)", Path("/proc/cmdline").read_text())
        return max([*forced, *(g for g in given if g in levels), "none"], key=levels.index)
    return None
