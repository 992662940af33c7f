"""scripts/install as a user runs it: tcptrace becomes a command on root's PATH and sudo's,
with a man page, bash completion and examples; --uninstall leaves nothing behind.

This installs for real (/opt/tcptrace, /usr/local): on a machine that already has an
installation it fails rather than replace it. Concurrent runs (other clones' suites)
take turns on a lock. Whatever happens, the module ends with an uninstall.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcptrace import __version__
from tests.conftest import IN_CI
from tests.integration.cmd import Running
from tests.integration.netutil import free_port, listener

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install"
PREFIX = Path("/opt/tcptrace")
BIN = Path("/usr/local/bin/tcptrace")
MANIFEST = PREFIX / "installed-files"
# What root's shell and sudo's secure_path (Debian's /etc/sudoers) search.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Everything the install may touch, listed before and after: the uninstall must restore it.
WATCHED = ("/opt", "/usr/local", "/etc/bash_completion.d")
# One installing test run at a time on this machine (scripts/install has a lock of its own).
TEST_LOCK = "/run/lock/tcptrace-install-test.lock"
LOCK_WAIT = 900.0
INSTALL_TIMEOUT = 900  # a cold install under emulation builds a venv from wheels
# In the VM the image has sudo: there its absence is a failure, not a skip.
REQUIRE_SUDO_ENV = "TCPTRACE_REQUIRE_SUDO"
SUDO_USER_PREFIX = "tcptrace-t"


def clean_env(**extra: str) -> dict[str, str]:
    """Root's environment, minus the test's venv: PATH as a fresh root shell has it."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": ROOT_PATH, "HOME": "/root", **extra}


def run(*argv: str | Path, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", clean_env())
    kw.setdefault("cwd", "/")
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw
    )


def listing() -> set[str]:
    found = set()
    for top in WATCHED:
        for root, dirs, files in os.walk(top):
            found.update(os.path.join(root, name) for name in dirs + files)
    return found


def install(source: Path = REPO) -> subprocess.CompletedProcess:
    done = run("bash", source / "scripts" / "install", timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, f"scripts/install failed:\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed() -> Iterator[set[str]]:
    """Installed from this tree; yields what was there before. Always uninstalls."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("scripts/install needs root")
        pytest.skip("scripts/install needs root")
    os.makedirs(os.path.dirname(TEST_LOCK), exist_ok=True)
    with open(TEST_LOCK, "w") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"another install test holds {TEST_LOCK}"
                time.sleep(1)
        if PREFIX.exists() or BIN.is_symlink() or BIN.exists():
            pytest.fail(
                f"tcptrace is already installed here ({PREFIX}, {BIN}): this test would "
                "replace it; remove it first (scripts/install --uninstall)"
            )
        before = listing()
        try:
            install()
            yield before
        finally:
            run("bash", INSTALL, "--uninstall", timeout=INSTALL_TIMEOUT)


def test_installed_layout(installed):
    manifest = MANIFEST.read_text().splitlines()
    files = {line.split(" ", 1)[1] for line in manifest if line.startswith("file ")}
    assert {
        str(BIN),
        "/usr/local/share/man/man8/tcptrace.8",
        "/usr/local/share/bash-completion/completions/tcptrace",
        "/usr/local/share/doc/tcptrace/tcptrace_example.txt",
        str(MANIFEST),
    } <= files
    # the command is a copy in /opt, not the clone
    target = BIN.resolve()
    assert target.is_relative_to(PREFIX) and not target.is_relative_to(REPO)
    assert shutil.which("tcptrace", path=ROOT_PATH) == str(BIN)


def test_version_from_root_directory(installed):
    done = run("tcptrace", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"tcptrace, version {__version__}"


def test_man_page(installed):
    where = run("man", "-w", "tcptrace")
    assert where.returncode == 0, where.stderr
    assert os.path.realpath(where.stdout.strip()) == "/usr/local/share/man/man8/tcptrace.8"
    page = run("man", "tcptrace", env=clean_env(MANPAGER="cat", MANWIDTH="80"))
    assert page.returncode == 0, page.stderr
    text = page.stdout
    assert text.startswith("TCPTRACE(8)")
    assert "tcptrace - show every TCP state transition live" in text
    helptext = run("tcptrace", "--help").stdout
    for name in sorted(set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", helptext, re.M))):
        assert name in text, f"{name} is in --help but not in man tcptrace"


def test_bash_completion_in_a_new_shell(installed):
    # a new interactive login shell loads bash-completion (/etc/profile.d), which
    # loads ours on first use; then complete as <Tab> would
    script = """
        _completion_loader tcptrace
        complete -p tcptrace
        for line in 'tcptrace --sta' 'tcptrace --state SYN_S'; do
            read -ra COMP_WORDS <<<"$line"
            COMP_CWORD=$((${#COMP_WORDS[@]} - 1)) COMP_LINE=$line COMP_POINT=${#line}
            COMPREPLY=()
            _tcptrace_completion tcptrace
            echo "reply: ${COMPREPLY[*]}"
        done
    """
    done = run("bash", "--login", "-i", "-c", script, env=clean_env(TERM="dumb"))
    assert "complete -o nosort -F _tcptrace_completion tcptrace" in done.stdout, done.stderr
    assert "reply: --state" in done.stdout
    assert "reply: SYN_SENT" in done.stdout


def one_connection(port: int) -> None:
    with listener(port=port) as srv:
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        client.close()
        time.sleep(0.05)
        conn.close()


@pytest.mark.host_only  # Debian 12's guest has this userland: the host runs it
def test_trace_through_installed_command(installed, bpf_ready):
    port = free_port()
    trace = Running("--port", str(port), "-n", command=["tcptrace"], cwd="/", env=clean_env())
    try:
        trace.wait_ready()
        one_connection(port)
        time.sleep(0.5)
    finally:
        code, out, err = trace.stop(signal.SIGINT)
    assert code == 0, err
    assert f"127.0.0.1:{port}" in out
    assert "SYN_SENT -> ESTABLISHED" in out and "FIN_WAIT2 -> TIME_WAIT" in out
    assert re.search(r"^(\d+) transitions traced, \1 shown, 0 lost$", out, re.M), out


@pytest.fixture
def unprivileged_user() -> Iterator[str]:
    """A throwaway user with a home and a sudo rule of its own; removed afterwards."""
    if shutil.which("sudo", path=ROOT_PATH) is None:
        if os.environ.get(REQUIRE_SUDO_ENV):
            pytest.fail(f"sudo is missing although {REQUIRE_SUDO_ENV} is set")
        pytest.skip("sudo is not installed on this machine (the VM image has it)")
    name = f"{SUDO_USER_PREFIX}{os.getpid()}"
    rule = Path(f"/etc/sudoers.d/{name}")
    created = run("useradd", "--create-home", "--shell", "/bin/bash", name)
    assert created.returncode == 0, created.stderr
    try:
        rule.write_text(f"{name} ALL=(root) NOPASSWD: ALL\n")
        rule.chmod(0o440)
        yield name
    finally:
        rule.unlink(missing_ok=True)
        run("userdel", "--remove", name)


def test_sudo_tcptrace_from_a_user_shell(installed, bpf_ready, unprivileged_user):
    home = pwd.getpwnam(unprivileged_user).pw_dir
    port = free_port()
    # the user's own login shell, in their home: PATH is theirs, sudo's is secure_path
    argv = ["su", "--login", unprivileged_user, "-c"]
    # (--duration: it ends by itself even if this test dies before the connects)
    shell = f"cd && sudo tcptrace --port {port} -n --state SYN_SENT --count 2 --duration 60"
    trace = Running(command=[*argv, shell], cwd="/", env=clean_env())
    try:
        trace.wait_ready()
        # --count 2 ends it after one connect (CLOSE -> SYN_SENT -> ESTABLISHED);
        # more connects only if the kernel skipped one (another BPF program running)
        deadline = time.monotonic() + 30
        while trace.proc.poll() is None and time.monotonic() < deadline:
            one_connection(port)
            time.sleep(0.5)
        code, out, err = trace.wait()
    finally:
        if trace.proc.poll() is None:
            trace.proc.kill()
    assert code == 0, err
    assert "CLOSE -> SYN_SENT" in out and "SYN_SENT -> ESTABLISHED" in out, out
    assert f"127.0.0.1:{port}" in out
    assert Path(home).is_dir()
    who = run("su", "--login", unprivileged_user, "-c", "id -u; echo $PATH")
    uid, path = who.stdout.split()
    assert uid != "0" and "/usr/local/bin" in path.split(":")


def test_install_again_changes_nothing(installed):
    before = {p: os.lstat(p).st_mtime_ns for p in listing() if p.startswith(str(PREFIX))}
    done = install()
    assert "up to date" in done.stderr
    after = {p: os.lstat(p).st_mtime_ns for p in listing() if p.startswith(str(PREFIX))}
    assert after == before


@pytest.mark.host_only  # Debian 12's guest has this userland: the host runs it
def test_upgrade_from_a_clone_that_then_goes_away(installed, tmp_path):
    # a git pull, in effect: the same tree with one change, in another place
    clone = tmp_path / "clone"
    shutil.copytree(
        REPO, clone, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info")
    )
    marker = f"# upgraded by the test {os.getpid()}"
    init = clone / "tcptrace" / "__init__.py"
    init.write_text(init.read_text() + marker + "\n")
    old_target = BIN.resolve()
    install(clone)
    shutil.rmtree(clone)
    new_target = BIN.resolve()
    assert new_target != old_target and not old_target.exists()
    assert [p.name for p in PREFIX.glob("venv-*")] == [new_target.parents[1].name]
    code = "import tcptrace, sys; sys.stdout.write(open(tcptrace.__file__).read())"
    shown = run(new_target.parent / "python", "-c", code)
    assert marker in shown.stdout
    assert run("tcptrace", "--version").returncode == 0


def test_uninstall_leaves_nothing(installed):
    done = run("bash", INSTALL, "--uninstall", timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert listing() == installed
    assert not BIN.exists() and not BIN.is_symlink()
    assert not Path("/run/lock/tcptrace-install.lock").exists()  # once it survived
    again = run("bash", INSTALL, "--uninstall")
    assert again.returncode == 0 and "nothing to remove" in again.stderr
