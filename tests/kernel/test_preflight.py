"""Preflight checks in isolation: each problem its own message (no root needed)."""

import subprocess
from pathlib import Path

import pytest

from tcptrace.errors import TcptraceError
from tcptrace.kernel import preflight
from tcptrace.kernel.preflight import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, missing_caps


def test_missing_caps_names_what_is_missing():
    assert missing_caps(0) == ["CAP_BPF", "CAP_PERFMON"]
    assert missing_caps(1 << CAP_BPF) == ["CAP_PERFMON"]
    assert missing_caps(1 << CAP_PERFMON) == ["CAP_BPF"]
    assert missing_caps(1 << CAP_BPF | 1 << CAP_PERFMON) == []
    assert missing_caps(1 << CAP_SYS_ADMIN) == []


def test_paranoid_3_needs_cap_sys_admin():
    # Debian's kernels: perf_event_open needs CAP_SYS_ADMIN at perf_event_paranoid=3
    assert missing_caps(1 << CAP_BPF | 1 << CAP_PERFMON, paranoid=3) == ["CAP_SYS_ADMIN"]
    assert missing_caps(1 << CAP_SYS_ADMIN, paranoid=3) == []
    # what is missing anyway is named first
    assert missing_caps(1 << CAP_BPF, paranoid=3) == ["CAP_PERFMON"]


def test_tracefs_override_is_never_mounted(tmp_path, monkeypatch):
    monkeypatch.setenv("TCPTRACE_TRACEFS", str(tmp_path))
    with pytest.raises(TcptraceError, match=f"tracefs is not mounted at {tmp_path}"):
        preflight.tracefs_root()


def test_tracepoint_looked_up_under_tracefs(tmp_path):
    (tmp_path / "events" / "sock" / "inet_sock_set_state").mkdir(parents=True)
    preflight.check_tracepoint(tmp_path)
    with pytest.raises(TcptraceError, match="no tracepoint sock:inet_sock_set_state"):
        preflight.check_tracepoint(tmp_path / "elsewhere")


def test_headers_override(tmp_path, monkeypatch):
    monkeypatch.setenv("TCPTRACE_HEADERS", str(tmp_path))
    with pytest.raises(TcptraceError, match=f"kernel headers not found at {tmp_path}"):
        preflight.check_headers()
    (tmp_path / "include").mkdir()
    preflight.check_headers()


def test_bcc_blocked_in_sys_modules_is_reported_not_raised(monkeypatch):
    # find_spec raises ValueError for a None entry: still the one-line message
    monkeypatch.setitem(__import__("sys").modules, "bcc", None)
    with pytest.raises(TcptraceError, match="bcc is not importable"):
        preflight.check_bcc()


class FakeMount:
    """mount(8) that makes tracefs appear where the kernel would: debugfs brings
    tracefs at its tracing/ (automounted since Linux 4.1); tracefs at its target."""

    def __init__(self, works: bool = True) -> None:
        self.works = works
        self.calls: list[tuple[str, str]] = []

    def __call__(self, argv, **_):
        fstype, target = argv[2], argv[4]
        self.calls.append((fstype, target))
        if self.works:
            where = Path(target, "tracing") if fstype == "debugfs" else Path(target)
            (where / "events").mkdir(parents=True, exist_ok=True)
        return subprocess.CompletedProcess(argv, 0 if self.works else 32, "", "")


def test_an_old_bcc_gets_tracefs_under_debugfs(tmp_path, monkeypatch):
    # Debian 11's bcc 0.18 reads /sys/kernel/debug/tracing only: debugfs is mounted
    monkeypatch.delenv("TCPTRACE_TRACEFS", raising=False)
    mount = FakeMount()
    monkeypatch.setattr(preflight.subprocess, "run", mount)
    root = tmp_path / "debug" / "tracing"
    preflight.tracefs_at(str(root), "0.18.0")
    assert mount.calls == [("debugfs", str(tmp_path / "debug"))]
    assert (root / "events").is_dir()
    # mounted already: nothing to do
    preflight.tracefs_at(str(root), "0.18.0")
    assert len(mount.calls) == 1


def test_tracefs_that_cannot_be_mounted_where_bcc_reads_it_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("TCPTRACE_TRACEFS", raising=False)
    monkeypatch.setattr(preflight.subprocess, "run", FakeMount(works=False))
    root = tmp_path / "debug" / "tracing"
    with pytest.raises(TcptraceError) as err:
        preflight.tracefs_at(str(root), "0.18.0")
    assert str(err.value) == (
        f"bcc 0.18.0 reads tracefs at {root} only, and it could not be mounted there: "
        f"run 'mount -t debugfs none {tmp_path / 'debug'}' as root"
    )
