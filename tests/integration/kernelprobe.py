"""What the kernel allows, asked without tcptrace's loader: the oracle of test_check.py.

A trivial program (r0 = 0; exit) of the kind asked about, loaded with the bpf()
system call through ctypes, its errno read: no bcc, no compiler, none of the code
under test but the BTF parser that finds the attach target's id.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

from tcptrace.kernel.btf import KIND_FUNC, Btf

# bpf(2) by architecture (the syscall has no libc wrapper)
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28
# union bpf_attr's BPF_PROG_LOAD member up to attach_btf_id and its union (120 bytes)
ATTR_SIZE = 120
ATTR_HEAD = struct.Struct("=IIQQIIQII")  # prog_type ... prog_flags
EXPECTED_ATTACH_TYPE_OFFSET = 68
ATTACH_BTF_ID_OFFSET = 108
RETURN_ZERO = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)


BPF_PROG_TYPE_TRACEPOINT = 5
BPF_FUNC_GET_CURRENT_ANCESTOR_CGROUP_ID = 123
# r1 = 1; call bpf_get_current_ancestor_cgroup_id; r0 = 0; exit
CALL_ANCESTOR = (
    struct.pack("<BBhi", 0xB7, 1, 0, 1)
    + struct.pack("<BBhi", 0x85, 0, 0, BPF_FUNC_GET_CURRENT_ANCESTOR_CGROUP_ID)
    + RETURN_ZERO
)


def load_errno(
    prog_type: int, attach_type: int = 0, attach_btf_id: int = 0, code: bytes = RETURN_ZERO
) -> int:
    """0 when the kernel loads a program of this kind (by default the trivial one), else
    its errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    ATTR_HEAD.pack_into(
        attr, 0, prog_type, len(code) // 8, ctypes.addressof(insns),
        ctypes.addressof(license_), 0, 0, 0, 0, 0,
    )  # fmt: skip
    struct.pack_into("=I", attr, EXPECTED_ATTACH_TYPE_OFFSET, attach_type)
    struct.pack_into("=I", attr, ATTACH_BTF_ID_OFFSET, attach_btf_id)
    fd = libc.syscall(SYS_BPF[platform.machine()], BPF_PROG_LOAD, attr, ATTR_SIZE)
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return 0


def map_iterator_errno() -> int:
    """0 when the kernel loads a map-element iterator (what tcptrace's scan is), else why not."""
    target = Btf.load().find("bpf_iter_bpf_map_elem", KIND_FUNC, "function")
    return load_errno(BPF_PROG_TYPE_TRACING, BPF_TRACE_ITER, target)


def ancestor_helper_errno() -> int:
    """0 when a tracepoint program may call bpf_get_current_ancestor_cgroup_id (--cgroup
    in the kernel), else why not (Debian 11's 5.10: EINVAL, an unknown function)."""
    return load_errno(BPF_PROG_TYPE_TRACEPOINT, code=CALL_ANCESTOR)


ACCEPT_EXITS = ("sys_exit_accept", "sys_exit_accept4")


def attached_programs() -> list[tuple[str, str]]:
    """(fd_type, tracepoint) of what tcptrace attaches here, sorted as bpftool perf lists
    them: the tracepoint program, the nested raw-tracepoint one, and the accept hook's
    two where the kernel has syscall tracepoints (asked of tracefs directly)."""
    found = [("raw_tracepoint", "inet_sock_set_state"), ("tracepoint", "inet_sock_set_state")]
    for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        events = os.path.join(root, "events", "syscalls")
        if all(os.path.exists(os.path.join(events, name, "format")) for name in ACCEPT_EXITS):
            found += [("tracepoint", name) for name in ACCEPT_EXITS]
            break
    return sorted(found)
