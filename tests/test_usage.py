"""Every option's bad values through the real command: click's usage error, exit 2,
no traceback, nothing loaded (these run without root)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

# click 8.2 quotes an unknown option; 8.1, the newest for Python 3.9, does not
CLICK_8_2 = tuple(int(part) for part in version("click").split(".")[:2]) >= (8, 2)

BAD = [
    # (arguments, what the one-line error says)
    (["--port", "0"], "port 0 is out of range 1-65535"),
    (["--port", "65536"], "out of range"),
    (["--port", "90-80"], "reversed port range '90-80'"),
    (["--port", "80-"], "'' is not a port number"),
    (["--port", ""], "empty item in port list"),
    (["-p", "http"], "'http' is not a port number"),
    (["--local-port", "abc"], "'abc' is not a port number"),
    (["-L", "70000"], "out of range"),
    (["--remote-port", "1,,2"], "empty item"),
    (["-D", "5-3"], "reversed port range"),
    (["--state", "LISTENING"], "unknown TCP state 'LISTENING' (known: ESTABLISHED"),
    (["--state", ""], "no TCP state named in ''"),
    (["-s", ","], "no TCP state named"),
    (["--count", "0"], "0 is not in the range 1<=x<="),
    (["--count", "-3"], "not in the range"),
    (["-c", "1.5"], "'1.5' is not a valid integer"),
    (["--duration", "0"], "not a positive, finite number of seconds"),
    (["--duration", "-1"], "not a positive, finite number of seconds"),
    (["--duration", "inf"], "'inf' is not a positive, finite number of seconds"),
    (["--duration", "nan"], "'nan' is not a positive, finite number of seconds"),
    (["-d", "soon"], "'soon' is not a number of seconds"),
    (["--timestamp", "yesterday"], "'yesterday' is not one of 'wall', 'relative', 'iso', 'none'"),
    (["-4", "-6"], "-4 and -6 exclude each other"),
    (["--buffer-pages", "0"], "0 is not in the range 1<=x<=65536"),
    (["--buffer-pages", "65537"], "not in the range"),
    (["--max-sockets", "10"], "10 is not in the range 64<=x<=4194304"),
    (["--max-sockets", "lots"], "'lots' is not a valid integer"),
    (["--max-cpu", "0"], "'0' is not in the range 1-100"),
    (["--max-cpu", "half"], "'half' is not a number (a percentage)"),
    (["--max-cpu", "nan"], "'nan' is not in the range 1-100"),
    (["--max-cpu", "101"], "'101' is not in the range 1-100"),
    (["--nice", "-21"], "-21 is not in the range -20<=x<=19"),
    (["--interval", "0"], "not a positive, finite number of seconds"),
    (["-i", "nan"], "'nan' is not a positive, finite number of seconds"),
    (["--interval", "inf"], "'inf' is not a positive, finite number of seconds"),
    (["-i", "1e-10"], "'1e-10' is below the shortest interval, 0.05 s"),
    (["--interval", "0.049"], "below the shortest interval"),
    (["--snapshot", "-c", "3"], "--count has no effect with --snapshot"),
    (["--snapshot", "-d", "1"], "--duration has no effect with --snapshot"),
    (["--snapshot", "-T", "iso"], "--timestamp has no effect with --snapshot"),
    (["-i", "1", "-s", "LISTEN"], "--state has no effect with --interval"),
    (["-i", "1", "-n"], "--numeric has no effect with --interval"),
    (["-i", "1", "-T", "wall"], "--timestamp has no effect with --interval"),
    (["--metrics", "70000"], "port 70000 out of range 1-65535"),
    (["--metrics", "nothere:9876"], "'nothere' is not an IP address"),
    (["--metrics", "127.0.0.1:"], "'' is not a port number"),
    (["--netns", "no-such-namespace"], "no network namespace named no-such-namespace"),
    (["--netns", "/nonexistent/ns"], "no network namespace at /nonexistent/ns"),
    (["--netns", "12345"], "no network namespace with inode 12345"),
    (["--cgroup", "/no/such/cgroup"], "no cgroup /no/such/cgroup under"),
    (["--pid", "0"], "'0' is not a process id"),
    (["--pid", "abc"], "'abc' is not a process id"),
    (["--comm", "a-very-long-command-name"], "is not a command name (1 to 15 bytes"),
    (["--slower-than", "0"], "'0' is not a positive duration"),
    (["--slower-than", "-1s"], "'-1s' is not a duration"),
    (["--slower-than", "1x"], "'1x' is not a duration (a number and a unit: ns, us, ms, s, m, h)"),
    (["--slower-than", "FOO=1s"], "unknown TCP state 'FOO'"),
    (["--slower-than", "ESTABLISHED="], "'' is not a duration"),
    (["--slower-than", "1s,,2s"], "empty item in '1s,,2s'"),
    (["--slower-than", "1s,2s"], "a duration for every state is given twice"),
    (["--slower-than", "TIME_WAIT=1s"], "TIME_WAIT: the kernel never reports its end"),
    (["--slower-than", "CLOSE=1s"], "CLOSE is never left"),
    (["--slower-than", "NEW_SYN_RECV=1s"], "NEW_SYN_RECV: the kernel never reports"),
    (["-q", "--slower-than", "1s"], "--slower-than has no effect with --quiet"),
    (["-i", "1", "--slower-than", "1s"], "--slower-than has no effect with --interval"),
    (["--lifetime", "--slower-than", "1s"], "--slower-than selects transitions: --lifetime"),
    (["--bogus"], "No such option '--bogus'" if CLICK_8_2 else "No such option: --bogus"),
    (["extra"], "unexpected extra argument (extra)"),
    (["--port"], "Option '--port' requires an argument"),
    (["--stuck", "0"], "'0' is not a positive duration"),
    (["--stuck", "-1s"], "'-1s' is not a duration"),
    (["--stuck", "FOO=1s"], "unknown TCP state 'FOO'"),
    (["--stuck", "CLOSE_WAIT=soon"], "'soon' is not a duration"),
    (["--stuck", "LISTEN=1s"], "a listener stays in LISTEN"),
    (["--stuck", "TIME_WAIT=1s"], "TIME_WAIT lasts the kernel's fixed 60 s"),
    (["--stuck", "1s", "--csv"], "--stuck reports are not transitions: use --json"),
    (["--stuck", "1s", "--lifetime"], "--lifetime and --stuck exclude each other"),
    (["--stuck", "1s", "--count", "3"], "--count counts transitions shown: --stuck shows none"),
    (["--stuck", "1s", "--snapshot"], "--stuck and --snapshot exclude each other"),
    (["--hist", "--snapshot"], "--hist and --snapshot exclude each other"),
    (["--stuck", "1s", "-s", "SYN_SENT"], "--state selects transitions: --stuck alone shows none"),
    # huge values (issue 22.4): once a traceback, an internal error, or a threshold
    # wrapped modulo 2^64 ns in the kernel
    (["--slower-than", "1e400s"], "'1e400s' is longer than 366 days"),
    (["--stuck", "1e300h"], "'1e300h' is longer than 366 days"),
    (["-d", "1e308"], "'1e308' is longer than 366 days"),
    (["-i", "1e308"], "'1e308' is longer than 366 days"),
    (["--slower-than", "18446744074.709551616s"], "is longer than 366 days"),
    (["--slower-than", "1e20s"], "'1e20s' is longer than 366 days"),
    (["--count", "99999999999999999999999"], "not in the range 1<=x<=9223372036854775807"),
    # small gaps (issue 22.5)
    (["-s", "SYN_SENT,,"], "empty item in state list 'SYN_SENT,,'"),
    (["-s", "NEW_SYN_RECV"], "NEW_SYN_RECV: the kernel never reports it"),
    (["--pid", "99999999"], "'99999999' is not a process id (at most 4194304"),
    # (issue 22.3) a path that is not a network namespace
    (["--netns", "/etc/passwd"], "/etc/passwd is not a network namespace"),
    (["--netns", "/tmp"], "/tmp is not a network namespace"),
    (["--netns", "/dev/null"], "/dev/null is not a network namespace"),
    (["--check", "--port", "80"], "--check takes no other option (--port given)"),
    (["--check", "-q"], "--check takes no other option (--quiet given)"),
    # capture and replay (issue 24)
    (["-w", "cap.bin"], "-w is --wide (as in tcpstates): to write a capture file, use --write"),
    (["-nw", "cap.bin"], "use --write FILE"),
    (["-p", "80", "stray"], "Got unexpected extra argument (stray)"),
    (["--write", "t.cap", "-n"], "--numeric has no effect with --write (give it to -r)"),
    (["--write", "t.cap", "-T", "iso"], "--timestamp has no effect with --write"),
    (["--write", "t.cap", "--wide"], "--wide has no effect with --write"),
    (["--write", "t.cap", "--json"], "--write and --json exclude each other"),
    (["--write", "t.cap", "--lifetime"], "--write and --lifetime exclude each other"),
    (["--write", "t.cap", "-i", "1"], "--write and --interval exclude each other"),
    (["--write", "t.cap", "--snapshot"], "--write and --snapshot exclude each other"),
    (["--write", "t.cap", "--csv"], "--write and --csv exclude each other"),
    (["--write", "t.cap", "-C", "10x"], "'10x' is not a size (bytes, or with k, M or G"),
    (["--write", "t.cap", "--file-size", "100"], "'100' is below the smallest file size"),
    (["--write", "t.cap", "--file-count", "3"], "--file-count needs -C/--file-size"),
    (["--write", "t.cap", "-C", "1M", "--file-count", "0"], "0 is not in the range x>=1"),
    (["-C", "1M"], "-C/--file-size goes with --write"),
    (["--read", "t.cap", "-i", "1"], "--interval needs the live kernel: not with -r/--read"),
    (["-r", "t.cap", "--metrics", "9876"], "--metrics needs the live kernel"),
    (["-r", "t.cap", "--max-cpu", "10"], "--max-cpu needs the live kernel"),
    (["-r", "t.cap", "--nice", "0"], "--nice needs the live kernel"),
    (["-r", "t.cap", "--buffer-pages", "8"], "--buffer-pages needs the live kernel"),
    (["-r", "t.cap", "--max-sockets", "1024"], "--max-sockets needs the live kernel"),
    (["-r", "t.cap", "--write", "u.cap"], "--write needs the live kernel"),
    (["-r", "t.cap", "--snapshot"], "--snapshot needs the live kernel"),
    (["-r", "t.cap", "--netns", "/run/netns/blue"], "with -r, an ip netns name or inode"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) or "''" for a, _ in BAD])
def test_usage_error_exit_2(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "tcptrace", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(("Usage: ", "Error: "))
    assert lines[-1].startswith("Error: ") and message in lines[-1], lines[-1]


def test_every_option_has_a_bad_value_here():
    # a new option must bring its usage errors to this table
    from tcptrace.cli import main

    takes_value = {
        name
        for param in main.params
        if not getattr(param, "is_flag", False) and param.name not in ("version", "help")
        for name in param.opts
        if name.startswith("--")
    }
    covered = {arg for args, _ in BAD for arg in args if arg.startswith("--")}
    short = {"-p": "--port", "-L": "--local-port", "-D": "--remote-port", "-s": "--state"}
    short |= {"-c": "--count", "-d": "--duration", "-T": "--timestamp", "-i": "--interval"}
    covered |= {short[arg] for args, _ in BAD for arg in args if arg in short}
    assert takes_value <= covered, takes_value - covered


FULL = "tcptrace: cannot write output: No space left on device"


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_a_full_disk_is_one_line_exit_1(args):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "tcptrace", *args],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr == FULL + "\n"


def test_a_closed_standard_output_is_one_line_exit_1():
    """tcptrace -p 80 >&- once gave 'internal error: AttributeError ... fileno'."""
    result = subprocess.run(
        ["sh", "-c", f"exec {sys.executable} -m tcptrace --port 80 -n >&-"],
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr == "tcptrace: standard output is closed: nothing to write to\n"
