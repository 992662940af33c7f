"""Shared fixtures. BPF tests need root and a working toolchain: outside CI they
skip with the reason when that is missing; with CI=true they fail instead.

Tests marked host_only run on the host only: the VM suite (vagrant/qemu-test sets
TCPTRACE_IN_VM=1 in the guest) skips them, because the host runs the same code on
the same Python (Debian 12's 3.11) and they ask nothing of the kernel that differs:
unit tests, and integration tests of what user space alone decides (output format,
signals, the reader under load), on a guest whose userland is the host's.
A guest on another Python (Debian 11's 3.9, Debian 13's 3.13) runs them: qemu-test
passes the host's Python as TCPTRACE_HOST_PYTHON (major.minor).
Every unit test module (tests/**/test_*.py outside tests/integration) is host_only
unless it is listed in KERNEL_UNIT_MODULES; single tests carry the marker themselves.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
IN_VM = os.environ.get("TCPTRACE_IN_VM") == "1"
# the host suite runs the host_only tests on this same Python (unknown: assumed so)
THIS_PYTHON = "{}.{}".format(*sys.version_info)
HOST_PYTHON = os.environ.get("TCPTRACE_HOST_PYTHON") or THIS_PYTHON
SKIP_HOST_ONLY = IN_VM and HOST_PYTHON == THIS_PYTHON
# Unit test modules that ask the kernel (sock_diag, its BTF), whose answers differ by version.
KERNEL_UNIT_MODULES = frozenset({"test_sockdiag.py", "test_benchmarks.py", "test_btf.py"})
TESTS_DIR = Path(__file__).resolve().parent
INTEGRATION_DIR = TESTS_DIR / "integration"


def pytest_configure(config: pytest.Config) -> None:
    # registered here, not in pyproject.toml: that file is part of the VM image's key
    config.addinivalue_line(
        "markers", "host_only: the VM suite skips it (TCPTRACE_IN_VM=1): see tests/conftest.py"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path
        unit = INTEGRATION_DIR not in path.parents
        if unit and path.name not in KERNEL_UNIT_MODULES:
            item.add_marker(pytest.mark.host_only)
        if SKIP_HOST_ONLY and item.get_closest_marker("host_only"):
            item.add_marker(pytest.mark.skip(reason="host_only: the host suite runs it"))


def _bpf_problem() -> str | None:
    from tcptrace.errors import TcptraceError
    from tcptrace.kernel import preflight

    try:
        preflight.run_all()
    except TcptraceError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def bpf_ready() -> None:
    """Depend on this in every test that loads the BPF program."""
    problem = _bpf_problem()
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"BPF is not usable in CI: {problem}")
    pytest.skip(f"BPF is not usable here: {problem}")
