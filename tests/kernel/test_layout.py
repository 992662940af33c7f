"""bpf/tcptrace.h is the one definition of the event layout: the Python mirror must agree."""

import re
from pathlib import Path

from tcptrace.kernel import events
from tcptrace.states import NSTATES, TcpState

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "tcptrace.h"
PROGRAM = HEADER.parent / "tcptrace.bpf.c"
C_SIZES = {"__u64": 8, "__u32": 4, "__u16": 2, "__u8": 1, "char": 1}
# A struct inside another, as C names it: its size is the mirrored struct's.
NESTED = {"struct tcptrace_event": events.EVENT_SIZE}


def header_text() -> str:
    return HEADER.read_text()


def defines(text: str) -> dict[str, int]:
    return {
        name: int(value, 0)
        for name, value in re.findall(r"#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text)
    }


def c_fields(struct: str = "tcptrace_event") -> list[tuple[str, str, int]]:
    text = header_text()
    body = re.search(rf"struct {struct}\s*{{(.*?)}};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    consts = defines(text)
    fields = []
    for ctype, name, length in re.findall(
        r"(__u64|__u32|__u16|__u8|char|struct \w+)\s+(\w+)(?:\[(\w+)\])?;", body
    ):
        n = int(consts.get(length, length)) if length else 1
        fields.append((name, ctype, n))
    return fields


def c_size(fields: list[tuple[str, str, int]]) -> int:
    """The struct's size, checking that C needs no padding: C lays the fields out
    naturally aligned, and the packed Python format ("=") must equal that byte for byte."""
    offset = 0
    for name, ctype, n in fields:
        size = NESTED.get(ctype) or C_SIZES[ctype]
        align = 8 if ctype in NESTED else size  # the nested struct leads with a __u64
        assert offset % align == 0, f"padding before {name}"
        offset += size * n
    assert offset % 8 == 0, "padding at the end"
    return offset


def test_fields_match_header():
    assert c_fields() == list(events.EVENT_FIELDS)


def test_size_matches_c_layout():
    assert events.EVENT_SIZE == c_size(c_fields()) == 104


def test_life_record_matches_header():
    """--lifetime's record: the closing event first (its ts_ns is what the perf reader
    orders records by), then the connection's states."""
    fields = c_fields("tcptrace_life")
    assert fields == list(events.LIFE_FIELDS)
    assert fields[0] == ("ev", "struct tcptrace_event", 1)
    assert events.EVENT_FIELDS[0][0] == "ts_ns"
    assert events.LIFE_SIZE == c_size(fields) == 192
    assert defines(header_text())["TCPTRACE_LIFE_VISITS"] == events.LIFE_VISITS


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
    assert consts["TCPTRACE_F_TW_KNOWN"] == events.F_TW_KNOWN
    assert consts["TCPTRACE_F_TW"] == events.F_TW
    assert consts["TCPTRACE_F_TW_PEER_FIN"] == events.F_TW_PEER_FIN
    # every flag the kernel sets (bits 0-15), both ways, as the counters below
    c_flags = {
        k.removeprefix("TCPTRACE_F_"): v for k, v in consts.items() if k.startswith("TCPTRACE_F_")
    }
    py_flags = {
        k.removeprefix("F_"): v
        for k, v in vars(events).items()
        if k.startswith("F_") and isinstance(v, int) and v < 0x10000
    }
    assert c_flags == py_flags
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


def test_user_space_scan_reads_sk_info_as_the_program_lays_it_out():
    """kernel/mapscan.py decodes the per-socket map's values (struct sk_info, with
    KEEP_ENDS) where the iterator is refused: its fields up to the ends, in order."""
    from tcptrace.kernel.mapscan import SK_INFO_OFFSETS

    text = PROGRAM.read_text()
    body = re.search(r"struct sk_info\s*{(.*?)};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    sizes = {"u64": 8, "u32": 4, "u16": 2, "u8": 1, "char": 1, "struct sk_ends": 40}
    offset, found = 0, {}
    for ctype, name, length in re.findall(
        r"(u64|u32|char|struct sk_ends)\s+(\w+)(?:\[(\w+)\])?;", body
    ):
        n = {"TCPTRACE_COMM_LEN": events.COMM_LEN}.get(length, 1) if length else 1
        found[name] = offset
        offset += sizes[ctype] * n
        if name == "ends":
            break
    assert found == SK_INFO_OFFSETS
    ends = re.search(r"struct sk_ends\s*{(.*?)};", text, re.S).group(1)
    assert re.findall(r"(u\d+) (\w+)", ends) == [
        ("u8", "saddr"), ("u8", "daddr"), ("u16", "sport"), ("u16", "dport"),
        ("u16", "family"), ("u16", "reserved"),
    ]  # fmt: skip
