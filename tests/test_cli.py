"""Command-line parsing: every bad value is a usage error (exit 2), before any BPF."""

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


def test_library_errors_are_one_line_exit_1(monkeypatch):
    from tcptrace.errors import TcptraceError

    def fail(options):
        raise TcptraceError("kernel headers not found at /nowhere")

    monkeypatch.setattr("tcptrace.session.run", fail)
    result = CliRunner().invoke(main, ["-p", "80"])
    assert result.exit_code == 1
    assert result.output == "tcptrace: kernel headers not found at /nowhere\n"
