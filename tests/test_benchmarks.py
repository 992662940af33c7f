"""The benchmark scripts run and report what they promise (small runs)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(script: str, *args: str) -> list[str]:
    """A benchmark's output lines; it must exit 0."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.host_only  # user space only, on recorded events
def test_consumer_benchmark_reports_each_step():
    lines = run_benchmark("consumer.py", "--events", "20000", "--batch", "512")
    assert lines[0].startswith("20,000 events, text, 512 records per ring read")
    steps = {line.split()[0] for line in lines[1:]}
    assert {"parse", "unpack", "sort", "Owners", "TimeWait", "TextOutput", "total"} <= steps


def test_consumer_benchmark_replays_lifetime_through_the_per_connection_path():
    lines = run_benchmark("consumer.py", "--events", "20000", "--batch", "512", "--lifetime")
    assert lines[0].startswith("20,000 events, text, --lifetime, 512 records per ring read")
    steps = {line.split()[0] for line in lines[1:]}
    assert {"Owners", "TimeWait", "LifetimeOutput", "total"} <= steps
    assert "TextOutput" not in steps


def test_sockdiag_benchmark_dumps_every_socket_both_ways():
    # as root (a network namespace of its own): CI runs as root, and so must this
    lines = run_benchmark("sockdiag.py", "--sockets", "300", "--rounds", "1")
    assert lines[0].startswith("300 timewait sockets")
    # both read exactly our 300 sockets: the namespace holds nothing else
    assert [line.split()[2] for line in lines[1:3]] == ["300", "300"]
    assert "faster a row" in lines[3]


def load_churn():
    import importlib.util

    spec = importlib.util.spec_from_file_location("churn_benchmark", BENCHMARKS / "churn.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.host_only  # parsing only
def test_churn_has_a_slower_than_mode_and_reads_its_summary():
    churn = load_churn()
    modes = {churn.short_name(m): m for m in churn.default_modes()}
    assert modes["slower"].args == ["--slower-than", "1ms"]
    assert modes["slower"].kind == "tcptrace"
    assert churn.selected(modes["quiet"], ["quiet"])
    assert churn.selected(modes["quiet"], ["tcptrace --quiet"])
    assert not churn.selected(modes["text"], ["slower", "quiet"])
    found = churn.SUMMARY_RE.findall(
        "1200 transitions traced, 14 shown (slower than 1ms), 1186 faster, 0 lost\n"
        "36 transitions traced, 0 lost\n"
        "12 transitions traced, 12 shown, 3 lost\n"
    )
    assert found == [("1200", "14", "1186", "0"), ("36", "", "", "0"), ("12", "12", "", "3")]


@pytest.mark.host_only  # parsing only
def test_churn_measures_the_lifetime_reader_in_parts(tmp_path: Path):
    churn = load_churn()
    modes = {churn.short_name(m): m for m in churn.default_modes()}
    # the whole reader, and the same with its lines (or all but the reading) cut off
    assert modes["lifetime"].part == ""
    assert (modes["read"].part, modes["unformatted"].part) == ("read", "unformatted")
    # every transition read from the rings and none decoded: the floor under --write
    assert (modes["transitions"].part, modes["transitions"].args) == ("read-events", [])
    command = churn.tracer_command(modes["read"], 9000)
    assert command[1:3] == [str(BENCHMARKS / "reader_parts.py"), "read"]
    assert command[3:] == ["--port", "9000", "--lifetime"]
    # no lines are written: what the summary counts is not checked against the file
    out, err = tmp_path / "out", tmp_path / "err"
    out.write_text("STATE ...\n\n120 transitions traced, 24 connections shown, 0 lost\n")
    err.write_text("")
    result = churn.Result("fastest", modes["unformatted"].name, ended=24)
    churn.parse_tracer_output(modes["unformatted"], result, out, err, 9000)
    assert (result.printed, result.lost, result.waiting) == (24, 0, 0)
    assert "lines in the file" not in result.note and "!=" not in result.note


def test_reader_parts_refuses_an_unknown_part():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "reader_parts.py"), "format"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "usage: reader_parts.py {read,unformatted,read-events}" in done.stderr
