"""Command-line parsing: every bad value is a usage error (exit 2), before any BPF."""

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from tcptrace.cli import main


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", "0"], "out of range"),
        (["--port", "65536"], "out of range"),
        (["--port", "90-80"], "reversed port range"),
        (["--local-port", "abc"], "not a port number"),
        (["--remote-port", "1,,2"], "empty item"),
        (["--state", "LISTENING"], "unknown TCP state"),
        (["--count", "0"], "--count"),
        (["--duration", "0"], "--duration"),
        (["--duration", "soon"], "--duration"),
        (["--timestamp", "yesterday"], "--timestamp"),
        (["-4", "-6"], "exclude each other"),
        (["--buffer-pages", "0"], "--buffer-pages"),
        (["--metrics", "0"], "out of range"),
        (["--metrics", "70000"], "out of range"),
        (["--metrics", "example.com:9876"], "not an IP address"),
        (["--metrics", "::1:9876"], "[ADDR]:PORT"),
        (["--metrics", "127.0.0.1:http"], "not a port number"),
        (["--interval", "0"], "--interval"),
        (["--interval", "fast"], "--interval"),
        (["--json", "--csv"], "exclude each other"),
        (["--interval", "1", "--json"], "excludes --json"),
        (["--interval", "1", "--csv"], "excludes --csv"),
        (["--interval", "1", "--count", "5"], "--interval shows none"),
        (["--quiet", "--count", "5"], "--quiet shows none"),
        (["-l"], "--listening goes with --snapshot"),
        (["-e"], "--extended goes with --snapshot"),
        (["--snapshot", "--lifetime"], "exclude each other"),
        (["--snapshot", "--quiet"], "exclude each other"),
        (["--lifetime", "--quiet"], "exclude each other"),
        (["--snapshot", "--json"], "exclude each other"),
        (["--lifetime", "--csv"], "exclude each other"),
        (["--lifetime", "--json", "--csv"], "exclude"),
        (["--lifetime", "--interval", "1"], "exclude each other"),
        (["--slower-than", "1x"], "is not a duration"),
        (["--slower-than", "TIME_WAIT=1s"], "TIME_WAIT"),
        (["--quiet", "--slower-than", "1s"], "no effect with --quiet"),
        (["--lifetime", "--slower-than", "1s"], "--lifetime"),
        (["--hist", "--snapshot"], "--hist and --snapshot exclude each other"),
    ],
)
def test_usage_errors(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_help_lists_options_with_examples():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--port", "--local-port", "--remote-port", "--state", "-n", "--timestamp"):
        assert option in result.output
    assert "tcptrace --port 443" in result.output


def test_options_reach_the_session(monkeypatch):
    seen = {}

    def fake_run(options):
        seen["options"] = options
        return 0

    monkeypatch.setattr("tcptrace.session.run", fake_run)
    result = CliRunner().invoke(
        main, ["-p", "80,443", "-p", "8000-8001", "-L", "443", "-6", "-s", "SYN_SENT", "-n"]
    )
    assert result.exit_code == 0, result.output
    opts = seen["options"]
    assert opts.filters.ports == {80, 443, 8000, 8001}
    assert opts.filters.local_ports == {443}
    assert opts.filters.family == 10
    assert opts.numeric
    assert opts.format == "text" and opts.metrics is None and opts.interval is None


def test_output_options_reach_the_session(monkeypatch):
    seen = []
    monkeypatch.setattr("tcptrace.session.run", lambda options: seen.append(options) or 0)
    runner = CliRunner()
    assert runner.invoke(main, ["--json", "--metrics", "[::1]:9876"]).exit_code == 0
    assert runner.invoke(main, ["--csv", "-q"]).exit_code == 0
    assert runner.invoke(main, ["-i", "0.5", "--no-color", "--metrics", "9876"]).exit_code == 0
    assert seen[0].format == "json"
    assert (seen[0].metrics.host, seen[0].metrics.port) == ("::1", 9876)
    assert seen[0].emit_events
    assert seen[1].format == "csv" and not seen[1].emit_events
    assert seen[2].interval == 0.5 and seen[2].no_color
    assert seen[2].metrics.host == "127.0.0.1"  # loopback unless an address is given
    assert not seen[2].emit_events  # the table reads the kernel's maps only


def test_hist_reaches_the_session_in_every_mode(monkeypatch):
    seen = []
    monkeypatch.setattr("tcptrace.session.run", lambda options: seen.append(options) or 0)
    runner = CliRunner()
    for args in ([], ["-q"], ["--json"], ["--csv", "-q"], ["--lifetime"], ["-i", "1"]):
        assert runner.invoke(main, ["--hist", *args]).exit_code == 0, args
    assert runner.invoke(main, []).exit_code == 0
    assert [options.hist for options in seen] == [True] * 6 + [False]


def test_slower_than_reaches_the_filters(monkeypatch):
    seen = []
    monkeypatch.setattr("tcptrace.session.run", lambda options: seen.append(options) or 0)
    args = ["--slower-than", "1m,SYN_SENT=100ms", "--slower-than", "ESTABLISHED=5s,2s"]
    assert CliRunner().invoke(main, [*args, "--json"]).exit_code == 0
    filters = seen[0].filters
    # later items override earlier ones, state by state; the bare duration too
    assert dict(filters.slower_than) == {0: 2_000_000_000, 2: 100_000_000, 1: 5_000_000_000}
    assert filters.describe() == "all TCP sockets, slower than 2s,SYN_SENT=100ms,ESTABLISHED=5s"
    assert CliRunner().invoke(main, ["-s", "LISTEN", "--slower-than", "LISTEN=1h"]).exit_code == 0
    assert dict(seen[1].filters.slower_than) == {10: 3_600_000_000_000}


def test_every_option_has_an_example_in_help():
    result = CliRunner().invoke(main, ["--help"])
    examples = result.output.split("Examples:", 1)[1]
    for param in main.params:
        if param.name in ("help", "version") or not isinstance(param, click.Option):
            continue  # (the words after -r FILE: more files, in the -r examples)
        assert any(opt in examples.split() for opt in param.opts), param.opts


def test_bash_completion_script():
    result = CliRunner().invoke(
        main, [], prog_name="tcptrace", env={"_TCPTRACE_COMPLETE": "bash_source"}
    )
    assert result.exit_code == 0
    assert "_tcptrace_completion()" in result.output
    assert "complete -o nosort -F _tcptrace_completion tcptrace" in result.output


def complete(words: str) -> list[str]:
    env = {
        "_TCPTRACE_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    result = CliRunner().invoke(main, [], prog_name="tcptrace", env=env)
    assert result.exit_code == 0
    return [line.split(",", 1)[1] for line in result.output.splitlines() if line]


def test_completion_of_options_and_states():
    assert "--metrics" in complete("tcptrace --me")
    assert complete("tcptrace --state SYN_") == ["SYN_SENT", "SYN_RECV"]
    assert complete("tcptrace --state LISTEN,time") == ["LISTEN,TIME_WAIT"]
    assert set(complete("tcptrace -T ")) == {"wall", "relative", "iso", "none"}
    # --slower-than: the state of the last item, ready for its duration
    assert complete("tcptrace --slower-than SYN_") == ["SYN_SENT=", "SYN_RECV="]
    assert complete("tcptrace --slower-than 1s,est") == ["1s,ESTABLISHED="]
    assert complete("tcptrace --slower-than TIME") == []  # never judged
    assert complete("tcptrace --slower-than LISTEN=1") == []


def test_library_errors_are_one_line_exit_1(monkeypatch):
    from tcptrace.errors import TcptraceError

    def fail(options):
        raise TcptraceError("kernel headers not found at /nowhere")

    monkeypatch.setattr("tcptrace.session.run", fail)
    result = CliRunner().invoke(main, ["-p", "80"])
    assert result.exit_code == 1
    assert result.output == "tcptrace: kernel headers not found at /nowhere\n"


def test_priority_is_raised_unless_the_reader_is_capped(monkeypatch):
    seen = []
    monkeypatch.setattr("tcptrace.session.run", lambda options: seen.append(options) or 0)
    runner = CliRunner()
    for args in ([], ["--max-cpu", "25"], ["--max-cpu", "25", "--nice", "-5"], ["--nice", "0"]):
        assert runner.invoke(main, args).exit_code == 0
    assert [o.nice for o in seen] == [-10, None, -5, 0]


def test_signals_are_caught_before_the_slow_imports():
    # Python's own SIGTERM kills (143, no summary) and its SIGINT raises anywhere (a
    # traceback mid-import, click's "Aborted!"): the entry point replaces both first
    probe = (
        "import signal, sys; import tcptrace.__main__; "
        "print(signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "
        "signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "
        "'click' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.split() == ["True", "True", "False"], result.stderr


@pytest.mark.parametrize("code", [0, 1])
def test_check_exits_with_the_session_code(monkeypatch, code):
    monkeypatch.setattr("tcptrace.session.check", lambda: code)
    monkeypatch.setattr("tcptrace.session.run", lambda options: pytest.fail("traced"))
    result = CliRunner().invoke(main, ["--check"])
    assert result.exit_code == code, result.output


@pytest.mark.parametrize(
    "args,named",
    [
        (["-p", "80"], "--port"),
        (["--json"], "--json"),
        (["--buffer-pages", "8"], "--buffer-pages"),
        (["--max-sockets", "65536"], "--max-sockets"),  # its default, given all the same
        (["-T", "wall"], "--timestamp"),
    ],
)
def test_check_takes_no_other_option(monkeypatch, args, named):
    monkeypatch.setattr("tcptrace.session.check", lambda: pytest.fail("checked"))
    result = CliRunner().invoke(main, ["--check", *args])
    assert result.exit_code == 2
    assert f"--check takes no other option ({named} given)" in result.output


def test_check_problem_is_one_line_exit_1(monkeypatch):
    from tcptrace.errors import TcptraceError

    def fail():
        raise TcptraceError("cannot read the BPF program /nowhere")

    monkeypatch.setattr("tcptrace.session.check", fail)
    result = CliRunner().invoke(main, ["--check"])
    assert result.exit_code == 1
    assert result.output == "tcptrace: cannot read the BPF program /nowhere\n"
