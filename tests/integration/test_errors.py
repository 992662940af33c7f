"""Every broken environment is one line naming the problem and its fix, exit 1, no traceback.

Each case is made real for the real command (python -m tcptrace): an unprivileged
user (setpriv), a module path without bcc or with a broken one, and the test hooks
README "Environment" documents: TCPTRACE_HEADERS, TCPTRACE_TRACEFS (a root that is
never mounted) and TCPTRACE_BPF_PROGRAM (a program the compiler or verifier refuses).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcptrace.kernel.loader import program_path as tcptrace_program

from . import unprivileged
from .cmd import Running
from .netutil import free_port
from .unprivileged import NOBODY, PYTHON

pytestmark = pytest.mark.usefixtures("bpf_ready")

DATA = Path(__file__).resolve().parent.parent / "data"


def tcptrace_cmd(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tcptrace", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 1, the last stderr line is 'tcptrace: ...' with the fragments, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("tcptrace: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


# --- privileges -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def readable_tree() -> Iterator[Path]:
    """tcptrace and its dependencies where an unprivileged user can read them."""
    with unprivileged.readable_tree() as root:
        yield root


def as_nobody(tree: Path, caps: str, *args: str):
    """Run tcptrace as uid/gid 65534 with only the given capabilities ('' for none)."""
    prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if caps:
        prefix += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
    return subprocess.run(
        [*prefix, PYTHON, "-m", "tcptrace", *args],
        capture_output=True,
        text=True,
        cwd=tree,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(tree), "HOME": "/"},
        timeout=60,
    )


def test_not_root(readable_tree):
    result = as_nobody(readable_tree, "", "--port", "80")
    assert_one_line_error(
        result, "needs root", "uid 65534", "lacks CAP_BPF and CAP_PERFMON", "sudo tcptrace"
    )
    assert len(result.stderr.splitlines()) == 1


def test_check_not_root_reports_it_as_a_line_exit_1(readable_tree):
    result = as_nobody(readable_tree, "", "--check")
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith("privileges      missing   loading the eBPF program needs root")
    assert "uid 65534" in lines[0]
    assert lines[1] == "tracepoint      unknown   not checked: privileges missing"
    assert "missing: privileges: tcptrace cannot trace" in lines
    assert lines[-1] == "result: tracing does not work here"


def test_not_root_with_cap_bpf_only_names_the_missing_one(readable_tree):
    result = as_nobody(readable_tree, "+bpf", "--port", "80")
    last = assert_one_line_error(result, "lacks CAP_PERFMON")
    assert "CAP_BPF and" not in last


def test_capabilities_without_access_to_tracefs(readable_tree):
    # tracefs is root-only (mode 700): CAP_BPF and CAP_PERFMON alone are not enough
    result = as_nobody(readable_tree, "+bpf,+perfmon", "--port", "80")
    from tcptrace.kernel.preflight import PARANOID_ADMIN_ONLY, perf_paranoid

    if perf_paranoid() >= PARANOID_ADMIN_ONLY:
        # Debian's kernels (the VM's 6.1) stop these two earlier: perf needs CAP_SYS_ADMIN
        assert_one_line_error(result, "lacks CAP_SYS_ADMIN", "kernel.perf_event_paranoid=2")
        return
    assert_one_line_error(
        result, "permission denied reading /sys/kernel/tracing", "CAP_DAC_READ_SEARCH"
    )


def test_the_capabilities_the_message_names_are_enough(readable_tree):
    # the advice is right: with exactly these three, an unprivileged user traces
    result = as_nobody(
        readable_tree, "+bpf,+perfmon,+dac_read_search", "--port", "80", "--duration", "0.5"
    )
    from tcptrace.kernel.preflight import PARANOID_ADMIN_ONLY, perf_paranoid

    if perf_paranoid() >= PARANOID_ADMIN_ONLY:
        # Debian's kernels (the VM's 6.1) then demand CAP_SYS_ADMIN: the message says so
        assert_one_line_error(result, "lacks CAP_SYS_ADMIN", "kernel.perf_event_paranoid=2")
        return
    assert result.returncode == 0, result.stderr
    assert "Ctrl-C to stop" in result.stderr
    assert "0 transitions traced, 0 shown, 0 lost" in result.stdout.splitlines()


# --- bcc ----------------------------------------------------------------------------------


def test_bcc_not_on_the_module_path(tmp_path):
    # a module search path without the distribution's bcc (as in a venv made without
    # --system-site-packages, or a Python other than the distribution's)
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p, 'bcc'))]\n"
    )
    result = tcptrace_cmd("--port", "80", env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(result, "bcc is not importable", "apt-get install python3-bpfcc")
    assert len(result.stderr.splitlines()) == 1


def test_bcc_found_but_broken(tmp_path):
    # the Python part of bcc present, its shared library not (a half-removed install)
    (tmp_path / "bcc").mkdir()
    (tmp_path / "bcc" / "__init__.py").write_text(
        "raise OSError('libbcc.so.0: cannot open shared object file: No such file or directory')\n"
    )
    result = tcptrace_cmd("--port", "80", env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(
        result, "bcc is not importable (libbcc.so.0: cannot open", "python3-bpfcc"
    )


# --- kernel headers, tracefs, tracepoint --------------------------------------------------


def test_kernel_headers_missing():
    result = tcptrace_cmd("--port", "80", env={"TCPTRACE_HEADERS": "/nonexistent"})
    assert_one_line_error(
        result, "kernel headers not found at /nonexistent", "linux-headers-$(uname -r)"
    )


def test_check_without_headers_or_bcc_reports_them_exit_1(tmp_path):
    result = tcptrace_cmd("--check", env={"TCPTRACE_HEADERS": "/nonexistent"})
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert any(
        line.startswith("kernel headers  missing   kernel headers not found at /nonexistent")
        for line in lines
    ), lines
    assert "tracepoint      unknown   not checked: kernel headers missing" in lines
    assert "missing: kernel headers: the program cannot be compiled" in lines
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p, 'bcc'))]\n"
    )
    result = tcptrace_cmd("--check", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    bcc = [line for line in result.stdout.splitlines() if line.startswith("bcc  ")]
    assert bcc[0].startswith("bcc             missing   bcc is not importable"), bcc
    assert result.stdout.splitlines()[-1] == "result: tracing does not work here"


def test_tracefs_not_mounted_and_not_mountable(tmp_path):
    result = tcptrace_cmd("--port", "80", env={"TCPTRACE_TRACEFS": str(tmp_path)})
    assert_one_line_error(result, f"tracefs is not mounted at {tmp_path}", "mount -t tracefs nodev")


def test_tracepoint_absent(tmp_path):
    (tmp_path / "events" / "sock").mkdir(parents=True)  # a kernel without the tracepoint
    result = tcptrace_cmd("--port", "80", env={"TCPTRACE_TRACEFS": str(tmp_path)})
    assert_one_line_error(result, "no tracepoint sock:inet_sock_set_state", "Linux 4.16 or newer")


# --- the program itself -------------------------------------------------------------------


def test_verifier_refuses_the_program():
    program = DATA / "verifier_refuses.bpf.c"
    result = tcptrace_cmd("--port", "80", env={"TCPTRACE_BPF_PROGRAM": str(program)})
    last = assert_one_line_error(
        result, "the kernel's BPF verifier refused verifier_refuses.bpf.c", "please report it"
    )
    assert "Permission denied" in last
    # the verifier's own log stays visible above the message, for the report
    assert "invalid mem access" in result.stderr


def test_program_that_does_not_compile():
    program = DATA / "does_not_compile.bpf.c"
    result = tcptrace_cmd("--port", "80", env={"TCPTRACE_BPF_PROGRAM": str(program)})
    assert_one_line_error(result, "could not compile", "kernel headers")
    assert "undeclared_variable" in result.stderr


@pytest.mark.host_only  # user space; Debian 12's guest has this userland
def test_compiler_warnings_of_a_program_that_loads_stay_off_the_terminal(tmp_path):
    """Debian 11's bcc 0.18 warns of three redefined macros at every compile on
    Linux 5.10: a program that loads prints its one 'tracing' line, nothing above it."""
    program = tmp_path / "tcptrace.bpf.c"
    program.write_text(
        '#warning "a compiler warning of a program that loads"\n'
        "#define __HAVE_BUILTIN_BSWAP16__ 2\n" + tcptrace_program().read_text()
    )
    run = Running("--port", str(free_port()), env={"TCPTRACE_BPF_PROGRAM": str(program)})
    run.wait_ready()
    rc, _, err = run.stop()
    assert rc == 0, err
    assert "warning" not in err, err
    assert err.splitlines()[0].startswith("tracing "), err


def test_program_file_missing(tmp_path):
    missing = tmp_path / "gone.bpf.c"
    result = tcptrace_cmd("--port", "80", env={"TCPTRACE_BPF_PROGRAM": str(missing)})
    assert_one_line_error(result, f"cannot read the BPF program {missing}")


def test_perf_buffer_over_the_locked_memory_limit():
    # root without CAP_IPC_LOCK and a 64 KiB memlock limit, as in a locked-down
    # systemd unit: the kernel refuses to map a 4 MiB-per-CPU perf buffer
    prefix = ("setpriv", "--bounding-set=-ipc_lock", "prlimit", "--memlock=65536")
    result = tcptrace_cmd("--port", "80", "--buffer-pages", "1024", prefix=prefix)
    assert_one_line_error(
        result, "could not set up the perf buffer of 1024 pages per CPU", "ulimit -l"
    )
    # a limit the buffer fits in (the per-user perf allowance may be used up by
    # other tracers, so the whole buffer must fit the process's own limit): it traces
    fits = ("setpriv", "--bounding-set=-ipc_lock", "prlimit", "--memlock=1048576")
    result = tcptrace_cmd("--port", "80", "--buffer-pages", "16", "--duration", "0.5", prefix=fits)
    assert result.returncode == 0, result.stderr


@pytest.mark.host_only  # user space; Debian 12's guest has this userland
def test_output_to_a_full_disk_is_one_line_exit_1():
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "tcptrace", "--port", "1"],
            stdout=full,
            capture_output=False,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr.splitlines()[-1] == "tcptrace: cannot write output: No space left on device"
    )
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
