"""tcptrace --check's findings without root: the verdict, and each finding's rules on
made-up inputs (the real kernel's answers: tests/integration/test_check.py)."""

from __future__ import annotations

import gzip
import mmap
import os
import socket
from pathlib import Path

import pytest

from tcptrace.errors import TcptraceError
from tcptrace.kernel import features
from tcptrace.kernel.events import F_OWNER_KNOWN, make_event
from tcptrace.kernel.features import DEGRADED, MISSING, OK, UNKNOWN, Finding
from tcptrace.states import TcpState


def findings(**statuses: str) -> list[Finding]:
    """Every finding ok but those given ({name with _ for spaces: status})."""
    given = {name.replace("_", " "): status for name, status in statuses.items()}
    return [Finding(name, given.get(name, OK), "detail") for name in features.NAMES]


def test_exit_0_when_tracing_works_whatever_is_degraded():
    assert features.exit_code(findings()) == 0
    degraded = findings(map_scan=DEGRADED, nested_program=DEGRADED, perf_buffer=DEGRADED)
    assert features.tracing_works(degraded)
    assert features.exit_code(degraded) == 0
    # a missing feature other than the tracepoint: tracing still works
    assert features.exit_code(findings(map_scan=MISSING, lockdown=UNKNOWN)) == 0


@pytest.mark.parametrize("status", [MISSING, UNKNOWN, DEGRADED])
def test_exit_1_unless_the_tracepoint_is_ok(status):
    assert not features.tracing_works(findings(tracepoint=status))
    assert features.exit_code(findings(tracepoint=status)) == 1
    assert features.exit_code([]) == 1


def test_nothing_loads_when_a_prerequisite_is_missing(monkeypatch):
    def not_root() -> None:
        raise TcptraceError("loading the eBPF program needs root; this process (uid 1000) ...")

    monkeypatch.setattr(features.preflight, "check_privileges", not_root)
    monkeypatch.setattr(features.preflight, "check_bcc", lambda: None)  # found, whatever here
    monkeypatch.setattr("tcptrace.kernel.loader.bcc_version", lambda: ("0.26.0", "/bcc"))
    monkeypatch.setattr(features, "_loaded", lambda *args: pytest.fail("loaded the program"))
    monkeypatch.setenv("TCPTRACE_HEADERS", "/nonexistent")
    found = {f.name: f for f in features.check(None, None)}
    assert list(found) == list(features.NAMES)
    assert found[features.PRIVILEGES].status == MISSING
    assert "needs root" in found[features.PRIVILEGES].detail
    assert found[features.PRIVILEGES].impact == "tcptrace cannot trace"
    assert found[features.HEADERS].status == MISSING
    assert "kernel headers not found at /nonexistent" in found[features.HEADERS].detail
    assert found[features.BCC] == Finding(features.BCC, OK, "0.26.0 (/bcc)")
    for name in features.LOADED:
        assert found[name] == Finding(name, UNKNOWN, "not checked: privileges missing")
    assert features.exit_code(list(found.values())) == 1


def event(pid: int, cgroup_id: int, old=TcpState.CLOSE, new=TcpState.SYN_SENT):
    return make_event(
        (1, 0, 0xFFFF0001, cgroup_id, pid, F_OWNER_KNOWN, 0, 0, b"\0" * 16, b"\0" * 16,
         40000, 8080, socket.AF_INET, int(old), int(new), b"python\0".ljust(16, b"\0"))
    )  # fmt: skip


def test_cgroup_helper_read_this_process_cgroup(tmp_path):
    (tmp_path / "user.slice").mkdir()
    inode = (tmp_path / "user.slice").stat().st_ino
    mine = [event(os.getpid(), inode), event(1, 999)]  # another owner's id is not compared
    found = features._cgroup(mine, tmp_path, "/user.slice", None)
    assert found.status == OK, found
    assert found.detail == (
        f"bpf_get_current_cgroup_id read this process's cgroup /user.slice (id {inode}); "
        f"cgroup2 at {tmp_path}; bpf_get_current_ancestor_cgroup_id loads (--cgroup)"
    )


def test_cgroup_without_the_ancestor_helper_is_degraded(tmp_path):
    # Debian 11's 5.10: --cgroup walks the cgroups below the filtered one instead
    (tmp_path / "user.slice").mkdir()
    inode = (tmp_path / "user.slice").stat().st_ino
    refused = "this kernel gives tracepoint programs no bpf_get_current_ancestor_cgroup_id"
    found = features._cgroup([event(os.getpid(), inode)], tmp_path, "/user.slice", refused)
    assert found.status == DEGRADED, found
    assert found.detail.endswith(f"cgroup2 at {tmp_path}; {refused}")
    assert found.impact == (
        "--cgroup matches the cgroups below it by id, walked every 1 s: "
        "a socket of a cgroup made in between may be missed"
    )


def test_cgroup_helper_reading_another_id_is_degraded(tmp_path):
    found = features._cgroup([event(os.getpid(), 12345)], tmp_path, "/", None)
    assert found.status == DEGRADED
    assert f"read 12345 for this process, whose cgroup {tmp_path} is" in found.detail
    assert found.impact


def test_cgroup_without_a_cgroup2_mount_or_without_events(tmp_path):
    found = features._cgroup([event(os.getpid(), 1)], None, "/", None)
    assert (found.status, found.detail) == (DEGRADED, "no cgroup2 mount in /proc/self/mountinfo")
    assert "--cgroup is refused" in found.impact
    assert features._cgroup([event(os.getpid(), 1)], tmp_path, None, None).status == DEGRADED
    assert features._cgroup([event(1, 1)], tmp_path, "/", None).status == UNKNOWN


def test_a_connection_not_traced_means_tracing_does_not_work():
    found = features._traced([], None)
    assert found.status == MISSING
    assert "a loopback connection of its own was not traced" in found.detail
    assert features._traced([], "no loopback connection (Network is unreachable)").detail.endswith(
        "but no loopback connection (Network is unreachable)"
    )
    ours = [event(os.getpid(), 1), event(0, 1, TcpState.LISTEN, TcpState.CLOSE)]
    assert features._traced(ours, None).status == OK
    assert "2 transitions of a loopback connection" in features._traced(ours, None).detail


def test_perf_buffer_default_or_halved():
    default = features._perf_buffer(4096, 4096, 2, 8 << 20)
    assert default.status == OK
    per_cpu = 4096 * mmap.PAGESIZE
    assert default.detail.startswith(f"4096 pages ({per_cpu >> 20} MiB) per CPU x 2 CPUs = ")
    assert ", the default; " in default.detail
    halved = features._perf_buffer(256, 4096, 4, 1 << 20)
    assert halved.status == DEGRADED
    assert "256 pages" in halved.detail and "halved from the default 4096 pages" in halved.detail
    assert "ulimit -l" in halved.impact


def test_headers_version(tmp_path):
    generated = tmp_path / "include" / "generated"
    generated.mkdir(parents=True)
    assert features.headers_version(tmp_path) is None
    (generated / "utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-57-amd64"\n')
    assert features.headers_version(tmp_path) == "6.1.0-57-amd64"


def test_headers_of_another_kernel_are_ok_and_say_so(tmp_path, monkeypatch):
    generated = tmp_path / "include" / "generated"
    generated.mkdir(parents=True)
    (generated / "utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-57-amd64"\n')
    monkeypatch.setenv("TCPTRACE_HEADERS", str(tmp_path))
    found = features._headers()
    assert found.status == OK
    assert found.detail.startswith(f"{tmp_path}: 6.1.0-57-amd64's, not the running ")
    (generated / "utsrelease.h").write_text(f'#define UTS_RELEASE "{os.uname().release}"\n')
    assert features._headers().detail == (
        f"{tmp_path}, the running kernel's ({os.uname().release})"
    )


def config(path: Path, *lines: str) -> Path:
    text = "\n".join(["CONFIG_BPF=y", "CONFIG_SECURITY_LOCKDOWN_LSM=y", *lines, ""]).encode()
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return path


def test_lockdown_from_securityfs(tmp_path):
    securityfs = tmp_path / "lockdown"
    securityfs.write_text("none [integrity] confidentiality\n")
    assert features.lockdown_mode(securityfs, []) == ("integrity", str(securityfs))


def test_lockdown_from_the_config_when_securityfs_is_not_mounted(tmp_path):
    absent = tmp_path / "lockdown"
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 quiet\n")
    forced = config(tmp_path / "config.gz", "CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY=y")
    mode, source = features.lockdown_mode(absent, [forced], cmdline)
    assert mode == "integrity"
    assert source == (
        f"CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY in {forced}; {absent} cannot be read"
    )
    # the command line can raise it, never lower it
    cmdline.write_text("quiet lockdown=confidentiality\n")
    mode, source = features.lockdown_mode(absent, [forced], cmdline)
    assert (mode, source.split(";")[0]) == (
        "confidentiality",
        f"lockdown=confidentiality in {cmdline}",
    )
    cmdline.write_text("lockdown=none\n")
    assert features.lockdown_mode(absent, [forced], cmdline)[0] == "integrity"
    plain = config(tmp_path / "config-6.1", "# CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY is not set")
    cmdline.write_text("quiet\n")
    assert features.lockdown_mode(absent, [tmp_path / "missing.gz", plain], cmdline)[0] == "none"


def test_lockdown_unknown_without_securityfs_or_config(tmp_path):
    mode, source = features.lockdown_mode(tmp_path / "lockdown", [tmp_path / "no-config"])
    assert mode is None and source.startswith("not found: ")
    # Secure Boot may have turned it on: only securityfs could say
    secure = config(tmp_path / "config", "CONFIG_LOCK_DOWN_IN_EFI_SECURE_BOOT=y")
    mode, source = features.lockdown_mode(tmp_path / "lockdown", [secure], tmp_path / "none")
    assert mode is None and source.startswith("CONFIG_LOCK_DOWN_IN_EFI_SECURE_BOOT in ")


def test_no_lockdown_without_the_lsm(tmp_path):
    plain = tmp_path / "config"
    plain.write_text("CONFIG_BPF=y\n# CONFIG_SECURITY_LOCKDOWN_LSM is not set\n")
    assert features.lockdown_mode(tmp_path / "lockdown", [plain]) == (
        "none",
        f"no lockdown LSM in {plain}",
    )


def test_lockdown_findings(monkeypatch):
    for mode, status in (("none", OK), ("integrity", OK), ("confidentiality", MISSING)):
        monkeypatch.setattr(features, "lockdown_mode", lambda mode=mode: (mode, "/x"))
        found = features._lockdown(traced=True)
        assert (found.status, found.detail.split()[0]) == (status, mode)
    monkeypatch.setattr(features, "lockdown_mode", lambda: (None, "not found: ..."))
    assert features._lockdown(traced=False) == Finding(features.LOCKDOWN, UNKNOWN, "not found: ...")
    # a program that traced rules out confidentiality, whatever Secure Boot did
    assert features._lockdown(traced=True) == Finding(
        features.LOCKDOWN, OK, "none or integrity (not found: ...): the program traced"
    )
