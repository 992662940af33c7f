"""bpf/tcptrace.h is the one definition of the event layout: the Python mirror must agree."""

import re
from pathlib import Path

from tcptrace.kernel import events
from tcptrace.states import NSTATES, TcpState

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "tcptrace.h"
PROGRAM = HEADER.parent / "tcptrace.bpf.c"
C_SIZES = {"__u64": 8, "__u32": 4, "__u16": 2, "__u8": 1, "char": 1}


def header_text() -> str:
    return HEADER.read_text()


def defines(text: str) -> dict[str, int]:
    return {
        name: int(value, 0)
        for name, value in re.findall(r"#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text)
    }


def c_fields() -> list[tuple[str, str, int]]:
    text = header_text()
    body = re.search(r"struct tcptrace_event\s*{(.*?)};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    consts = defines(text)
    fields = []
    for ctype, name, length in re.findall(
        r"(__u64|__u32|__u16|__u8|char)\s+(\w+)(?:\[(\w+)\])?;", body
    ):
        n = int(consts.get(length, length)) if length else 1
        fields.append((name, ctype, n))
    return fields


def test_fields_match_header():
    assert c_fields() == list(events.EVENT_FIELDS)


def test_size_matches_c_layout():
    # C lays the fields out naturally aligned; the struct must need no padding
    # so that the packed Python format ("=") equals the C layout byte for byte.
    offset = 0
    for _name, ctype, n in c_fields():
        size = C_SIZES[ctype]
        assert offset % size == 0, f"padding before {_name}"
        offset += size * n
    assert offset % 8 == 0
    assert events.EVENT_SIZE == offset == 104


def test_constants_match_header():
    consts = defines(header_text())
    assert consts["TCPTRACE_COMM_LEN"] == events.COMM_LEN
    assert consts["TCPTRACE_NSTATES"] == NSTATES
    assert consts["TCPTRACE_HIST_SUB_BITS"] == events.HIST_SUB_BITS
    assert consts["TCPTRACE_HIST_SLOTS"] == events.HIST_SLOTS
    assert consts["TCPTRACE_F_DELTA_KNOWN"] == events.F_DELTA_KNOWN
    assert consts["TCPTRACE_F_OWNER_KNOWN"] == events.F_OWNER_KNOWN
    assert consts["TCPTRACE_F_NETNS_KNOWN"] == events.F_NETNS_KNOWN
    assert consts["TCPTRACE_F_STUCK"] == events.F_STUCK
    # every counter index, both ways: a counter added on one side only fails here
    c_counters = {
        k.removeprefix("TCPTRACE_C_"): v for k, v in consts.items() if k.startswith("TCPTRACE_C_")
    }
    py_counters = {k.removeprefix("C_"): v for k, v in vars(events).items() if k.startswith("C_")}
    assert c_counters == py_counters
    assert {"SEEN", "SUBMITTED", "DROPPED", "SHED", "NO_START", "INSERTED", "DELETED"} <= set(
        py_counters
    )
    assert consts["TCPTRACE_NCOUNTERS"] == events.NCOUNTERS
    assert max(v for k, v in consts.items() if k.startswith("TCPTRACE_C_")) < events.NCOUNTERS


def test_program_state_numbers_match_table():
    consts = defines(PROGRAM.read_text())
    for state in TcpState:
        if state is TcpState.NEW_SYN_RECV:
            continue
        assert consts[f"TT_{state.name}"] == int(state), state.name
