"""Preflight checks in isolation: each problem its own message (no root needed)."""

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
