"""A socket's first transition never carries another socket's time.

When the kernel skips a socket's last transition (a tracepoint hit while the
program already runs on that CPU), its per-socket entry stays; a new socket at
the same address must not inherit it. Mass-close bursts make such skips (0.6-3%
of transitions on a 2-CPU VM) and reuse the freed sockets' memory at once.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from . import massclose
from .accounting import accounting_line
from .cmd import Running
from .netutil import free_port

pytestmark = pytest.mark.usefixtures("bpf_ready")

ROUNDS = 6
COUNT = 1500
# a first transition: connect(), listen(), or a child cloned from its listener
FIRST = re.compile(r"(CLOSE -> (SYN_SENT|LISTEN)|LISTEN -> SYN_RECV)\s+(\S+)$")


def summary_rows(lines: list[str]) -> dict[str, list[str]]:
    """The summary table's rows by state: STATE LEFT MEAN ... UNTIMED."""
    start = next(i for i, line in enumerate(lines) if line.startswith("STATE "))
    rows = {}
    for line in lines[start + 1 :]:
        parts = line.split()
        if not parts or " transitions traced, " in line:
            break
        rows[parts[0]] = parts
    return rows


def test_mass_close_bursts_give_no_first_transition_a_duration():
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    churn = massclose.run_in_netns(port, ROUNDS, COUNT)
    made = int(churn.communicate(timeout=120)[0])
    assert churn.returncode == 0 and made == ROUNDS * COUNT
    time.sleep(0.5)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    lines = out.splitlines()
    accounting_line(lines)
    timed = [line for line in lines if (m := FIRST.search(line)) and m.group(3) != "-"]
    assert not timed, timed[:5]
    rows = summary_rows(lines)
    # nothing leaves CLOSE with a time; LISTEN is left only by the listener's close
    assert "CLOSE" not in rows, rows
    assert int(rows["LISTEN"][1]) <= ROUNDS, rows
