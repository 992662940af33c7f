"""--hist on real connections: each state's log2 histogram after the exit summary, in
text (stdout), --quiet (stopping by itself) and --json (in the summary object)."""

from __future__ import annotations

import json
import re
import signal
import socket
import time

import pytest

from tcptrace.outputs.output import format_duration
from tcptrace.states import TcpState

from .cmd import Running
from .netutil import listener

# host_only: the histograms are the summary's own numbers (the kernel's maps, read in
# every guest by the summary's tests) laid out by user space, on the host's Python
pytestmark = [pytest.mark.usefixtures("bpf_ready"), pytest.mark.host_only]

CONNECTIONS = 6
# The server holds each connection ESTABLISHED this long: both ends then spend
# 75 ms and a little more there, inside [2**26 ns, 2**27 ns) = [67.11ms, 134.22ms),
# with ~59 ms to spare for a busy machine's late wake-ups.
HOLD_S = 0.075
ROW = (1 << 26, 1 << 27)
QUIET_DURATION_S = 4

_HEADER = re.compile(r"^([A-Z_0-9]+): (\d+) left$")
_ROW = re.compile(r"^\s*(\S+) -> (\S+)\s+: (\d+)\s+\|(\**)\s*\|$")


def hist_blocks(text: str) -> dict[str, list[tuple[str, str, int]]]:
    """The text histograms: per state, its rows as (low, high, count)."""
    blocks: dict[str, list[tuple[str, str, int]]] = {}
    rows: list[tuple[str, str, int]] | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            rows = blocks[header.group(1)] = []
            continue
        row = _ROW.match(line) if rows is not None else None
        if row and rows is not None:
            rows.append((row.group(1), row.group(2), int(row.group(3))))
    return blocks


def held_connections(srv: socket.socket, count: int, hold_s: float) -> None:
    """One connection after another; the server closes each after hold_s ESTABLISHED,
    then the client, at the server's FIN."""
    for _ in range(count):
        cli = socket.create_connection(srv.getsockname()[:2])
        conn, _ = srv.accept()
        time.sleep(hold_s)
        conn.close()  # server ESTABLISHED -> FIN_WAIT1
        assert cli.recv(1) == b""  # client ESTABLISHED -> CLOSE_WAIT
        cli.close()


def test_hist_shows_the_time_held_established_in_its_row_in_every_mode():
    # bound before any tracer starts (port 0: the kernel picks a free one); its own
    # LISTEN is older than tracing, and stays open until every tracer has finished
    with listener() as srv:
        port = str(srv.getsockname()[1])
        text = Running("--hist", "-p", port, "-n", "-T", "none")
        as_json = Running("--hist", "-p", port, "--json")
        for run in (text, as_json):
            run.wait_ready()
        # started last: its --duration runs from its own start
        quiet = Running("--quiet", "--hist", "-p", port, "-d", str(QUIET_DURATION_S))
        quiet.wait_ready()
        held_connections(srv, CONNECTIONS, HOLD_S)
        time.sleep(0.3)
        text_code, text_out, text_err = text.stop(signal.SIGINT)
        json_code, json_out, json_err = as_json.stop(signal.SIGINT)
        quiet_code, quiet_out, quiet_err = quiet.wait(timeout=QUIET_DURATION_S + 30)
    assert (text_code, json_code, quiet_code) == (0, 0, 0), (text_err, json_err, quiet_err)

    # JSON: stdout stays JSON lines; the summary's rows are those of the exact durations
    records = [json.loads(line) for line in json_out.splitlines()]
    summary = records[-1]
    assert summary["type"] == "summary"
    established = [
        r["duration_ns"]
        for r in records
        if r["type"] == "transition" and r["old"] == "ESTABLISHED" and r["duration_ns"]
    ]
    # both ends of each connection
    assert len(established) == 2 * CONNECTIONS, established
    assert all(ROW[0] <= ns < ROW[1] for ns in established), established
    rows = summary["states"]["ESTABLISHED"]["hist"]
    assert rows == [{"low_ns": ROW[0], "high_ns": ROW[1], "count": 2 * CONNECTIONS}]
    assert summary["states"]["ESTABLISHED"]["timed"] == 2 * CONNECTIONS

    # text and --quiet: the histograms come right after the exit summary, on stdout
    row = (format_duration(ROW[0]), format_duration(ROW[1]), 2 * CONNECTIONS)
    for out in (text_out, quiet_out):
        before, sep, after = out.partition("transitions traced")
        assert sep, out
        blocks = hist_blocks(after)
        # the counts add up to the connections' ends, all in the row holding ~75 ms
        assert blocks["ESTABLISHED"] == [row], out
        assert f"ESTABLISHED: {2 * CONNECTIONS} left" in after.splitlines()
        # every state the summary shows has its histogram, in the same order
        summary_states = [
            line.split()[0]
            for line in before.splitlines()
            if line.split() and line.split()[0] in TcpState.__members__ and len(line.split()) == 8
        ]
        assert list(blocks) == summary_states, out
        assert not hist_blocks(before), out
    # the handshake's and the closing states are there too, from the same kernel counts
    assert {"SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "CLOSE_WAIT"} <= set(
        hist_blocks(quiet_out)
    )
