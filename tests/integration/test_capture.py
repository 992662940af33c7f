"""--write and -r end to end: a capture of real connections replays as the live run printed.

A live run and a --write run trace the same loopback connections side by side; the
replay of the capture is then compared with the live output, record for record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import tcptrace

from .cmd import READY, Running
from .netutil import free_port, listener
from .test_command import connect_and_close
from .unprivileged import AS_NOBODY, PYTHON, readable_tree

pytestmark = [pytest.mark.usefixtures("bpf_ready"), pytest.mark.host_only]

CONNECTIONS = 4
HOLD = 0.03
# the tree tcptrace is imported from: a replay as another user imports it from there
TREE = str(Path(tcptrace.__file__).resolve().parents[1])


def tcptrace_cmd(*args: str, prefix: tuple[str, ...] = (), **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tcptrace", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": TREE},
        **kwargs,
    )


def side_by_side(live_args: list[str], cap: Path, port: int) -> tuple[str, str]:
    """A live run (live_args) and a --write run on the same connections: the live
    run's stdout, and the writer's stderr."""
    live = Running("--port", str(port), *live_args)
    writer = Running("--port", str(port), "--write", str(cap), stdout=subprocess.DEVNULL)
    live.wait_ready()
    writer.wait_ready()
    for _ in range(CONNECTIONS):
        connect_and_close(port, hold=HOLD)
    time.sleep(0.5)
    code, out, err = live.stop(signal.SIGINT)
    assert code == 0, err
    code, _, werr = writer.stop(signal.SIGINT)
    assert code == 0, werr
    assert "Traceback" not in werr
    return out, werr


# Two tracers are two BPF programs on the tracepoint: each reads the clock itself
# (bpf_ktime_get_ns) and keeps its own entry times, so a transition's ts_ns, time and
# duration_ns differ between them by the microseconds between the two programs' runs.
# Every other field is equal, and a replay equals its own writer's output exactly.
# Apart by microseconds here; by 3.7 ms once in an emulated (TCG) guest.
CLOCK_FIELDS = ("ts_ns", "time", "duration_ns")
SLACK_NS = 50_000_000
# A transition learnt by polling sock_diag (a TIME_WAIT entry the kernel did not
# report): its time is each process's own poll's, within the poll interval
POLLED_SLACK_NS = 1_100_000_000


def _matched(records: list[dict]) -> list[dict]:
    return sorted(
        records, key=lambda r: (r["local_port"], r["remote_port"], r["old"], r["new"], r["ts_ns"])
    )


def test_replay_json_equals_the_live_json(tmp_path: Path) -> None:
    port = free_port()
    cap = tmp_path / "t.cap"
    out, werr = side_by_side(["--json"], cap, port)
    # the writer's summary went to stderr, as --csv's
    assert "transitions traced" in werr
    replay = tcptrace_cmd("-r", str(cap), "--json")
    assert replay.returncode == 0, replay.stderr
    assert replay.stderr == ""
    live = [json.loads(line) for line in out.splitlines()]
    again = [json.loads(line) for line in replay.stdout.splitlines()]
    assert live[-1]["type"] == again[-1]["type"] == "summary"
    live_t, again_t = _matched(live[:-1]), _matched(again[:-1])
    assert len(again_t) == len(live_t) == CONNECTIONS * 12
    for a, b in zip(live_t, again_t):
        assert {k: v for k, v in a.items() if k not in CLOCK_FIELDS} == {
            k: v for k, v in b.items() if k not in CLOCK_FIELDS
        }
        slack = POLLED_SLACK_NS if a["note"] == "learnt_from_sock_diag" else SLACK_NS
        assert abs(a["ts_ns"] - b["ts_ns"]) < slack, (a, b)
        assert (a["duration_ns"] is None) == (b["duration_ns"] is None)
        if a["duration_ns"] is not None:
            assert abs(a["duration_ns"] - b["duration_ns"]) < slack, (a, b)
    # the summaries: the same counts; the times, as above, within the slack
    ls, rs = live[-1], again[-1]
    for key in ("transitions_traced", "written", "lost", "held", "notes", "transitions"):
        assert ls[key] == rs[key], key
    assert ls["states"].keys() == rs["states"].keys()
    for state, entry in ls["states"].items():
        for key, value in entry.items():
            if key.endswith("_ns"):
                assert abs(value - rs["states"][state][key]) < POLLED_SLACK_NS, (state, key)
            else:
                assert value == rs["states"][state][key], (state, key)


LIFE_CLOCK_FIELDS = ("start_ns", "end_ns", "start", "end", "duration_ns", "states")


def test_replay_lifetime_equals_the_live_lifetime(tmp_path: Path) -> None:
    """-r --lifetime builds each connection from the capture's transitions; the live
    run had the kernel's life records. The same connections, owners and states in
    order; the times within the two programs' clocks; --count counts connections."""
    port = free_port()
    cap = tmp_path / "t.cap"
    out, _werr = side_by_side(["--lifetime", "--json"], cap, port)
    replay = tcptrace_cmd("-r", str(cap), "--lifetime", "--json")
    assert replay.returncode == 0, replay.stderr
    live = [json.loads(line) for line in out.splitlines()]
    again = [json.loads(line) for line in replay.stdout.splitlines()]
    assert live[-1]["type"] == again[-1]["type"] == "summary"

    def key(life: dict) -> tuple:
        return (life["local_port"], life["remote_port"])

    live_l, again_l = sorted(live[:-1], key=key), sorted(again[:-1], key=key)
    # each connection's end that does not go through TIME_WAIT finishes within the run
    assert len(again_l) == len(live_l) == CONNECTIONS, (live_l, again_l)
    for a, b in zip(live_l, again_l):
        assert a["type"] == b["type"] == "lifetime"
        assert {k: v for k, v in a.items() if k not in LIFE_CLOCK_FIELDS} == {
            k: v for k, v in b.items() if k not in LIFE_CLOCK_FIELDS
        }
        assert [s["state"] for s in a["states"]] == [s["state"] for s in b["states"]]
        for x, y in zip(a["states"], b["states"]):
            assert abs(x["duration_ns"] - y["duration_ns"]) < SLACK_NS, (a, b)
            assert x["lower_bound"] == y["lower_bound"]
        for field in ("start_ns", "end_ns", "duration_ns"):
            assert abs(a[field] - b[field]) < SLACK_NS, (field, a, b)
    for field in ("transitions_traced", "written", "lost", "held", "notes", "still_in_time_wait"):
        assert live[-1][field] == again[-1][field], field
    # --count: connections, as live
    first = tcptrace_cmd("-r", str(cap), "--lifetime", "--json", "--count", "1")
    assert first.returncode == 0, first.stderr
    lives = [json.loads(line) for line in first.stdout.splitlines()][:-1]
    assert [life["type"] for life in lives] == ["lifetime"]
    assert key(lives[0]) == key(again[0])
    # --state chooses whole connections (those that visited it), as live
    visited = tcptrace_cmd("-r", str(cap), "--lifetime", "--json", "--state", "CLOSE_WAIT")
    assert visited.returncode == 0, visited.stderr
    chosen = [json.loads(line) for line in visited.stdout.splitlines()][:-1]
    expected = [life for life in again_l if "CLOSE_WAIT" in [s["state"] for s in life["states"]]]
    assert sorted(chosen, key=key) == expected and expected


def test_replay_netns_by_the_name_the_capture_recorded(tmp_path: Path) -> None:
    """-r --netns NAME: the ip netns name the capture recorded, gone from this host
    by the time of the replay (deleted), as the inode."""
    from .test_namespaces import burst, name_tag, netns

    port = free_port()
    cap = tmp_path / "t.cap"
    a, b = f"{name_tag()}ra", f"{name_tag()}rb"
    with netns(a) as ino_a, netns(b):
        writer = Running("--port", str(port), "--write", str(cap), stdout=subprocess.DEVNULL)
        writer.wait_ready()
        burst(port, "ip", "netns", "exec", a)
        burst(port, "ip", "netns", "exec", b)
        time.sleep(0.5)
        code, _, werr = writer.stop(signal.SIGINT)
        assert code == 0, werr
    assert not Path(f"/run/netns/{a}").exists()
    by_name = tcptrace_cmd("-r", str(cap), "--json", "--netns", a)
    by_inode = tcptrace_cmd("-r", str(cap), "--json", "--netns", str(ino_a))
    assert by_name.returncode == by_inode.returncode == 0, by_name.stderr + by_inode.stderr
    named = [json.loads(line) for line in by_name.stdout.splitlines()]
    assert named == [json.loads(line) for line in by_inode.stdout.splitlines()]
    transitions = [r for r in named if r["type"] == "transition"]
    assert transitions and {(r["netns"], r["netns_name"]) for r in transitions} == {(ino_a, a)}
    everything = tcptrace_cmd("-r", str(cap), "--json")
    assert len(transitions) * 2 == sum(
        1 for line in everything.stdout.splitlines() if '"type":"transition"' in line
    )


def test_replay_stuck_finds_the_leak_by_capture_time(tmp_path: Path) -> None:
    """-r --stuck CLOSE_WAIT=1s on a capture of a leaking server: the socket the live
    --stuck reported, with its owner, stamped when it crossed (1 s after it entered
    CLOSE_WAIT by the capture's clock, though no transition came after), and still
    stuck when the capture ended; the socket that closed in time is never reported."""
    from .test_stuck import leak_one, start_leaky

    port = free_port()
    cap = tmp_path / "t.cap"
    server = start_leaky(port)
    try:
        live = Running("--port", str(port), "--stuck", "CLOSE_WAIT=1s", "--json")
        writer = Running("--port", str(port), "--write", str(cap), stdout=subprocess.DEVNULL)
        live.wait_ready()
        writer.wait_ready()
        leak_one(port, server)
        time.sleep(2.5)
        code, out, err = live.stop(signal.SIGINT)
        assert code == 0, err
        code, _, werr = writer.stop(signal.SIGINT)
        assert code == 0, werr
    finally:
        server.kill()
        server.wait()
    replay = tcptrace_cmd("-r", str(cap), "--stuck", "CLOSE_WAIT=1s", "--json")
    assert replay.returncode == 0, replay.stderr
    records = [json.loads(line) for line in replay.stdout.splitlines()]
    live_records = [json.loads(line) for line in out.splitlines()]

    def stuck(recs: list[dict], kind: str) -> list[tuple]:
        return [
            (r["pid"], r["local_port"], r["remote_port"], r["state"])
            for r in recs
            if r["type"] == kind
        ]

    assert stuck(records, "stuck") == stuck(live_records, "stuck")
    (report,) = [r for r in records if r["type"] == "stuck"]
    assert report["pid"] == server.pid and report["local_port"] == port
    assert report["age_ns"] == 1_000_000_000
    still = [r for r in records if r["type"] == "still_stuck"]
    assert stuck(still, "still_stuck") == stuck(records, "stuck") and not any(
        r["type"] == "transition" for r in records
    ), records
    assert 2.0e9 < still[0]["age_ns"] < 30e9


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_replay_text_equals_the_live_text(tmp_path: Path) -> None:
    port = free_port()
    cap = tmp_path / "t.cap"
    out, werr = side_by_side(["-T", "none", "-n"], cap, port)
    replay = tcptrace_cmd("-r", str(cap), "-T", "none", "-n")
    assert replay.returncode == 0, replay.stderr
    live_body, live_summary = _split(out.splitlines())
    again_body, again_summary = _split(replay.stdout.splitlines())
    assert live_body[0] == again_body[0]  # the header
    assert len(again_body) == len(live_body) == CONNECTIONS * 12 + 1

    def without_in_old(lines: list[str]) -> list[str]:
        return sorted(line.rsplit(None, 1)[0] for line in lines)  # IN OLD: a clock field

    assert without_in_old(live_body[1:]) == without_in_old(again_body[1:])
    # the summary: the writer's own (stderr) exactly; the live one's counts
    assert "\n".join(again_summary) in werr
    assert again_summary[-1] == live_summary[-1]  # traced, shown, lost
    assert [row.split()[:2] for row in again_summary] == [row.split()[:2] for row in live_summary]


def _split(lines: list[str]) -> tuple[list[str], list[str]]:
    blank = lines.index("")
    return lines[:blank], lines[blank + 1 :]


def test_replay_as_an_unprivileged_user_with_filters(tmp_path: Path) -> None:
    port = free_port()
    cap = tmp_path / "t.cap"
    writer = Running("--port", str(port), "--write", str(cap), stdout=subprocess.DEVNULL)
    writer.wait_ready()
    for _ in range(2):
        connect_and_close(port, hold=HOLD)
    time.sleep(0.3)
    code, _, err = writer.stop(signal.SIGINT)
    assert code == 0, err
    # where that user can read it (pytest's own directories are root's alone)
    shared = Path(tempfile.mkdtemp(prefix="tcptrace-cap-"))
    shared.chmod(0o755)
    cap = Path(shutil.copy(cap, shared / "t.cap"))
    cap.chmod(0o644)
    as_root = tcptrace_cmd("-r", str(cap), "-T", "none", "-n")
    with readable_tree() as tree:
        _replays_as_nobody(cap, tree, as_root.stdout)
    shutil.rmtree(shared)


def _replays_as_nobody(cap: Path, tree: Path, as_root: str) -> None:
    """What root's replay printed, printed by uid 65534 from a copy it can read (the
    checkout may be private to root), with filters, and without bcc."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(tree), "HOME": "/"}

    def as_nobody(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*AS_NOBODY, PYTHON, "-m", "tcptrace", *args],
            capture_output=True, text=True, timeout=60, env=env, cwd="/", **kwargs,
        )  # fmt: skip

    replayed = as_nobody("-r", str(cap), "-T", "none", "-n")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == as_root
    with open(cap, "rb") as stdin:  # -r -: from standard input
        piped = as_nobody("-r", "-", "-T", "none", "-n", stdin=stdin)
    assert piped.returncode == 0 and piped.stdout == as_root, piped.stderr
    # filters in user space: --state and --slower-than
    est = as_nobody("-r", str(cap), "-T", "none", "-n", "--state", "FIN_WAIT1")
    lines = [line for line in est.stdout.splitlines() if "->" in line][1:]  # (header)
    assert len(lines) == 4 and all("FIN_WAIT1" in line for line in lines), est.stdout
    slow = as_nobody("-r", str(cap), "--json", "--slower-than", "ESTABLISHED=20ms")
    records = [json.loads(line) for line in slow.stdout.splitlines()]
    shown = [r for r in records if r["type"] == "transition"]
    assert len(shown) == 4 and all(r["old"] == "ESTABLISHED" for r in shown)
    assert records[-1]["faster"] == 2 * 12 - 4
    # the path of a replay imports no bcc and runs no preflight: shown by a user who
    # could not pass it
    probe = subprocess.run(
        [*AS_NOBODY, PYTHON, "-c",
         "import sys; from tcptrace import cli; sys.argv = ['tcptrace', '-r', sys.argv[1], '-q'];\n"
         "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
         "print(code, 'bcc' in sys.modules)", str(cap)],
        capture_output=True, text=True, cwd="/", timeout=60, env=env,
    )  # fmt: skip
    assert probe.stdout.split()[-2:] == ["0", "False"], probe.stderr


def test_a_write_into_a_pipe_read_late_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    cap = tmp_path / "t.cap"
    read_fd, write_fd = os.pipe()
    writer = Running("--port", str(port), "--write", "-", stdout=write_fd)
    os.close(write_fd)
    writer.wait_ready()
    count = 300
    with listener(port=port, backlog=128) as srv:
        for _ in range(count):  # ~3,300 records, far past a pipe's 64 KiB
            cli = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            cli.close()
            conn.close()
        time.sleep(1.0)  # nobody reads the pipe meanwhile: the writer blocks
        with open(cap, "wb") as f:
            writer.proc.send_signal(signal.SIGINT)
            while True:
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                f.write(chunk)
    os.close(read_fd)
    code, _, err = writer.wait()
    assert code == 0, err
    replay = tcptrace_cmd("-r", str(cap), "--json")
    assert replay.returncode == 0, replay.stderr
    records = [json.loads(line) for line in replay.stdout.splitlines()]
    summary = records[-1]
    shown = len(records) - 1
    assert summary["written"] == shown
    assert shown + summary["lost"] + summary["held"] == summary["transitions_traced"]
    assert summary["lost"] == 0, summary
    assert shown >= count * 10


def test_bad_captures_are_one_line_exit_1(tmp_path: Path) -> None:
    port = free_port()
    cap = tmp_path / "t.cap"
    writer = Running("--port", str(port), "--write", str(cap), stdout=subprocess.DEVNULL)
    writer.wait_ready()
    connect_and_close(port, hold=HOLD)
    time.sleep(0.3)
    assert writer.stop(signal.SIGINT)[0] == 0
    data = cap.read_bytes()
    cut = tmp_path / "cut.cap"
    cut.write_bytes(data[: len(data) - 20])  # inside the END record
    newer = tmp_path / "newer.cap"
    newer.write_bytes(data[:8] + (7).to_bytes(2, "little") + data[10:])
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(4096))
    # a text file such as /etc/services (which a minimal Debian 11 lacks)
    services = tmp_path / "services"
    services.write_text("http\t\t80/tcp\t\twww\t\t# WorldWideWeb HTTP\n" * 40)
    cases = {
        cut: "truncated",
        newer: "written by a newer tcptrace: format version 7, this one reads 1",
        garbage: "not a tcptrace capture",
        services: "not a tcptrace capture",
        tmp_path / "missing": "No such file",
    }
    for path, message in cases.items():
        result = tcptrace_cmd("-r", str(path), "-T", "none", "-n")
        assert result.returncode == 1, (path, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and message in lines[0], (path, result.stderr)
        assert lines[0].startswith(f"tcptrace: {path}")
    # a truncated file prints what it holds first, then the line
    result = tcptrace_cmd("-r", str(cut), "-T", "none", "-n")
    assert sum("->" in line for line in result.stdout.splitlines()) == 1 + 12  # header, lines


def test_a_full_disk_is_one_line_exit_1_and_the_capture_stays_readable(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], check=True)
    try:
        port = free_port()
        cap = small / "t.cap"
        writer = Running("--port", str(port), "--write", str(cap), stdout=subprocess.DEVNULL)
        writer.wait_ready()
        with listener(port=port, backlog=128) as srv:
            # three connections apart (small batches that fit), then ~1,000 records of
            # 104 bytes: far past 16 KiB
            for n in range(103):
                cli = socket.create_connection(("127.0.0.1", port))
                conn, _ = srv.accept()
                cli.close()
                conn.close()
                if n < 3:
                    time.sleep(0.2)
        code, _, err = writer.wait(timeout=30)
        assert code == 1
        lines = err[err.index(READY) + len(READY) :].split("\n", 1)[1].splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"tcptrace: {cap}: cannot write: No space left on device; ")
        assert "whole records written before stay readable" in lines[0]
        # replayed: the whole records, then the line naming where the file ends
        replay = tcptrace_cmd("-r", str(cap), "-T", "none", "-n")
        assert replay.returncode == 1
        assert sum(" -> " in line for line in replay.stdout.splitlines()) > 1 + 3 * 10
        assert replay.stderr.count("\n") == 1 and "truncated" in replay.stderr
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_write_to_dev_full_is_one_line_before_tracing() -> None:
    result = tcptrace_cmd("--write", "/dev/full", "-d", "1")
    assert result.returncode == 1
    assert result.stderr == "tcptrace: /dev/full: cannot write: No space left on device\n"


def test_a_write_that_fails_before_tracing_leaves_no_capture(tmp_path: Path) -> None:
    """--metrics on a port in use fails after the capture is opened, before tracing:
    no header-only file that replays as a capture stopped early; a file that was there
    stays as it was; --write - writes nothing."""
    cap = tmp_path / "t.cap"
    kept = tmp_path / "old.cap"
    kept.write_bytes(b"what was there")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for path in (cap, kept):
            result = tcptrace_cmd("--write", str(path), "--metrics", port, "-d", "1")
            assert result.returncode == 1
            assert result.stderr.count("\n") == 1 and "already in use" in result.stderr
        piped = tcptrace_cmd("--write", "-", "--metrics", port, "-d", "1")
        assert piped.returncode == 1 and piped.stdout == ""
    assert not cap.exists()
    assert kept.read_bytes() == b"what was there"
    # and a run that traces replaces it
    result = tcptrace_cmd("--write", str(kept), "-d", "0.5")
    assert result.returncode == 0, result.stderr
    assert tcptrace_cmd("-r", str(kept), "-q").returncode == 0


def churn(port: int, connections: int) -> None:
    with listener(port=port, backlog=128) as srv:
        for _ in range(connections):
            cli = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            cli.close()
            conn.close()


def written_by(err: str) -> int:
    """The writer's own count of what it wrote (its summary on stderr: 'N shown')."""
    line = next(line for line in err.splitlines() if "transitions traced" in line)
    return int(line.split(", ")[1].split()[0])


@pytest.mark.parametrize("kept", [None, 3])
def test_rotation_under_churn_no_gap_no_duplicate(tmp_path: Path, kept) -> None:
    port = free_port()
    cap = tmp_path / "t.cap"
    args = ["--port", str(port), "--write", str(cap), "-C", "64k"]
    if kept:
        args += ["--file-count", str(kept)]
    writer = Running(*args, stdout=subprocess.DEVNULL)
    writer.wait_ready()
    churn(port, 1500)  # ~15,000 records, ~1.6 MB: files of 64 KiB and a batch more
    time.sleep(0.5)
    code, _, err = writer.stop(signal.SIGINT)
    assert code == 0, err
    files = sorted(tmp_path.glob("t.cap*"))
    if kept:
        assert len(files) == kept
        assert files[0].name != "t.cap"  # the oldest went
    else:
        assert len(files) >= 5
        assert [f.name for f in files[:3]] == ["t.cap", "t.cap.000001", "t.cap.000002"]
    for f in files[:-1]:
        assert f.stat().st_size >= 64 * 1024  # ended by the record that took it past
    # each file reads alone (its own header, clock and places)
    alone = tcptrace_cmd("-r", str(files[1]), "--json")
    assert alone.returncode == 0, alone.stderr
    assert all(json.loads(line)["pid"] for line in alone.stdout.splitlines()[:-1])
    # all of them, by a quoted glob, in time order whatever the order given
    replay = tcptrace_cmd("-r", f"{cap}*", "--json")
    assert replay.returncode == 0, replay.stderr
    records = [json.loads(line) for line in replay.stdout.splitlines()]
    transitions, summary = records[:-1], records[-1]
    keys = [
        (r["ts_ns"], r["local_port"], r["remote_port"], r["old"], r["new"]) for r in transitions
    ]
    assert len(set(keys)) == len(keys)  # no duplicate
    reverse = tcptrace_cmd("-r", *map(str, reversed(files)), "--json")
    assert reverse.stdout == replay.stdout
    # the writer's summary is the capture's (END, in the last file)
    assert summary["transitions_traced"] == summary["written"] + summary["held"] or kept
    assert summary["lost"] == 0
    if kept is None:
        assert len(transitions) == written_by(err)  # no gap: every record written is read
    else:
        assert 0 < len(transitions) < written_by(err)
