"""Shared fixtures. BPF tests need root and a working toolchain: outside CI they
skip with the reason when that is missing; with CI=true they fail instead."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _bpf_problem() -> str | None:
    from tcptrace import preflight
    from tcptrace.errors import TcptraceError

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
